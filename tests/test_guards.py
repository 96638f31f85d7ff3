"""The harness holds every run to the denoiser contract, a time limit and a clean stop on SIGINT / SIGTERM, the same
way through ``diffbench run`` and through ``evaluate``: a failing run becomes an ``error`` record that says why, and
the other runs go on."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench_core.cli import main
from bench_core.denoiser import CheckedDenoiser, DenoiserOutputError, GaussianDenoiser
from bench_core.records import load_records

REPO = Path(__file__).resolve().parent.parent
FIRST_RUN_CALLS = 4  # euler at 3 steps: the harness's warm-up call, then 3 sampler calls


class BadDenoiser:
    """An exact Gaussian denoiser that misbehaves in one way during the first run, then behaves: the runs after
    the bad one must complete.  A misbehaviour that ends the run (raise, bad output, sleep) happens once; NaN
    output lasts the whole first run (its FIRST_RUN_CALLS calls)."""

    def __init__(self, mode: str, sleep: float = 30.0):
        self.mode, self.sleep, self.calls, self.slept_through = mode, sleep, 0, False
        self.ended_a_run = False
        self.inner = GaussianDenoiser(mu=0.0, std=0.5)
        self.sigma_min, self.sigma_max = self.inner.sigma_min, self.inner.sigma_max

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        out = self.inner(x, sigma)
        if self.ended_a_run or self.calls > FIRST_RUN_CALLS:
            return out
        m = self.mode
        if m != "NaN" and not (m == "raises late" and self.calls < 3) and not (m == "slow" and self.calls < 2):
            self.ended_a_run = True
        if m == "raises early":
            raise RuntimeError("exploded on the first call")
        if m == "raises late" and self.calls == 3:
            raise RuntimeError("exploded on call 3")
        if m == "slow" and self.calls == 2:
            time.sleep(self.sleep)
            self.slept_through = True  # never reached when the time limit stops the run
        return {
            "wrong shape": lambda: out[..., :1] if out.dim() == 2 else out[:, :, :4],
            "batch of 1": lambda: out[:1],
            "None": lambda: None,
            "numpy": lambda: out.numpy(),
            "integer": lambda: out.round().long(),
            "NaN": lambda: out * float("nan"),
        }.get(m, lambda: out)()


# the per-run time limit of these tests: far below the slow call's 30 s, far above a good run's ~1 s (which
# includes computing the reference statistics once) on a loaded 2-core machine
RUN_LIMIT = 8


# mode -> (status of the first run, text its error holds)
CASES = {
    "raises early": ("error", "RuntimeError: exploded on the first call"),
    "raises late": ("error", "RuntimeError: exploded on call 3"),
    "wrong shape": ("error", "DenoiserOutputError: the denoiser returned shape"),
    "batch of 1": ("error", "for an input of shape"),
    "None": ("error", "the denoiser returned builtins.NoneType where a torch.Tensor"),
    "numpy": ("error", "the denoiser returned numpy.ndarray where a torch.Tensor"),
    "integer": ("error", "the denoiser returned dtype torch.int64"),
    "NaN": ("diverged", "non-finite values"),
    "slow": ("error", f"RunTimeout: the run went past its time limit of {RUN_LIMIT} s"),
}


def test_checked_denoiser_passes_good_output_and_casts_another_float_with_a_warning():
    g = GaussianDenoiser(mu=0.0, std=0.5)
    x, s = torch.randn(4, 2), torch.full((4,), 1.0)
    assert torch.equal(CheckedDenoiser(g)(x, s), g(x, s))
    d = CheckedDenoiser(lambda x, s: g(x, s).double())
    with pytest.warns(UserWarning, match="float64 for torch.float32 input; cast"):
        y = d(x, s)
    assert y.dtype == torch.float32 and torch.allclose(y, g(x, s))
    with pytest.raises(DenoiserOutputError, match=r"shape \(1, 2\) for an input of shape \(4, 2\)"):
        CheckedDenoiser(lambda x, s: g(x, s)[:1])(x, s)


@pytest.mark.parametrize("mode", list(CASES))
def test_evaluate_records_a_bad_denoiser_and_goes_on(mode, tmp_path):
    from bench_core import evaluate

    logged = []
    den = BadDenoiser(mode)
    res = evaluate(den, samplers=["euler"], steps=[3], seeds=[0, 1], grid="karras",
                   dataset="swiss_roll", dataset_opts={"n": 1000}, num_samples=64, out=tmp_path / "o", progress=False,
                   timeout=RUN_LIMIT,
                   log=logged.append, cache_dir=tmp_path / "cache")
    assert not den.slept_through  # the slow call was stopped, not waited out
    status, text = CASES[mode]
    first, second = res.records
    assert first["status"] == status and text in first["error"], first["error"]
    assert second["status"] == "ok" and second["metrics"]  # the remaining run completed
    on_disk = load_records(tmp_path / "o")
    assert [r["status"] for r in on_disk] == [status, "ok"]
    assert (status == "error") == any(text in line for line in logged)


@pytest.fixture
def bad_model(monkeypatch):
    """Make the ddpm reproduction hand out a BadDenoiser on digits (no training), for the CLI path."""
    import reproductions
    from reproductions import LoadedModel

    rep = reproductions.get("ddpm")
    holder = {}

    def load_model(model, overrides, *, device, cache_dir, progress=True):
        return LoadedModel(holder["den"], "bad0000000000000", "digits", (1, 8, 8))

    monkeypatch.setattr(rep, "load_model", load_model)
    monkeypatch.setattr(rep, "preflight", lambda *a, **k: [])
    return holder


@pytest.mark.parametrize("mode", list(CASES))
def test_cli_records_a_bad_denoiser_and_goes_on(mode, bad_model, tmp_path):
    bad_model["den"] = BadDenoiser(mode)
    suite = tmp_path / "bad.yaml"
    suite.write_text(yaml.safe_dump({"name": "bad", "defaults": {"num_samples": 16, "seeds": [0]}, "entries": [
        {"name": "first", "reproduction": "ddpm", "model": "digits", "sampler": "euler", "grid": {"kind": "karras"},
         "steps": 3},
        {"name": "second", "reproduction": "ddpm", "model": "digits", "sampler": "euler", "grid": {"kind": "karras"},
         "steps": 2}]}))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--no-report", "--run-timeout", str(RUN_LIMIT)]) == 0
    assert not bad_model["den"].slept_through
    by = {r["entry"]: r for r in load_records(out)}
    status, text = CASES[mode]
    assert by["first"]["status"] == status and text in by["first"]["error"]
    assert by["second"]["status"] == "ok" and by["second"]["fid"] is not None


def test_suite_key_timeout_applies(bad_model, tmp_path):
    bad_model["den"] = BadDenoiser("slow")
    suite = tmp_path / "t.yaml"
    suite.write_text(yaml.safe_dump({"name": "t", "entries": [
        {"name": "slow", "reproduction": "ddpm", "model": "digits", "sampler": "euler", "grid": {"kind": "karras"},
         "steps": 3, "num_samples": 16, "timeout": 1.5}]}))
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--no-report"]) == 0
    (r,) = load_records(tmp_path / "o")
    assert r["status"] == "error" and "time limit of 1.5 s" in r["error"]


# --------------------------------------------------------------------------------------------
# SIGINT / SIGTERM, and a kill, mid-run (the DIFFBENCH_TEST_HOLD_AFTER hook makes "mid-run" certain)
# --------------------------------------------------------------------------------------------
def _tiny_suite(tmp_path) -> Path:
    data = {"name": "tiny", "defaults": {"num_samples": 8, "batch_size": 4, "seeds": [0],
                                          "model_overrides": {"train": {"steps": 5, "warmup": 1}}},
            "entries": [{"name": "ddim", "reproduction": "ddim", "model": "digits", "sampler": "ddim",
                         "sampler_opts": {"eta": [0.0, 1.0]}, "steps": [2, 3]}]}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _fids(path) -> dict:
    return {(r["entry"], json.dumps(r["sampler_opts"]), r["steps"]): r["fid"] for r in load_records(path)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny suite, its cache, and the FIDs of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("signals")
    suite = _tiny_suite(tmp)
    env = {**os.environ, "DIFFBENCH_CACHE": str(tmp / "cache"), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "bench_core.cli", "run", "--suite", str(suite), "--out",
                        str(tmp / "whole"), "--no-progress", "--no-report"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    whole = _fids(tmp / "whole" / "records.jsonl")
    assert len(whole) == 4
    return tmp, suite, env, whole


def _start_and_hold(cmd, env, after=2):
    """Start the command; return it once it has written `after` records and holds (the test hook)."""
    p = subprocess.Popen(cmd, env={**env, "DIFFBENCH_TEST_HOLD_AFTER": str(after)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "DIFFBENCH_TEST_HOLD_AFTER: holding" in line:
            return p
    p.wait()
    raise AssertionError("the run ended before the hook held: " + "".join(seen[-20:]))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_keeps_whole_records_and_says_how_to_resume(tiny, sig, code):
    tmp, suite, env, whole = tiny
    out = tmp / f"sig{int(sig)}"
    cmd = [sys.executable, "-m", "bench_core.cli", "run", "--suite", str(suite), "--out", str(out),
           "--no-progress", "--no-report"]
    p = _start_and_hold(cmd, env)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "Traceback" not in err
    assert f"stopped by {sig.name}" in err and "2 of 4 runs kept in" in err
    path = out / "records.jsonl"
    for line in path.read_bytes().splitlines():
        json.loads(line)  # every line whole
    assert len(load_records(path)) == 2 and not (out / ".lock").exists()
    resume = err.split("continue with: ", 1)[1].strip().splitlines()[0]
    argv = shlex.split(resume)
    assert argv[0] == "diffbench" and argv[-1] == "--resume"
    r = subprocess.run([sys.executable, "-m", "bench_core.cli", *argv[1:]], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 of 4 runs already recorded" in r.stdout
    assert _fids(path) == pytest.approx(whole, rel=1e-9)


def test_a_kill_mid_run_loses_nothing_and_resume_finishes(tiny):
    """SIGKILL (no handler can run): the records written are whole, --resume runs the rest exactly once."""
    tmp, suite, env, whole = tiny
    out = tmp / "killed"
    cmd = [sys.executable, "-m", "bench_core.cli", "run", "--suite", str(suite), "--out", str(out),
           "--no-progress", "--no-report"]
    p = _start_and_hold(cmd, env)
    p.kill()
    p.communicate()
    path = out / "records.jsonl"
    first = load_records(path)
    assert len(first) == 2
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)  # the dead run's lock is stale
    assert r.returncode == 0, r.stderr
    assert "2 of 4 runs already recorded" in r.stdout
    final = load_records(path)
    assert final[:2] == first and len(final) == 4
    assert _fids(path) == pytest.approx(whole, rel=1e-9)


def test_a_second_run_into_the_same_out_is_refused_while_the_first_lives(tiny):
    tmp, suite, env, _ = tiny
    out = tmp / "locked"
    cmd = [sys.executable, "-m", "bench_core.cli", "run", "--suite", str(suite), "--out", str(out),
           "--no-progress", "--no-report"]
    p = _start_and_hold(cmd, env, after=1)
    try:
        r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
        assert r.returncode == 2
        assert f"another diffbench run (pid {p.pid}) is writing to" in r.stderr and "Traceback" not in r.stderr
    finally:
        p.kill()
        p.communicate()
    assert len(load_records(out / "records.jsonl")) == 1  # the refused run wrote nothing


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_an_unusable_out_is_refused_before_any_work(tmp_path, kind, capsys):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is still writable")
    suite = _tiny_suite(tmp_path)
    try:
        assert main(["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                     "--no-progress", "--no-report"]) == 2
    finally:
        if out.is_dir():
            out.chmod(0o700)
    err = capsys.readouterr().err
    assert ("is not a folder" if kind == "file" else "is not writable") in err
    assert not (tmp_path / "c" / "checkpoints").exists()  # nothing was trained


def test_a_full_disk_stops_the_run_with_whole_records(tmp_path, monkeypatch, capsys):
    """ENOSPC on the third record: one message, exit 1, two whole records; --resume finishes once space is back."""
    import errno

    from bench_core import records

    suite = _tiny_suite(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "c"
    real = records.RecordStore.append
    calls = {"n": 0}

    def full(self, record):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, record)

    monkeypatch.setattr(records.RecordStore, "append", full)
    args = ["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(cache), "--no-progress", "--no-report"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert len(load_records(out)) == 2
    monkeypatch.setattr(records.RecordStore, "append", real)
    assert main(args + ["--resume"]) == 0
    assert len(load_records(out)) == 4
