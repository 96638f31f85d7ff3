"""``diffbench run --dry-run``: what a suite would do, before anything runs.

For every run: its entry, model, sampler, steps, the NFE per sample trajectory and in all, whether the model
is already trained (checkpoint cache), and an estimate of the run time on the chosen device.

- NFE is counted by running the sampler on a stand-in denoiser (the exact Gaussian denoiser, carrying a DDPM
  timestep table so DDIM grids work): exact for fixed-step samplers; for the adaptive probability-flow solver
  it is the count on the stand-in, marked ``~``.
- Time comes from earlier records of the same model on the same device kind and batch size (``results/`` and
  the output folder by default): seconds per NFE on a batch, times the run's NFE and batches; training time
  from an earlier record of training the same model hash when its checkpoint is not cached.  Runs with no such
  history are counted as unknown, and the total says how many.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from .denoiser import GaussianDenoiser, NFECounter
from .measure import resolve_device
from .plugin import get as get_reproduction
from .records import load_records
from .samplers import get_sampler
from .schedules import alphas_cumprod, linear_betas, make_grid, vp_sigmas
from .seeding import SampleNoise
from .train import CheckpointCache

ADAPTIVE = ("prob_flow",)


@dataclass
class PlannedRun:
    entry: str
    model: str               # reproduction/model
    model_hash: str
    sampler: str
    grid: str
    steps: int
    num_samples: int
    batch_size: int
    nfe: float | None        # per sample trajectory
    nfe_exact: bool
    cached: bool             # the model's checkpoint is in the cache (no training)
    sample_sec: float | None  # estimated sampling time of the run
    train_sec: float | None   # estimated training time (0 when cached)

    @property
    def total_nfe(self) -> float | None:
        return None if self.nfe is None else self.nfe * self.num_samples


class _StandIn:
    """The exact N(0, 0.5^2 I) denoiser with a DDPM linear-beta timestep table (``sigmas``) for DDIM grids."""

    def __init__(self):
        self.gauss = GaussianDenoiser(0.0, 0.5)
        self.sigmas = vp_sigmas(alphas_cumprod(linear_betas(1000))).float()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def __call__(self, x, sigma, **cond):
        return self.gauss(x, sigma)


def count_nfe(sampler: str, grid: dict, steps: int, opts: dict, stand_in: _StandIn | None = None) -> float | None:
    """NFE of one trajectory of ``sampler`` on the stand-in denoiser (None if it cannot run there)."""
    spec = get_sampler(sampler)
    g = dict(grid)
    kind = g.pop("kind", "uniform")
    stand_in = stand_in or _StandIn()
    try:
        sigmas = make_grid(kind, steps, stand_in, **g)
        counter = NFECounter(stand_in)
        noise = SampleNoise([0], torch.device("cpu"))
        x = noise.randn((1, 4, 4)) * sigmas[0]
        with torch.no_grad():
            spec.fn(counter, x, sigmas, generator=noise, cond={}, **opts)
        return float(counter.count)
    except Exception:  # a sampler tied to its own model (e.g. a learned reverse kernel)
        return None


def _is_cached(run, cache) -> bool:
    """Every checkpoint the run's model loads is in the cache (base models and calibrations included; exact
    denoisers need none)."""
    rep = get_reproduction(run.reproduction)
    try:
        hashes = rep.needed_checkpoints(run.model, run.model_overrides, rep.model_config(run.model, run.model_overrides))
    except Exception:  # noqa: BLE001 - the dry run reports, it does not validate: trust the model's own hash
        hashes = [run.model_hash]
    return all(cache.path(h).is_file() for h in hashes)


def plan(suite, *, device: str, cache_dir, history: list[Path], skip: frozenset | set = frozenset()) -> list[PlannedRun]:
    """The suite's runs (but those whose record key is in ``skip``: already recorded, with --resume), each with
    its counted NFE, whether its model is cached and a time estimate from the ``history`` records."""
    dev = resolve_device(device).type
    cache = CheckpointCache(Path(cache_dir) / "checkpoints")
    recs = [r for r in load_records(*history) if r.get("status") == "ok"]
    per_nfe: dict[tuple, list[float]] = {}   # (model_hash, device, batch) -> seconds per NFE on one batch
    trained: dict[str, float] = {}
    for r in recs:
        if r.get("nfe") and r.get("sec_per_batch") and r.get("device") == dev:
            per_nfe.setdefault((r["model_hash"], r["batch_size"]), []).append(r["sec_per_batch"] / r["nfe"])
        if r.get("train_sec"):
            trained[r["model_hash"]] = max(trained.get(r["model_hash"], 0.0), float(r["train_sec"]))
    nfe_cache: dict[tuple, float | None] = {}
    rows, seen_models, cached_by_model, stand_in = [], set(), {}, _StandIn()
    for run in (r for r in suite.runs if r.key() not in skip):
        key = (run.sampler, json.dumps(run.grid, sort_keys=True), run.steps, json.dumps(run.sampler_opts, sort_keys=True))
        if key not in nfe_cache:
            nfe_cache[key] = count_nfe(run.sampler, run.grid, run.steps, run.sampler_opts, stand_in)
        nfe = nfe_cache[key]
        exact = nfe is not None and run.sampler not in ADAPTIVE
        if nfe is None:
            nfe = float(run.steps)  # one evaluation per step: the learned-kernel samplers
        mkey = (run.reproduction, run.model, json.dumps(run.model_overrides, sort_keys=True))
        if mkey not in cached_by_model:
            cached_by_model[mkey] = _is_cached(run, cache)
        cached = cached_by_model[mkey]
        batches = math.ceil(run.num_samples / run.batch_size)
        spn = per_nfe.get((run.model_hash, run.batch_size))
        sample_sec = statistics.median(spn) * nfe * (batches + run.timing_repeats) if spn else None
        train_sec = 0.0  # a model's training is counted on its first run
        if run.model_hash not in seen_models:
            train_sec = 0.0 if cached else trained.get(run.model_hash)
            seen_models.add(run.model_hash)
        rows.append(PlannedRun(run.entry, f"{run.reproduction}/{run.model}", run.model_hash, run.sampler,
                               run.grid.get("kind", "uniform"), run.steps, run.num_samples, run.batch_size, nfe,
                               exact, cached, sample_sec, train_sec))
    return rows


def _fmt_sec(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def format_plan(rows: list[PlannedRun], device: str) -> str:
    lines = [f"{'entry':<24} {'model':<28} {'sampler':<18} {'grid':<9} {'steps':>5} {'NFE':>7} {'samples':>7} "
             f"{'model?':<9} {'est. time':>9}"]
    for r in rows:
        nfe = ("" if r.nfe_exact else "~") + f"{r.nfe:g}"
        t = None if r.sample_sec is None or r.train_sec is None else r.sample_sec + r.train_sec
        lines.append(f"{r.entry[:24]:<24} {r.model[:28]:<28} {r.sampler[:18]:<18} {r.grid[:9]:<9} {r.steps:>5} "
                     f"{nfe:>7} {r.num_samples:>7} {'cached' if r.cached else 'train':<9} {_fmt_sec(t):>9}")
    total_nfe = sum(r.total_nfe for r in rows)
    known = [r for r in rows if r.sample_sec is not None and r.train_sec is not None]
    est = sum(r.sample_sec + r.train_sec for r in known)
    unknown = len(rows) - len(known)
    to_train = len({r.model_hash for r in rows if not r.cached})
    lines.append("")
    lines.append(f"{len(rows)} runs, {total_nfe:,.0f} network evaluations in all (NFE per trajectory x samples; "
                 f"'~' = adaptive solver, counted on a stand-in), {to_train} model(s) to train.")
    msg = f"estimated time on {device}: {_fmt_sec(est)} for {len(known)} runs with earlier records of their model"
    train = sum(r.train_sec for r in known)
    if train > 0:
        msg += (f" (of which {_fmt_sec(train)} training, summed over the models: on a CPU, --train-jobs trains them "
                f"side by side first, which takes less)")
    if unknown:
        msg += (f"; {unknown} run(s) have no earlier record of their model on this device and batch size "
                f"(time unknown, not included)")
    lines.append(msg + ". Metrics and start-up add a few seconds per run.")
    return "\n".join(lines)
