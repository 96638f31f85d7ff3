"""bench_core.report: leaderboard, plots, scorecard, report and README, all from synthetic records."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

import reproductions
from bench_core.records import Record, RecordStore, encode_preview
from bench_core.report import (
    leaderboard, make_plots, read_csv, scorecard, scorecard_markdown, to_csv, to_markdown, update_readme,
    write_report,
)
from bench_core.report.leaderboard import fmt_sig, markdown_table
from bench_core.report.report import MARKERS, extractor_statement

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXTRACTOR = "digits_cnn@0123456789ab"


def rec(**kw) -> dict:
    base = dict(suite="unit", entry="e", reproduction="toy", model="cpu", model_hash="hashA", dataset="digits8",
                sampler="ddim", sampler_opts={"eta": 0.0}, grid={"kind": "uniform"}, steps=10, nfe=10.0,
                num_samples=1000, batch_size=100, seed=0, fid=10.0, kid=0.01, precision=0.8, recall=0.7,
                fid_extractor=EXTRACTOR, fid_reference="digits8:test:1000", sec_per_batch=0.5,
                samples_per_sec=200.0, peak_mem_mb=123.4, device="cpu", device_name="Test CPU", git_sha="abc123",
                status="ok")
    base.update(kw)
    return asdict(Record(**base))


def image_preview(seed=0, n=9):
    rng = np.random.default_rng(seed)
    return encode_preview(rng.integers(0, 256, size=(n, 1, 8, 8)), "uint8")


def synthetic_records() -> list[dict]:
    """Group A (toy/cpu on digits8, n=1000), group B (same model, n=500), group C (another
    extractor), group D (2-D points model), an error record, a diverged record, two seeds."""
    R = []
    # group A: ddim eta=0 at 10/20/50 steps, ddpm at 100 steps; two seeds of ddim@20
    R.append(rec(steps=10, nfe=10, fid=30.0, sec_per_batch=0.1, preview=image_preview(1)))
    R.append(rec(steps=20, nfe=20, fid=20.0, seed=0, sec_per_batch=0.2))
    R.append(rec(steps=20, nfe=20, fid=22.0, seed=1, sec_per_batch=0.2))
    R.append(rec(steps=50, nfe=50, fid=12.0, sec_per_batch=0.5, preview=image_preview(2)))
    R.append(rec(sampler="ddpm", sampler_opts={}, steps=100, nfe=100, fid=11.0, sec_per_batch=1.0,
                 preview=image_preview(3)))
    # group B: same model but num_samples 500 -> a FID of 1.0 must never outrank group A rows
    R.append(rec(num_samples=500, steps=10, nfe=10, fid=1.0, fid_reference="digits8:test:500"))
    R.append(rec(num_samples=500, steps=50, nfe=50, fid=0.5, fid_reference="digits8:test:500"))
    # group C: same everything as A but another extractor
    R.append(rec(fid_extractor="inception-v3-compat@fedcba987654", steps=50, nfe=50, fid=2.0))
    # group D: 2-D toy model with point previews
    pts = np.random.default_rng(0).normal(size=(200, 2))
    R.append(rec(reproduction="toy2d", model="mlp", model_hash="hashP", dataset="gmm8", sampler="heun",
                 sampler_opts={}, grid={"kind": "karras", "rho": 7}, steps=18, nfe=35, fid=3.0,
                 preview=encode_preview(pts, "float16")))
    # failures: never ranked, listed in the report
    R.append(rec(steps=5, nfe=5, fid=None, status="error", error="RuntimeError: boom | pipe\nsecond line"))
    R.append(rec(steps=2, nfe=2, fid=float("nan"), status="diverged", error="NaN in samples"))
    return R


# --------------------------------------------------------------------------------------------
# fake reproduction
# --------------------------------------------------------------------------------------------
class FakeRep(reproductions.Reproduction):
    name = "toy"
    title = "Toy paper"
    paper_url = "https://example.org/toy"

    def claims(self):
        C, CR = reproductions.Claim, reproductions.ClaimResult

        def best_fid_below_15(df):
            ok = df[(df["reproduction"] == "toy") & (df["status"] == "ok")]
            if ok.empty:
                return CR("not run", "no records")
            best = ok["fid"].min()
            return CR("pass" if best < 15 else "fail", f"best FID {best:.2f}")

        def impossible(df):
            return CR("fail", "FID 11.00 at 100 steps")

        def broken(df):
            raise ValueError("check exploded")

        def not_run(df):
            return CR("not run", "needs the paper config", "paper config only")

        def noisy(df):
            return CR("inconclusive", "difference 0.1 ± 0.5")

        return [C("best", "best FID below 15", "FID 3.17", best_fid_below_15),
                C("impossible", "FID below 1 at 100 steps", "FID 0.9", impossible),
                C("broken", "a check that raises", "?", broken),
                C("later", "paper-scale claim", "FID 3.17 (≈)", not_run),
                C("noisy", "a sanity check inside the noise", "", noisy, kind="sanity")]

    def tables(self, df):
        ok = df[(df["reproduction"] == "toy") & (df["status"] == "ok")]
        t = ok.groupby("steps")["fid"].mean().rename("FID").to_frame()
        return {"Table 1: FID by steps": t}

    def plots(self, df, outdir):
        from matplotlib.figure import Figure

        fig = Figure()
        fig.add_subplot(1, 1, 1).plot([1, 2], [3, 4])
        p = outdir / "toy_paper_fig.png"
        fig.savefig(p)
        return [p]


class BrokenPlotsRep(reproductions.Reproduction):
    name = "zz_broken"
    title = "Broken"

    def claims(self):
        raise RuntimeError("claims exploded")

    def tables(self, df):
        raise RuntimeError("tables exploded")

    def plots(self, df, outdir):
        raise RuntimeError("plots exploded")


@pytest.fixture
def fake_registry(monkeypatch):
    from bench_core import plugin

    fake = {"toy": FakeRep(), "zz_broken": BrokenPlotsRep()}
    monkeypatch.setattr(plugin, "REGISTRY", fake)
    monkeypatch.setattr(plugin, "_discovered", True)
    monkeypatch.setattr(plugin, "_ERRORS", {})
    return fake


@pytest.fixture
def records_dir(tmp_path):
    d = tmp_path / "results"
    store = RecordStore(d / "records.jsonl")
    for r in synthetic_records():
        store.append(r)
    return d


# --------------------------------------------------------------------------------------------
# leaderboard
# --------------------------------------------------------------------------------------------
def test_leaderboard_ranks_within_groups():
    lb = leaderboard(synthetic_records())
    assert set(lb.columns) >= {"group", "rank", "tied", "reproduction", "model", "sampler", "steps", "nfe",
                               "fid_mean", "fid_sem", "fid_ci_lo", "fid_ci_hi", "kid_mean", "precision_mean",
                               "recall_mean", "sec_per_batch", "samples_per_sec", "peak_mem_mb", "device_name",
                               "n_seeds"}
    # four comparable groups: A, B (n=500), C (other extractor), D (2-D model)
    assert lb["group"].nunique() == 4
    for _, g in lb.groupby("group"):
        assert g["fid_mean"].is_monotonic_increasing
        # a group never mixes sample counts, extractors, references or models
        for col in ("num_samples", "fid_extractor", "fid_reference", "model_hash", "dataset"):
            assert g[col].nunique() == 1
    a = lb[(lb["num_samples"] == 1000) & (lb["fid_extractor"] == EXTRACTOR) & (lb["model"] == "cpu")]
    assert list(a["fid_mean"]) == [11.0, 12.0, 21.0, 30.0]
    assert list(a["sampler"]) == ["ddpm uniform", "ddim(eta=0.0) uniform", "ddim(eta=0.0) uniform",
                                  "ddim(eta=0.0) uniform"]
    assert list(a["steps"]) == [100, 50, 20, 10]
    # one-seed configurations have no interval and no rank; the two-seed one has no rival with an interval
    assert a["rank"].isna().tolist() == [True, True, False, True]
    assert a.loc[a["steps"] == 20, "rank"].item() == 1 and not a.loc[a["steps"] == 20, "tied"].item()
    # error / diverged records never appear
    assert not ((lb["steps"] == 5) | (lb["steps"] == 2)).any()


def test_leaderboard_intervals_and_ties_by_hand():
    """Three configurations with three seeds each: A (10, 11, 12), B (11, 12, 13) overlap -> tied rank 1;
    C (20, 21, 22) lies wholly above both -> rank 3 (two configurations are better), not tied.
    95% t-interval with 2 dof: mean ± 4.302653 * 1/sqrt(3) (sd 1)."""
    recs = []
    for steps, fids in ((10, (10.0, 11.0, 12.0)), (20, (11.0, 12.0, 13.0)), (50, (20.0, 21.0, 22.0))):
        recs += [rec(steps=steps, nfe=steps, seed=i, fid=f) for i, f in enumerate(fids)]
    recs.append(rec(steps=100, nfe=100, seed=0, fid=1.0))   # one seed: best mean, but no rank
    lb = leaderboard(recs).set_index("steps")
    half = 4.302653 / np.sqrt(3)
    assert lb.loc[10, "fid_mean"] == pytest.approx(11.0)
    assert lb.loc[10, "fid_sem"] == pytest.approx(1 / np.sqrt(3))
    assert lb.loc[10, "fid_ci_lo"] == pytest.approx(11.0 - half, abs=1e-5)
    assert lb.loc[10, "fid_ci_hi"] == pytest.approx(11.0 + half, abs=1e-5)
    assert (lb.loc[10, "rank"], lb.loc[10, "tied"]) == (1, True)
    assert (lb.loc[20, "rank"], lb.loc[20, "tied"]) == (1, True)
    assert (lb.loc[50, "rank"], lb.loc[50, "tied"]) == (3, False)
    assert pd.isna(lb.loc[100, "rank"]) and lb.loc[100, "n_seeds"] == 1
    md = to_markdown(lb.reset_index())
    ranks = [ln.strip("|").split(" | ")[0].strip() for ln in md.splitlines() if ln.startswith("| ")][2:]
    assert ranks == ["1 seed", "=1", "=1", "3"]
    assert f"11.00 ± {half:.2f}" in md


def test_leaderboard_names_variants_of_one_preset():
    """Two guidance scales of one preset are two groups (two hashes); the recorded model_label tells them apart
    in the model column and in the Markdown headings; a model without a label keeps its bare name."""
    recs = [rec(model="guided", model_hash=f"h{s}", fid=5.0 + s, metrics={"model_label": f"scale={s:g}"})
            for s in (10.0, 0.5, 2.0)] + [rec()]
    lb = leaderboard(recs)
    # groups in natural order of the label (0.5 < 2 < 10), not by hash or as strings
    assert list(dict.fromkeys(lb["model"])) == ["cpu", "guided [scale=0.5]", "guided [scale=2]", "guided [scale=10]"]
    md = to_markdown(lb)
    assert "model guided [scale=0.5] (toy)" in md and "model guided [scale=2] (toy)" in md


def test_leaderboard_seed_average_and_nfe_budget():
    lb = leaderboard(synthetic_records())
    row = lb[(lb["steps"] == 20)]
    assert len(row) == 1
    assert row["n_seeds"].item() == 2
    assert row["fid_mean"].item() == pytest.approx(21.0)
    assert row["fid_sem"].item() == pytest.approx(np.std([20.0, 22.0], ddof=1) / np.sqrt(2))
    assert (lb.loc[lb["steps"] != 20, "n_seeds"] == 1).all()

    small = leaderboard(synthetic_records(), nfe_max=20)
    assert (small["nfe"] <= 20).all()
    a = small[(small["num_samples"] == 1000) & (small["model"] == "cpu")]
    assert list(a["steps"]) == [20, 10]
    assert leaderboard(synthetic_records(), nfe_max=1).empty


def test_leaderboard_repeated_seed_last_wins_and_group_filter():
    recs = synthetic_records() + [rec(steps=10, nfe=10, fid=28.0)]   # re-run of seed 0 at 10 steps
    lb = leaderboard(recs)
    row = lb[(lb["steps"] == 10) & (lb["num_samples"] == 1000) & (lb["model"] == "cpu")]
    assert row["fid_mean"].item() == 28.0 and row["n_seeds"].item() == 1
    only_b = leaderboard(recs, group_filter={"num_samples": 500})
    assert set(only_b["num_samples"]) == {500} and len(only_b) == 2
    only_2d = leaderboard(recs, group_filter="gmm8")
    assert set(only_2d["model"]) == {"mlp"}
    assert set(leaderboard(recs, group_filter=lambda r: r["sampler"] == "heun")["sampler"]) == {
        "heun karras(rho=7)"}


def test_markdown_and_csv(tmp_path):
    lb = leaderboard(synthetic_records())
    md = to_markdown(lb)
    assert md.count("### ") == 4
    assert "### model cpu (toy) · digits8 · digits_cnn@0123456789ab · n=1000 · Test CPU" in md
    assert "n=500" in md and "inception-v3-compat" in md
    rows = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in md.splitlines() if ln.startswith("| ")]
    ddpm = [r for r in rows if "ddpm uniform" in r]
    assert len(ddpm) == 1 and ddpm[0][:6] == ["1 seed", "toy", "ddpm uniform", "100", "100", "11.00"]
    seeds = [r for r in rows if r[2:4] == ["ddim(eta=0.0) uniform", "20"]]
    half = 12.706205 * np.std([20.0, 22.0], ddof=1) / np.sqrt(2)
    assert len(seeds) == 1 and seeds[0][0] == "1" and seeds[0][5:7] == [f"21.00 ± {half:.2f}", "2"]
    # every table row has the same number of cells as its header
    for block in md.split("###")[1:]:
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.count(" | ") for ln in rows}) == 1
    assert "tabulate" not in md

    path = to_csv(lb, tmp_path / "lb.csv")
    back = read_csv(path)
    pd.testing.assert_frame_equal(back, lb, check_dtype=False)
    raw = pd.read_csv(path)
    assert {"fid_mean", "fid_sem", "fid_ci_lo", "fid_ci_hi", "n_seeds", "rank", "tied"} <= set(raw.columns)
    assert list(raw["fid_mean"]) == list(lb["fid_mean"])


def test_nfe_view_matches_budgets_and_ties():
    """FID at matched NFE: a sampler at 9 NFE (Heun) stands in for 10 (within one NFE), ranks are within one
    model and one budget, and a model with one sampler per budget is left out."""
    from bench_core.report.leaderboard import nfe_view, nfe_view_markdown

    recs = []
    for smp, steps, nfe, fids in (("ddim", 10, 10, (8.0, 9.0, 10.0)), ("heun", 5, 9, (8.5, 9.5, 10.5)),
                                  ("euler", 10, 10, (20.0, 21.0, 22.0)), ("ddim", 20, 20, (5.0, 5.5, 6.0))):
        recs += [rec(sampler=smp, sampler_opts={}, steps=steps, nfe=nfe, seed=i, fid=f) for i, f in enumerate(fids)]
    recs.append(rec(model="other", model_hash="hashO", sampler="ddim", sampler_opts={}, steps=10, nfe=10, fid=3.0))
    v = nfe_view(recs, (5, 10, 20))
    assert set(v["model"]) == {"cpu"}
    ten = v[v["target_nfe"] == 10].set_index("sampler")
    assert set(ten.index) == {"ddim uniform", "heun uniform", "euler uniform"}
    assert ten.loc["heun uniform", "nfe"] == 9
    assert (ten.loc["ddim uniform", "rank"], bool(ten.loc["ddim uniform", "tied"])) == (1, True)
    assert (ten.loc["heun uniform", "rank"], bool(ten.loc["heun uniform", "tied"])) == (1, True)
    assert (ten.loc["euler uniform", "rank"], bool(ten.loc["euler uniform", "tied"])) == (3, False)
    assert list(v.loc[v["target_nfe"] == 20, "sampler"]) == ["ddim uniform"]
    md = nfe_view_markdown(v)
    assert "| NFE 10" in md and "@9" in md and "(=1)" in md and "(3)" in md


def test_formatting_helpers():
    assert fmt_sig(0.123456) == "0.123"
    assert fmt_sig(1234.5) == "1230"
    assert fmt_sig(9.996) == "10.0"
    assert fmt_sig(None) == "–" and fmt_sig(float("nan")) == "–"
    t = markdown_table(pd.DataFrame({"a": ["x|y", "z"], "b": [1.5, None]}))
    assert "x\\|y" in t and t.splitlines()[1].startswith("| :")


def test_ok_rows_filters_status_present_columns_and_values():
    """The claims' record filter, against the rows picked out by hand."""
    df = pd.DataFrame([rec(entry="a"), rec(entry="b", status="error"), rec(entry="c", fid=None),
                       rec(entry="d", sampler_opts={"eta": 1.0}), rec(entry="e", grid={"kind": "quadratic"}),
                       rec(entry="f", model="gpu", steps=20)])
    ok_rows = reproductions.ok_rows
    assert list(ok_rows(df)["entry"]) == ["a", "c", "d", "e", "f"]
    assert list(ok_rows(df, "fid")["entry"]) == ["a", "d", "e", "f"]
    assert list(ok_rows(df, "fid", model="cpu", steps=10, opt_eta=0.0, grid_kind="uniform")["entry"]) == ["a"]
    assert list(ok_rows(df, model="gpu")["entry"]) == ["f"]
    assert ok_rows(None) is None and len(ok_rows(df.iloc[:0])) == 0


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def test_make_plots(tmp_path, fake_registry):
    errors = []
    paths = make_plots(synthetic_records(), tmp_path / "plots", errors=errors)
    names = [p.name for p in paths]
    for p in paths:
        assert p.exists() and p.stat().st_size > 100 and p.read_bytes()[:8] == PNG_MAGIC
    # groups A and B have curves; C and D hold one point each (no curve, their number is in the leaderboard)
    assert sum(n.startswith("fid_vs_nfe__") for n in names) == 2
    assert sum(n.startswith("fid_vs_latency__") for n in names) == 2
    samples = [n for n in names if n.startswith("samples__")]
    assert len(samples) == 2     # the image model and the 2-D points model
    assert "toy_paper_fig.png" in names
    assert all(n == n.lower() and " " not in n for n in names)
    # the failing reproduction is reported, not raised
    assert any(src == "zz_broken" and "plots exploded" in msg for src, msg in errors)
    # filenames are stable
    again = make_plots(synthetic_records(), tmp_path / "plots2")
    assert sorted(p.name for p in again) == sorted(names)


def test_sample_grid_tiles_preview():
    from bench_core.report.plots import tile_images

    arr = np.arange(5 * 3 * 4 * 4, dtype=np.uint8).reshape(5, 3, 4, 4)
    grid = tile_images(arr, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert (grid[1:5, 1:5] == arr[0].transpose(1, 2, 0)).all()
    assert (grid[6:10, 6:10] == arr[4].transpose(1, 2, 0)).all()


# --------------------------------------------------------------------------------------------
# scorecard
# --------------------------------------------------------------------------------------------
def test_scorecard(fake_registry, tmp_path):
    from bench_core.report.scorecard import to_csv as sc_to_csv

    sc = scorecard(synthetic_records())
    assert list(sc.columns) == ["reproduction", "id", "kind", "claim", "status", "why", "ours", "reported"]
    by_id = sc.set_index("id")
    assert by_id.loc["best", "status"] == "pass" and by_id.loc["best", "ours"] == "best FID 0.50"
    assert by_id.loc["best", "why"] == ""
    assert by_id.loc["impossible", "status"] == "fail" and by_id.loc["impossible", "why"]
    assert by_id.loc["broken", "status"] == "error" and "check exploded" in by_id.loc["broken", "why"]
    assert by_id.loc["later", "status"] == "not run" and by_id.loc["later", "why"] == "paper config only"
    assert by_id.loc["noisy", "status"] == "inconclusive" and by_id.loc["noisy", "kind"] == "sanity"
    assert by_id.loc["(claims)", "status"] == "error"
    md = scorecard_markdown(sc)
    # the headline counts each kind apart
    assert "**paper claims**: 1 pass, 1 fail, 0 inconclusive, 1 not run, 1 error" in md
    assert "**sanity claims**: 0 pass, 0 fail, 1 inconclusive, 0 not run, 1 error" in md
    assert "| toy" in md and "FID 3.17 (≈)" in md
    csv = pd.read_csv(sc_to_csv(sc, tmp_path / "scorecard.csv"), keep_default_na=False)
    assert list(csv.columns) == ["reproduction", "id", "kind", "status", "why", "ours", "reported"]
    assert len(csv) == len(sc)
    # no records: the check reports "not run", nothing crashes
    empty = scorecard([]).set_index("id")
    assert empty.loc["best", "status"] == "not run"


# --------------------------------------------------------------------------------------------
# report and README
# --------------------------------------------------------------------------------------------
def test_write_report(tmp_path, records_dir, fake_registry):
    out = tmp_path / "report"
    path = write_report(records_dir, out)
    text = path.read_text()
    for section in ("# diffbench report", "## Run", "## Leaderboard", "## Reproduction tables",
                    "#### Table 1: FID by steps", "## Plots", "## Scorecard", "## Report problems"):
        assert section in text, section
    assert "- records: 11" in text and "- source: " in text and "Test CPU" in text and "`abc123`" in text
    assert "| error " in text and "| diverged " in text
    assert "RuntimeError: boom \\| pipe second line" in text and "NaN in samples" in text
    assert "tables() failed" in text and "plots exploded" in text
    # plots are embedded with relative links that resolve
    links = [ln[ln.index("](") + 2:-1] for ln in text.splitlines() if ln.startswith("![")]
    assert links and all(link.startswith("plots/") for link in links)
    assert all((out / link).exists() for link in links)
    assert (out / "leaderboard.csv").exists()
    # deterministic
    assert write_report(records_dir, out).read_text() == text


README = """# diffbench

Intro text.

## Leaderboard
{ls}
old leaderboard
{le}

## Scorecard
{ss}
stale
{se}

Extractor: {es}old{ee}

Tail text.
"""


def _readme(tmp_path, **drop):
    kw = dict(ls=MARKERS["leaderboard"][0], le=MARKERS["leaderboard"][1], ss=MARKERS["scorecard"][0],
              se=MARKERS["scorecard"][1], es=MARKERS["extractor"][0], ee=MARKERS["extractor"][1])
    kw.update(drop)
    p = tmp_path / "README.md"
    p.write_text(README.format(**kw))
    return p


def test_update_readme(tmp_path, records_dir, fake_registry):
    meta = tmp_path / "digits_cnn.json"
    meta.write_text(json.dumps({"heldout_accuracy": 0.9912, "n_test": 1797, "sha256": "f" * 64}))
    p = _readme(tmp_path)
    assert update_readme(p, records_dir, extractor_json=meta)
    text = p.read_text()
    assert "old leaderboard" not in text and "stale" not in text and "Extractor: " in text
    assert text.startswith("# diffbench\n\nIntro text.\n\n## Leaderboard\n")
    assert text.endswith("\n\nTail text.\n")
    assert "FID at matched NFE" in text and "**paper claims**: 1 pass, 1 fail" in text and "scorecard.csv" in text
    assert "held-out accuracy 99.12% on 1797 test images" in text and "f" * 64 in text
    # idempotent
    assert update_readme(p, records_dir, extractor_json=meta)
    assert p.read_text() == text

    # missing extractor file is said, not crashed on
    assert "missing" in extractor_statement(tmp_path / "nope.json")

    # a broken marker pair leaves the README untouched
    q = _readme(tmp_path, le="")
    before = q.read_text()
    assert update_readme(q, records_dir, extractor_json=meta) is False
    assert q.read_text() == before
    # no markers at all
    q.write_text("# plain\n")
    assert update_readme(q, records_dir) is False and q.read_text() == "# plain\n"


def test_ddpm_quality_claim_without_fid_is_not_run():
    """A DDPM-1000 record whose FID is missing (e.g. the extractor failed) leaves the claim "not run", no crash."""
    from bench_core.report.leaderboard import records_df
    from reproductions.ddpm import _check_quality

    r = rec(reproduction="ddpm", model="digits", sampler="ddpm", sampler_opts={"variance": "beta"}, steps=1000, fid=None)
    assert _check_quality(records_df([r])).status == "not run"
    ok = [rec(reproduction="ddpm", model="digits", sampler="ddpm", sampler_opts={"variance": "beta"}, steps=1000,
              seed=s, fid=f, metrics={"fid_real_data": 3.0}) for s, f in enumerate((5.0, 5.2, 4.8))]
    one = _check_quality(records_df([r, ok[0]]))
    assert one.status == "inconclusive" and "one replicate" in one.why   # one seed: no estimate of the noise
    assert _check_quality(records_df([r, *ok])).status == "pass"         # 5.0 +- 0.2 well under 3 x 3.0
