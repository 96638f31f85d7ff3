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
import errno
import itertools
import json
import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import records as rec
from .data import to_uint8
from .limits import (HARD_MAX_SEED_PRODUCT, HARD_MAX_TRAIN_SEED, MAX_NUM_SAMPLES, MAX_RUNS, MAX_SEED, MAX_STEPS,
                     MAX_TIMING_REPEATS, SAMPLE_SEED_STRIDE, HOW_TO_RAISE, too_large)
from .records import Record, RecordStore

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = REPO_ROOT / "benchmarks" / "suites"

TOP_KEYS = {"name": str, "description": str, "defaults": dict, "entries": list, "inception_weights": str}
ENTRY_KEYS = {
    "name": str, "reproduction": str, "model": str, "model_overrides": dict, "sampler": str,
    "sampler_opts": dict, "grid": dict, "steps": (int, list), "num_samples": int, "batch_size": int,
    "seeds": (int, list), "train_seeds": (int, list), "timing_repeats": int, "description": str, "timeout": (float, int),
}
REQUIRED_ENTRY_KEYS = ("name", "reproduction", "model", "sampler", "steps")
DEFAULTABLE = {"num_samples", "batch_size", "seeds", "train_seeds", "timing_repeats", "grid", "model_overrides",
               "timeout"}
GRID_KEYS = {"kind": (str, list), "rho": (float, int, list), "sigma_min": (float, int), "sigma_max": (float, int)}
TIMESTEP_GRIDS = ("uniform", "quadratic")  # DDPM/DDIM timestep subsets: discrete-time models only, steps <= T
DEFAULT_GRID = "uniform"                   # an entry without a grid
# size bounds (steps, num_samples, seeds, training steps, ...; lifted by --allow-large): bench_core/limits.py
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
    timeout: float | None = None  # seconds (suite key 'timeout'); None: no limit of its own

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
def _known_suites() -> str:
    known = sorted(x.stem for x in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []
    return f"known suites: {', '.join(known) or 'none'} (in {SUITES_DIR})"


def resolve_suite_path(name_or_path: str) -> Path:
    """The file a ``--suite`` value names.  A bare name (no folder, no .yaml) of a suite in ``benchmarks/suites``
    is that suite, even when the working directory holds a file or folder of the same name (write ``./NAME`` for
    that one); anything else is a path to a file.  FileNotFoundError, naming the known suites, otherwise."""
    text = str(name_or_path)
    p = Path(text)
    if p.suffix not in (".yaml", ".yml") and not any(c in text for c in "/\\") and text not in ("", ".", ".."):
        cand = SUITES_DIR / f"{text}.yaml"
        if cand.is_file():
            return cand
    if p.is_dir():
        raise FileNotFoundError(f"{p} is a folder, not a suite file; give a .yaml file or a suite name ({_known_suites()})")
    if p.exists():
        return p
    if p.suffix in (".yaml", ".yml") or any(c in text for c in "/\\"):
        raise FileNotFoundError(f"suite file {p} does not exist")
    raise FileNotFoundError(f"no suite named {text!r}; {_known_suites()}, or pass a path to a .yaml file")


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


def load_suite(name_or_path: str, train_seed_offset: int = 0, allow_large: bool = False) -> Suite:
    """Read, validate and expand a suite.  Raises SuiteError listing every problem, for a file that cannot be
    found, read or parsed (``bench_core.suite_yaml``: duplicate keys, alias bombs, deep nesting, not UTF-8) as for
    its content.  ``allow_large``: lift the size bounds of ``bench_core/limits.py``."""
    from .suite_yaml import SuiteFileError, read_suite_file

    source = str(name_or_path)
    try:
        path = resolve_suite_path(name_or_path)
        source = str(path)
        data = read_suite_file(path)
    except SuiteFileError as e:
        raise SuiteError(source, e.problems) from None
    except (OSError, ValueError) as e:  # FileNotFoundError from resolve_suite_path; a path the OS refuses
        raise SuiteError(source, [str(e)]) from None
    return parse_suite(data, source, train_seed_offset=train_seed_offset, allow_large=allow_large)


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, nested mappings merged key by key (``extra`` wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _grid_problems(grid: dict, known: tuple) -> tuple[list[str], list[dict]]:
    """Problems of an entry's ``grid`` mapping (each message starts after ``.grid``) and its expansion into one
    mapping per (kind, values) combination."""
    msgs = []
    for k, v in grid.items():
        if k not in GRID_KEYS:
            msgs.append(f": unknown key {k!r} (known: {', '.join(GRID_KEYS)})")
        elif isinstance(v, list) and not v:
            msgs.append(f".{k}: an empty list")
        elif not all(_type_ok(x, GRID_KEYS[k]) for x in _as_list(v)):
            msgs.append(f".{k}: expected {_tname(GRID_KEYS[k])}, got {v!r}")
        elif k != "kind" and not all(_finite(x) and x > 0 for x in _as_list(v)):
            msgs.append(f".{k}: must be a finite number > 0, got {v!r}")
    kinds = _as_list(grid.get("kind", DEFAULT_GRID))
    for kind in kinds:
        if not isinstance(kind, str):
            msgs.append(f".kind: expected a grid name or a list of them, got {kind!r}")
        elif kind not in known:
            msgs.append(f".kind: unknown grid {kind!r} (known: {', '.join(known)})")
    smin, smax = grid.get("sigma_min"), grid.get("sigma_max")
    if _finite(smin) and _finite(smax) and 0 < smax <= smin:
        msgs.append(f": sigma_min must be below sigma_max, got sigma_min {smin!r} >= sigma_max {smax!r}")
    if msgs:
        return msgs, []
    gkeys = [k for k in grid if k != "kind"]
    gvals = [_as_list(grid[k]) for k in gkeys]
    return [], [{"kind": kind, **dict(zip(gkeys, combo))} for kind in kinds for combo in itertools.product(*gvals)]


def _seed_problem(seeds: list, hard_max: int, allow_large: bool, offset: int = 0) -> str | None:
    """What is wrong with a list of seeds (after adding ``offset``): not non-negative integers, above
    ``MAX_SEED`` (unless ``allow_large``) or above ``hard_max`` (always); None when nothing is."""
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        return "expected non-negative integers"
    top = max(seeds) + offset
    if top > hard_max:
        return f"{top} is above the largest seed the generators take here ({hard_max:_})"
    if not allow_large and top > MAX_SEED:
        return too_large("seed", top, MAX_SEED, "MAX_SEED")
    return None


@dataclass
class Sampling:
    """What one suite entry (or one ``evaluate`` sampler) samples, as validated: the sampler's spec, each option's
    values, the grid combinations, the step counts and the seeds (their product is the entry's runs)."""

    spec: Any
    opt_values: dict
    grid_list: list
    steps: list
    seeds: list


def sampling_problems(e: dict, where: str = "", *, model: str | None = None, timesteps: int | None = None,
                      allow_large: bool = False) -> tuple[list[str], Sampling]:
    """Every problem with what an entry samples: ``sampler``, ``sampler_opts``, ``grid``, ``steps`` (with ``model``
    given: a timestep-subset grid needs ``timesteps``, the model's T, and at most T steps; None is a continuous-time
    model), ``num_samples``, ``batch_size``, ``timing_repeats``, ``seeds``, ``timeout`` -- each message prefixed by
    ``where`` and the key.  Shared by ``parse_suite`` and ``bench_core.api.evaluate``: the one validator."""
    from .samplers import SAMPLERS, load_all
    from .schedules import GRIDS

    load_all()
    problems: list[str] = []
    # sampler and options: each value checked once (the options expand into their product)
    spec = None
    if isinstance(e.get("sampler"), str):
        spec = SAMPLERS.get(e["sampler"])
        if spec is None:
            problems.append(f"{where}.sampler: unknown sampler {e['sampler']!r} (registered: {', '.join(sorted(SAMPLERS))})")
    opts = e.get("sampler_opts") or {}
    opt_values: dict[str, list] = {}
    if spec is not None and isinstance(opts, dict):
        opt_values = {k: _as_list(v) for k, v in opts.items()}
        if any(len(v) == 0 for v in opt_values.values()):
            problems.append(f"{where}.sampler_opts: an option has an empty list")
        msgs = list(dict.fromkeys(m for k, vs in opt_values.items() for v in vs
                                  for m in spec.validate({k: v}, allow_large=allow_large)))
        problems += [f"{where}.sampler_opts: {m}" for m in msgs]
    # grid
    grid = e.get("grid") or {"kind": DEFAULT_GRID}
    grid_list: list[dict] = [{"kind": DEFAULT_GRID}]
    if isinstance(grid, dict):
        gmsgs, grid_list = _grid_problems(grid, GRIDS)
        problems += [f"{where}.grid{m}" for m in gmsgs]
    # steps, seeds, sizes
    steps = _as_list(e.get("steps", []))
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
        problems.append(f"{where}.steps: expected a positive integer or a list of them, got {e.get('steps')!r}")
    elif not allow_large and max(steps) > MAX_STEPS:
        problems.append(too_large(f"{where}.steps:", max(steps), MAX_STEPS, "MAX_STEPS"))
    elif model is not None:  # a timestep-subset grid: a discrete-time model, steps <= its T
        T = timesteps
        for kind in dict.fromkeys(g["kind"] for g in grid_list if g["kind"] in TIMESTEP_GRIDS):
            what = f"grid kind {kind!r}" + (" (the default when an entry gives no grid)" if "grid" not in e else "")
            if T is None:
                problems.append(f"{where}.grid: {what} takes DDPM/DDIM timesteps and needs a discrete-time model; "
                                f"{model} is continuous-time: use karras, geometric or linear")
            elif max(steps) > T:
                problems.append(f"{where}.steps: {max(steps)} steps on {what} are more than the model's T = {T} "
                                f"timesteps; use at most {T} steps, or a continuous grid (karras, linear)")
    num_samples = e.get("num_samples", 64)
    batch_size = e.get("batch_size", num_samples)
    for k, v in (("num_samples", num_samples), ("batch_size", batch_size), ("timing_repeats", e.get("timing_repeats", 0))):
        if isinstance(v, int) and not isinstance(v, bool) and v < (0 if k == "timing_repeats" else 1):
            problems.append(f"{where}.{k}: must be {'>= 0' if k == 'timing_repeats' else '>= 1'}, got {v}")
    for k, bound, bname in (("num_samples", MAX_NUM_SAMPLES, "MAX_NUM_SAMPLES"),
                            ("timing_repeats", MAX_TIMING_REPEATS, "MAX_TIMING_REPEATS")):
        v = e.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and not allow_large and v > bound:
            problems.append(too_large(f"{where}.{k}:", v, bound, bname))
    n = num_samples if isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1 else 1
    seeds = _as_list(e.get("seeds", [0]))
    msg = _seed_problem(seeds, (HARD_MAX_SEED_PRODUCT - (n - 1)) // SAMPLE_SEED_STRIDE, allow_large)
    if msg:
        problems.append(f"{where}.seeds: {msg}" + ("" if "expected" not in msg else f", got {e.get('seeds')!r}"))
    return problems, Sampling(spec, opt_values, grid_list, steps, seeds)


def parse_suite(data: Any, source: str = "<suite>", train_seed_offset: int = 0, allow_large: bool = False) -> Suite:
    """Validate and expand a suite (a parsed YAML mapping): the one validator, used by ``diffbench run`` /
    ``validate`` and by ``evaluate``.  Every problem is collected and raised at once as SuiteError.
    ``train_seed_offset`` is added to every entry's training seeds (``train_seeds``, default [0]): the same suite
    with freshly trained models.  ``allow_large`` lifts the size bounds of ``bench_core/limits.py`` (steps,
    num_samples, seeds, training steps, ...); the hard limits hold regardless."""
    import reproductions
    from .samplers import load_all

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
    total_runs = 0
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
        cfg = None  # the model's finished config, once its overrides are known to be good
        if rep is not None and isinstance(e.get("model"), str):
            errs = rep.override_errors(e["model"], e.get("model_overrides") or {}, allow_large=allow_large)
            for m in errs:
                problems.append(f"{where}.model_overrides: {m}" if not m.startswith("unknown model") else f"{where}.model: {m}")
            bad |= bool(errs)
            if not errs:
                cfg = rep.model_config(e["model"], e.get("model_overrides") or {})
        # what it samples: sampler, options, grid, steps (against the model's T), sizes, seeds
        timesteps = rep.timesteps(e["model"], cfg) if cfg is not None else None
        msgs, sm = sampling_problems(e, where, model=f"{e['reproduction']}/{e['model']}" if cfg is not None else None,
                                     timesteps=timesteps, allow_large=allow_large)
        problems += msgs
        bad |= bool(msgs)
        spec, opt_values, grid_list, steps, seeds = sm.spec, sm.opt_values, sm.grid_list, sm.steps, sm.seeds
        num_samples = e.get("num_samples", 64)
        batch_size = e.get("batch_size", num_samples)
        train_seeds = _as_list(e.get("train_seeds", [0]))
        msg = _seed_problem(train_seeds, HARD_MAX_TRAIN_SEED, allow_large, offset=int(train_seed_offset))
        if msg:
            problems.append(f"{where}.train_seeds: {msg}" + ("" if "expected" not in msg else f", got {e.get('train_seeds')!r}"))
            bad = True
        timeout = e.get("timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and not (math.isfinite(timeout) and timeout >= 0):
            problems.append(f"{where}.timeout: must be a finite number of seconds >= 0 (0: no limit), got {timeout!r}")
            bad = True
        # how many runs the entry expands into, before expanding it
        n_runs = math.prod(len(v) for v in opt_values.values()) * len(grid_list) * len(steps) * len(seeds) * len(train_seeds)
        total_runs += n_runs
        if not allow_large and total_runs > MAX_RUNS and not bad:
            problems.append(f"{where}: the suite expands into {total_runs:_} runs up to this entry (this one: {n_runs:_}), "
                            f"above the bound {MAX_RUNS:_} (MAX_RUNS in bench_core/limits.py); {HOW_TO_RAISE}")
            bad = True
        if bad:
            continue
        opt_grid = [dict(zip(opt_values, combo)) for combo in itertools.product(*opt_values.values())]
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
                    timing_repeats=int(e.get("timing_repeats", 0)), model_hash=model_hash, train_seed=ts,
                    timeout=float(e["timeout"]) if e.get("timeout") else None))
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
    from .denoiser import CheckedDenoiser, NFECounter
    from .measure import PeakMemory, Stopwatch, device_name, synchronize
    from .samplers import get_sampler
    from .schedules import make_grid
    from .seeding import SampleNoise, sample_seed

    spec = get_sampler(run.sampler)
    grid = dict(run.grid)
    kind = grid.pop("kind", "uniform")
    sigmas = make_grid(kind, run.steps, lm.denoiser, **grid).to(device)
    checked = CheckedDenoiser(lm.denoiser)  # the output contract (tensor, shape, dtype) and the time limit
    counter = NFECounter(checked)
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
    from .measure import device_name

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


def run_guarded(run: Run, lm, metrics: _Metrics, device: torch.device, *, timeout: float | None = None,
                on_batch=None, log=print) -> Record | None:
    """One run with the harness's guards, the same for ``diffbench run`` and ``evaluate``: a run that raises,
    breaks the denoiser contract (``CheckedDenoiser``) or goes past ``timeout`` seconds becomes an ``error``
    record saying why, and the caller goes on with the next run.  None on the non-zero ranks of a distributed
    run (rank 0 writes).  A lost rank (DistributedError) and SIGINT / SIGTERM (Interrupted) stop everything."""
    from .distributed import DistributedError
    from .guard import Interrupted, time_limit

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


def _append(store: RecordStore, record: Record) -> None:
    """Append one record, whole or not at all: SIGINT / SIGTERM wait until it is written; a failed write (disk
    full, I/O error) stops the run with one message (the store leaves no cut line)."""
    from .guard import deferred

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
        import sys

        print(f"DIFFBENCH_TEST_HOLD_AFTER: holding after record {_test_hold.count} (test hook)", file=sys.stderr,
              flush=True)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            time.sleep(0.05)


_DISK_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT}


def run_suite(suite: Suite, out_dir: str | Path, *, device: str = "auto", resume: bool = False,
              cache_dir: str | Path | None = None, progress: bool = True, inception_weights: str | None = None,
              timeout: float | None = None, log=print) -> dict:
    """Run every (not yet recorded, with resume) run of the suite; one record per run.

    ``timeout``: seconds per run (with a run's own ``timeout``, the tighter one); a run past it is an error record.
    Returns a summary {"ran", "skipped", "ok", "diverged", "error", "records"}.  Raises PreflightError or
    OutputError before any work when a model, dataset or folder is not usable, OutputError when a record
    cannot be written, and :class:`bench_core.guard.Interrupted` on SIGINT / SIGTERM (inside ``stop_on_signals``).
    """
    import reproductions

    from .distributed import current
    from .measure import resolve_device
    from .train import default_cache_dir

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
        problems += reproductions.get(rep_name).preflight(model, json.loads(ov), cache_dir=cache / "checkpoints")
    if problems:
        raise PreflightError(problems)
    # then the folders (created here, so not before a preflight that refuses the suite)
    if writer:
        check_writable_dir(out, "--out")
    check_writable_dir(cache, "--cache-dir")
    with OutputLock(out) if writer else contextlib.nullcontext():
        return _run_todo(suite, todo, store, out, dev, dist, writer, resume, cache, progress, inception_weights,
                         timeout, log)


def _run_todo(suite, todo, store, out, dev, dist, writer, resume, cache, progress, inception_weights, timeout, log):
    from tqdm.auto import tqdm

    import reproductions

    from .distributed import DistributedError
    from .guard import Interrupted

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
    metrics = _Metrics(cache, inception_weights or suite.inception_weights)
    groups: dict[tuple, list[Run]] = {}
    for r in todo:
        groups.setdefault((r.reproduction, r.model, json.dumps(r.model_overrides, sort_keys=True)), []).append(r)

    def keep(record: Record) -> None:
        if writer:
            _append(store, record)
        summary[record.status] += 1
        summary["ran"] += 1

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
