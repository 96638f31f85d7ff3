"""Distributed runs (bench_core/distributed.py): 2 CPU processes under torchrun with gloo give the
same samples and FID as one process; a rank that dies ends the run with an error and no record."""
import os
import socket
import subprocess
import sys

import pytest
import yaml

from bench_core.records import load_records

pytest.importorskip("torch.distributed")
if not __import__("torch").distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    suite = tmp / "tiny_dist.yaml"
    # 4 batches of 16: two per rank; two runs so the ranks go through more than one gather
    suite.write_text(yaml.safe_dump({
        "name": "tiny_dist",
        "defaults": {"num_samples": 64, "batch_size": 16, "seeds": [0],
                     "model_overrides": {"train": {"steps": 20, "warmup": 2}}},
        "entries": [{"name": "ddim", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": [5]},
                    {"name": "ddpm", "reproduction": "ddpm", "model": "digits", "sampler": "ddpm", "steps": [4]}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFBENCH_CACHE": str(tmp / "cache"),
           "DIFFBENCH_DIST_TIMEOUT": "20"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DIFFBENCH_TEST_KILL_RANK"):
        env.pop(k, None)
    # the single-process reference run (it also trains the model into the shared cache)
    single = tmp / "single"
    r = subprocess.run([sys.executable, "-m", "bench_core.cli", "run", "--suite", str(suite), "--out", str(single),
                        "--device", "cpu", "--no-progress", "--no-report"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return tmp, suite, env, load_records(single / "records.jsonl")


def _torchrun(suite, out, env, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "bench_core.cli", "run", "--suite", str(suite), "--out", str(out),
           "--device", "cpu", "--no-progress", "--no-report"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_match_one_process(setup):
    tmp, suite, env, single = setup
    out = tmp / "two"
    r = _torchrun(suite, out, env)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = load_records(out / "records.jsonl")
    assert len(recs) == len(single) == 2  # one record per run, written once (by rank 0)
    for a, b in zip(single, recs):
        assert (a["entry"], a["status"], b["status"]) == (b["entry"], "ok", "ok")
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
        assert b["preview"] == a["preview"]  # the same samples, bit for bit (uint8 preview of the first 16)
        assert b["nfe"] == a["nfe"] and b["num_samples"] == a["num_samples"] == 64
        assert b["metrics"]["world_size"] == 2 and "max over ranks" in b["metrics"]["timing"]
        assert len(b["metrics"]["rank_sec_per_batch"]) == 2 and all(t > 0 for t in b["metrics"]["rank_sec_per_batch"])
        assert b["sec_per_batch"] == max(b["metrics"]["rank_sec_per_batch"])
        assert a["kid"] is not None and b["kid"] == pytest.approx(a["kid"], rel=1e-6)
        assert b["metrics"]["fid_real_data"] == pytest.approx(a["metrics"]["fid_real_data"], rel=1e-6)
    assert r.stdout.count("done:") == 1  # rank 0's summary; rank 1 prints nothing


def test_a_dead_rank_ends_the_run_with_no_record(setup):
    tmp, suite, env, _ = setup
    out = tmp / "killed"
    r = _torchrun(suite, out, {**env, "DIFFBENCH_TEST_KILL_RANK": "1"})
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "rank 1 exits abruptly" in text  # the hook fired ...
    # the surviving rank says it in diffbench's words, before torchrun's own report: which run, what was kept and
    # the command that continues.  Its gather fails on the dead peer, or, when it is still sampling as the rank
    # dies (a loaded machine), torchrun's SIGTERM stops it first
    failed = "error: distributed run failed during ddim (ddim S=5, seed 0): rank 0/2:" in text
    stopped = "diffbench: rank 0/2: stopped by SIGTERM" in text and "(torchrun stops every rank once one" in text
    assert failed or stopped, text[-4000:]
    assert "another rank probably died" in text if failed else "names the failed rank" in text
    assert "0 of 2 runs kept in" in text and "--resume" in text
    if "ChildFailedError" in r.stderr:  # torchrun's report, when it gives one, comes after ours
        assert r.stderr.index("0 of 2 runs kept in") < r.stderr.index("ChildFailedError")
    path = out / "records.jsonl"
    assert not path.exists() or path.read_text() == ""  # no partial record


def test_without_torchrun_a_dead_rank_gives_a_clear_error_on_rank_0(setup):
    """Ranks started by hand (no torchrun to stop them): rank 0's gather fails, it says why and exits 1."""
    tmp, suite, env, _ = setup
    out = tmp / "by_hand"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "bench_core.cli", "run", "--suite", str(suite), "--out", str(out),
                               "--device", "cpu", "--no-progress", "--no-report"],
                              env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                                   "RANK": str(r), "LOCAL_RANK": str(r), "DIFFBENCH_TEST_KILL_RANK": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    res = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 1 and procs[0].returncode == 1
    err0 = res[0][1]
    assert "distributed run failed" in err0 and "no record was written" in err0
    path = out / "records.jsonl"
    assert not path.exists() or path.read_text() == ""
