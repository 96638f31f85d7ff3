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
import textwrap
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from bench_core.atomic import atomic_path
from bench_core.records import decode_preview
from bench_core.report.leaderboard import (
    as_dicts, fmt_nfe, label_with_dtype, leaderboard, load_registry, nfe_view, records_df,
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module
    from matplotlib.figure import Figure  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module

    fig = Figure(figsize=(w, h), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, tidy: bool = True) -> Path:
    """Make ``fig`` readable (:func:`tidy_figure`; ``tidy=False`` for a figure built readable, whose check would
    only cost draws), then write it whole or not at all; the figure is released either way."""
    path = Path(path)
    try:
        try:
            if tidy:
                tidy_figure(fig)
        except Exception as e:  # noqa: BLE001 - an untidy figure is better than none
            warnings.warn(f"could not tidy plot {path.name}: {type(e).__name__}: {e}")
        _write_png(fig, path)
    finally:
        fig.clear()
    return path


def _write_png(fig, path: Path) -> None:
    with atomic_path(path, what="plot") as tmp:  # the format is given, the temporary name says nothing
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})


# --------------------------------------------------------------------------------------------
# Readability: styles, legends outside the data, log FID axes, titles that fit
# --------------------------------------------------------------------------------------------
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
LOG_SPAN = 10.0          # an FID axis whose values span this factor (a decade) or more is drawn on a log scale
LEGEND_LABEL_WIDTH = 48  # characters per legend line before it wraps


def _palette(n: int) -> list:
    """n colours, all distinct for n <= 20: tab10's ten, then ten darker and mid shades of tab20b (hues apart
    from tab10's)."""
    from matplotlib import colormaps  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module

    tab10, tab20b = colormaps["tab10"], colormaps["tab20b"]
    base = [tab10(i) for i in range(10)] + [tab20b(i) for i in (0, 4, 8, 12, 16, 2, 6, 10, 14, 18)]
    return [base[i % len(base)] for i in range(n)]


def styles(labels: Iterable[str]) -> dict[str, dict]:
    """A style (``color``, ``marker``, ``ls``) per label, sorted by label: colours are distinct up to 20 curves,
    markers up to 12 and (colour, marker) pairs up to 60; curves 11-20 are dashed as well."""
    labels = sorted(set(labels))
    colors = _palette(len(labels))
    return {lab: {"color": colors[i], "marker": MARKERS[i % len(MARKERS)], "ls": "-" if i % 20 < 10 else "--"}
            for i, lab in enumerate(labels)}


def fid_yscale(values) -> str:
    """'log' when the positive finite FIDs span a decade or more (max/min >= 10), else 'linear'."""
    v = np.asarray([x for x in np.asarray(values, dtype=float).ravel() if np.isfinite(x)])
    if v.size < 2 or v.min() <= 0:
        return "linear"
    return "log" if v.max() / v.min() >= LOG_SPAN else "linear"


def _readable_log_axis(ax, which: str) -> None:
    """Plain numbers (5, 10, 20, 50 ...) instead of powers of ten; labels at 2 and 5 as well where the axis
    spans few decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module

    lo, hi = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    if not (lo > 0 and hi > lo):
        return
    axis = ax.yaxis if which == "y" else ax.xaxis
    few = math.log10(hi / lo) < 2.2

    def minor(v, _pos):
        if v <= 0:
            return ""
        mant = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        return f"{v:g}" if few and mant in (2.0, 5.0) else ""

    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
    axis.set_minor_formatter(FuncFormatter(minor))


def _set_fid_yscale(ax, values) -> None:
    scale = fid_yscale(values)
    ax.set_yscale(scale)
    if scale == "log":
        _readable_log_axis(ax, "y")


def _curves(ax) -> list[tuple[str, Any, Any]]:
    """(label, main line, container or None) for every labelled line of ``ax`` (error-bar plots included)."""
    out, seen = [], set()
    for c in ax.containers:
        line = c.lines[0] if hasattr(c, "has_xerr") else None
        if line is not None and not str(c.get_label()).startswith("_"):
            out.append((str(c.get_label()), line, c))
            seen.add(id(line))
        elif line is not None:
            seen.add(id(line))
    for line in ax.get_lines():
        if id(line) not in seen and not str(line.get_label()).startswith("_"):
            out.append((str(line.get_label()), line, None))
    return out


def _restyle(line, container, st: dict) -> None:
    from matplotlib.colors import to_rgba  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module

    color = to_rgba(st["color"])
    line.set_color(color)
    line.set_markerfacecolor(color)
    line.set_markeredgecolor(color)
    if line.get_marker() not in (None, "None", "", " "):
        line.set_marker(st["marker"])
    if line.get_linestyle() not in ("None", "", " "):
        line.set_linestyle(st["ls"])
    if container is not None:
        _data, caps, bars = container.lines
        for art in (*(caps or ()), *(bars or ())):
            art.set_color(color)


def _distinct_styles(fig) -> None:
    """Where two curves of one panel share a colour, give every labelled curve of the figure its own colour and
    marker, by label, so one label keeps one style across panels."""
    from matplotlib.colors import to_rgba  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module

    clash = False
    for ax in fig.axes:
        colours = [to_rgba(line.get_color()) for _lab, line, _c in _curves(ax)]
        clash |= len(colours) != len(set(colours))
    if not clash:
        return
    st = styles(lab for ax in fig.axes for lab, _l, _c in _curves(ax))
    for ax in fig.axes:
        for lab, line, c in _curves(ax):
            _restyle(line, c, st[lab])


def _fid_axes(fig) -> None:
    """A panel whose y label says FID: log scale when its curves span a decade or more, linear otherwise."""
    for ax in fig.axes:
        if "FID" not in ax.get_ylabel():
            continue
        ys = [y for _lab, line, _c in _curves(ax) for y in np.asarray(line.get_ydata(), dtype=float).ravel()]
        if not ys:
            ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float).ravel()]
        if ys:
            _set_fid_yscale(ax, ys)
    for ax in fig.axes:
        if ax.get_xscale() == "log":
            _readable_log_axis(ax, "x")


def _wrap_label(text: str, width: int = LEGEND_LABEL_WIDTH) -> str:
    return "\n".join(textwrap.fill(part, width, break_long_words=False, break_on_hyphens=False)
                     for part in str(text).split("\n"))


def legend_outside(ax, handles=None, labels=None, fontsize: float = 7):
    """A legend to the right of the axes, clear of the data; long labels wrap."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, [_wrap_label(lab) for lab in labels], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, fontsize=fontsize, ncol=1 if len(handles) <= 22 else 2,
                     handlelength=2.4, labelspacing=0.35)


def _overlap(a, b, tol: float = 1.0) -> bool:
    """Whether two display boxes share more than ``tol`` pixels each way."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def _legends_outside(fig, renderer) -> bool:
    """Move every legend that sits on its axes' data area to the right of the axes; in a figure of several
    panels the figure widens by the legends' width and the layout makes room for them.  Whether any moved."""
    moved = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None or not _overlap(leg.get_window_extent(renderer), ax.get_window_extent(renderer)):
            continue
        texts = [t.get_text() for t in leg.get_texts()]
        size = leg.get_texts()[0].get_fontsize() if texts else 7
        handles, labels = ax.get_legend_handles_labels()
        if labels != texts:  # the legend was given its own handles: keep those
            handles, labels = leg.legend_handles, texts
        leg.remove()
        new = legend_outside(ax, handles, labels, fontsize=max(size, 7))
        if new is not None:
            moved.append((ax, new))
    if moved and len(fig.axes) > 1:
        cols: dict[float, float] = {}
        for ax, leg in moved:
            x0 = round(ax.get_position().x0, 3)
            cols[x0] = max(cols.get(x0, 0.0), leg.get_window_extent(renderer).width / fig.dpi + 0.2)
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + sum(cols.values()), h)
        if fig.get_layout_engine() is None:
            fig.set_layout_engine("constrained")
    return bool(moved)


def _titles(fig) -> list:
    ts = [ax.title for ax in fig.axes if ax.title.get_text() and ax.title.get_visible()]
    if fig._suptitle is not None and fig._suptitle.get_text():
        ts.append(fig._suptitle)
    return ts


def _fit_text(t, width_px: float, renderer, min_size: float = 5.0) -> None:
    """Re-wrap ``t`` at spaces so that each line fits ``width_px``; shrink the font where one word is wider."""
    words_by_line = [line.split(" ") for line in t.get_text().split("\n")]
    while True:
        lines = []
        for words in words_by_line:
            cur = ""
            for w in words:
                cand = f"{cur} {w}" if cur else w
                t.set_text(cand)
                if cur and t.get_window_extent(renderer).width > width_px:
                    lines.append(cur)
                    cur = w
                else:
                    cur = cand
            lines.append(cur)
        t.set_text("\n".join(lines))
        if t.get_window_extent(renderer).width <= width_px or t.get_fontsize() <= min_size:
            return
        t.set_fontsize(t.get_fontsize() - 0.5)


def _fit_titles(fig, renderer) -> None:
    """Panel titles no wider than their panel (where there are several) and the figure title no wider than the
    panels' span; then, as a last resort, smaller fonts until no two titles overlap."""
    axes = [ax for ax in fig.axes if ax.title.get_text()]
    if len(fig.axes) > 1:
        for ax in axes:
            _fit_text(ax.title, ax.get_window_extent(renderer).width * 1.02, renderer)
    sup = fig._suptitle
    if sup is not None and sup.get_text() and fig.axes:
        span = max(ax.get_window_extent(renderer).x1 for ax in fig.axes) - min(
            ax.get_window_extent(renderer).x0 for ax in fig.axes)
        _fit_text(sup, max(span, fig.bbox.width * 0.6), renderer)
    for _ in range(8):
        fig.draw_without_rendering()
        ts = _titles(fig)
        boxes = [t.get_window_extent(renderer) for t in ts]
        clash = {i for i in range(len(ts)) for j in range(len(ts)) if i != j and _overlap(boxes[i], boxes[j])}
        if not clash:
            return
        for i in clash:
            ts[i].set_fontsize(max(4.0, ts[i].get_fontsize() - 0.5))


def tidy_figure(fig):
    """Make a figure readable before it is saved: distinct colour and marker per curve within a panel, FID on a
    log axis where it spans a decade, legends off the data, titles that fit and do not overlap."""
    if not fig.axes:
        return fig
    _distinct_styles(fig)
    _fid_axes(fig)
    fig.draw_without_rendering()  # each draw costs ~0.2 s: only as many as something changed needs
    renderer = fig.canvas.get_renderer()
    if _legends_outside(fig, renderer):
        fig.draw_without_rendering()
    if len(fig.axes) > 1 or len(_titles(fig)) > 1:  # one panel's lone title neither clashes nor outgrows a panel
        _fit_titles(fig, renderer)
        if fig.get_layout_engine() is not None:
            fig.draw_without_rendering()
            _fit_titles(fig, renderer)  # the layout may move after the first fit
    return fig


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
        style = styles(pts["sampler"])
        fig = _new_figure(6.4, 4.4)
        ax = fig.add_subplot(1, 1, 1)
        for label in sorted(set(pts["sampler"])):
            p = pts[pts["sampler"] == label].sort_values("nfe")
            _fid_line(ax, p["nfe"], p, style[label], label, lw=1.5)
        paths.append(_finish_log_x(fig, ax, pts["fid_mean"], "NFE (counted)", group,
                                   outdir / f"{PREFIX_NFE}__{_group_slug(g)}.png"))
    return paths


def fid_errors(p) -> np.ndarray:
    """(2, n) error-bar lengths below and above each mean FID from its 95% interval (0 where a point has one
    seed and so no interval)."""
    m = p["fid_mean"].to_numpy(float)
    lo = np.nan_to_num(m - p["fid_ci_lo"].to_numpy(float), nan=0.0)
    hi = np.nan_to_num(p["fid_ci_hi"].to_numpy(float) - m, nan=0.0)
    return np.vstack([np.clip(lo, 0, None), np.clip(hi, 0, None)])


def _fid_line(ax, x, p, style: dict, label: str, lw: float) -> None:
    """Mean FID against x with its 95% interval as error bars (where a point has more than one seed), in the
    curve's own colour, marker and line style."""
    yerr = fid_errors(p)
    ax.errorbar(x, p["fid_mean"], yerr=yerr if yerr.any() else None, color=style["color"], marker=style["marker"],
                ls=style["ls"], label=label, ms=4, lw=lw, capsize=2, elinewidth=0.8)


def plot_nfe_heatmap(lb, outdir: Path, nfes=(5, 10, 20)) -> list[Path]:
    """Samplers x NFE heatmap of mean FID, one panel per model (the few-step view); a cell's text is the mean
    and the half-width of its 95% interval, ``=`` marks a tie for that NFE's best rank."""

    view = nfe_view([], nfes, lb=lb)
    if len(view) == 0:
        return []
    from matplotlib import colormaps  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module

    groups = list(dict.fromkeys(view["group"]))
    samplers = sorted(set(view["sampler"]))
    ylabels = [_wrap_label(s, 40) for s in samplers]
    label_w = max(len(line) for lab in ylabels for line in lab.split("\n")) * 7 * 0.6 / 72
    cmap = colormaps["viridis_r"]
    fig = _new_figure(label_w + len(groups) * (0.85 * len(nfes) + 0.25) + 0.4,
                      sum(0.2 + 0.14 * lab.count("\n") for lab in ylabels) + 1.9, layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        g = view[view["group"] == group]
        grid = np.full((len(samplers), len(nfes)), np.nan)
        for _, r in g.iterrows():
            grid[samplers.index(r["sampler"]), list(nfes).index(int(r["target_nfe"]))] = r["fid_mean"]
        finite = grid[np.isfinite(grid)]
        vmax = np.percentile(finite, 90) if finite.size else 1.0
        lo, hi = (np.log(max(finite.min(), 1e-3)) if finite.size else 0.0), np.log(max(vmax, 1e-3))
        hi = hi if hi > lo else lo + 1.0
        ax.imshow(np.log(np.clip(grid, 1e-3, None)), aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
        for _, r in g.iterrows():
            i, j = samplers.index(r["sampler"]), list(nfes).index(int(r["target_nfe"]))
            half = (r["fid_ci_hi"] - r["fid_ci_lo"]) / 2 if np.isfinite(r["fid_ci_hi"]) else np.nan
            txt = f"{r['fid_mean']:.1f}" + (f"±{half:.1f}" if np.isfinite(half) else "")
            best = not pd.isna(r["rank"]) and int(r["rank"]) == 1
            if best:
                txt = ("=" if r["tied"] else "") + "1: " + txt
            rgba = cmap(float(np.clip((np.log(max(r["fid_mean"], 1e-3)) - lo) / (hi - lo), 0, 1)))
            light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5   # dark text on light cells
            ax.text(j, i, txt, ha="center", va="center", fontsize=6, color="black" if light else "white",
                    fontweight="bold" if best else "normal")
        ax.set_xticks(range(len(nfes)), [str(n) for n in nfes])
        ax.set_yticks(range(len(samplers)), ylabels if ax is axes[0] else [""] * len(samplers), fontsize=7)
        ax.set_xlabel("NFE")
        ax.set_title(str(g.iloc[0]["model"]) + " · " + group, fontsize=7)
    fig.suptitle("FID at NFE 5 / 10 / 20 (mean ± half 95% interval; 1: best at that NFE, =1: tied)", fontsize=8)
    return [_save(fig, outdir / "sampler_heatmap_fid_at_nfe.png")]


def _finish_log_x(fig, ax, fids, xlabel: str, group: str, path: Path) -> Path:
    """Log-x FID axes (log y too where the FIDs span a decade) with the group as title, a grid and a legend
    outside the data; saved to path."""
    ax.set_xscale("log")
    _readable_log_axis(ax, "x")
    _set_fid_yscale(ax, fids)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(_wrap(group), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
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
        style = styles(g["series"])
        fig = _new_figure(6.4, 4.4)
        ax = fig.add_subplot(1, 1, 1)
        for label in sorted(set(g["series"])):
            p = g[g["series"] == label].sort_values("sec_per_batch")
            _fid_line(ax, p["sec_per_batch"], p, style[label], label, lw=1.2)
            for x, y, s in zip(p["sec_per_batch"], p["fid_mean"], p["steps"]):
                ax.annotate(str(int(s)), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=style[label]["color"])
        paths.append(_finish_log_x(fig, ax, g["fid_mean"], "seconds per batch (median; numbers: steps)", group,
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
            ax.set_title(f"{_wrap_label(label_with_dtype(r), 42)}\n{int(r.get('steps') or 0)} steps, "
                         f"NFE {fmt_nfe(r.get('nfe'))}", fontsize=7)
        rep, model, mhash, dataset = key
        title = f"{rep}/{model}" + (f"@{mhash[:8]}" if mhash else "") + f" · {dataset}"
        if total > len(chosen):
            title += f" (showing {len(chosen)} of {total} sampler configurations)"
        fig.suptitle(title, fontsize=9)
        # built readable (one style, titles wrapped to the panel, constrained layout): no tidy pass needed
        paths.append(_save(fig, outdir / f"{PREFIX_SAMPLES}__{_key_slug(key, (rep, model, dataset))}.png", tidy=False))
    return paths


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------
def _ensure_headless_backend() -> None:
    """Reproductions may use pyplot: make it Agg unless the user chose a backend."""
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        import matplotlib  # noqa: PLC0415 - lazy: matplotlib loads when a plot is drawn, not when papers import this module

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
