"""YAML suites: the schema, the one validator and the expansion of entries into runs (``bench_core.runner`` runs them).

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

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import records as rec
from .limits import (HARD_MAX_SEED_PRODUCT, HARD_MAX_TRAIN_SEED, MAX_NUM_SAMPLES, MAX_RUNS, MAX_SEED, MAX_STEPS,
                     MAX_TIMING_REPEATS, SAMPLE_SEED_STRIDE, HOW_TO_RAISE, too_large)
from .plugin import get as get_reproduction
from .samplers import SAMPLERS, load_all
from .schedules import GRIDS
from .suite_yaml import SuiteFileError, read_suite_file

SUITES_DIR = Path(__file__).resolve().parent / "suites"   # package data: shipped in the wheel

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
    """The file a ``--suite`` value names.  A bare name (no folder, no .yaml) of a suite in ``bench_core/suites``
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

    def runs(self, **fields) -> list[Run]:
        """The runs this sampling expands into, in the order every caller records them (options, grid, steps,
        seed); ``fields``: the rest of each :class:`Run` (suite, entry, model, sizes, ...)."""
        opt_grid = [dict(zip(self.opt_values, combo)) for combo in itertools.product(*self.opt_values.values())]
        return [Run(**fields, sampler_opts=self.spec.resolve(o), grid=dict(g), steps=int(st), seed=int(seed))
                for o, g, st, seed in itertools.product(opt_grid, self.grid_list, self.steps, self.seeds)]


def sampling_problems(e: dict, where: str = "", *, model: str | None = None, timesteps: int | None = None,
                      allow_large: bool = False) -> tuple[list[str], Sampling]:
    """Every problem with what an entry samples: ``sampler``, ``sampler_opts``, ``grid``, ``steps`` (with ``model``
    given: a timestep-subset grid needs ``timesteps``, the model's T, and at most T steps; None is a continuous-time
    model), ``num_samples``, ``batch_size``, ``timing_repeats``, ``seeds``, ``timeout`` -- each message prefixed by
    ``where`` and the key.  Shared by ``parse_suite`` and ``bench_core.api.evaluate``: the one validator."""
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
                rep = get_reproduction(e["reproduction"])
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
        opt_values, grid_list, steps, seeds = sm.opt_values, sm.grid_list, sm.steps, sm.seeds
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
        for ts in dict.fromkeys(int(t) + int(train_seed_offset) for t in train_seeds):
            # training seed 0 is the preset as written (its checkpoint hash unchanged); another seed offsets
            # every seed of the model's training (network init, batches, ...)
            overrides = e.get("model_overrides") or {}
            if ts:
                overrides = _merge(overrides, rep.train_seed_overrides(e["model"], ts))
            runs += sm.runs(suite=name, entry=e["name"], reproduction=e["reproduction"], model=e["model"],
                            model_overrides=overrides, sampler=e["sampler"], num_samples=int(num_samples),
                            batch_size=int(min(batch_size, num_samples)), timing_repeats=int(e.get("timing_repeats", 0)),
                            model_hash=rep.model_hash(e["model"], overrides), train_seed=ts,
                            timeout=float(e["timeout"]) if e.get("timeout") else None)
    if problems:
        raise SuiteError(source, problems)
    return Suite(name=name, source=source, description=data.get("description", ""), runs=runs,
                 inception_weights=data.get("inception_weights"), entries=list(entries))
