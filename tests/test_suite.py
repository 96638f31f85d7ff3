"""Suite files: validation before any work, expansion, the smoke suite end to end, crash and resume."""
from pathlib import Path

import pytest
import yaml

from bench_core.cli import main
from bench_core.records import load_records
from bench_core.suite import SuiteError, load_suite, parse_suite

REPO = Path(__file__).resolve().parent.parent
GOOD_ENTRY = {"name": "e", "reproduction": "ddim", "model": "digits", "sampler": "ddim", "steps": [5, 10],
              "sampler_opts": {"eta": [0.0, 1.0]}, "grid": {"kind": ["uniform", "quadratic"]}}


def test_shipped_suites_are_valid():
    for name in ("smoke", "default"):
        s = load_suite(name)
        assert s.runs and all(r.model_hash for r in s.runs)


def test_expansion_is_the_product_of_lists():
    s = parse_suite({"name": "t", "entries": [GOOD_ENTRY]})
    assert len(s.runs) == 2 * 2 * 2
    assert {(r.sampler_opts["eta"], r.grid["kind"], r.steps) for r in s.runs} == {
        (e, g, n) for e in (0.0, 1.0) for g in ("uniform", "quadratic") for n in (5, 10)}


def test_every_problem_is_reported_at_once():
    bad = {
        "name": "bad", "colour": "red",
        "defaults": {"num_samples": "many"},
        "entries": [
            {**GOOD_ENTRY, "name": "a", "sampler": "warp-drive"},
            {**GOOD_ENTRY, "name": "b", "reproduction": "alchemy"},
            {**GOOD_ENTRY, "name": "c", "sampler_opts": {"eta": "lots", "zeta": 1}},
            {**GOOD_ENTRY, "name": "d", "steps": "ten", "grid": {"kind": "spiral"}, "bogus": 1},
            {**GOOD_ENTRY, "name": "e", "model": "imagenet"},
            {**GOOD_ENTRY, "name": "f", "model_overrides": {"train": {"stepz": 3, "lr": "fast"}}},
            {"name": "g"},
        ],
    }
    with pytest.raises(SuiteError) as ei:
        parse_suite(bad, "bad.yaml")
    msg = str(ei.value)
    for needle in ("colour", "defaults.num_samples", "warp-drive", "alchemy", "'lots'", "zeta", "ten", "spiral",
                   "bogus", "imagenet", "stepz", "lr", "missing required key 'reproduction'"):
        assert needle in msg, needle
    assert len(ei.value.problems) >= 13


def test_cli_rejects_bad_suite_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "entries": [{**GOOD_ENTRY, "sampler": "nope"}]}))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(path), "--out", str(out), "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists()
    path.write_text("entries: [unclosed")
    assert main(["run", "--suite", str(path), "--out", str(out)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", "--suite", "no-such-suite", "--out", str(out)]) == 2
    assert not out.exists()


def _tiny_suite(tmp_path) -> Path:
    data = {"name": "tiny", "defaults": {"num_samples": 8, "batch_size": 4, "seeds": [0],
                                          "model_overrides": {"train": {"steps": 5, "warmup": 1}}},
            "entries": [
                {"name": "ddim", "reproduction": "ddim", "model": "digits", "sampler": "ddim",
                 "sampler_opts": {"eta": [0.0, 1.0]}, "steps": [2, 3, 4]},
                {"name": "ddpm", "reproduction": "ddpm", "model": "digits", "sampler": "ddpm", "steps": [3]},
            ]}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_run_records_every_field_and_counts_nfe(tmp_path):
    suite = _tiny_suite(tmp_path)
    out = tmp_path / "out"
    assert main(["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress", "--no-report"]) == 0
    recs = load_records(out / "records.jsonl")
    assert len(recs) == 7 and all(r["status"] == "ok" for r in recs)
    for r in recs:
        assert r["nfe"] == r["steps"]  # counted by the harness
        assert r["fid"] is not None and r["fid_extractor"].startswith("diffbench-digits-cnn@")
        assert r["sec_per_batch"] > 0 and r["samples_per_sec"] > 0 and r["peak_mem_mb"] is not None
        assert r["device"] == "cpu" and r["device_name"] and r["git_sha"]
    # the model was trained once and shared by both reproductions
    assert len({r["model_hash"] for r in recs}) == 1
    assert sum(1 for r in recs if r["train_sec"]) == 1


def test_failing_entry_does_not_stop_the_suite(tmp_path, monkeypatch):
    from bench_core import samplers

    def broken(denoiser, x, sigmas, *, generator=None, cond=None):
        raise RuntimeError("boom")

    monkeypatch.setitem(samplers.SAMPLERS, "broken", samplers.SamplerSpec("broken", broken))

    def nan_sampler(denoiser, x, sigmas, *, generator=None, cond=None):
        return x * float("nan")

    monkeypatch.setitem(samplers.SAMPLERS, "nan", samplers.SamplerSpec("nan", nan_sampler))
    data = {"name": "mixed", "defaults": {"num_samples": 4, "model_overrides": {"train": {"steps": 3, "warmup": 1}}},
            "entries": [
                {"name": "bad", "reproduction": "ddpm", "model": "digits", "sampler": "broken", "steps": 2},
                {"name": "nan", "reproduction": "ddpm", "model": "digits", "sampler": "nan", "steps": 2},
                {"name": "good", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 2}]}
    p = tmp_path / "mixed.yaml"
    p.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(p), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--no-report"]) == 0
    by = {r["entry"]: r for r in load_records(out)}
    assert by["bad"]["status"] == "error" and "boom" in by["bad"]["error"]
    assert by["nan"]["status"] == "diverged" and by["nan"]["fid"] is None
    assert by["good"]["status"] == "ok"


# a kill mid-run followed by --resume: tests/test_guards.py (test_a_kill_mid_run_loses_nothing_and_resume_finishes)


# the smoke suite end to end, from an installed wheel: tests/test_wheel.py


def test_corrupted_checkpoint_and_missing_dataset_stop_before_any_work(tmp_path, capsys, monkeypatch):
    from bench_core.train import CheckpointCache

    suite = _tiny_suite(tmp_path)
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    # a first run writes records and a checkpoint
    assert main(["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(cache),
                 "--no-progress", "--no-report"]) == 0
    before = (out / "records.jsonl").read_bytes()
    h = load_suite(str(suite)).runs[0].model_hash
    ckpt = CheckpointCache(cache / "checkpoints").path(h)
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    assert main(["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(cache), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and str(ckpt) in err and "nothing was run" in err
    assert (out / "records.jsonl").read_bytes() == before  # results already written are kept as they were
    assert not list(out.glob("records-*.old"))

    # a model whose dataset files are missing: a clear error naming them, before any work
    monkeypatch.setenv("DIFFBENCH_DATA", str(tmp_path / "no-data"))
    data = {"name": "c", "entries": [{"name": "c", "reproduction": "ddpm", "model": "cifar10", "sampler": "ddim",
                                      "steps": 10}]}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    assert main(["run", "--suite", str(p), "--out", str(tmp_path / "out2"), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "data_batch_1" in err
    assert not (tmp_path / "out2").exists()
