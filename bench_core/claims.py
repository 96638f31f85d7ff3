"""Helpers for claims and tables: select records (a pandas DataFrame of them) and turn replicates into the
input of ``bench_core.stats``' verdicts.  Shared by every paper; none of them imports pandas itself."""
from __future__ import annotations

from .plugin import ClaimResult

def ok_rows(df, *present: str, **eq):
    """Records (a DataFrame) with status ok, a value (not None/NaN) in every column named in ``present``, and the
    given column values; ``opt_<key>=v`` and ``grid_<key>=v`` match one key of ``sampler_opts`` / ``grid``.
    None or an empty frame is returned as it is."""
    if df is None or len(df) == 0:
        return df
    m = df["status"] == "ok"
    for c in present:
        m &= df[c].notna()
    for k, v in eq.items():
        if k.startswith("opt_"):
            key = k[4:]
            m &= df["sampler_opts"].map(lambda o: isinstance(o, dict) and o.get(key) == v)
        elif k.startswith("grid_"):
            key = k[5:]
            m &= df["grid"].map(lambda o: isinstance(o, dict) and o.get(key) == v)
        else:
            m &= df[k] == v
    return df[m]


def train_seed_of(t) -> int:
    """A record's training seed (0 for records from before ``train_seed`` existed: None or NaN)."""
    try:
        return 0 if t is None or t != t else int(t)
    except (TypeError, ValueError):
        return 0


def seed_values(df, col: str = "fid") -> dict:
    """Replicate values of ``col`` keyed by (train_seed, seed): the input of ``bench_core.stats``' verdicts
    (two sides keyed alike are paired).  Duplicate keys (e.g. a re-run) are averaged; NaN values dropped."""
    if df is None or len(df) == 0 or col not in df:
        return {}
    ts = df["train_seed"] if "train_seed" in df else [0] * len(df)
    out: dict = {}
    for t, s, v in zip(ts, df["seed"], df[col]):
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if v == v and abs(v) != float("inf"):
            out.setdefault((train_seed_of(t), int(s)), []).append(v)
    return {k: sum(v) / len(v) for k, v in out.items()}


def combine(parts: list[tuple[str, "ClaimResult"]]) -> "ClaimResult":
    """One verdict from named parts that must all hold (``bench_core.stats.all_of``'s rule: fail if any fails,
    else inconclusive if any is, else not run if any is, else pass)."""
    from bench_core.stats import Verdict, all_of  # noqa: PLC0415 - lazy: scipy only when claims are combined, not at discovery

    v = all_of([Verdict(r.status, r.ours, r.why) for _, r in parts], [name for name, _ in parts])
    return ClaimResult(v.status, v.text, v.why)


def fid_seeds(df, col: str = "fid", **eq) -> dict:
    """``seed_values`` of the ok records matching ``eq`` (``ok_rows``' filters): the replicates of one side of a
    comparison."""
    return seed_values(ok_rows(df, col, **eq), col)


def primary(df):
    """The records of the primary model of each preset: the lowest training seed present (a suite run with
    ``--train-seed K`` shifts every seed by K; extra training seeds of a comparison are left to their claim)."""
    if df is None or len(df) == 0 or "train_seed" not in df:
        return df
    ts = df["train_seed"].map(train_seed_of)
    lowest = ts.groupby(df["reproduction"].astype(str) + "/" + df["model"].astype(str)).transform("min")
    return df[ts == lowest]


def largest_group(df, *cols: str):
    """The rows of the most common combination of ``cols`` (a table or claim compares like with like: the
    same extractor, sample count, ...); ties go to the combination seen first."""
    key = df[cols[0]].astype(str)
    for c in cols[1:]:
        key = key + "|" + df[c].astype(str)
    return df[key == key.value_counts().idxmax()]
