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


def _suite(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("""
name: tiny
defaults: {num_samples: 8, batch_size: 4, seeds: [0]}
entries:
  - {name: a, reproduction: ddim, model: digits, model_overrides: {train: {steps: 3}}, sampler: ddim, steps: [5, 10]}
  - {name: b, reproduction: ddpm, model: digits, model_overrides: {train: {steps: 3}}, sampler: heun, grid: {kind: karras}, steps: 4}
""")
    return p


def test_plan_estimates_time_from_earlier_records_of_the_same_model(tmp_path):
    suite = load_suite(str(_suite(tmp_path)))
    h = suite.runs[0].model_hash
    hist = tmp_path / "hist" / "records.jsonl"
    hist.parent.mkdir()
    hist.write_text(json.dumps({"status": "ok", "model_hash": h, "device": "cpu", "batch_size": 4, "nfe": 10,
                                "sec_per_batch": 2.0, "train_sec": 30.0}) + "\n")
    rows = plan(suite, device="cpu", cache_dir=tmp_path / "cache", history=[hist.parent])
    assert [r.nfe for r in rows] == [5, 10, 7]
    assert [r.total_nfe for r in rows] == [40, 80, 56]
    assert not any(r.cached for r in rows)
    # 0.2 s per NFE on a batch of 4, two batches; the model's training (30 s) counted once
    assert [round(r.sample_sec, 6) for r in rows] == [2.0, 4.0, 2.8]
    assert [r.train_sec for r in rows] == [30.0, 0.0, 0.0]
    text = format_plan(rows, "cpu")
    assert "3 runs, 176 network evaluations" in text and "1 model(s) to train" in text and "38.8 s" in text


def test_cli_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--suite", str(_suite(tmp_path)), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--dry-run", "--history", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "3 runs" in text and "time unknown" in text
    assert not out.exists() and not (tmp_path / "c").exists()
