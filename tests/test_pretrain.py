"""Training a suite's uncached models in worker processes first (bench_core/pretrain.py) and the checkpoint
cache's per-checkpoint lock that keeps two processes from training the same model."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from bench_core.plugin import discover
from bench_core.pretrain import plan_jobs
from bench_core.records import load_records
from bench_core.runner import run_suite
from bench_core.suite import parse_suite
from bench_core.train import CheckpointCache

FAST = {"train": {"steps": 30, "warmup": 2}}
SUITE = {"name": "pt", "defaults": {"num_samples": 40, "batch_size": 40, "seeds": [0]}, "entries": [
    {"name": "ddpm", "reproduction": "ddpm", "model": "digits", "model_overrides": FAST, "sampler": "ddim",
     "grid": {"kind": "uniform"}, "steps": 3},
    # the same checkpoint through another reproduction: not a job of its own
    {"name": "ddim", "reproduction": "ddim", "model": "digits", "model_overrides": FAST, "sampler": "ddim",
     "grid": {"kind": "uniform"}, "steps": 3},
    {"name": "edm", "reproduction": "edm", "model": "digits", "model_overrides": FAST, "sampler": "euler",
     "grid": {"kind": "karras"}, "steps": 3},
    # distilled from the EDM model above: waits for its teacher
    {"name": "cd", "reproduction": "consistency", "model": "cd-digits",
     "model_overrides": {"train": {"steps": 5, "warmup": 1}, "teacher": FAST}, "sampler": "consistency",
     "grid": {"kind": "karras"}, "steps": 1},
]}


def _groups(suite):
    return list(dict.fromkeys((r.reproduction, r.model, json.dumps(r.model_overrides, sort_keys=True))
                              for r in suite.runs))


def test_plan_jobs_owns_and_needs(tmp_path):
    discover()
    suite = parse_suite(SUITE)
    cache = CheckpointCache(tmp_path)
    jobs = plan_jobs(_groups(suite), cache)
    assert [j.key[:2] for j in jobs] == [("ddpm", "digits"), ("edm", "digits"), ("consistency", "cd-digits")]
    ddpm, edm, cd = jobs
    assert not ddpm.needs and not edm.needs and len(ddpm.owns) == len(edm.owns) == 1
    assert cd.needs == edm.owns and len(cd.owns) == 1  # the teacher is the EDM job's, CD's own checkpoint is its
    # once the DDPM checkpoint is cached, it is no job
    cache.dir.mkdir(parents=True, exist_ok=True)
    cache.path(ddpm.owns[0]).write_bytes(b"x")
    assert [j.key[:2] for j in plan_jobs(_groups(suite), cache)] == [("edm", "digits"), ("consistency", "cd-digits")]


def test_suite_trains_in_workers_then_samples(tmp_path):
    suite = parse_suite(SUITE)
    lines = []
    summary = run_suite(suite, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, train_jobs=2,
                        log=lines.append)
    assert summary["ok"] == 4, (summary, lines)
    assert any("3 uncached models first, 2 processes" in x for x in lines), lines
    assert not any("failed" in x for x in lines), lines
    recs = {r["entry"]: r for r in load_records(tmp_path / "out" / "records.jsonl")}
    # the worker's training time is on the model's first record, as an inline training's would be; the wall
    # times hold the models' shares of the training phase (positive; they add up to the phase, not beyond it)
    assert any(x.startswith("trained 3 models in") for x in lines), lines
    for entry in ("ddpm", "edm", "cd"):
        assert recs[entry]["train_sec"] > 0 and recs[entry]["wall_sec"] > 0, entry
    assert recs["ddim"]["train_sec"] is None  # the DDPM model, already trained
    assert recs["cd"]["model_hash"] != recs["edm"]["model_hash"]
    # every checkpoint is in the cache; a second run trains nothing
    assert plan_jobs(_groups(suite), CheckpointCache(tmp_path / "cache" / "checkpoints")) == []
    lines.clear()
    run_suite(suite, tmp_path / "out2", cache_dir=tmp_path / "cache", progress=False, train_jobs=2, log=lines.append)
    assert not any("uncached" in x for x in lines)
    assert all(r["train_sec"] is None for r in load_records(tmp_path / "out2" / "records.jsonl"))


def test_cache_lock_trains_a_checkpoint_once(tmp_path):
    """Two processes ask for the same uncached checkpoint at once: one trains it, the other waits and loads it."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        from bench_core.train import CheckpointCache
        log = {str(tmp_path / 'trained.log')!r}
        def train_fn(net):
            with open(log, 'a') as f:
                f.write(sys.argv[1] + '\\n')
            time.sleep(1.5)
            torch.nn.init.constant_(net.weight, 3.0)
            return {{"by": sys.argv[1]}}
        net = torch.nn.Linear(2, 2)
        meta, trained = CheckpointCache({str(tmp_path / 'cache')!r}).load_or_train('h1', net, train_fn)
        print(meta["by"], trained, float(net.weight.mean()))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, name], stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len((tmp_path / "trained.log").read_text().split()) == 1  # trained once
    trainer = (tmp_path / "trained.log").read_text().split()[0]
    assert sorted(o[1] for o in outs) == ["False", "True"]
    assert all(o[0] == trainer and float(o[2]) == 3.0 for o in outs)  # the waiter loaded the trainer's weights


def test_a_dead_worker_leaves_its_models_to_the_run(tmp_path, monkeypatch):
    """A worker killed mid-phase (the test hook exits the one given the EDM model): the phase ends, the run
    trains what is left inline, and every run is recorded."""
    monkeypatch.setenv("DIFFBENCH_TEST_PRETRAIN_EXIT", "digits")  # ddpm/digits and edm/digits both match
    lines = []
    summary = run_suite(parse_suite(SUITE), tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                        train_jobs=2, log=lines.append)
    assert summary["ok"] == 4, (summary, lines)
    assert any("its worker process died" in x for x in lines), lines
    recs = {r["entry"]: r for r in load_records(tmp_path / "out" / "records.jsonl")}
    assert recs["ddpm"]["train_sec"] > 0 and recs["cd"]["train_sec"] > 0  # trained inline after the phase


def test_cli_refuses_a_bad_train_jobs_value(capsys):
    import pytest

    from bench_core.cli import main

    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as e:
            main(["run", "--train-jobs", bad, "--dry-run"])
        assert e.value.code == 2
        assert "--train-jobs: must be a whole number >= 1 or 'auto'" in capsys.readouterr().err
