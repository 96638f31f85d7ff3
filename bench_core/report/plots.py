"""Plots regenerated from records alone: FID vs NFE, FID vs latency (one figure per comparable
group), sample grids from the records' ``preview`` field, and every reproduction's own plots.

Our figures are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot state,
no display needed); pyplot figures a reproduction leaves open are closed after its ``plots``.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from bench_core.records import decode_preview
from bench_core.report.leaderboard import (
    as_dicts, fmt_nfe, label_with_dtype, leaderboard, load_registry, records_df,
)

MAX_PANELS = 12          # sample-grid panels per figure
MAX_PREVIEW_ITEMS = 64   # images (or points are not capped) shown per panel
DPI = 110

PREFIX_NFE = "fid_vs_nfe"
PREFIX_LATENCY = "fid_vs_latency"
PREFIX_SAMPLES = "samples"


def slugify(text: str, max_len: int = 80) -> str:
    """Lower-case ASCII slug: letters, digits, '-' and '_'; never empty."""
    s = re.sub(r"[^a-z0-9_]+", "-", str(text).lower()).strip("-_")
    s = re.sub(r"-{2,}", "-", s)[:max_len].strip("-_")
    return s or "x"


def _key_slug(key: tuple, readable: Iterable[Any]) -> str:
    """A stable, unique file stem for a group: readable parts plus a short hash of the whole key."""
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:8]
    return f"{slugify('-'.join(str(p) for p in readable if p not in ('', None)), 60)}-{digest}"


def _new_figure(w: float, h: float, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    fig.clear()
    return path


def _colors(labels: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    labels = sorted(set(labels))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _wrap(title: str, width: int = 70) -> str:
    parts, line = [], ""
    for word in title.split(" · "):
        if line and len(line) + len(word) + 3 > width:
            parts.append(line)
            line = word
        else:
            line = f"{line} · {word}" if line else word
    parts.append(line)
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# FID vs NFE and FID vs latency
# --------------------------------------------------------------------------------------------
def _group_slug(g) -> str:
    first = g.iloc[0]
    key = tuple(first[c] for c in ("reproduction", "model", "model_hash", "dataset", "fid_extractor",
                                   "fid_reference")) + (int(first["num_samples"]),)
    extractor = str(first["fid_extractor"]).split("@")[0]
    return _key_slug(key, (first["reproduction"], first["model"], first["dataset"], extractor,
                           f"n{int(first['num_samples'])}"))


def plot_fid_vs_nfe(lb, outdir: Path) -> list[Path]:
    """One figure per comparable group: FID against counted NFE, one line per sampler label."""
    paths = []
    for group in dict.fromkeys(lb["group"]):
        g = lb[(lb["group"] == group) & (lb["nfe"] > 0)]
        if len(g) < 2:  # one point is no curve: the leaderboard has its number
            continue
        # FID does not depend on the device: pool device rows of one configuration
        pts = g.groupby(["sampler", "steps"], as_index=False)[["nfe", "fid_mean", "fid_ci_lo", "fid_ci_hi"]].mean()
        colors = _colors(pts["sampler"])
        fig = _new_figure(6.4, 4.4)
        ax = fig.add_subplot(1, 1, 1)
        for label in sorted(set(pts["sampler"])):
            p = pts[pts["sampler"] == label].sort_values("nfe")
            _fid_line(ax, p["nfe"], p, colors[label], label, lw=1.5)
        paths.append(_finish_log_x(fig, ax, "NFE (counted)", group, outdir / f"{PREFIX_NFE}__{_group_slug(g)}.png"))
    return paths


def fid_errors(p) -> np.ndarray:
    """(2, n) error-bar lengths below and above each mean FID from its 95% interval (0 where a point has one
    seed and so no interval)."""
    m = p["fid_mean"].to_numpy(float)
    lo = np.nan_to_num(m - p["fid_ci_lo"].to_numpy(float), nan=0.0)
    hi = np.nan_to_num(p["fid_ci_hi"].to_numpy(float) - m, nan=0.0)
    return np.vstack([np.clip(lo, 0, None), np.clip(hi, 0, None)])


def _fid_line(ax, x, p, color, label: str, lw: float) -> None:
    """Mean FID against x with its 95% interval as error bars (where a point has more than one seed)."""
    yerr = fid_errors(p)
    ax.errorbar(x, p["fid_mean"], yerr=yerr if yerr.any() else None, fmt="o-", color=color, label=label, ms=4,
                lw=lw, capsize=2, elinewidth=0.8)


def plot_nfe_heatmap(lb, outdir: Path, nfes=(5, 10, 20)) -> list[Path]:
    """Samplers x NFE heatmap of mean FID, one panel per model (the few-step view); a cell's text is the mean
    and the half-width of its 95% interval, ``=`` marks a tie for that NFE's best rank."""
    from bench_core.report.leaderboard import nfe_view

    view = nfe_view([], nfes, lb=lb)
    if len(view) == 0:
        return []
    groups = list(dict.fromkeys(view["group"]))
    samplers = sorted(set(view["sampler"]))
    fig = _new_figure(3.2 * len(groups) + 1.5, 0.32 * len(samplers) + 1.6, layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        g = view[view["group"] == group]
        grid = np.full((len(samplers), len(nfes)), np.nan)
        for _, r in g.iterrows():
            grid[samplers.index(r["sampler"]), list(nfes).index(int(r["target_nfe"]))] = r["fid_mean"]
        finite = grid[np.isfinite(grid)]
        vmax = np.percentile(finite, 90) if finite.size else 1.0
        ax.imshow(np.log(np.clip(grid, 1e-3, None)), aspect="auto", cmap="viridis_r",
                  vmin=np.log(max(finite.min(), 1e-3)) if finite.size else 0, vmax=np.log(max(vmax, 1e-3)))
        for _, r in g.iterrows():
            i, j = samplers.index(r["sampler"]), list(nfes).index(int(r["target_nfe"]))
            half = (r["fid_ci_hi"] - r["fid_ci_lo"]) / 2 if np.isfinite(r["fid_ci_hi"]) else np.nan
            txt = f"{r['fid_mean']:.1f}" + (f"±{half:.1f}" if np.isfinite(half) else "")
            if not pd.isna(r["rank"]) and int(r["rank"]) == 1:
                txt = ("=" if r["tied"] else "") + "1: " + txt
            ax.text(j, i, txt, ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(len(nfes)), [str(n) for n in nfes])
        ax.set_yticks(range(len(samplers)), samplers if ax is axes[0] else [""] * len(samplers), fontsize=7)
        ax.set_xlabel("NFE")
        ax.set_title(_wrap(str(g.iloc[0]["model"]) + " · " + group, 40), fontsize=7)
    return [_save(fig, outdir / "sampler_heatmap_fid_at_nfe.png")]


def _finish_log_x(fig, ax, xlabel: str, group: str, path: Path) -> Path:
    """Log-x FID axes with the group as title, a grid and a legend; saved to path."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID")
    ax.set_title(_wrap(group), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_fid_vs_latency(lb, outdir: Path) -> list[Path]:
    """One figure per comparable group: FID against seconds per batch (points annotated with steps)."""
    paths = []
    for group in dict.fromkeys(lb["group"]):
        g = lb[(lb["group"] == group) & (lb["sec_per_batch"] > 0)]
        if len(g) < 2:
            continue
        multi_device = g["device_name"].nunique() > 1
        series = (g["sampler"] + " @ " + g["device_name"]) if multi_device else g["sampler"]
        g = g.assign(series=series)
        colors = _colors(g["series"])
        fig = _new_figure(6.4, 4.4)
        ax = fig.add_subplot(1, 1, 1)
        for label in sorted(set(g["series"])):
            p = g[g["series"] == label].sort_values("sec_per_batch")
            _fid_line(ax, p["sec_per_batch"], p, colors[label], label, lw=1.2)
            for x, y, s in zip(p["sec_per_batch"], p["fid_mean"], p["steps"]):
                ax.annotate(str(int(s)), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=colors[label])
        paths.append(_finish_log_x(fig, ax, "seconds per batch (median)", group,
                                   outdir / f"{PREFIX_LATENCY}__{_group_slug(g)}.png"))
    return paths


# --------------------------------------------------------------------------------------------
# Sample grids
# --------------------------------------------------------------------------------------------
def tile_images(arr: np.ndarray, pad: int = 1, max_items: int = MAX_PREVIEW_ITEMS) -> np.ndarray:
    """(n, C, H, W) uint8 -> one (rows*H, cols*W[, 3|4]) image, tiles in a near-square grid."""
    arr = np.asarray(arr)
    if arr.ndim == 3:          # (n, H, W)
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"expected images (n, C, H, W), got shape {arr.shape}")
    arr = arr[:max_items]
    n, c, h, w = arr.shape
    if c not in (1, 3, 4):
        arr, c = arr[:, :1], 1
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fill = 255
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = np.transpose(arr[i], (1, 2, 0))
    return grid[..., 0] if c == 1 else grid


def _select_previews(recs: list[dict]) -> tuple[list[dict], int]:
    """For each sampler label the record with the most steps (then most samples, lowest seed)."""
    best: dict[str, dict] = {}
    for r in recs:
        label = label_with_dtype(r)
        rank = (int(r.get("steps") or 0), int(r.get("num_samples") or 0), -int(r.get("seed") or 0))
        if label not in best or rank > best[label][0]:
            best[label] = (rank, r)
    labels = sorted(best)
    return [best[lab][1] for lab in labels[:MAX_PANELS]], len(labels)


def _draw_preview(ax, arr: np.ndarray) -> None:
    if arr.ndim == 2 and arr.shape[1] == 2:      # 2-D points
        pts = arr.astype(np.float32)
        pts = pts[np.isfinite(pts).all(axis=1)]
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.6, lw=0)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=6)
    else:
        img = tile_images(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])


def plot_sample_grids(records: list[dict], outdir: Path) -> list[Path]:
    """One figure per model (reproduction, preset, hash, dataset): a panel per sampler label."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status", "ok") != "ok" or not r.get("preview"):
            continue
        key = (str(r.get("reproduction") or ""), str(r.get("model") or ""), str(r.get("model_hash") or ""),
               str(r.get("dataset") or ""))
        groups.setdefault(key, []).append(r)
    paths = []
    for key in sorted(groups):
        chosen, total = _select_previews(groups[key])
        panels = []
        for r in chosen:
            try:
                panels.append((r, decode_preview(r["preview"])))
            except Exception as e:  # noqa: BLE001 - a corrupt preview skips one panel
                warnings.warn(f"preview of {r.get('entry')!r} {label_with_dtype(r)} undecodable: {e}")
        if not panels:
            continue
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = _new_figure(3.0 * ncols, 3.2 * nrows + 0.4, layout="constrained")
        for i, (r, arr) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            try:
                _draw_preview(ax, arr)
            except Exception as e:  # noqa: BLE001
                ax.text(0.5, 0.5, f"cannot draw:\n{e}", ha="center", va="center", fontsize=6, wrap=True)
            ax.set_title(f"{label_with_dtype(r)}\n{int(r.get('steps') or 0)} steps, NFE {fmt_nfe(r.get('nfe'))}",
                         fontsize=7)
        rep, model, mhash, dataset = key
        title = f"{rep}/{model}" + (f"@{mhash[:8]}" if mhash else "") + f" · {dataset}"
        if total > len(chosen):
            title += f" (showing {len(chosen)} of {total} sampler configurations)"
        fig.suptitle(title, fontsize=9)
        paths.append(_save(fig, outdir / f"{PREFIX_SAMPLES}__{_key_slug(key, (rep, model, dataset))}.png"))
    return paths


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------
def _ensure_headless_backend() -> None:
    """Reproductions may use pyplot: make it Agg unless the user chose a backend."""
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        import matplotlib

        matplotlib.use("Agg")


def make_plots(records: list[dict], outdir: str | os.PathLike, *,
               errors: list[tuple[str, str]] | None = None) -> list[Path]:
    """Regenerate every plot from records into ``outdir``; returns the written paths.

    A failing reproduction plot (or a reproduction module that does not import) is reported in
    ``errors`` as (source, message) and as a warning; the other plots are still made.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    errors = [] if errors is None else errors
    records = as_dicts(records)

    lb = leaderboard(records)
    paths: list[Path] = []
    for name, fn, arg in (("fid_vs_nfe", plot_fid_vs_nfe, lb), ("fid_vs_latency", plot_fid_vs_latency, lb),
                          ("sampler_heatmap", plot_nfe_heatmap, lb), ("samples", plot_sample_grids, records)):
        try:
            paths += fn(arg, outdir)
        except Exception as e:  # noqa: BLE001
            errors.append((f"bench_core.report.plots:{name}", f"{type(e).__name__}: {e}"))
            warnings.warn(f"plot {name} failed: {e}\n{traceback.format_exc()}")

    reps, load_errors = load_registry()
    errors.extend(load_errors)
    if reps:
        _ensure_headless_backend()
        df = records_df(records)
        for name, rep in reps.items():
            before = _open_figures()
            try:
                for p in rep.plots(df.copy(), outdir) or []:
                    paths.append(Path(p))
            except Exception as e:  # noqa: BLE001 - one failing paper plot never stops the rest
                errors.append((name, f"{type(e).__name__}: {e}"))
                warnings.warn(f"plots of reproduction {name!r} failed: {e}")
            finally:
                _close_new_figures(before)
    return paths


def _open_figures() -> set:
    plt = sys.modules.get("matplotlib.pyplot")
    return set(plt.get_fignums()) if plt else set()


def _close_new_figures(before: set) -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)


# public names for reproductions' own plots
new_figure = _new_figure
save_figure = _save
