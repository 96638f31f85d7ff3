"""Multi-process runs on torch.distributed, launched with torchrun.

``torchrun --nproc_per_node=N -m bench_core.cli run --suite S --out O`` sets WORLD_SIZE, RANK and
LOCAL_RANK; :func:`init_from_env` sees them and joins the process group (gloo on CPU, NCCL on
CUDA with device ``cuda:LOCAL_RANK``).  Then, for every run:

- the run's batches (the same batches of per-sample seeds as a single-process run) are split
  into contiguous blocks, one block per rank: every sample is drawn in the very batch it would be
  drawn in by one process, so the samples are identical to a single-process run;
- each rank sends its samples and its counters/timings to rank 0 (:meth:`Dist.gather_run`);
- only rank 0 computes metrics and writes records and the report.

Models: rank 0 trains or loads the checkpoint first; the other ranks wait and then load it from
the shared cache (:meth:`Dist.rank0_first`).

Failure: collectives time out after ``DIFFBENCH_DIST_TIMEOUT`` seconds (default 1800), the
wait for rank 0's training after ``DIFFBENCH_DIST_TRAIN_TIMEOUT`` (default 7 days; torchrun
ends every rank anyway when one dies).  A failed collective raises :class:`DistributedError`,
which ends the run; a record is only appended after its gather has completed, so a dead rank
never leaves a partial record.

Test hook: ``DIFFBENCH_TEST_KILL_RANK=R`` makes rank R ``os._exit(1)`` right before its first
gather (used by tests/test_distributed.py to check the failure path).  Not for normal use.
"""
from __future__ import annotations

import atexit
import os
import statistics
import sys
from datetime import timedelta

import torch
import torch.distributed as td

DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_TRAIN_TIMEOUT_S = 7 * 24 * 3600.0

_CURRENT: "Dist | None" = None


class DistributedError(RuntimeError):
    """A rank died, timed out or failed: the whole distributed run stops; no record is written for the run."""


def launched() -> bool:
    """True when this process was started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> "Dist | None":
    """The active distributed context, or None in a single-process run."""
    return _CURRENT


def _env_seconds(name: str, default: float) -> float:
    v = os.environ.get(name)
    try:
        return float(v) if v else default
    except ValueError:
        raise ValueError(f"{name}={v!r} is not a number of seconds") from None


class Dist:
    """Rank, world size and the few collectives the harness needs (on a gloo group, CPU objects)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, backend: str, timeout_s: float,
                 train_timeout_s: float):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self.timeout_s = timeout_s
        # samples and stats travel as pickled CPU objects: a gloo group works under NCCL as well
        self._cpu = td.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend != "gloo" \
            else td.group.WORLD
        self._slow = td.new_group(backend="gloo", timeout=timedelta(seconds=train_timeout_s))
        self._gathers = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, dev: torch.device) -> torch.device:
        """cuda -> cuda:LOCAL_RANK (one GPU per process); cpu stays cpu."""
        if dev.type == "cuda":
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev

    def shard(self, n_batches: int) -> list[int]:
        """This rank's contiguous block of batch indices (sizes differ by at most one, the larger on the
        lower ranks; with fewer batches than ranks the higher ranks have none)."""
        q, rem = divmod(n_batches, self.world_size)
        lo = self.rank * q + min(self.rank, rem)
        return list(range(lo, lo + q + (self.rank < rem)))

    def _collective(self, what: str, fn):
        try:
            return fn()
        except Exception as err:  # gloo/NCCL raise RuntimeError (or DistBackendError) on a dead peer or timeout
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed ({type(err).__name__}: {str(err)[:300]}); "
                f"another rank probably died or hung (timeout {self.timeout_s:g} s, DIFFBENCH_DIST_TIMEOUT). "
                f"The run was stopped; no record was written for it.") from err

    def gather_run(self, payload: dict) -> list[dict] | None:
        """Every rank's payload, in rank order, on rank 0 (None on the other ranks)."""
        self._gathers += 1
        kill = os.environ.get("DIFFBENCH_TEST_KILL_RANK")
        if kill is not None and kill.strip() == str(self.rank) and self._gathers == 1:
            print(f"DIFFBENCH_TEST_KILL_RANK: rank {self.rank} exits abruptly before the gather (test hook)",
                  file=sys.stderr, flush=True)
            os._exit(1)
        out = [None] * self.world_size if self.is_main else None
        self._collective("gathering samples to rank 0",
                         lambda: td.gather_object(payload, out, dst=0, group=self._cpu))
        return out

    def all_ok(self, ok: bool, what: str) -> bool:
        """True when every rank reports ok (keeps the ranks in step after a per-rank failure)."""
        flags = [None] * self.world_size
        self._collective(what, lambda: td.all_gather_object(flags, bool(ok), group=self._cpu))
        return all(flags)

    def rank0_first(self, fn, what: str):
        """Run ``fn`` on rank 0, then (after rank 0 finished) on the other ranks.

        Used for training: rank 0 trains and writes the checkpoint cache, the others then load it.
        Every rank makes the same collectives whatever happens, then all raise if any rank failed
        (the failing rank re-raises its own exception).
        """
        res, err = None, None
        if self.is_main:
            try:
                res = fn()
            except Exception as e:
                err = e
        box = [err is None]
        self._collective(f"waiting for rank 0 ({what})",
                         lambda: td.broadcast_object_list(box, src=0, group=self._slow))
        if not self.is_main:
            if box[0]:
                try:
                    res = fn()
                except Exception as e:
                    err = e
            else:
                err = RuntimeError(f"rank 0 failed: {what}")
        ok = self.all_ok(err is None, f"after {what}")
        if err is not None:
            raise err
        if not ok:
            raise RuntimeError(f"{what} failed on another rank")
        return res

    def close(self) -> None:
        global _CURRENT
        if td.is_initialized():
            td.destroy_process_group()
        _CURRENT = None


def init_from_env(device: str = "auto") -> Dist | None:
    """Join the process group when launched by torchrun; None (and nothing done) otherwise."""
    global _CURRENT
    if _CURRENT is not None or not launched():
        return _CURRENT
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    timeout = _env_seconds("DIFFBENCH_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    kw = {}
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): use one process "
                               f"per GPU (torchrun --nproc_per_node <= {torch.cuda.device_count()}) or --device cpu")
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout), **kw)
    _CURRENT = Dist(rank, world, local, backend, timeout,
                    _env_seconds("DIFFBENCH_DIST_TRAIN_TIMEOUT", DEFAULT_TRAIN_TIMEOUT_S))
    atexit.register(_CURRENT.close)
    return _CURRENT


class capture_errors:
    """``with capture_errors(dist) as cap:`` keeps an exception of the block in ``cap.error`` in a
    distributed run (it is sent with the gather so every rank stays in step), re-raises otherwise."""

    def __init__(self, dist: Dist | None):
        self.dist, self.error = dist, None

    def __enter__(self):
        return self

    def __exit__(self, etype, err, tb):
        if err is None or self.dist is None or not isinstance(err, Exception) or isinstance(err, DistributedError):
            return False
        self.error = err
        return True


def merge_run(dist: Dist, payload: dict) -> dict | None:
    """Gather every rank's part of a run to rank 0 and merge it (None on the other ranks).

    payload: outs (list of CPU sample batches), times (seconds per timed batch), calls, nfe and
    grad counts, peak_mb, peak_method, error.  Raises RuntimeError on rank 0 if a rank failed.
    """
    parts = dist.gather_run(payload)
    if parts is None:
        return None
    bad = [f"rank {i}: {p['error']}" for i, p in enumerate(parts) if p["error"]]
    if bad:
        raise RuntimeError("sampling failed on " + "; ".join(bad))
    medians = [statistics.median(p["times"]) if p["times"] else None for p in parts]
    timed = [m for m in medians if m is not None]
    peaks = [p["peak_mb"] for p in parts if p["peak_mb"] is not None]
    return {
        "outs": [o for p in parts for o in p["outs"]],
        "times": [t for p in parts for t in p["times"]],
        "sec": max(timed) if timed else float("nan"),
        "calls": sum(p["calls"] for p in parts),
        "nfe": sum(p["nfe"] for p in parts),
        "grad": sum(p["grad"] for p in parts),
        "peak_mb": max(peaks) if peaks else None,
        "peak_method": parts[0]["peak_method"],
        "metrics": {
            "world_size": dist.world_size, "dist_backend": dist.backend,
            "timing": "sec_per_batch: max over ranks of each rank's median batch time; "
                      "peak_mem_mb: max over ranks",
            "rank_sec_per_batch": medians,
            "samples_per_sec_all_ranks": sum(p["batch_size"] / m for p, m in zip(parts, medians) if m),
        },
    }
