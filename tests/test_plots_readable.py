"""Plots a reader can read: legends off the data, one colour and marker per curve within a panel, a log FID axis
where FID spans a decade, titles that do not overlap. Each figure is measured (matplotlib objects, display
coordinates) at the moment it would be written, after the readability pass."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from bench_core.records import encode_preview
from bench_core.report import plots
from bench_core.report.leaderboard import leaderboard
from test_report import image_preview, rec

SAMPLERS = [("ddim", {"eta": e}) for e in (0.0, 0.2, 0.5, 1.0)] + [
    ("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("unipc", {"order": 3}), ("ddpm", {}),
    ("euler_ancestral", {"eta": 1.0}), ("pc", {"snr": 0.16, "n_corrector": 1}), ("prob_flow", {"rtol": 1e-3}),
    ("edm_stochastic", {"S_churn": 10.0, "S_noise": 1.0, "S_tmax": 1e6, "S_tmin": 0.0})]


def _overlap(a, b) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1


def _measure(fig) -> dict:
    """What a reader sees, from the figure as it is about to be written."""
    fig.draw_without_rendering()
    r = fig.canvas.get_renderer()
    panels = []
    for ax in fig.axes:
        leg = ax.get_legend()
        curves = [(lab, to_rgba(line.get_color()), line.get_marker()) for lab, line, _c in plots._curves(ax)]
        panels.append(dict(ax=ax.get_window_extent(r), legend=leg.get_window_extent(r) if leg else None,
                           curves=curves, yscale=ax.get_yscale(), ylabel=ax.get_ylabel(),
                           ys=[y for _l, line, _c in plots._curves(ax) for y in line.get_ydata()],
                           title=ax.title.get_window_extent(r) if ax.title.get_text() else None,
                           texts=[(t.get_text(), t.get_window_extent(r)) for t in ax.texts]))
    sup = fig._suptitle.get_window_extent(r) if fig._suptitle is not None and fig._suptitle.get_text() else None
    return dict(panels=panels, suptitle=sup)


@pytest.fixture
def written(monkeypatch):
    """name -> measurements of every figure plots.py would write (nothing is written)."""
    out: dict[str, dict] = {}
    monkeypatch.setattr(plots, "_write_png", lambda fig, path: out.__setitem__(path.name, _measure(fig)))
    return out


def _check_readable(m: dict) -> None:
    panels = m["panels"]
    for p in panels:
        # the legend is off every panel's data area
        if p["legend"] is not None:
            for q in panels:
                assert not _overlap(p["legend"], q["ax"]), "legend covers a panel"
        # one colour and one marker per curve, and so one (colour, marker) pair
        colours = [c for _lab, c, _mk in p["curves"]]
        pairs = [(c, mk) for _lab, c, mk in p["curves"]]
        assert len(set(pairs)) == len(pairs), "two curves of one panel look alike"
        if len(colours) <= 20:
            assert len(set(colours)) == len(colours), "two curves of one panel share a colour"
        # FID on a log axis exactly when it spans a decade
        if "FID" in p["ylabel"]:
            ys = np.asarray(p["ys"], float)
            ys = ys[np.isfinite(ys)]
            want = "log" if ys.min() > 0 and ys.max() / ys.min() >= 10 else "linear"
            assert p["yscale"] == want, (p["yscale"], ys.min(), ys.max())
    # titles do not overlap one another or the figure title
    titles = [p["title"] for p in panels if p["title"] is not None] + ([m["suptitle"]] if m["suptitle"] else [])
    for a, b in itertools.combinations(titles, 2):
        assert not _overlap(a, b), "titles overlap"


def _many_sampler_records(fid_scale: float) -> list[dict]:
    """13 samplers (more than tab10 has colours) at 3 NFEs; FID from 4x to 140x fid_scale/..."""
    R = []
    for i, (s, o) in enumerate(SAMPLERS):
        for nfe, f in ((5, 140.0), (10, 30.0), (50, 4.0)):
            R.append(rec(sampler=s, sampler_opts=o, steps=nfe, nfe=nfe, fid=fid_scale * f * (1 + 0.01 * i),
                         sec_per_batch=0.01 * nfe * (1 + i)))
    return R


def test_fid_vs_nfe_and_latency_are_readable(written, tmp_path):
    lb = leaderboard(_many_sampler_records(1.0))
    plots.plot_fid_vs_nfe(lb, tmp_path)
    plots.plot_fid_vs_latency(lb, tmp_path)
    assert len(written) == 2
    for name, m in written.items():
        _check_readable(m)
        (p,) = m["panels"]
        assert p["yscale"] == "log" and len(p["curves"]) == len(SAMPLERS), name
        assert p["legend"] is not None and p["legend"].x0 >= p["ax"].x1  # right of the data


def test_fid_within_a_decade_stays_linear(written, tmp_path):
    R = [rec(sampler=s, sampler_opts=o, steps=n, nfe=n, fid=f) for (s, o) in SAMPLERS[:3]
         for n, f in ((10, 15.0), (20, 9.0), (50, 6.0))]
    plots.plot_fid_vs_nfe(leaderboard(R), tmp_path)
    (m,) = written.values()
    _check_readable(m)
    assert m["panels"][0]["yscale"] == "linear"


def test_fid_yscale_rule():
    assert plots.fid_yscale([4.0, 40.0]) == "log"
    assert plots.fid_yscale([4.0, 39.9]) == "linear"
    assert plots.fid_yscale([0.0, 100.0]) == "linear"        # no log of 0
    assert plots.fid_yscale([5.0, np.nan, 70.0]) == "log"


def test_styles_are_distinct():
    labels = [f"s{i}" for i in range(20)]
    st = plots.styles(labels)
    assert len({to_rgba(s["color"]) for s in st.values()}) == 20
    assert len({(to_rgba(s["color"]), s["marker"]) for s in plots.styles([f"s{i}" for i in range(60)]).values()}) == 60
    assert len({s["marker"] for s in plots.styles(labels[:12]).values()}) == 12


def test_sample_grid_titles_do_not_overlap(written, tmp_path):
    R = [rec(sampler=s, sampler_opts=o, steps=50, nfe=50, preview=image_preview(i, n=16))
         for i, (s, o) in enumerate(SAMPLERS[:8] + SAMPLERS[-3:])]
    plots.plot_sample_grids(R, tmp_path)
    (m,) = written.values()
    assert len(m["panels"]) == 11
    _check_readable(m)
    for p in m["panels"]:   # a title stays over its own panel
        assert p["title"].width <= p["ax"].width * 1.05


def test_heatmap_is_readable(written, tmp_path):
    R = _many_sampler_records(1.0) + [dict(r, model="cpu2", model_hash="hashB", fid=r["fid"] * 1.3)
                                      for r in _many_sampler_records(1.0)]
    plots.plot_nfe_heatmap(leaderboard(R), tmp_path)
    (m,) = written.values()
    _check_readable(m)
    for p in m["panels"]:   # a cell's number fits inside its cell
        cell_w = p["ax"].width / 3
        assert p["texts"] and all(box.width <= cell_w for _t, box in p["texts"])


def test_paper_figure_through_save_figure_is_tidied(written, tmp_path):
    """A reproduction's own figure (EDM Fig. 2 style: tab10 by label over two panels, so 12 curves in one panel
    repeat colours; legends inside; log y where FID spans a small range; long panel titles)."""
    from matplotlib import colormaps

    labels = [f"sampler {i}, karras rho=7" for i in range(12)]
    color = {lab: colormaps["tab10"](i % 10) for i, lab in enumerate(labels)}
    fig = plots.new_figure(10.4, 4.2)
    for k, (names, lo) in enumerate(((labels, 4.0), (labels[:4], 6.0))):
        ax = fig.add_subplot(1, 2, k + 1)
        for i, lab in enumerate(names):
            hi = 300.0 if k == 0 else 9.0     # panel 1 spans two decades, panel 2 less than one
            ax.errorbar([5, 10, 50], [hi * (1 + 0.01 * i), 20.0, lo], yerr=[[1, 1, 1], [1, 1, 1]], marker="o",
                        label=lab, color=color[lab], capsize=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("FID (mean ± 95% interval)")
        ax.set_title("a rather long panel title that names the model, its parametrisation and the dataset", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("EDM Fig. 2 at our scale (digits): FID vs NFE")
    plots.save_figure(fig, tmp_path / "paper.png")
    m = written["paper.png"]
    _check_readable(m)
    p1, p2 = m["panels"]
    assert p1["yscale"] == "log" and p2["yscale"] == "linear"
    assert all(p["legend"] is not None for p in (p1, p2))
    # one label keeps one style across panels
    style1 = {lab: (c, mk) for lab, c, mk in p1["curves"]}
    assert all(style1[lab] == (c, mk) for lab, c, mk in p2["curves"])


def test_a_point_preview_grid_and_no_legend_figure_still_save(tmp_path):
    pts = np.random.default_rng(0).normal(size=(100, 2))
    R = [rec(reproduction="toy2d", model="mlp", dataset="gmm8", sampler="heun", sampler_opts={},
             preview=encode_preview(pts, "float16"))]
    (path,) = plots.plot_sample_grids(R, tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG"
