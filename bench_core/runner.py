"""Run a list of runs: one record per run, a failing run an ``error`` record, written whole or not at all.

``run_suite`` runs a validated suite (``bench_core.suite``) into ``out/records.jsonl``: preflight (datasets,
cached checkpoints), the output folder checked and locked, then models loaded once per (paper, model,
overrides) and their runs sampled, timed and measured (``run_one``, guarded by ``run_guarded``: the denoiser
contract, the time limit, errors as records).  ``bench_core.api.evaluate`` runs its runs through the same
``run_guarded`` and ``Evaluator``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import records as rec
from .data import load_dataset, to_uint8
from .denoiser import CheckedDenoiser, NFECounter
from .distributed import DistributedError, capture_errors, current, merge_run
from .guard import Interrupted, deferred, time_limit
from .measure import PeakMemory, Stopwatch, device_name, resolve_device, synchronize
from .metrics.twod import points_metrics
from .plugin import discover, get as get_reproduction
from .records import Record, RecordStore
from .samplers import get_sampler
from .schedules import make_grid
from .seeding import SampleNoise, sample_seed
from .suite import Run, Suite
from .train import default_cache_dir

PREVIEW_IMAGES = 16
PREVIEW_POINTS = 512


class PreflightError(RuntimeError):
    """Problems found before any work: missing dataset files, corrupted or mismatched checkpoints."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) found before running; nothing was run or written:\n{lines}")


class Evaluator:
    """The metrics of a run's samples: reference data, feature extractors and the real-data floor, loaded once
    per dataset and shared by every run (FID / KID / precision-recall for images, sliced Wasserstein and MMD for
    points)."""

    def __init__(self, cache_dir: Path, inception_weights: str | None):
        self.cache_dir = Path(cache_dir)
        self.inception_weights = inception_weights
        self._data: dict[str, Any] = {}
        self._extractors: dict[str, Any] = {}
        self._floor: dict[tuple, dict] = {}

    def data(self, name: str, opts: dict | None = None):
        key = json.dumps([name, opts or {}], sort_keys=True)
        if key not in self._data:
            self._data[key] = load_dataset(name, **(opts or {}))
        return self._data[key]

    def measure(self, dataset: str, samples: torch.Tensor, opts: dict | None = None) -> dict:
        ds = self.data(dataset, opts)
        if ds.kind == "points":
            return {"metrics": points_metrics(samples.reshape(len(samples), -1), ds.x.reshape(len(ds.x), -1))}
        from .metrics.extractors import get_extractor  # noqa: PLC0415 - lazy: torch-fidelity only for image datasets
        from .metrics.fidelity import image_metrics, real_data_floor  # noqa: PLC0415 - lazy: torch-fidelity, as above

        if dataset not in self._extractors:
            self._extractors[dataset] = get_extractor(dataset, self.inception_weights)
        ref = ds.reference_uint8()
        tag = "".join(f",{k}={v}" for k, v in sorted((opts or {}).items()))
        kw = dict(extractor=self._extractors[dataset], reference_name=f"{dataset}{tag}",
                  cache_dir=self.cache_dir / "ref_stats")
        m = image_metrics(to_uint8(samples), ref, **kw)
        # the floor: FID of as many real images against the same reference, mean and spread over random subsets
        # (computed once per dataset, extractor and n; every record carries it)
        floor_key = (dataset, tag, self._extractors[dataset].identity, len(samples))
        if floor_key not in self._floor and len(samples) <= len(ref):
            self._floor[floor_key] = real_data_floor(ref, len(samples), **kw)
        fl = self._floor.get(floor_key)
        m["metrics"] = {} if fl is None else {
            "fid_real_data": fl["mean"], "fid_real_data_sd": fl["sd"], "fid_real_data_subsets": fl["n_subsets"]}
        return m


def _preview(samples: torch.Tensor, kind: str) -> dict:
    if kind == "points":
        return rec.encode_preview(samples[:PREVIEW_POINTS].reshape(-1, samples.shape[-1]).numpy(), "float16")
    return rec.encode_preview(to_uint8(samples[:PREVIEW_IMAGES]).numpy(), "uint8")


def run_one(run: Run, lm, metrics: Evaluator, device: torch.device, on_batch=None) -> Record:
    """Sample one run with the counted denoiser, time it, measure its memory and metrics."""
    spec = get_sampler(run.sampler)
    grid = dict(run.grid)
    kind = grid.pop("kind", "uniform")
    sigmas = make_grid(kind, run.steps, lm.denoiser, **grid).to(device)
    checked = CheckedDenoiser(lm.denoiser)  # the output contract (tensor, shape, dtype) and the time limit
    counter = NFECounter(checked)
    seeds = [sample_seed(run.seed, i) for i in range(run.num_samples)]
    batches = [seeds[i:i + run.batch_size] for i in range(0, len(seeds), run.batch_size)]
    dist = current()  # torchrun: this rank draws a contiguous block of the same batches (bench_core/distributed.py)
    mine = list(range(len(batches))) if dist is None else dist.shard(len(batches))

    decode = lm.decode

    def cond_for(b: int) -> dict:
        """lm.cond plus the per-sample conditioning of batch b (from the samples' indices)."""
        if lm.batch_cond is None:
            return lm.cond
        idx = torch.arange(b * run.batch_size, b * run.batch_size + len(batches[b]), device=device)
        return {**lm.cond, **lm.batch_cond(idx)}

    def draw(b: int):
        noise = SampleNoise(batches[b], device)
        x = noise.randn(lm.sample_shape) * sigmas[0]
        out = spec.fn(counter, x, sigmas, generator=noise, cond=cond_for(b), **run.sampler_opts)
        return out if decode is None else decode(out)  # e.g. latents -> images, inside the timed region

    times, outs, calls, peak, grad_evals0 = [], [], 0, None, 0.0
    with torch.no_grad(), capture_errors(dist) as local:
        if mine:  # (a rank of a distributed run may have no batch: more ranks than batches)
            # warm-up: one denoiser call at the batch size (allocations, lazy init), not counted
            b0 = mine[0]
            xw = torch.zeros((len(batches[b0]), *lm.sample_shape), device=device)
            dw = checked(xw, sigmas[:1].expand(len(xw)), **cond_for(b0))
            if decode is not None:
                decode(dw)
            synchronize(device)
            # classifier-gradient evaluations (guidance wrappers expose `grad_evals`) are counted from here on
            grad_evals0 = float(getattr(lm.denoiser, "grad_evals", 0))
            for b in mine:
                bs = batches[b]
                ctx = PeakMemory(device) if b == b0 else contextlib.nullcontext()
                with ctx as pm, Stopwatch(device) as sw:
                    out = draw(b)
                dt = sw.elapsed
                if b == b0:
                    peak = pm
                calls += 1
                if len(bs) == run.batch_size or len(batches) == 1:
                    times.append(dt)
                outs.append(out.float().cpu())
                if on_batch:
                    on_batch(run.steps * len(bs))
            for _ in range(run.timing_repeats):  # extra timed repeats of the first batch
                with Stopwatch(device) as sw:
                    draw(b0)
                times.append(sw.elapsed)
                calls += 1
    nfe_count, grad_count = counter.count, float(getattr(lm.denoiser, "grad_evals", 0)) - grad_evals0
    peak_mb, peak_method = (peak.peak_mb, peak.method) if peak else (None, "")
    if dist is not None:  # every rank's samples, counts and timings to rank 0; only rank 0 goes on
        err = local.error
        merged = merge_run(dist, {"outs": outs, "times": times, "calls": calls, "nfe": nfe_count, "grad": grad_count,
                                  "peak_mb": peak_mb, "peak_method": peak_method, "batch_size": run.batch_size,
                                  "error": None if err is None else f"{type(err).__name__}: {err}"})
        if merged is None:
            return None
        outs, times, calls, nfe_count, grad_count = (merged[k] for k in ("outs", "times", "calls", "nfe", "grad"))
        peak_mb, peak_method = merged["peak_mb"], merged["peak_method"]
    samples = torch.cat(outs)
    # the median of the timed batches; distributed: the slowest rank's median
    sec = merged["sec"] if dist is not None else statistics.median(times)
    r = Record(
        suite=run.suite, entry=run.entry, reproduction=run.reproduction, model=run.model,
        model_hash=lm.model_hash, dataset=lm.dataset, sampler=run.sampler, sampler_opts=dict(run.sampler_opts),
        grid=dict(run.grid), steps=run.steps, nfe=nfe_count / calls,
        grad_evals=grad_count / calls,
        num_samples=run.num_samples, batch_size=run.batch_size, seed=run.seed, train_seed=run.train_seed, dtype=lm.dtype,
        sec_per_batch=sec, samples_per_sec=run.batch_size / sec if sec > 0 else None, timing_repeats=len(times),
        peak_mem_mb=peak_mb, peak_mem_method=peak_method,
        train_sec=lm.train_sec, device=device.type, device_name=device_name(device),
        git_sha=rec.git_sha(), versions=rec.versions(), timestamp=rec.now(),
    )
    if dist is not None:
        r.metrics.update(merged["metrics"])
    ds_kind = metrics.data(lm.dataset, lm.dataset_opts).kind
    r.preview = _preview(samples, ds_kind) if torch.isfinite(samples[:PREVIEW_POINTS]).all() else None
    if not torch.isfinite(samples).all():
        r.status = "diverged"
        r.error = f"{int((~torch.isfinite(samples)).sum())} non-finite values in the samples"
        return r
    r.metrics.update(lm.model_metrics)
    if lm.sample_metrics is not None:
        r.metrics.update(lm.sample_metrics(samples))
    m = metrics.measure(lm.dataset, samples, lm.dataset_opts)
    for k, v in m.items():
        if k == "metrics":
            r.metrics.update(v)
        elif hasattr(r, k):
            setattr(r, k, v)
        else:
            r.metrics[k] = v
    return r


def error_record(run: Run, device: torch.device, err: BaseException, model_hash: str = "") -> Record:
    msg = f"{type(err).__name__}: {err}"
    return Record(
        suite=run.suite, entry=run.entry, reproduction=run.reproduction, model=run.model,
        model_hash=model_hash or run.model_hash, sampler=run.sampler, sampler_opts=dict(run.sampler_opts),
        grid=dict(run.grid), steps=run.steps, num_samples=run.num_samples, batch_size=run.batch_size,
        seed=run.seed, train_seed=run.train_seed, device=device.type, device_name=device_name(device), git_sha=rec.git_sha(),
        versions=rec.versions(), timestamp=rec.now(), status="error", error=msg[:2000])


def describe(run: Run) -> str:
    """A run in a few words, for messages: entry, sampler, steps, seed."""
    return f"{run.entry} ({run.sampler} S={run.steps}, seed {run.seed})"


def run_guarded(run: Run, lm, metrics: Evaluator, device: torch.device, *, timeout: float | None = None,
                on_batch=None, log=print) -> Record | None:
    """One run with the harness's guards, the same for ``diffbench run`` and ``evaluate``: a run that raises,
    breaks the denoiser contract (``CheckedDenoiser``) or goes past ``timeout`` seconds becomes an ``error``
    record saying why, and the caller goes on with the next run.  None on the non-zero ranks of a distributed
    run (rank 0 writes).  A lost rank (DistributedError) and SIGINT / SIGTERM (Interrupted) stop everything."""
    t0 = time.perf_counter()
    try:
        with time_limit(min((t for t in (timeout, run.timeout) if t), default=None)):  # the tighter limit
            record = run_one(run, lm, metrics, device, on_batch=on_batch)
    except (DistributedError, Interrupted) as err:
        err.where = describe(run)  # for the message that tells the user what was running
        raise
    except rec.StorageError:  # the cache or output disk is full or failing: every later run would fail too
        raise
    except Exception as err:
        record = error_record(run, device, err, lm.model_hash)
        record.error += "\n" + "".join(traceback.format_exception(err)[-3:])[:1500]
        log(f"error in {describe(run)}: {type(err).__name__}: {err}")
    if record is not None:
        record.wall_sec = time.perf_counter() - t0
    return record


class OutputError(RuntimeError):
    """The output folder cannot take the run's records (not a writable folder, locked by another run, disk full).
    ``during_run``: raised after work started (a write failed) rather than before any work."""

    def __init__(self, message: str, during_run: bool = False):
        super().__init__(message)
        self.during_run = during_run


def check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove it takes a file (a probe written and removed); OutputError otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a folder; give another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".diffbench-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{what} {path} is not writable ({e.strerror or e}); give a writable folder") from None


class OutputLock:
    """``out/.lock`` holding the writer's pid: a second run into the same folder is refused while the first
    lives; a lock left by a process that no longer exists is taken over."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and self._alive(pid):
                    raise OutputError(f"another diffbench run (pid {pid}) is writing to {self.path.parent}; wait "
                                      f"for it to finish or give another --out (remove {self.path} if that process "
                                      f"is not diffbench)") from None
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise OutputError(f"could not take the lock {self.path}; remove it if no diffbench run is using it")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False


def append_record(store: RecordStore, record: Record) -> None:
    """Append one record, whole or not at all: SIGINT / SIGTERM wait until it is written; a failed write (disk
    full, I/O error) stops the run with one message (the store leaves no cut line)."""
    try:
        with deferred():
            store.append(record)
    except OSError as e:
        raise OutputError(f"could not write a record to {store.path} ({e.strerror or e}); the records written so "
                          f"far are whole; free space (or fix the folder) and continue with --resume", during_run=True) from None
    _test_hold(store)


def _test_hold(store: RecordStore) -> None:
    """Test hook: with DIFFBENCH_TEST_HOLD_AFTER=N, after the N-th record this process wrote, announce it on
    stderr and wait (up to 120 s), so a test's signal or kill lands mid-run for certain."""
    n = os.environ.get("DIFFBENCH_TEST_HOLD_AFTER")
    if not n:
        return
    _test_hold.count = getattr(_test_hold, "count", 0) + 1
    if _test_hold.count == int(n):
        print(f"DIFFBENCH_TEST_HOLD_AFTER: holding after record {_test_hold.count} (test hook)", file=sys.stderr,
              flush=True)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            time.sleep(0.05)


_DISK_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT}


def run_suite(suite: Suite, out_dir: str | Path, *, device: str = "auto", resume: bool = False,
              cache_dir: str | Path | None = None, progress: bool = True, inception_weights: str | None = None,
              timeout: float | None = None, train_jobs: int = 1, log=print) -> dict:
    """Run every (not yet recorded, with resume) run of the suite; one record per run.

    ``timeout``: seconds per run (with a run's own ``timeout``, the tighter one); a run past it is an error record.
    ``train_jobs`` > 1 (CPU, one process): the uncached models are trained first in that many worker processes
    side by side (bench_core/pretrain.py); sampling stays in this process.
    Returns a summary {"ran", "skipped", "ok", "diverged", "error", "records"}.  Raises PreflightError or
    OutputError before any work when a model, dataset or folder is not usable, OutputError when a record
    cannot be written, and :class:`bench_core.guard.Interrupted` on SIGINT / SIGTERM (inside ``stop_on_signals``).
    """
    discover()  # every paper module imported, or one DiscoveryError naming each that failed, before any work
    rec.git_sha()  # the commit (and whether the tree is dirty) as the run starts, not when its first record is written
    dev = resolve_device(device)
    dist = current()  # torchrun: only rank 0 writes; see bench_core/distributed.py
    if dist is not None:
        dev, progress = dist.device(dev), progress and dist.is_main
    writer = dist is None or dist.is_main  # rank 0 writes every record
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = Path(out_dir)
    store = RecordStore(out / "records.jsonl")
    done = store.done_keys() if resume else set()
    todo = [r for r in suite.runs if r.key() not in done]
    # preflight: every model's data and cached checkpoint, before anything is run or written
    problems = []
    for rep_name, model, ov in dict.fromkeys((r.reproduction, r.model, json.dumps(r.model_overrides, sort_keys=True))
                                             for r in todo):
        problems += get_reproduction(rep_name).preflight(model, json.loads(ov), cache_dir=cache / "checkpoints")
    if problems:
        raise PreflightError(problems)
    # then the folders (created here, so not before a preflight that refuses the suite)
    if writer:
        check_writable_dir(out, "--out")
    check_writable_dir(cache, "--cache-dir")
    with OutputLock(out) if writer else contextlib.nullcontext():
        return _run_todo(suite, todo, store, out, dev, dist, writer, resume, cache, progress, inception_weights,
                         timeout, log, train_jobs)


def _pretrain(groups, dev, dist, cache, train_jobs, progress, log) -> dict:
    """Train the groups' uncached models in worker processes first (CPU, one process, more than one job)."""
    if dist is not None or dev.type != "cpu" or train_jobs < 2:
        return {}
    from .pretrain import plan_jobs, pretrain  # noqa: PLC0415 - only when it runs
    from .train import CheckpointCache  # noqa: PLC0415 - as above

    ckpts = CheckpointCache(cache / "checkpoints")
    jobs = plan_jobs(groups, ckpts)
    if len(jobs) < 2:
        return {}
    workers = min(train_jobs, len(jobs))
    threads = max(1, torch.get_num_threads() // workers)
    log(f"training {len(jobs)} uncached models first, {workers} processes of {threads} thread(s) side by side "
        f"(--train-jobs; 1 trains each where it is first used)")
    return pretrain(jobs, ckpts, workers=workers, threads=threads, log=log, progress=progress)


def _run_todo(suite, todo, store, out, dev, dist, writer, resume, cache, progress, inception_weights, timeout, log,
              train_jobs=1):
    # Denormal floats (e.g. SiLU of large negative activations) slow CPU kernels by ~20 %; flushing them
    # to zero changes no result above 1e-38.  See README, "Measurement protocol".
    torch.set_flush_denormal(True)
    if writer and not resume and store.path.exists() and store.path.stat().st_size > 0:
        backup = store.path.with_name(f"records-{time.strftime('%Y%m%d-%H%M%S')}.jsonl.old")
        store.path.rename(backup)
        log(f"note: {out} already held records; moved them to {backup.name} (use --resume to keep and skip them)")
    skipped = len(suite.runs) - len(todo)
    if skipped:
        log(f"resume: {skipped} of {len(suite.runs)} runs already recorded in {store.path}, skipping them")
    summary = {"ran": 0, "skipped": skipped, "ok": 0, "diverged": 0, "error": 0, "records": str(store.path)}
    if not todo:
        return summary
    metrics = Evaluator(cache, inception_weights or suite.inception_weights)
    groups: dict[tuple, list[Run]] = {}
    for r in todo:
        groups.setdefault((r.reproduction, r.model, json.dumps(r.model_overrides, sort_keys=True)), []).append(r)

    pretrained = _pretrain(groups, dev, dist, cache, train_jobs, progress, log)

    def keep(record: Record) -> None:
        if writer:
            append_record(store, record)
        summary[record.status] += 1
        summary["ran"] += 1

    bar = tqdm(total=sum(r.work() for r in todo), desc=f"suite {suite.name}", unit="step·sample",
               unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        for key, runs in groups.items():
            rep_name, model, _ = key
            rep = get_reproduction(rep_name)
            t_load = time.perf_counter()

            def load():
                return rep.load_model(model, runs[0].model_overrides, device=dev, cache_dir=cache / "checkpoints",
                                      progress=progress)
            try:  # distributed: rank 0 trains (or loads) first, then the others load from the cache
                lm = load() if dist is None else dist.rank0_first(load, f"loading {rep_name}/{model}")
            except (DistributedError, Interrupted):
                raise
            except OSError as err:
                if err.errno in _DISK_ERRNOS:  # the cache cannot take the checkpoint: stop, do not fail every run
                    raise OutputError(f"{rep_name}/{model}: could not write to the cache {cache} ({err.strerror}); "
                                      f"free space and continue with --resume", during_run=True) from None
                raise
            except Exception as err:  # the model could not be trained/loaded: every run of it fails
                log(f"error: {rep_name}/{model}: {type(err).__name__}: {err}")
                for r in runs:
                    keep(error_record(r, dev, err))
                    bar.update(r.work())
                continue
            load_sec = time.perf_counter() - t_load
            pre = pretrained.get(key)
            if pre is not None and not pre["error"]:  # trained in a worker: its training is this model's
                lm.train_sec = pre["train_sec"] if lm.train_sec is None else lm.train_sec
                load_sec += pre["wall_share"]
            bar.unpause()  # training time must not count in the sampling rate behind the ETA
            for r in runs:
                bar.set_postfix_str(f"{r.entry}: {r.sampler} {r.grid.get('kind')} S={r.steps}", refresh=False)
                before = bar.n
                record = run_guarded(r, lm, metrics, dev, timeout=timeout, on_batch=bar.update, log=log)
                if record is not None and record.status != "error":
                    lm.train_sec = None  # training time is reported once, on the first record after training
                bar.update(max(0, r.work() - (bar.n - before)))
                if record is None:  # not rank 0 of a distributed run: rank 0 writes the record
                    continue
                record.wall_sec += load_sec  # the first run of a model also counts its loading / training time
                load_sec = 0.0
                keep(record)
    finally:
        bar.close()
    return summary
