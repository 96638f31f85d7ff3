"""Replicates, intervals, ties and verdicts: the statistics every figure and claim uses.

A figure is a mean over replicates (sampling seeds, or training seeds where a claim compares trained
models) with its standard error and a 95% Student-t interval.  Two rules, stated once here and quoted
by the leaderboard and the scorecard:

- **Ranks.**  A configuration's rank is 1 + the number of configurations whose whole 95% interval lies
  below (better than) its own; configurations whose intervals overlap share a rank and are marked tied
  (shown ``=3``).  A configuration with one seed has no interval and gets no rank.
- **Verdicts.**  A comparison "A beats B (by at least ``margin``)" is decided by a one-sided test at 95%
  on the difference of means: paired over common seeds when both sides share at least two seeds (the same
  sampling seeds give the same initial noise, so their noise largely cancels), Welch's unequal-variance
  test otherwise.  ``pass``: the 95% lower confidence bound of the improvement is above ``margin``;
  ``fail``: its 95% upper bound is below ``margin`` (significantly short of the claim, including the wrong
  direction when the margin is 0); otherwise ``inconclusive``.  Equivalence ("within ``tol``") is the two
  one-sided tests: ``pass`` when the 90% interval of the difference lies inside ``±tol``, ``fail`` when it
  lies wholly outside, else ``inconclusive``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from scipy.special import stdtrit  # scipy.stats.t.ppf's own kernel, without scipy.stats' 1 s import

LEVEL = 0.95  # two-sided interval level of every figure; one-sided tests are at the same 95%


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t with ``dof`` degrees of freedom."""
    return float(stdtrit(dof, p))


def _clean(values: Iterable) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, standard error and 95% t-interval of replicate values."""

    n: int
    mean: float
    sd: float
    sem: float
    lo: float
    hi: float

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.lo)

    def text(self, digits: int = 2) -> str:
        """``8.02 ± 0.99 (n=5)``: the mean and the half-width of its 95% interval."""
        if self.n == 0:
            return "–"
        if not self.has_interval:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {(self.hi - self.lo) / 2:.{digits}f} (n={self.n})"


NAN = float("nan")
EMPTY = Summary(0, NAN, NAN, NAN, NAN, NAN)


def summarize(values: Iterable) -> Summary:
    """Summary of the finite values (NaN, inf and None are dropped)."""
    v = _clean(values)
    n = len(v)
    if n == 0:
        return EMPTY
    mean = sum(v) / n
    if n == 1:
        return Summary(1, mean, NAN, NAN, NAN, NAN)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    sem = sd / math.sqrt(n)
    h = t_quantile(0.5 + LEVEL / 2, n - 1) * sem
    return Summary(n, mean, sd, sem, mean - h, mean + h)


def rank_with_ties(summaries: Sequence[Summary], lower_is_better: bool = True) -> list[tuple[int | None, bool]]:
    """(rank, tied) per summary, by the module's rank rule; (None, False) for a summary without an interval."""
    out: list[tuple[int | None, bool]] = []
    for i, s in enumerate(summaries):
        if not s.has_interval:
            out.append((None, False))
            continue
        better = tied = 0
        for j, o in enumerate(summaries):
            if j == i or not o.has_interval:
                continue
            if (o.hi < s.lo) if lower_is_better else (o.lo > s.hi):
                better += 1
            elif not ((o.lo > s.hi) if lower_is_better else (o.hi < s.lo)):
                tied += 1  # the intervals overlap
        out.append((1 + better, tied > 0))
    return out


def rank_label(rank: int | None, tied: bool, n_seeds: int = 2) -> str:
    if rank is None:
        return "1 seed" if n_seeds == 1 else "–"
    return f"={rank}" if tied else str(rank)


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------
PASS, FAIL, INCONCLUSIVE, NOT_RUN = "pass", "fail", "inconclusive", "not run"


@dataclass(frozen=True)
class Difference:
    """The improvement d = mean(B) - mean(A) (lower is better) or mean(A) - mean(B), with its test."""

    d: float
    se: float
    dof: float
    paired: bool
    n_a: int
    n_b: int

    def bound(self, one_sided: float) -> tuple[float, float]:
        """(lower, upper) confidence bounds at the one-sided level ``one_sided`` (e.g. 0.95)."""
        if not (self.se > 0 and math.isfinite(self.se)):
            return (self.d, self.d) if self.se == 0 else (-math.inf, math.inf)
        h = t_quantile(one_sided, self.dof) * self.se
        return self.d - h, self.d + h

    def test_name(self) -> str:
        return (f"paired t over {self.n_a} seeds" if self.paired
                else f"Welch t, n={self.n_a} vs {self.n_b}")


def _as_map(values) -> dict:
    if isinstance(values, Mapping):
        return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    return dict(enumerate(_clean(values)))


def difference(a, b, *, lower_is_better: bool = True, paired: bool | None = None) -> Difference | None:
    """The improvement of A over B.  ``a``/``b``: values, or mappings replicate-key -> value (the key, e.g. the
    sampling seed, pairs the two sides).  Paired when both are mappings sharing >= 2 keys (unless
    ``paired=False``); None when a side has no value or neither test has a degree of freedom."""
    ma, mb = _as_map(a), _as_map(b)
    if not ma or not mb:
        return None
    sign = 1.0 if lower_is_better else -1.0
    common = sorted(set(ma) & set(mb), key=str) if isinstance(a, Mapping) and isinstance(b, Mapping) else []
    if paired is not False and len(common) >= 2:
        diffs = [sign * (mb[k] - ma[k]) for k in common]
        s = summarize(diffs)
        return Difference(s.mean, s.sem, s.n - 1, True, s.n, s.n)
    sa, sb = summarize(ma.values()), summarize(mb.values())
    d = sign * (sb.mean - sa.mean)
    if sa.n < 2 and sb.n < 2:
        return Difference(d, NAN, NAN, False, sa.n, sb.n)
    va = sa.sd ** 2 / sa.n if sa.n >= 2 else 0.0
    vb = sb.sd ** 2 / sb.n if sb.n >= 2 else 0.0
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(d, 0.0, math.inf, False, sa.n, sb.n)
    # Welch-Satterthwaite degrees of freedom (a one-value side contributes no variance and no dof)
    den = (va ** 2 / (sa.n - 1) if sa.n >= 2 else 0.0) + (vb ** 2 / (sb.n - 1) if sb.n >= 2 else 0.0)
    dof = (va + vb) ** 2 / den if den > 0 else math.inf
    return Difference(d, se, dof, False, sa.n, sb.n)


@dataclass(frozen=True)
class Verdict:
    status: str
    text: str          # what our records show, with the test
    why: str = ""      # one line for every status but pass


def beats(a, b, *, margin: float = 0.0, lower_is_better: bool = True, what: str = "FID",
          names: tuple[str, str] = ("A", "B"), paired: bool | None = None, fmt: str = ".2f") -> Verdict:
    """Verdict on "A beats B by more than ``margin``" (module docstring: one-sided test at 95%)."""
    diff = difference(a, b, lower_is_better=lower_is_better, paired=paired)
    sa, sb = summarize(_as_map(a).values()), summarize(_as_map(b).values())
    if diff is None:
        return Verdict(NOT_RUN, "", f"no {what} for {names[0] if sa.n == 0 else names[1]}")
    lo, hi = diff.bound(LEVEL)
    side = f"{what} {names[0]} {sa.text()} vs {names[1]} {sb.text()}"
    if not math.isfinite(diff.se):
        return Verdict(INCONCLUSIVE, side, "one replicate per side: no estimate of the noise")
    gain = f"improvement {diff.d:{fmt}}, 95% bounds [{lo:{fmt}}, {hi:{fmt}}] ({diff.test_name()})"
    text = f"{side}; {gain}"
    m = f" {margin:{fmt}}" if margin else " 0"
    if lo > margin:
        return Verdict(PASS, text)
    if hi < margin:
        return Verdict(FAIL, text, f"{names[0]} is significantly {'short of the margin' if margin else 'worse'}"
                                   f" (upper bound {hi:{fmt}} <{m})")
    return Verdict(INCONCLUSIVE, text, f"difference inside the noise (bounds [{lo:{fmt}}, {hi:{fmt}}] contain{m})")


def equivalent(a, b, *, tol: float, what: str = "FID", names: tuple[str, str] = ("A", "B"),
               paired: bool | None = None, fmt: str = ".2f") -> Verdict:
    """Verdict on "A equals B within ±tol" (two one-sided tests at 95%, i.e. the 90% interval)."""
    diff = difference(a, b, lower_is_better=True, paired=paired)  # d = B - A
    sa, sb = summarize(_as_map(a).values()), summarize(_as_map(b).values())
    if diff is None:
        return Verdict(NOT_RUN, "", f"no {what} for {names[0] if sa.n == 0 else names[1]}")
    side = f"{what} {names[0]} {sa.text()} vs {names[1]} {sb.text()}"
    if not math.isfinite(diff.se):
        return Verdict(INCONCLUSIVE, side, "one replicate per side: no estimate of the noise")
    lo, hi = diff.bound(LEVEL)
    text = (f"{side}; difference {-diff.d:{fmt}}, 90% interval [{-hi:{fmt}}, {-lo:{fmt}}] ({diff.test_name()}), "
            f"tolerance ±{tol:{fmt}}")
    if -tol < lo and hi < tol:
        return Verdict(PASS, text)
    if lo > tol or hi < -tol:
        return Verdict(FAIL, text, f"the difference is significantly larger than ±{tol:{fmt}}")
    return Verdict(INCONCLUSIVE, text, f"the 90% interval reaches past ±{tol:{fmt}}: more seeds needed to decide")


def at_most(values, bound: float, *, what: str = "FID", fmt: str = ".2f") -> Verdict:
    """Verdict on "the mean of ``values`` is below ``bound``" (one-sided test at 95% against a constant)."""
    return _vs_bound(values, bound, below=True, what=what, fmt=fmt)


def at_least(values, bound: float, *, what: str = "value", fmt: str = ".2f") -> Verdict:
    """Verdict on "the mean of ``values`` is above ``bound``" (one-sided test at 95% against a constant)."""
    return _vs_bound(values, bound, below=False, what=what, fmt=fmt)


def _vs_bound(values, bound: float, *, below: bool, what: str, fmt: str) -> Verdict:
    s = summarize(_as_map(values).values())
    if s.n == 0:
        return Verdict(NOT_RUN, "", f"no {what}")
    text = f"{what} {s.text()} vs bound {bound:{fmt}}"
    if s.n < 2:
        return Verdict(INCONCLUSIVE, text, "one replicate: no estimate of the noise")
    h = t_quantile(LEVEL, s.n - 1) * s.sem
    lo, hi = s.mean - h, s.mean + h
    text += f" (95% one-sided bounds [{lo:{fmt}}, {hi:{fmt}}])"
    good, bad = (hi < bound, lo > bound) if below else (lo > bound, hi < bound)
    if good:
        return Verdict(PASS, text)
    if bad:
        return Verdict(FAIL, text, f"significantly {'above' if below else 'below'} the bound {bound:{fmt}}")
    return Verdict(INCONCLUSIVE, text, f"the bound {bound:{fmt}} is inside the noise")


def all_of(verdicts: Sequence[Verdict], labels: Sequence[str] | None = None, *, sep: str = "; ") -> Verdict:
    """Verdict on a claim made of several comparisons, all of which must hold: ``fail`` when any fails, else
    ``inconclusive`` when any is, else ``not run`` when any part lacked records, else ``pass``.  The text joins
    every part (prefixed by its label); ``why`` joins the whys of the parts that decide the status."""
    labels = list(labels) if labels is not None else [""] * len(verdicts)
    if not verdicts:
        return Verdict(NOT_RUN, "", "nothing to compare")
    text = sep.join(f"{lab}: {v.text}" if lab else v.text for lab, v in zip(labels, verdicts) if v.text)
    for status in (FAIL, INCONCLUSIVE, NOT_RUN):
        why = [f"{lab}: {v.why}" if lab else v.why for lab, v in zip(labels, verdicts) if v.status == status]
        if why:
            return Verdict(status, text, sep.join(why))
    return Verdict(PASS, text)


def scaled(values, factor: float):
    """Replicate values (list or mapping) multiplied by ``factor``, keyed alike (e.g. 1.47 x a reference)."""
    if isinstance(values, Mapping):
        return {k: float(v) * factor for k, v in values.items()}
    return [float(v) * factor for v in values]
