"""Sampler leaderboard, regenerated from records only.

FID is ranked **within comparable groups** only: the same model (reproduction, preset and
``model_hash``), dataset, FID feature extractor, reference set and sample count.  A FID measured
with another extractor, reference or number of samples is a different number and never shares a
ranking.  Several seeds of one sampler configuration are averaged (``n_seeds`` says how many).

This module also holds the small Markdown helpers the rest of ``bench_core.report`` uses
(no dependency on ``tabulate``).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from bench_core.records import sampler_label

# What makes two FIDs comparable: the same trained model (its config hash), data, extractor, reference
# and sample count.  Samplers from different papers on one model rank together (that is the point of
# the leaderboard); the reproduction joins the key only when a record has no model hash, so such
# records are never pooled across models.
GROUP_FIELDS = ("reproduction", "model", "model_hash", "dataset", "fid_extractor", "fid_reference", "num_samples")

COLUMNS = [
    "group", "rank", "reproduction", "model", "sampler", "steps", "nfe", "fid", "fid_std", "n_seeds",
    "kid", "precision", "recall", "sec_per_batch", "samples_per_sec", "peak_mem_mb", "device_name",
    # group details (used for headings and filtering)
    "model_hash", "dataset", "fid_extractor", "fid_reference", "num_samples", "device", "dtype",
]
FLOAT_COLUMNS = ("nfe", "fid", "fid_std", "kid", "precision", "recall", "sec_per_batch", "samples_per_sec",
                 "peak_mem_mb")
INT_COLUMNS = ("rank", "steps", "n_seeds", "num_samples")
STR_COLUMNS = tuple(c for c in COLUMNS if c not in FLOAT_COLUMNS + INT_COLUMNS)

_MEAN_FIELDS = ("nfe", "fid", "kid", "precision", "recall", "sec_per_batch", "samples_per_sec", "peak_mem_mb")


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

    # 2. one row per configuration, seeds averaged
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
                "group": group_label(key), "rank": 0,
                "reproduction": ", ".join(sorted({str(x.get("reproduction") or "") for x in recs} - {""})) or rep,
                "model": names[key], "sampler": label,
                "steps": steps, "n_seeds": len(recs), "device_name": device_name or device,
                "model_hash": mhash, "dataset": dataset, "fid_extractor": extractor, "fid_reference": reference,
                "num_samples": n, "device": device, "dtype": dtype,
            }
            for f in _MEAN_FIELDS:
                vals = [v for v in (finite(x.get(f)) for x in recs) if v is not None]
                row[f] = sum(vals) / len(vals) if vals else math.nan
            fids = [finite(x.get("fid")) for x in recs]
            row["fid_std"] = (math.sqrt(sum((v - row["fid"]) ** 2 for v in fids) / (len(fids) - 1))
                              if len(fids) > 1 else math.nan)
            if nfe_max is not None and not (math.isfinite(row["nfe"]) and row["nfe"] <= nfe_max):
                continue
            group_rows.append(row)
        # 3. rank by FID inside the group (ties share the better rank)
        group_rows.sort(key=lambda x: (x["fid"], x["nfe"] if math.isfinite(x["nfe"]) else math.inf,
                                       x["sampler"], x["steps"], x["device_name"]))
        prev_fid, prev_rank = None, 0
        for i, row in enumerate(group_rows, start=1):
            row["rank"] = prev_rank if row["fid"] == prev_fid else i
            prev_fid, prev_rank = row["fid"], row["rank"]
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


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in FLOAT_COLUMNS:
        df[c] = df[c].astype("float64")
    for c in INT_COLUMNS:
        df[c] = df[c].astype("int64")
    for c in STR_COLUMNS:
        df[c] = df[c].fillna("").astype(object)
    return df.reset_index(drop=True)


def to_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the leaderboard as CSV (full precision; ``read_csv`` restores it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, lineterminator="\n")
    return path


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a leaderboard CSV written by ``to_csv`` back into the same frame."""
    head = pd.read_csv(path, nrows=0).columns
    df = pd.read_csv(path, keep_default_na=False,
                     na_values={c: ["", "nan", "NaN"] for c in head if c in FLOAT_COLUMNS},
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


def fmt_fixed(x: Any, decimals: int = 2) -> str:
    v = finite(x)
    return MISSING if v is None else f"{v:.{decimals}f}"


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


LEADERBOARD_DISPLAY = {
    # column -> (header, formatter)
    "rank": ("rank", lambda v: str(int(v))),
    "reproduction": ("paper", str),
    "sampler": ("sampler", str),
    "steps": ("steps", lambda v: str(int(v))),
    "nfe": ("NFE", fmt_nfe),
    "fid": ("FID", lambda v: fmt_fixed(v, 2)),
    "fid_std": ("FID std", lambda v: fmt_fixed(v, 2)),
    "n_seeds": ("seeds", lambda v: str(int(v))),
    "kid": ("KID", lambda v: fmt_sig(v, 3)),
    "precision": ("precision", lambda v: fmt_fixed(v, 3)),
    "recall": ("recall", lambda v: fmt_fixed(v, 3)),
    "sec_per_batch": ("s / batch", lambda v: fmt_sig(v, 3)),
    "samples_per_sec": ("samples / s", lambda v: fmt_sig(v, 3)),
    "peak_mem_mb": ("peak MB", lambda v: fmt_sig(v, 3)),
    "device_name": ("device", str),
}


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
        cols = [c for c in LEADERBOARD_DISPLAY if c in g.columns]
        # drop columns that say nothing for this group
        cols = [c for c in cols if not (c in FLOAT_COLUMNS and g[c].isna().all())]
        if "n_seeds" in cols and (g["n_seeds"] <= 1).all():
            cols.remove("n_seeds")
        if "device_name" in cols and g["device_name"].nunique() <= 1:
            cols.remove("device_name")  # already in the heading
        table = g[cols].reset_index(drop=True)
        out.append(markdown_table(
            table,
            formatters={c: LEADERBOARD_DISPLAY[c][1] for c in cols},
            headers={c: LEADERBOARD_DISPLAY[c][0] for c in cols},
            align={"sampler": "l", "device_name": "l"},
        ))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# What reproductions receive, and the registry (shared by plots, scorecard and report)
# --------------------------------------------------------------------------------------------
def records_df(records: Iterable[Any]) -> pd.DataFrame:
    """``records_frame`` of the records, with every ``Record`` column present even when empty."""
    from dataclasses import fields

    from bench_core.records import Record, records_frame

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
    import importlib

    import reproductions

    errors: list[tuple[str, str]] = []
    if not reproductions._loaded:
        try:
            reproductions.load_all()
        except Exception:
            # load_all stops at the first failure: import the modules one by one instead
            for m in reproductions.MODULES:
                try:
                    importlib.import_module(f"reproductions.{m}")
                except Exception as e:  # noqa: BLE001 - reported, never fatal
                    errors.append((f"reproductions.{m}", f"{type(e).__name__}: {e}"))
    reps = reproductions.REPRODUCTIONS
    return {name: reps[name] for name in sorted(reps)}, errors
