"""Sampler leaderboard, regenerated from records only.

FID is ranked **within comparable groups** only: the same model (reproduction, preset and
``model_hash``), dataset, FID feature extractor, reference set and sample count.  A FID measured
with another extractor, reference or number of samples is a different number and never shares a
ranking.  Several seeds of one sampler configuration are summarised by their mean, standard error and
95% interval (``n_seeds`` says how many); configurations whose intervals overlap share a rank, shown as a
tie (``=3``), and a configuration with one seed has no rank (``bench_core.stats`` states the rule).

This module also holds the small Markdown helpers the rest of ``bench_core.report`` uses
(no dependency on ``tabulate``).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from bench_core.atomic import atomic_path
from bench_core.plugin import discover, discovery_errors
from bench_core.records import Record, records_frame, sampler_label
from bench_core.stats import Summary, rank_label, rank_with_ties, summarize

# every figure is a mean over sampling seeds with its standard error and 95% Student-t interval
INTERVAL_METRICS = ("fid", "kid", "precision", "recall")
_STATS = ("mean", "sem", "ci_lo", "ci_hi")
COLUMNS = [
    "group", "rank", "tied", "reproduction", "model", "sampler", "steps", "nfe",
    *[f"{m}_{st}" for m in INTERVAL_METRICS for st in _STATS], "n_seeds",
    "sec_per_batch", "samples_per_sec", "peak_mem_mb", "device_name",
    # group details (used for headings and filtering)
    "model_hash", "dataset", "fid_extractor", "fid_reference", "num_samples", "device", "dtype",
]
FLOAT_COLUMNS = ("nfe", *[f"{m}_{st}" for m in INTERVAL_METRICS for st in _STATS],
                 "sec_per_batch", "samples_per_sec", "peak_mem_mb")
INT_COLUMNS = ("steps", "n_seeds", "num_samples")
NULLABLE_INT_COLUMNS = ("rank",)  # no rank for a configuration with one seed (no interval)
BOOL_COLUMNS = ("tied",)
STR_COLUMNS = tuple(c for c in COLUMNS if c not in FLOAT_COLUMNS + INT_COLUMNS + NULLABLE_INT_COLUMNS + BOOL_COLUMNS)

_MEAN_FIELDS = ("nfe", "sec_per_batch", "samples_per_sec", "peak_mem_mb")


# --------------------------------------------------------------------------------------------
# Record helpers shared by the report modules
# --------------------------------------------------------------------------------------------
def as_dicts(records: Iterable[Any]) -> list[dict]:
    """Records as plain dicts (accepts dicts and ``Record`` dataclasses)."""
    return [asdict(r) if is_dataclass(r) and not isinstance(r, type) else dict(r) for r in records]


def finite(x: Any) -> float | None:
    """``x`` as a float, or None when missing, non-numeric, NaN or infinite."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def group_key(r: Mapping) -> tuple:
    """The comparable-group key of a record (all strings / ints, sortable)."""
    mhash = str(r.get("model_hash") or "")
    return (
        "" if mhash else str(r.get("reproduction") or ""), str(r.get("model") or ""), mhash,
        str(r.get("dataset") or ""), str(r.get("fid_extractor") or ""), str(r.get("fid_reference") or ""),
        int(r.get("num_samples") or 0),
    )


def group_label(key: tuple | Mapping) -> str:
    """Readable name of a comparable group, e.g. ``ddpm/cpu@1a2b3c4d · digits8 · digits_cnn@… · n=1000``."""
    if isinstance(key, Mapping):
        key = group_key(key)
    rep, model, mhash, dataset, extractor, reference, n = key
    name = f"{rep}/{model}" if rep else (model or "?")
    if mhash:
        name += f"@{mhash[:8]}"
    parts = [name, dataset or "?", extractor or "no extractor", f"n={n}"]
    if reference:
        parts.append(f"ref={reference}")
    return " · ".join(parts)


def label_with_dtype(r: Mapping) -> str:
    """``sampler_label`` plus the dtype when it is not float32 (a different configuration)."""
    label = sampler_label(dict(r))
    dtype = r.get("dtype") or "float32"
    return label if dtype == "float32" else f"{label} [{dtype}]"


# --------------------------------------------------------------------------------------------
# Leaderboard
# --------------------------------------------------------------------------------------------
def _matches(r: dict, key: tuple, group_filter) -> bool:
    if group_filter is None:
        return True
    if callable(group_filter):
        return bool(group_filter(r))
    if isinstance(group_filter, str):
        return group_filter.lower() in group_label(key).lower()
    if isinstance(group_filter, Mapping):
        for k, want in group_filter.items():
            have = r.get(k)
            if isinstance(want, (list, tuple, set, frozenset)):
                if have not in want:
                    return False
            elif have != want:
                return False
        return True
    raise TypeError(f"group_filter must be None, a str, a mapping or a callable, not {type(group_filter).__name__}")


def leaderboard(records: list[dict], *, nfe_max: float | None = None,
                group_filter: str | Mapping | Callable[[dict], bool] | None = None) -> pd.DataFrame:
    """Sampler configurations ranked by FID within comparable groups.

    Uses only records with status "ok" and a finite fid.  A configuration is (sampler label,
    steps, dtype, device); several seeds are averaged (the last record of a repeated seed wins).
    ``nfe_max`` keeps configurations with mean NFE <= the budget (ranks are within the budget).
    ``group_filter``: a substring of the group label, a mapping {record field: value or list of
    values}, or a predicate on the record.
    """
    # 1. comparable groups -> configurations -> seeds (last record of a seed wins)
    configs: dict[tuple, dict[tuple, dict[int, dict]]] = {}
    for r in as_dicts(records):
        if r.get("status", "ok") != "ok" or finite(r.get("fid")) is None:
            continue
        key = group_key(r)
        if not _matches(r, key, group_filter):
            continue
        cfg = (label_with_dtype(r), int(r.get("steps") or 0), str(r.get("device_name") or ""),
               str(r.get("device") or ""), str(r.get("dtype") or "float32"))
        configs.setdefault(key, {}).setdefault(cfg, {})[int(r.get("seed") or 0)] = r

    # 2. one row per configuration: mean, standard error and 95% interval over seeds
    rows = []
    # a group's model name, with its variant label (one per group: the label is part of the model's hash)
    names = {key: _model_name(key[1], [r for by_seed in by_cfg.values() for r in by_seed.values()])
             for key, by_cfg in configs.items()}
    for key in sorted(configs, key=lambda k: _group_order(k, names[k])):
        rep, model, mhash, dataset, extractor, reference, n = key
        group_rows = []
        for cfg, by_seed in configs[key].items():
            label, steps, device_name, device, dtype = cfg
            recs = [by_seed[s] for s in sorted(by_seed)]
            row = {
                "group": group_label(key), "rank": None, "tied": False,
                "reproduction": ", ".join(sorted({str(x.get("reproduction") or "") for x in recs} - {""})) or rep,
                "model": names[key], "sampler": label,
                "steps": steps, "n_seeds": len(recs), "device_name": device_name or device,
                "model_hash": mhash, "dataset": dataset, "fid_extractor": extractor, "fid_reference": reference,
                "num_samples": n, "device": device, "dtype": dtype,
            }
            for f in _MEAN_FIELDS:
                vals = [v for v in (finite(x.get(f)) for x in recs) if v is not None]
                row[f] = sum(vals) / len(vals) if vals else math.nan
            for m in INTERVAL_METRICS:
                st = summarize(finite(x.get(m)) for x in recs)
                row.update({f"{m}_mean": st.mean, f"{m}_sem": st.sem, f"{m}_ci_lo": st.lo, f"{m}_ci_hi": st.hi})
                if m == "fid":
                    row["_fid"] = st
            if nfe_max is not None and not (math.isfinite(row["nfe"]) and row["nfe"] <= nfe_max):
                continue
            group_rows.append(row)
        # 3. rank by FID inside the group: 1 + the configurations whose whole interval is better; overlapping
        #    intervals share a rank (tied); one seed: no interval, no rank (bench_core.stats)
        group_rows.sort(key=lambda x: (x["fid_mean"], x["nfe"] if math.isfinite(x["nfe"]) else math.inf,
                                       x["sampler"], x["steps"], x["device_name"]))
        for row, (rank, tied) in zip(group_rows, rank_with_ties([r.pop("_fid") for r in group_rows])):
            row["rank"], row["tied"] = rank, tied
        rows.extend(group_rows)
    return _typed(pd.DataFrame(rows, columns=COLUMNS))


def _group_order(key: tuple, name: str) -> tuple:
    """Groups sorted by reproduction and model, then by the model's name with its variant label in natural
    order (scale=0.5 before scale=2 before scale=8), then by the rest of the key."""
    natural = tuple((0, float(t), "") if re.fullmatch(r"\d+(?:\.\d+)?", t) else (1, 0.0, t)
                    for t in re.split(r"(\d+(?:\.\d+)?)", name) if t)
    return (key[0], key[1], natural, key)


def _model_name(model: str, recs: list[dict]) -> str:
    """The model's name, with the variant label its reproduction recorded (``metrics.model_label``), e.g.
    ``guided [scale=2]``: several variants of one preset are separate groups (their hashes differ)."""
    labels = sorted({str(m["model_label"]) for m in (r.get("metrics") for r in recs)
                     if isinstance(m, Mapping) and m.get("model_label")})
    return f"{model} [{', '.join(labels)}]" if labels else model


def _nullable_int(values) -> pd.api.extensions.ExtensionArray:
    """Integers with missing values (None, NaN, "") as pandas' nullable Int64."""
    return pd.array([None if finite(v) is None else int(float(v)) for v in values], dtype="Int64")


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in FLOAT_COLUMNS:
        df[c] = df[c].astype("float64")
    for c in INT_COLUMNS:
        df[c] = df[c].astype("int64")
    for c in NULLABLE_INT_COLUMNS:
        df[c] = _nullable_int(df[c])
    for c in BOOL_COLUMNS:
        df[c] = df[c].map(lambda v: str(v).lower() in ("true", "1")).astype(bool)
    for c in STR_COLUMNS:
        df[c] = df[c].fillna("").astype(object)
    return df.reset_index(drop=True)


def to_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the leaderboard as CSV (full precision; ``read_csv`` restores it)."""
    path = Path(path)
    with atomic_path(path, what="leaderboard CSV") as tmp:  # whole or not at all
        df.to_csv(tmp, index=False, lineterminator="\n")
    return path


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a leaderboard CSV written by ``to_csv`` back into the same frame."""
    head = pd.read_csv(path, nrows=0).columns
    df = pd.read_csv(path, keep_default_na=False,
                     na_values={c: ["", "nan", "NaN"] for c in head if c in FLOAT_COLUMNS + NULLABLE_INT_COLUMNS},
                     dtype={c: str for c in head if c in STR_COLUMNS})
    return _typed(df.reindex(columns=COLUMNS)) if set(COLUMNS) <= set(df.columns) else df


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
MISSING = "–"


def fmt_sig(x: Any, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without scientific notation for ordinary values."""
    v = finite(x)
    if v is None:
        return MISSING
    if v == 0:
        return "0"
    e = math.floor(math.log10(abs(v)))
    if e < -4 or e >= 15:
        return f"{v:.{digits - 1}e}"
    rounded = round(v, digits - 1 - e)
    e = math.floor(math.log10(abs(rounded))) if rounded else e  # 9.996 -> 10.0
    decimals = max(0, digits - 1 - e)
    return f"{rounded:.{decimals}f}"


def fmt_nfe(x: Any) -> str:
    v = finite(x)
    if v is None:
        return MISSING
    return str(int(round(v))) if abs(v - round(v)) < 1e-9 else f"{v:.1f}"


def fmt_value(x: Any) -> str:
    """Generic cell formatting for tables whose columns we do not know."""
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int) or (hasattr(x, "dtype") and getattr(x.dtype, "kind", "") in "iu"):
        return str(int(x))
    if isinstance(x, float) or (hasattr(x, "dtype") and getattr(x.dtype, "kind", "") == "f"):
        return fmt_sig(x, 4)
    try:
        if pd.isna(x):
            return MISSING
    except (TypeError, ValueError):
        pass
    return str(x)


def _cell(s: str) -> str:
    return str(s).replace("\r", "").replace("\n", " ").replace("|", "\\|")


def markdown_table(df: pd.DataFrame, formatters: Mapping[str, Callable[[Any], str]] | None = None,
                   align: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``df``.

    A non-default index is shown as leading column(s); MultiIndex columns are joined with " / ".
    ``formatters`` maps column -> str function (default ``fmt_value``); numbers are right-aligned
    unless ``align`` says otherwise ("l", "r", "c"); ``headers`` renames columns for display.
    """
    formatters = dict(formatters or {})
    align = dict(align or {})
    headers = dict(headers or {})
    df = df.copy()
    if not isinstance(df.index, pd.RangeIndex) or df.index.name is not None:
        df = df.reset_index()
    if isinstance(df.columns, pd.MultiIndex):
        df.columns = [" / ".join(str(p) for p in col if str(p) != "") for col in df.columns]
    cols = list(df.columns)
    names = [_cell(headers.get(c, str(c))) for c in cols]
    body = []
    for row in df.itertuples(index=False, name=None):
        body.append([_cell(formatters.get(c, fmt_value)(v)) for c, v in zip(cols, row)])
    seps = []
    for i, c in enumerate(cols):
        a = align.get(c)
        if a is None:
            a = "r" if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) else "l"
        w = max(3, len(names[i]), *(len(b[i]) for b in body)) if body else max(3, len(names[i]))
        seps.append({"l": ":" + "-" * (w - 1), "r": "-" * (w - 1) + ":", "c": ":" + "-" * (w - 2) + ":"}[a])
    widths = [len(s) for s in seps]
    right = [s.endswith(":") and not s.startswith(":") for s in seps]

    def line(cells, pad_right=False):
        return "| " + " | ".join(c.rjust(w) if (r and pad_right) else c.ljust(w)
                                 for c, w, r in zip(cells, widths, right)) + " |"

    return "\n".join([line(names), line(seps)] + [line(b, True) for b in body])


def fmt_interval(mean: Any, lo: Any, hi: Any, decimals: int = 2) -> str:
    """``8.02 ± 0.99`` (mean and the half-width of its 95% interval), or the bare mean without an interval."""
    m = finite(mean)
    if m is None:
        return MISSING
    a, b = finite(lo), finite(hi)
    return f"{m:.{decimals}f}" if a is None or b is None else f"{m:.{decimals}f} ± {(b - a) / 2:.{decimals}f}"


def _metric(name: str, decimals: int):
    return lambda r: fmt_interval(r[f"{name}_mean"], r[f"{name}_ci_lo"], r[f"{name}_ci_hi"], decimals)


def _kid(r) -> str:  # KID is ~1e-3: shown x 1000
    return fmt_interval(*(r[f"kid_{s}"] * 1000 if finite(r[f"kid_{s}"]) is not None else None
                          for s in ("mean", "ci_lo", "ci_hi")), 2)


LEADERBOARD_DISPLAY = {
    # display column -> (header, fn(row) -> text, source column that must hold a value)
    "rank": ("rank", lambda r: rank_label(None if pd.isna(r["rank"]) else int(r["rank"]), bool(r["tied"]),
                                         int(r["n_seeds"])), "fid_mean"),
    "reproduction": ("paper", lambda r: str(r["reproduction"]), "reproduction"),
    "sampler": ("sampler", lambda r: str(r["sampler"]), "sampler"),
    "steps": ("steps", lambda r: str(int(r["steps"])), "steps"),
    "nfe": ("NFE", lambda r: fmt_nfe(r["nfe"]), "nfe"),
    "fid": ("FID (95% CI)", _metric("fid", 2), "fid_mean"),
    "n_seeds": ("seeds", lambda r: str(int(r["n_seeds"])), "n_seeds"),
    "kid": ("KID x1000", _kid, "kid_mean"),
    "precision": ("precision", _metric("precision", 3), "precision_mean"),
    "recall": ("recall", _metric("recall", 3), "recall_mean"),
    "sec_per_batch": ("s / batch", lambda r: fmt_sig(r["sec_per_batch"], 3), "sec_per_batch"),
    "samples_per_sec": ("samples / s", lambda r: fmt_sig(r["samples_per_sec"], 3), "samples_per_sec"),
    "peak_mem_mb": ("peak MB", lambda r: fmt_sig(r["peak_mem_mb"], 3), "peak_mem_mb"),
    "device_name": ("device", lambda r: str(r["device_name"]), "device_name"),
}
RANK_RULE = ("Ranks: 1 + the configurations whose whole 95% interval of FID is lower; overlapping intervals share "
             "a rank (`=k`); one seed: no interval, no rank.")


def _group_heading(g: pd.DataFrame) -> tuple[str, str]:
    first = g.iloc[0]
    reps = sorted({str(x) for x in g["reproduction"] if x})
    name = f"model {first['model']}" + (f" ({', '.join(reps)})" if reps else "")
    devices = sorted({d for d in g["device_name"] if d})
    title = " · ".join([name, first["dataset"] or "?", first["fid_extractor"] or "no extractor",
                        f"n={int(first['num_samples'])}", ", ".join(devices) or "unknown device"])
    details = []
    if first["model_hash"]:
        details.append(f"model `{first['model_hash']}`")
    if first["fid_reference"]:
        details.append(f"reference: {first['fid_reference']}")
    return title, "; ".join(details)


def display_table(g: pd.DataFrame) -> str:
    """A Markdown table of one group's leaderboard rows, intervals as ``mean ± half-width``; columns that say
    nothing here are dropped."""
    cols = [c for c, (_, _, src) in LEADERBOARD_DISPLAY.items()
            if src in g.columns and not (src in FLOAT_COLUMNS and g[src].isna().all())]
    if "device_name" in cols and g["device_name"].nunique() <= 1:
        cols.remove("device_name")  # already in the heading
    rows = [r for _, r in g.iterrows()]
    table = pd.DataFrame({LEADERBOARD_DISPLAY[c][0]: [LEADERBOARD_DISPLAY[c][1](r) for r in rows] for c in cols})
    return markdown_table(table, align={LEADERBOARD_DISPLAY[c][0]: ("l" if c in ("sampler", "device_name", "reproduction")
                                                                    else "r") for c in cols})


def to_markdown(df: pd.DataFrame, *, heading_level: int = 3) -> str:
    """One Markdown table per comparable group, each under a heading naming the group."""
    if df is None or len(df) == 0:
        return "_No ranked results (no ok records with a FID)._"
    hashes = "#" * max(1, heading_level)
    out = []
    for group in dict.fromkeys(df["group"]):  # groups in frame order
        g = df[df["group"] == group]
        title, details = _group_heading(g)
        out.append(f"{hashes} {title}")
        out.append("")
        if details:
            out.append(details)
            out.append("")
        out.append(display_table(g))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# What reproductions receive, and the registry (shared by plots, scorecard and report)
# --------------------------------------------------------------------------------------------
def records_df(records: Iterable[Any]) -> pd.DataFrame:
    """``records_frame`` of the records, with every ``Record`` column present even when empty."""
    df = records_frame(as_dicts(records))
    for f in fields(Record):
        if f.name not in df.columns:
            df[f.name] = pd.Series([None] * len(df), index=df.index, dtype=object)
    if "sampler_label" not in df.columns:
        df["sampler_label"] = pd.Series([], dtype=object)
    return df


def load_registry() -> tuple[dict, list[tuple[str, str]]]:
    """The registered reproductions, sorted by name, and the (module, message) of any that failed
    to import.  One broken paper module never hides the others."""
    reps = discover(strict=False)
    return {name: reps[name] for name in sorted(reps)}, list(discovery_errors().items())


# --------------------------------------------------------------------------------------------
# Few-step view: FID at matched NFE
# --------------------------------------------------------------------------------------------
NFE_VIEW_COLUMNS = ["group", "model", "model_hash", "reproduction", "num_samples", "fid_extractor", "target_nfe",
                    "sampler", "steps", "nfe", "fid_mean", "fid_sem", "fid_ci_lo", "fid_ci_hi", "n_seeds", "rank", "tied"]


def nfe_view(records: list[dict], nfes=(5, 10, 20), *, tolerance: float = 1.0, min_samplers: int = 2,
             group_filter=None, lb: pd.DataFrame | None = None) -> pd.DataFrame:
    """FID at matched NFE: for each comparable group (model) and each target NFE, every sampler configuration
    whose mean NFE is within ``tolerance`` of the target (a Heun step costs 2 NFE, so 10 exactly is not always
    reachable; the actual NFE is shown), ranked with ties among themselves by the leaderboard's rule.  Groups
    with fewer than ``min_samplers`` samplers at every target are left out (nothing to compare).  ``lb``: the
    records' leaderboard when the caller has it already."""
    if lb is None:
        lb = leaderboard(records, group_filter=group_filter)
    rows = []
    for group in dict.fromkeys(lb["group"]):
        g = lb[lb["group"] == group]
        per_target = []
        for t in nfes:
            sel = g[(g["nfe"] - float(t)).abs() <= tolerance + 1e-9].copy()
            if len(sel) == 0:
                continue
            # one configuration per sampler label: the one closest to the target NFE (then the better FID)
            sel["_d"] = (sel["nfe"] - float(t)).abs()
            sel = sel.sort_values(["_d", "fid_mean"]).drop_duplicates("sampler").sort_values("fid_mean")
            ranks = rank_with_ties([_as_summary(r) for _, r in sel.iterrows()])
            sel["rank"] = [r for r, _ in ranks]
            sel["tied"] = [tie for _, tie in ranks]
            sel["target_nfe"] = int(t)
            per_target.append(sel)
        if not per_target or max(len(p) for p in per_target) < min_samplers:
            continue
        for p in per_target:
            rows += p[NFE_VIEW_COLUMNS].to_dict("records")
    df = pd.DataFrame(rows, columns=NFE_VIEW_COLUMNS)
    df["rank"] = _nullable_int(df["rank"])
    return df


def _as_summary(r):
    return Summary(int(r["n_seeds"]), float(r["fid_mean"]), math.nan, float(r["fid_sem"]),
                   float(r["fid_ci_lo"]), float(r["fid_ci_hi"]))


def nfe_view_markdown(view: pd.DataFrame, *, heading_level: int = 3) -> str:
    """One table per model: samplers as rows, target NFEs as columns, ``FID ± half-width (rank)`` per cell."""
    if view is None or len(view) == 0:
        return "_No samplers at matched NFE in these records._\n"
    hashes = "#" * max(1, heading_level)
    out = []
    for group in dict.fromkeys(view["group"]):
        g = view[view["group"] == group]
        targets = sorted(set(int(t) for t in g["target_nfe"]))
        samplers = list(dict.fromkeys(g.sort_values(["target_nfe", "fid_mean"])["sampler"]))
        table = {"sampler": samplers}
        for t in targets:
            cells = []
            for smp in samplers:
                r = g[(g["target_nfe"] == t) & (g["sampler"] == smp)]
                if len(r) == 0:
                    cells.append(MISSING)
                    continue
                r = r.iloc[0]
                txt = fmt_interval(r["fid_mean"], r["fid_ci_lo"], r["fid_ci_hi"], 2)
                if abs(float(r["nfe"]) - t) > 1e-9:
                    txt += f" @{fmt_nfe(r['nfe'])}"
                rank = None if pd.isna(r["rank"]) else int(r["rank"])
                cells.append(f"{txt} ({rank_label(rank, bool(r['tied']), int(r['n_seeds']))})")
            table[f"NFE {t}"] = cells
        first = g.iloc[0]
        reps = ", ".join(sorted({x for r in g["reproduction"] for x in str(r).split(", ") if x}))
        title = f"{first['model']} ({reps})" + (f" `{first['model_hash'][:8]}`" if first["model_hash"] else "")
        out += [f"{hashes} {title} · n={int(first['num_samples'])} · {first['fid_extractor']}", "",
                markdown_table(pd.DataFrame(table), align={"sampler": "l"}), ""]
    return "\n".join(out).rstrip() + "\n"
