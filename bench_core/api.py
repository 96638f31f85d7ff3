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
from tqdm.auto import tqdm

from . import records as rec
from .measure import resolve_device
from .plugin import LoadedModel
from .runner import Evaluator, append_record, check_writable_dir, run_guarded
from .samplers import load_all
from .suite import sampling_problems
from .train import default_cache_dir


@dataclass
class Results:
    """What :func:`evaluate` measured: one record (a dict) per (sampler, options, steps, seed)."""

    records: list[dict]
    out: Path | None = None

    def leaderboard(self, nfe_max: float | None = None):
        """The leaderboard as a pandas DataFrame (ranked by FID within comparable groups)."""
        from .report.leaderboard import leaderboard  # noqa: PLC0415 - lazy: pandas only when the results are tabulated

        return leaderboard(self.records, nfe_max=nfe_max)

    def leaderboard_markdown(self, nfe_max: float | None = None) -> str:
        from .report.leaderboard import to_markdown  # noqa: PLC0415 - lazy: pandas only when the results are tabulated

        return to_markdown(self.leaderboard(nfe_max))

    def plots(self, outdir: str | Path) -> list[Path]:
        """FID against NFE and against latency, and sample grids, from the records."""
        from .report.plots import make_plots  # noqa: PLC0415 - lazy: matplotlib and pandas only when plotting

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
             inception_weights: str | None = None, progress: bool = True, timeout: float | None = None,
             log=print, allow_large: bool = False) -> Results:
    """Sample ``denoiser`` with every sampler at every step count and measure it like a suite run.

    - ``denoiser``: ``D(x, sigma, **cond) -> x0`` estimate with ``sigma_min`` / ``sigma_max`` attributes
      (see ``bench_core.denoiser``: adapters for epsilon-prediction and other parametrisations).
    - ``samplers``: registry names (``diffbench list samplers``); ``sampler_opts`` maps a sampler to its options.
    - ``grid``: a sigma-grid kind or ``{"kind": ..., **options}``; default ``uniform`` for discrete-time
      denoisers (they expose ``sigmas``), else ``karras`` (rho 7).
    - ``dataset``: the metrics' reference (and the sample shape when ``sample_shape`` is not given).
    - ``out``: a folder for ``records.jsonl`` (appended); None keeps the records in memory only.
    - ``allow_large``: lift the size bounds of ``bench_core/limits.py`` (steps, num_samples, seeds).
    - ``timeout``: seconds per run; a run past it is stopped and recorded as an error.

    Like ``diffbench run``, a run that fails (the denoiser raises, returns something other than a tensor of the
    input's shape and a floating dtype, or goes past ``timeout``) becomes an ``error`` record naming why, and the
    other runs go on; ``log`` receives one line per failed run.
    """
    load_all()
    samplers, steps, seeds = list(samplers), [int(s) for s in steps], [int(s) for s in seeds]
    sampler_opts = dict(sampler_opts or {})
    # every problem before any work, through the suite's validator (sampling_problems: options, grid, steps
    # against the denoiser's timesteps, sizes and seeds), then what only a user's denoiser can get wrong
    if grid is None:
        grid = {"kind": "uniform" if getattr(denoiser, "sigmas", None) is not None else "karras"}
    grid = {"kind": grid} if isinstance(grid, str) else dict(grid)
    sigmas = getattr(denoiser, "sigmas", None)
    errors, samplings = [], []
    for s in samplers or [None]:
        entry = {"sampler": s, "sampler_opts": sampler_opts.get(s, {}), "grid": grid, "steps": steps, "seeds": seeds,
                 "num_samples": num_samples, "batch_size": batch_size or num_samples}
        msgs, sm = sampling_problems(entry, model=f"the denoiser {name!r}", allow_large=allow_large,
                                     timesteps=len(sigmas) if sigmas is not None else None)
        errors += [m.lstrip(".") for m in msgs if m.lstrip(".") not in errors]
        samplings.append((s, sm))
    for s in sampler_opts:
        if s not in samplers:
            errors.append(f"sampler_opts given for {s!r}, which is not in samplers")
    for attr in ("sigma_min", "sigma_max"):
        if not hasattr(denoiser, attr):
            errors.append(f"the denoiser has no {attr} attribute (see bench_core.denoiser for the protocol)")
    data = None
    metrics = Evaluator(Path(cache_dir) if cache_dir else default_cache_dir(), inception_weights)
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
    store = None
    if out is not None:
        check_writable_dir(Path(out), "out")  # an unusable folder is refused before any sampling
        store = rec.RecordStore(Path(out) / "records.jsonl")
    # expanded as a suite entry's runs are (lists of option values and grid parameters included)
    runs = [r for s, sm in samplings
            for r in sm.runs(suite="api", entry=name, reproduction="user", model=name, model_overrides={}, sampler=s,
                             num_samples=num_samples, batch_size=min(batch_size or num_samples, num_samples),
                             model_hash=model_hash)]
    out_records = []
    with tqdm(total=sum(r.work() for r in runs), desc=f"evaluate {name}", unit="step·sample", unit_scale=True,
              disable=not progress) as bar:
        for r in runs:
            bar.set_postfix_str(f"{r.sampler} S={r.steps}", refresh=False)
            record = run_guarded(r, lm, metrics, dev, timeout=timeout, on_batch=bar.update, log=log)
            if store is not None:
                append_record(store, record)
            out_records.append(asdict(record))
    return Results(out_records, Path(out) if out is not None else None)
