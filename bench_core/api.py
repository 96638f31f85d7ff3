"""Benchmark your own model from Python: wrap it as a denoiser, pick samplers and steps, get records,
the leaderboard and plots.  The same harness as ``diffbench run`` (counted NFE, the timing and memory
protocol, FID through the registered extractor, per-sample seeds), without a suite file::

    from bench_core import evaluate
    from bench_core.denoiser import DiscreteVPEpsDenoiser

    den = DiscreteVPEpsDenoiser(my_eps_net, alphas_cumprod)          # or any D(x, sigma) -> x0 estimate
    res = evaluate(den, samplers=["ddim", "heun"], steps=[10, 20], dataset="digits", out="my-results")
    print(res.leaderboard_markdown())
    res.plots("my-results/plots")
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch


@dataclass
class Results:
    """What :func:`evaluate` measured: one record (a dict) per (sampler, options, steps, seed)."""

    records: list[dict]
    out: Path | None = None

    def leaderboard(self, nfe_max: float | None = None):
        """The leaderboard as a pandas DataFrame (ranked by FID within comparable groups)."""
        from .report.leaderboard import leaderboard

        return leaderboard(self.records, nfe_max=nfe_max)

    def leaderboard_markdown(self, nfe_max: float | None = None) -> str:
        from .report.leaderboard import to_markdown

        return to_markdown(self.leaderboard(nfe_max))

    def plots(self, outdir: str | Path) -> list[Path]:
        """FID against NFE and against latency, and sample grids, from the records."""
        from .report.plots import make_plots

        return make_plots(self.records, outdir)


def _model_hash(denoiser, name: str) -> str:
    """Identity of the user's model: its name and, when it holds a torch module, its parameters."""
    h = hashlib.sha256(name.encode())
    modules = [m for m in (denoiser, getattr(denoiser, "model", None)) if isinstance(m, torch.nn.Module)]
    if modules:
        for k, v in sorted(modules[0].state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def evaluate(denoiser, *, samplers: Iterable[str], steps: Iterable[int], dataset: str = "digits",
             dataset_opts: dict | None = None, sample_shape: tuple | None = None,
             sampler_opts: dict[str, dict] | None = None, grid: dict | str | None = None, num_samples: int = 500,
             batch_size: int | None = None, seeds: Iterable[int] = (0,), name: str = "my-model",
             out: str | Path | None = None, device: str = "auto", cache_dir: str | Path | None = None,
             inception_weights: str | None = None, progress: bool = True) -> Results:
    """Sample ``denoiser`` with every sampler at every step count and measure it like a suite run.

    - ``denoiser``: ``D(x, sigma, **cond) -> x0`` estimate with ``sigma_min`` / ``sigma_max`` attributes
      (see ``bench_core.denoiser``: adapters for epsilon-prediction and other parametrisations).
    - ``samplers``: registry names (``diffbench list samplers``); ``sampler_opts`` maps a sampler to its options.
    - ``grid``: a sigma-grid kind or ``{"kind": ..., **options}``; default ``uniform`` for discrete-time
      denoisers (they expose ``sigmas``), else ``karras`` (rho 7).
    - ``dataset``: the metrics' reference (and the sample shape when ``sample_shape`` is not given).
    - ``out``: a folder for ``records.jsonl`` (appended); None keeps the records in memory only.
    """
    from . import records as rec
    from .measure import resolve_device
    from .samplers import get_sampler, load_all
    from .schedules import GRIDS
    from .suite import Run, _Metrics, run_one
    from .train import default_cache_dir
    from reproductions import LoadedModel

    load_all()
    samplers, steps, seeds = list(samplers), [int(s) for s in steps], [int(s) for s in seeds]
    sampler_opts = dict(sampler_opts or {})
    # every problem before any work, like a suite file
    errors = []
    for s in samplers:
        try:
            spec = get_sampler(s)
            errors += spec.validate(sampler_opts.get(s, {}))
        except KeyError as e:
            errors.append(str(e).strip("'\""))
    for s in sampler_opts:
        if s not in samplers:
            errors.append(f"sampler_opts given for {s!r}, which is not in samplers")
    if not steps or any(n < 1 for n in steps):
        errors.append(f"steps must be positive integers, got {steps}")
    if grid is None:
        grid = {"kind": "uniform" if getattr(denoiser, "sigmas", None) is not None else "karras"}
    grid = {"kind": grid} if isinstance(grid, str) else dict(grid)
    if grid.get("kind") not in GRIDS:
        errors.append(f"unknown grid {grid.get('kind')!r}; known: {', '.join(GRIDS)}")
    for attr in ("sigma_min", "sigma_max"):
        if not hasattr(denoiser, attr):
            errors.append(f"the denoiser has no {attr} attribute (see bench_core.denoiser for the protocol)")
    if num_samples < 1:
        errors.append(f"num_samples must be >= 1, got {num_samples}")
    data = None
    metrics = _Metrics(Path(cache_dir) if cache_dir else default_cache_dir(), inception_weights)
    try:  # loaded once: the metrics reuse it
        data = metrics.data(dataset, dataset_opts)
    except Exception as e:  # a missing file, an unknown name: say so before any work
        errors.append(f"dataset {dataset!r}: {e}")
    if errors:
        raise ValueError("evaluate(): " + "; ".join(errors))

    dev = resolve_device(device)
    torch.set_flush_denormal(True)
    shape = tuple(sample_shape) if sample_shape is not None else tuple(data.x.shape[1:])
    model_hash = _model_hash(denoiser, name)
    lm = LoadedModel(denoiser, model_hash, dataset, shape, dataset_opts=dict(dataset_opts or {}))
    store = rec.RecordStore(Path(out) / "records.jsonl") if out is not None else None
    runs = [Run(suite="api", entry=name, reproduction="user", model=name, model_overrides={}, sampler=s,
                sampler_opts=get_sampler(s).resolve(sampler_opts.get(s, {})), grid=grid, steps=n, seed=seed,
                num_samples=num_samples, batch_size=min(batch_size or num_samples, num_samples),
                model_hash=model_hash)
            for s in samplers for n in steps for seed in seeds]
    from tqdm.auto import tqdm

    out_records = []
    with tqdm(total=sum(r.work() for r in runs), desc=f"evaluate {name}", unit="step·sample", unit_scale=True,
              disable=not progress) as bar:
        for r in runs:
            bar.set_postfix_str(f"{r.sampler} S={r.steps}", refresh=False)
            record = run_one(r, lm, metrics, dev, on_batch=bar.update)
            if store is not None:
                store.append(record)
            out_records.append(asdict(record))
    return Results(out_records, Path(out) if out is not None else None)
