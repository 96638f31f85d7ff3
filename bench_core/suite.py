"""YAML suites: validate the whole file, expand entries into runs, run them, write records.

A suite file::

    name: smoke
    description: every reproduction, tiny
    defaults: {num_samples: 64, batch_size: 64, seeds: [0]}
    entries:
      - name: ddim
        reproduction: ddim
        model: digits
        model_overrides: {train: {steps: 200}}
        sampler: ddim
        sampler_opts: {eta: [0.0, 1.0]}     # a list expands into one run per value
        grid: {kind: [uniform, quadratic]}  # also expands
        steps: [10, 50]

Every problem in the file is reported at once, before any work starts.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import records as rec
from .data import to_uint8
from .records import Record, RecordStore

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = REPO_ROOT / "benchmarks" / "suites"

TOP_KEYS = {"name": str, "description": str, "defaults": dict, "entries": list, "inception_weights": str}
ENTRY_KEYS = {
    "name": str, "reproduction": str, "model": str, "model_overrides": dict, "sampler": str,
    "sampler_opts": dict, "grid": dict, "steps": (int, list), "num_samples": int, "batch_size": int,
    "seeds": (int, list), "train_seeds": (int, list), "timing_repeats": int, "description": str,
}
REQUIRED_ENTRY_KEYS = ("name", "reproduction", "model", "sampler", "steps")
DEFAULTABLE = {"num_samples", "batch_size", "seeds", "train_seeds", "timing_repeats", "grid", "model_overrides"}
GRID_KEYS = {"kind": (str, list), "rho": (float, int, list), "sigma_min": (float, int), "sigma_max": (float, int)}
PREVIEW_IMAGES = 16
PREVIEW_POINTS = 512


class PreflightError(RuntimeError):
    """Problems found before any work: missing dataset files, corrupted or mismatched checkpoints."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) found before running; nothing was run or written:\n{lines}")


class SuiteError(ValueError):
    """A suite file with problems; ``problems`` lists every one."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"suite {source} has {len(problems)} problem(s); nothing was run:\n{lines}")


@dataclass
class Run:
    """One expanded measurement: (entry, model, sampler, options, grid, steps, seed)."""

    suite: str
    entry: str
    reproduction: str
    model: str
    model_overrides: dict
    sampler: str
    sampler_opts: dict
    grid: dict
    steps: int
    seed: int
    num_samples: int
    batch_size: int
    timing_repeats: int = 0
    model_hash: str = ""
    train_seed: int = 0

    def key(self) -> tuple:
        return rec.record_key({**asdict(self)})

    def work(self) -> int:
        return self.steps * self.num_samples


@dataclass
class Suite:
    name: str
    source: str
    description: str
    runs: list[Run]
    inception_weights: str | None = None
    entries: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
def resolve_suite_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"suite file {p} does not exist")
        return p
    cand = SUITES_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.exists() else []
    raise FileNotFoundError(f"no suite named {name_or_path!r}; known suites: {', '.join(known) or 'none'} "
                            f"(in {SUITES_DIR}), or pass a path to a .yaml file")


def _type_ok(v, t) -> bool:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(v, bool) and bool not in ts:
        return False
    if float in ts and isinstance(v, int) and not isinstance(v, bool):
        return True
    return isinstance(v, ts)


def _tname(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join({"dict": "mapping", "list": "list", "str": "string", "int": "integer",
                        "float": "number"}.get(x.__name__, x.__name__) for x in ts)


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def load_suite(name_or_path: str, train_seed_offset: int = 0) -> Suite:
    """Read, validate and expand a suite.  Raises SuiteError listing every problem."""
    path = resolve_suite_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(str(path), [f"not valid YAML: {e}"]) from None
    return parse_suite(data, str(path), train_seed_offset=train_seed_offset)


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, nested mappings merged key by key (``extra`` wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_suite(data: Any, source: str = "<suite>", train_seed_offset: int = 0) -> Suite:
    """Validate and expand a suite (a parsed YAML mapping).  ``train_seed_offset`` is added to every entry's
    training seeds (``train_seeds``, default [0]): the same suite with freshly trained models."""
    import reproductions
    from .samplers import SAMPLERS, load_all
    from .schedules import GRIDS

    load_all()
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SuiteError(source, [f"the top level must be a mapping with keys {sorted(TOP_KEYS)}, got {type(data).__name__}"])
    for k, v in data.items():
        if k not in TOP_KEYS:
            problems.append(f"unknown top-level key {k!r} (known: {', '.join(sorted(TOP_KEYS))})")
        elif not _type_ok(v, TOP_KEYS[k]):
            problems.append(f"{k}: expected {_tname(TOP_KEYS[k])}, got {type(v).__name__}")
    name = data.get("name") if isinstance(data.get("name"), str) else Path(source).stem
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        defaults = {}
    for k, v in defaults.items():
        if k not in DEFAULTABLE:
            problems.append(f"defaults.{k}: not a defaultable key (allowed: {', '.join(sorted(DEFAULTABLE))})")
        elif not _type_ok(v, ENTRY_KEYS[k]):
            problems.append(f"defaults.{k}: expected {_tname(ENTRY_KEYS[k])}, got {type(v).__name__}")
    entries = data.get("entries")
    if entries is None:
        problems.append("missing key 'entries' (a list of entries)")
        entries = []
    if not isinstance(entries, list):
        entries = []
    if isinstance(data.get("entries"), list) and not entries:
        problems.append("entries: the list is empty")

    runs: list[Run] = []
    seen_names: set[str] = set()
    for i, e in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(e, dict):
            problems.append(f"{where}: expected a mapping, got {type(e).__name__}")
            continue
        if isinstance(e.get("name"), str):
            where += f" ({e['name']})"
            if e["name"] in seen_names:
                problems.append(f"{where}: duplicate entry name")
            seen_names.add(e["name"])
        e = {**{k: v for k, v in defaults.items() if k in DEFAULTABLE}, **e}
        bad = False
        for k, v in e.items():
            if k not in ENTRY_KEYS:
                problems.append(f"{where}: unknown key {k!r} (known: {', '.join(sorted(ENTRY_KEYS))})")
                bad = True
            elif not _type_ok(v, ENTRY_KEYS[k]):
                problems.append(f"{where}.{k}: expected {_tname(ENTRY_KEYS[k])}, got {type(v).__name__} {v!r}")
                bad = True
        for k in REQUIRED_ENTRY_KEYS:
            if k not in e:
                problems.append(f"{where}: missing required key {k!r}")
                bad = True
        # reproduction and model
        rep = None
        if isinstance(e.get("reproduction"), str):
            try:
                rep = reproductions.get(e["reproduction"])
            except KeyError as err:
                problems.append(f"{where}.reproduction: {err.args[0]}")
                bad = True
        if rep is not None and isinstance(e.get("model"), str):
            errs = rep.override_errors(e["model"], e.get("model_overrides") or {})
            for m in errs:
                problems.append(f"{where}.model_overrides: {m}" if not m.startswith("unknown model") else f"{where}.model: {m}")
            bad |= bool(errs)
        # sampler and options
        spec = None
        if isinstance(e.get("sampler"), str):
            spec = SAMPLERS.get(e["sampler"])
            if spec is None:
                problems.append(f"{where}.sampler: unknown sampler {e['sampler']!r} (registered: {', '.join(sorted(SAMPLERS))})")
                bad = True
        opts = e.get("sampler_opts") or {}
        opt_grid: list[dict] = [{}]
        if spec is not None and isinstance(opts, dict):
            keys = list(opts)
            values = [_as_list(opts[k]) for k in keys]
            if any(len(v) == 0 for v in values):
                problems.append(f"{where}.sampler_opts: an option has an empty list")
                bad = True
            opt_grid = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
            msgs = sorted({m for o in opt_grid for m in spec.validate(o)})
            problems += [f"{where}.sampler_opts: {m}" for m in msgs]
            bad |= bool(msgs)
        # grid
        grid = e.get("grid") or {"kind": "uniform"}
        grid_list: list[dict] = [{"kind": "uniform"}]
        if isinstance(grid, dict):
            for k, v in grid.items():
                if k not in GRID_KEYS:
                    problems.append(f"{where}.grid: unknown key {k!r} (known: {', '.join(GRID_KEYS)})")
                    bad = True
                elif not all(_type_ok(x, GRID_KEYS[k]) for x in _as_list(v)):
                    problems.append(f"{where}.grid.{k}: expected {_tname(GRID_KEYS[k])}, got {v!r}")
                    bad = True
            kinds = _as_list(grid.get("kind", "uniform"))
            for kind in kinds:
                if kind not in GRIDS:
                    problems.append(f"{where}.grid.kind: unknown grid {kind!r} (known: {', '.join(GRIDS)})")
                    bad = True
            gkeys = [k for k in grid if k != "kind" and k in GRID_KEYS]
            gvals = [_as_list(grid[k]) for k in gkeys]
            grid_list = [{"kind": kind, **dict(zip(gkeys, combo))} for kind in kinds for combo in itertools.product(*gvals)]
        # steps, seeds, sizes
        steps = _as_list(e.get("steps", []))
        if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
            problems.append(f"{where}.steps: expected a positive integer or a list of them, got {e.get('steps')!r}")
            bad = True
        seeds = _as_list(e.get("seeds", [0]))
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            problems.append(f"{where}.seeds: expected non-negative integers, got {e.get('seeds')!r}")
            bad = True
        train_seeds = _as_list(e.get("train_seeds", [0]))
        if not train_seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in train_seeds):
            problems.append(f"{where}.train_seeds: expected non-negative integers, got {e.get('train_seeds')!r}")
            bad = True
        num_samples = e.get("num_samples", 64)
        batch_size = e.get("batch_size", num_samples)
        for k, v in (("num_samples", num_samples), ("batch_size", batch_size), ("timing_repeats", e.get("timing_repeats", 0))):
            if isinstance(v, int) and not isinstance(v, bool) and v < (0 if k == "timing_repeats" else 1):
                problems.append(f"{where}.{k}: must be {'>= 0' if k == 'timing_repeats' else '>= 1'}, got {v}")
                bad = True
        if bad:
            continue
        for ts in dict.fromkeys(int(t) + int(train_seed_offset) for t in train_seeds):
            # training seed 0 is the preset as written (its checkpoint hash unchanged); another seed offsets
            # every seed of the model's training (network init, batches, ...)
            overrides = e.get("model_overrides") or {}
            if ts:
                overrides = _merge(overrides, rep.train_seed_overrides(e["model"], ts))
            model_hash = rep.model_hash(e["model"], overrides)
            for o, g, s, seed in itertools.product(opt_grid, grid_list, steps, seeds):
                runs.append(Run(
                    suite=name, entry=e["name"], reproduction=e["reproduction"], model=e["model"],
                    model_overrides=overrides, sampler=e["sampler"],
                    sampler_opts=spec.resolve(o), grid=dict(g), steps=int(s), seed=int(seed),
                    num_samples=int(num_samples), batch_size=int(min(batch_size, num_samples)),
                    timing_repeats=int(e.get("timing_repeats", 0)), model_hash=model_hash, train_seed=ts))
    if problems:
        raise SuiteError(source, problems)
    return Suite(name=name, source=source, description=data.get("description", ""), runs=runs,
                 inception_weights=data.get("inception_weights"), entries=list(entries))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
class _Metrics:
    """Reference data and feature extractors, loaded once per dataset."""

    def __init__(self, cache_dir: Path, inception_weights: str | None):
        self.cache_dir = Path(cache_dir)
        self.inception_weights = inception_weights
        self._data: dict[str, Any] = {}
        self._extractors: dict[str, Any] = {}
        self._floor: dict[tuple, dict] = {}

    def data(self, name: str, opts: dict | None = None):
        key = json.dumps([name, opts or {}], sort_keys=True)
        if key not in self._data:
            from .data import load_dataset

            self._data[key] = load_dataset(name, **(opts or {}))
        return self._data[key]

    def measure(self, dataset: str, samples: torch.Tensor, opts: dict | None = None) -> dict:
        ds = self.data(dataset, opts)
        if ds.kind == "points":
            from .metrics.twod import points_metrics

            return {"metrics": points_metrics(samples.reshape(len(samples), -1), ds.x.reshape(len(ds.x), -1))}
        from .metrics.extractors import get_extractor
        from .metrics.fidelity import image_metrics, real_data_floor

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


def run_one(run: Run, lm, metrics: _Metrics, device: torch.device, on_batch=None) -> Record:
    """Sample one run with the counted denoiser, time it, measure its memory and metrics."""
    from .denoiser import NFECounter
    from .measure import PeakMemory, Stopwatch, device_name, synchronize
    from .samplers import get_sampler
    from .schedules import make_grid
    from .seeding import SampleNoise, sample_seed

    spec = get_sampler(run.sampler)
    grid = dict(run.grid)
    kind = grid.pop("kind", "uniform")
    sigmas = make_grid(kind, run.steps, lm.denoiser, **grid).to(device)
    counter = NFECounter(lm.denoiser)
    seeds = [sample_seed(run.seed, i) for i in range(run.num_samples)]
    batches = [seeds[i:i + run.batch_size] for i in range(0, len(seeds), run.batch_size)]
    from .distributed import capture_errors, current, merge_run
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
            dw = lm.denoiser(xw, sigmas[:1].expand(len(xw)), **cond_for(b0))
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
    from .measure import device_name

    msg = f"{type(err).__name__}: {err}"
    return Record(
        suite=run.suite, entry=run.entry, reproduction=run.reproduction, model=run.model,
        model_hash=model_hash or run.model_hash, sampler=run.sampler, sampler_opts=dict(run.sampler_opts),
        grid=dict(run.grid), steps=run.steps, num_samples=run.num_samples, batch_size=run.batch_size,
        seed=run.seed, train_seed=run.train_seed, device=device.type, device_name=device_name(device), git_sha=rec.git_sha(),
        versions=rec.versions(), timestamp=rec.now(), status="error", error=msg[:2000])


def run_suite(suite: Suite, out_dir: str | Path, *, device: str = "auto", resume: bool = False,
              cache_dir: str | Path | None = None, progress: bool = True, inception_weights: str | None = None,
              log=print) -> dict:
    """Run every (not yet recorded, with resume) run of the suite; one record per run.

    Returns a summary {"ran", "skipped", "ok", "diverged", "error", "records"}.
    """
    from tqdm.auto import tqdm

    import reproductions

    from .measure import resolve_device
    from .train import default_cache_dir

    from .distributed import DistributedError, current

    dev = resolve_device(device)
    dist = current()  # torchrun: only rank 0 writes; see bench_core/distributed.py
    if dist is not None:
        dev, progress = dist.device(dev), progress and dist.is_main
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = Path(out_dir)
    store = RecordStore(out / "records.jsonl")
    done = store.done_keys() if resume else set()
    if dist is not None and not dist.is_main:
        store.append = lambda record: None  # rank 0 writes every record
    todo = [r for r in suite.runs if r.key() not in done]
    # preflight: every model's data and cached checkpoint, before anything is run or written
    problems = []
    for rep_name, model, ov in dict.fromkeys((r.reproduction, r.model, json.dumps(r.model_overrides, sort_keys=True))
                                             for r in todo):
        problems += reproductions.get(rep_name).preflight(model, json.loads(ov), cache_dir=cache / "checkpoints")
    if problems:
        raise PreflightError(problems)
    # Denormal floats (e.g. SiLU of large negative activations) slow CPU kernels by ~20 %; flushing them
    # to zero changes no result above 1e-38.  See README, "Measurement protocol".
    torch.set_flush_denormal(True)
    if (dist is None or dist.is_main) and not resume and store.path.exists() and store.path.stat().st_size > 0:
        backup = store.path.with_name(f"records-{time.strftime('%Y%m%d-%H%M%S')}.jsonl.old")
        store.path.rename(backup)
        log(f"note: {out} already held records; moved them to {backup.name} (use --resume to keep and skip them)")
    skipped = len(suite.runs) - len(todo)
    if skipped:
        log(f"resume: {skipped} of {len(suite.runs)} runs already recorded in {store.path}, skipping them")
    summary = {"ran": 0, "skipped": skipped, "ok": 0, "diverged": 0, "error": 0, "records": str(store.path)}
    if not todo:
        return summary
    metrics = _Metrics(cache, inception_weights or suite.inception_weights)
    groups: dict[tuple, list[Run]] = {}
    for r in todo:
        groups.setdefault((r.reproduction, r.model, json.dumps(r.model_overrides, sort_keys=True)), []).append(r)

    bar = tqdm(total=sum(r.work() for r in todo), desc=f"suite {suite.name}", unit="step·sample",
               unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        for (rep_name, model, _), runs in groups.items():
            rep = reproductions.get(rep_name)
            t_load = time.perf_counter()

            def load():
                return rep.load_model(model, runs[0].model_overrides, device=dev, cache_dir=cache / "checkpoints",
                                      progress=progress)
            try:  # distributed: rank 0 trains (or loads) first, then the others load from the cache
                lm = load() if dist is None else dist.rank0_first(load, f"loading {rep_name}/{model}")
            except DistributedError:
                raise
            except Exception as err:  # the model could not be trained/loaded: every run of it fails
                log(f"error: {rep_name}/{model}: {type(err).__name__}: {err}")
                for r in runs:
                    store.append(error_record(r, dev, err))
                    summary["error"] += 1
                    summary["ran"] += 1
                    bar.update(r.work())
                continue
            bar.unpause()  # training time must not count in the sampling rate behind the ETA
            for r in runs:
                bar.set_postfix_str(f"{r.entry}: {r.sampler} {r.grid.get('kind')} S={r.steps}", refresh=False)
                before = bar.n
                t0 = time.perf_counter() if t_load is None else t_load
                t_load = None
                try:
                    record = run_one(r, lm, metrics, dev, on_batch=bar.update)
                    lm.train_sec = None  # training time is reported once, on the first record after training
                except DistributedError:
                    raise  # a rank died or timed out: stop, with no record for this run
                except Exception as err:
                    record = error_record(r, dev, err, lm.model_hash)
                    record.error += "\n" + "".join(traceback.format_exception(err)[-3:])[:1500]
                    log(f"error in {r.entry} ({r.sampler} S={r.steps}): {type(err).__name__}: {err}")
                bar.update(max(0, r.work() - (bar.n - before)))
                if record is None:  # not rank 0 of a distributed run: rank 0 writes the record
                    continue
                record.wall_sec = time.perf_counter() - t0
                store.append(record)
                summary[record.status] += 1
                summary["ran"] += 1
    finally:
        bar.close()
    return summary
