"""``diffbench run --dry-run``: NFE counted on a stand-in denoiser, time from earlier records, nothing written."""
import json

from bench_core.cli import main
from bench_core.dryrun import count_nfe, format_plan, plan
from bench_core.suite import load_suite


def test_counted_nfe_matches_each_samplers_cost_per_step():
    assert count_nfe("ddim", {"kind": "uniform"}, 10, {"eta": 0.0}) == 10
    assert count_nfe("euler", {"kind": "karras", "rho": 7.0}, 18, {}) == 18
    assert count_nfe("heun", {"kind": "karras", "rho": 7.0}, 18, {}) == 35          # 2N - 1 (EDM Alg. 1)
    assert count_nfe("pc", {"kind": "geometric"}, 10, {}) == 20                     # predictor + one corrector step
    assert count_nfe("annealed_langevin", {"kind": "geometric"}, 10, {"T": 3}) == 30  # L levels x T steps
    assert count_nfe("sohl_dickstein", {"kind": "uniform"}, 40, {}) == 40            # one kernel evaluation per step


def _history_line(**fields) -> str:
    """One earlier record (a whole one: readers skip lines that are not records) as a JSONL line."""
    from dataclasses import asdict

    from bench_core.records import Record

    return json.dumps(asdict(Record(status="ok", device="cpu", **fields))) + "\n"


def _suite(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("""
name: tiny
defaults: {num_samples: 8, batch_size: 4, seeds: [0]}
entries:
  - {name: a, reproduction: ddim, model: digits, model_overrides: {train: {steps: 3}}, sampler: ddim, steps: [5, 10]}
  - {name: b, reproduction: ddpm, model: digits, model_overrides: {train: {steps: 3}}, sampler: heun, grid: {kind: karras},
     steps: 4}
""")
    return p


def test_plan_estimates_time_from_earlier_records_of_the_same_model(tmp_path):
    suite = load_suite(str(_suite(tmp_path)))
    h = suite.runs[0].model_hash
    hist = tmp_path / "hist" / "records.jsonl"
    hist.parent.mkdir()
    hist.write_text(_history_line(model_hash=h, batch_size=4, nfe=10, sec_per_batch=2.0, train_sec=30.0))
    rows = plan(suite, device="cpu", cache_dir=tmp_path / "cache", history=[hist.parent])
    assert [r.nfe for r in rows] == [5, 10, 7]
    assert [r.total_nfe for r in rows] == [40, 80, 56]
    assert not any(r.cached for r in rows)
    # 0.2 s per NFE on a batch of 4, two batches; the model's training (30 s) counted once
    assert [round(r.sample_sec, 6) for r in rows] == [2.0, 4.0, 2.8]
    assert [r.train_sec for r in rows] == [30.0, 0.0, 0.0]
    text = format_plan(rows, "cpu")
    assert "3 runs, 176 network evaluations" in text and "1 model(s) to train" in text and "38.8 s" in text
    assert "of which 30.0 s training" in text


def test_cli_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--suite", str(_suite(tmp_path)), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--dry-run", "--history", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "3 runs" in text and "time unknown" in text
    assert not out.exists() and not (tmp_path / "c").exists()


def test_dry_run_resume_lists_only_what_is_left_and_counts_timing_repeats(tmp_path, capsys):
    """With --resume the runs already recorded in --out are left out of the listing and of the estimate; extra
    timed repeats of a batch are part of a run's time."""
    from bench_core.records import Record, RecordStore

    suite = load_suite(str(_suite(tmp_path)))
    first = suite.runs[0]
    out = tmp_path / "out"
    RecordStore(out / "records.jsonl").append(Record(
        suite=first.suite, entry=first.entry, reproduction=first.reproduction, model=first.model,
        model_hash=first.model_hash, sampler=first.sampler, sampler_opts=dict(first.sampler_opts), grid=dict(first.grid),
        steps=first.steps, seed=first.seed, num_samples=first.num_samples, batch_size=first.batch_size, status="ok"))
    assert main(["run", "--suite", str(_suite(tmp_path)), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--dry-run", "--resume", "--history", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    assert "resume: 1 of 3 runs already recorded" in text and "2 runs," in text
    rows = plan(suite, device="cpu", cache_dir=tmp_path / "c", history=[], skip={first.key()})
    assert [(r.entry, r.steps) for r in rows] == [("a", 10), ("b", 4)]
    # timing_repeats: 0.2 s per NFE, 10 NFE, two batches + two repeats of the first
    hist = tmp_path / "hist" / "records.jsonl"
    hist.parent.mkdir()
    hist.write_text(_history_line(model_hash=first.model_hash, batch_size=4, nfe=10, sec_per_batch=2.0))
    suite.runs[1].timing_repeats = 2
    rows = plan(suite, device="cpu", cache_dir=tmp_path / "c", history=[hist.parent])
    assert round(rows[1].sample_sec, 6) == 0.2 * 10 * (2 + 2)


def test_needed_checkpoints_include_base_models_and_calibrations():
    """A wrapper model is cached only when everything it loads is: the ddpm base, the classifier, the calibration."""
    import reproductions
    from reproductions.ddpm import DDPM_REPRO

    reproductions.discover()
    base = DDPM_REPRO.model_hash("digits", {})
    qd = reproductions.get("qdiffusion")
    w8 = qd.needed_checkpoints("digits-w8a8-qdiff", {}, qd.model_config("digits-w8a8-qdiff", {}))
    assert w8[0] == base and len(w8) == 2 and w8[1] != qd.model_hash("digits-w8a8-qdiff", {})
    assert qd.needed_checkpoints("digits-fp32", {}, qd.model_config("digits-fp32", {})) == [base]
    adm = reproductions.get("adm")
    cfg = adm.model_config("guided", {})
    assert adm.needed_checkpoints("guided", {}, cfg) == [base, adm.classifier_hash(cfg)]
    sp = reproductions.get("speed")
    assert set(sp.needed_checkpoints("ddpm-digits-fast", {}, sp.model_config("ddpm-digits-fast", {}))) == {base}
