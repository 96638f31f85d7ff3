"""Train a suite's uncached models in parallel worker processes before it samples (CPU).

Why: the suite's networks are small (the digits U-Net has 150k parameters; a training step is a batch of 64
8x8 images), and at that size two CPU threads on one training speed it up by only ~1.2x over one thread,
while two single-threaded trainings side by side run ~1.6x faster than one after the other (measured on a
2-core Xeon: 54.5 ms per step with 2 threads; 68-71 ms per step in each of two 1-thread processes at once).
Sampling (batch 500) and its timing stay in the main process, alone on the cores, so no latency a record
reports is measured beside a training.

How: every (reproduction, model, overrides) group of the suite whose checkpoints are not all in the cache is
a job; a job owns the missing checkpoints no earlier job owns (a DDIM entry on the DDPM model owns nothing:
it is not a job) and depends on the missing ones an earlier job owns (the guided model's base, a distilled
model's teacher, a calibration's network), and starts only once those are in the cache.  A worker runs the
reproduction's own ``load_model`` with ``progress=False``, which trains and saves exactly as an inline run
would; the main process then loads every model from the cache.  The first record of a pre-trained model
carries the training time its worker measured (``train_sec``), as an inline training's first record does, and
in its ``wall_sec`` the model's share of the training phase's elapsed time (the phase divided in proportion to
the workers' wall times per model), so that the records' wall times add up to the time the run took.  A job
that fails in its worker is logged and left to the main process, which trains it inline and records the error
as before.

The weights are the same configuration, seeds and code as an inline training; they are not bit-identical to
a training on another number of threads (a convolution's reductions are summed in another order), as they are
not across machines.  ``CheckpointCache.load_or_train`` takes a per-checkpoint file lock, so two processes
never train the same checkpoint at once.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field

DEFAULT_MAX_JOBS = 4  # "auto": one job per usable CPU core, at most this many
WORKER_DIED = "its worker process died"


@dataclass
class Job:
    """One model group to train: what to load, the checkpoints it trains and those it waits for."""

    key: tuple            # (reproduction, model, overrides JSON): the runner's group key
    owns: list[str]
    needs: list[str] = field(default_factory=list)


def auto_jobs() -> int:
    """Worker processes for ``--train-jobs auto``: the usable CPU cores, at most DEFAULT_MAX_JOBS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, DEFAULT_MAX_JOBS))


def plan_jobs(groups, cache) -> list[Job]:
    """The jobs of ``groups`` (an ordered iterable of (reproduction, model, overrides-JSON) keys), in order,
    given ``cache`` (a CheckpointCache); groups with nothing to train are left out."""
    from .plugin import get as get_reproduction  # noqa: PLC0415 - lazy, as in the runner

    owner: dict[str, int] = {}
    jobs: list[Job] = []
    for key in groups:
        rep_name, model, ov = key
        rep = get_reproduction(rep_name)
        overrides = json.loads(ov)
        try:
            hashes = rep.needed_checkpoints(model, overrides, rep.model_config(model, overrides))
        except Exception:  # noqa: BLE001 - the run itself reports a config problem, with its context
            continue
        missing = list(dict.fromkeys(h for h in hashes if not cache.exists(h)))
        owns = [h for h in missing if h not in owner]
        if not owns:
            continue
        for h in owns:
            owner[h] = len(jobs)
        jobs.append(Job(key, owns, [h for h in missing if h not in owns]))
    return jobs


def _worker_init(threads: int) -> None:
    import warnings  # noqa: PLC0415 - in the worker process only

    import torch  # noqa: PLC0415 - in the worker process only

    # numpy's float32 limits, first computed after the flush below, warn that the smallest subnormal is zero
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as the runner does: denormals slow CPU kernels


def _train_job(key: tuple, cache_dir: str) -> dict:
    """In a worker: load (train, save) one model group; returns its training time and wall time, or its error."""
    from .plugin import discover, get as get_reproduction  # noqa: PLC0415 - in the worker process only

    t0 = time.perf_counter()
    if os.environ.get("DIFFBENCH_TEST_PRETRAIN_EXIT") == key[1]:  # test hook: this model's worker dies
        os._exit(1)
    try:
        discover()
        rep_name, model, ov = key
        lm = get_reproduction(rep_name).load_model(model, json.loads(ov), device="cpu", cache_dir=cache_dir,
                                                    progress=False)
        return {"train_sec": lm.train_sec, "wall_sec": time.perf_counter() - t0, "error": None}
    except Exception as e:  # noqa: BLE001 - reported to the main process, which retries inline
        return {"train_sec": None, "wall_sec": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}


def pretrain(jobs: list[Job], cache, *, workers: int, threads: int, log=print, progress: bool = True
             ) -> dict[tuple, dict]:
    """Run ``jobs`` on ``workers`` processes of ``threads`` threads each, a job starting once the checkpoints
    it needs are cached; returns group key -> {"train_sec", "wall_sec", "wall_share", "error"} for every job
    that ran (``wall_share``: the job's share of the phase's elapsed time, in proportion to its wall time).

    A worker that dies (killed, out of memory) ends the phase: its job and the jobs not yet run are left to
    the main process.  An interrupt stops the workers (a checkpoint is saved whole or not at all) and is raised."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait  # noqa: PLC0415 - only here
    from concurrent.futures.process import BrokenProcessPool  # noqa: PLC0415 - only here

    from tqdm.auto import tqdm  # noqa: PLC0415 - lazy, as the runner's imports

    t0 = time.perf_counter()
    pending = list(jobs)
    running: dict = {}  # future -> job
    done: dict[tuple, dict] = {}
    failed: set[str] = set()
    bar = tqdm(total=len(jobs), desc=f"train {len(jobs)} models on {workers} processes", unit="model",
               disable=not progress, dynamic_ncols=True)
    # spawn: no fork of a process that holds torch's thread pools
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads,))
    try:
        while pending or running:
            i = 0
            while i < len(pending) and len(running) < workers:
                job = pending[i]
                if any(h in failed for h in job.needs):  # its base failed: the main process reports it
                    pending.pop(i)
                elif all(cache.exists(h) for h in job.needs):
                    running[pool.submit(_train_job, job.key, str(cache.dir))] = pending.pop(i)
                else:
                    i += 1
            if not running:  # nothing can start: a dependency is neither cached nor being trained
                break
            # a waiting job's dependencies are running jobs' checkpoints: only a finished job can free it
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool:
                    out = {"train_sec": None, "wall_sec": 0.0, "error": WORKER_DIED}
                done[job.key] = out
                bar.update(1)
                if out["error"]:
                    failed.update(job.owns)
                    log(f"note: training {'/'.join(job.key[:2])} in a worker failed ({out['error']}); "
                        "the run trains it again and records the error")
                    if out["error"] == WORKER_DIED:  # the pool is unusable: the rest runs inline
                        pending.clear()
        pool.shutdown(wait=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in multiprocessing.active_children():  # the workers (this process starts no other children)
            p.terminate()
            p.join(timeout=10)
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    log(f"trained {sum(not d['error'] for d in done.values())} models in {elapsed / 60:.1f} min")
    # the records' wall times then add up to the time the run took, as they do when every model trains inline
    total = sum(d["wall_sec"] for d in done.values()) or 1.0
    for d in done.values():
        d["wall_share"] = elapsed * d["wall_sec"] / total
    return done
