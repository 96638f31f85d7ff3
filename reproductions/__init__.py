"""One module per paper.  A reproduction declares its models, training loss, samplers, claims,
tables and plots; the harness in ``bench_core`` does the rest.

Registry: ``REPRODUCTIONS[name]`` -> a ``Reproduction`` instance.  Importing this package
registers every paper module listed in ``MODULES``.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# every module of this package is a paper; they register themselves on import
MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")))

REPRODUCTIONS: dict[str, "Reproduction"] = {}


@dataclass
class ClaimResult:
    status: str  # "pass" | "fail" | "not run"
    ours: str    # what our records show, as text


@dataclass
class Claim:
    """A paper's claim and the check of it against our records (a pandas DataFrame of records)."""

    id: str
    text: str
    reported: str                                  # the paper's number(s); "(≈)" marks unverified
    check: Callable[[Any], ClaimResult]


@dataclass
class LoadedModel:
    """What the harness needs from a reproduction to sample and measure."""

    denoiser: Any                  # a Denoiser (bench_core.denoiser)
    model_hash: str
    dataset: str                   # name of the dataset the model was trained on (metrics reference)
    sample_shape: tuple            # shape of one sample, e.g. (1, 8, 8) or (2,)
    train_sec: float | None = None  # wall time of training, None when loaded from the cache
    dataset_opts: dict = field(default_factory=dict)  # options of the dataset (e.g. resolution)
    cond: dict = field(default_factory=dict)
    # metrics of the model itself (e.g. a variational bound or bits/dim), copied into every record's `metrics`
    model_metrics: dict = field(default_factory=dict)
    # paper-specific metrics of the samples: fn(samples: Tensor on CPU) -> dict, merged into `metrics`
    sample_metrics: Callable[[Any], dict] | None = None
    extra: dict = field(default_factory=dict)


class Reproduction:
    name: str = ""
    title: str = ""
    paper_url: str = ""
    models: dict[str, Any] = {}      # preset name -> typed config (dataclass)

    def load_model(self, model: str, overrides: dict, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        raise NotImplementedError

    def model_hash(self, model: str, overrides: dict) -> str:
        """The checkpoint-cache key of a model preset with overrides (cheap: no training)."""
        raise NotImplementedError

    def override_errors(self, model: str, overrides: dict) -> list[str]:
        """Every problem with a model name and its suite overrides (validated before any work starts)."""
        return [] if model in self.models else [f"unknown model {model!r} for reproduction {self.name!r}"]

    def preflight(self, model: str, overrides: dict, *, cache_dir) -> list[str]:
        """Problems to report before any work starts: missing dataset files, a cached checkpoint
        that is corrupted or does not match.  The harness calls it for every model a suite uses."""
        return []

    def claims(self) -> list[Claim]:
        return []

    def tables(self, df) -> dict[str, Any]:
        """Paper tables regenerated from records: title -> pandas DataFrame (Markdown-able)."""
        return {}

    def plots(self, df, outdir) -> list:
        """Paper-specific plots regenerated from records; returns the written paths."""
        return []


def register(rep: Reproduction) -> Reproduction:
    REPRODUCTIONS[rep.name] = rep
    return rep


_loaded = False


def load_all() -> dict[str, Reproduction]:
    global _loaded
    if not _loaded:
        _loaded = True
        for m in MODULES:
            importlib.import_module(f"reproductions.{m}")
    return REPRODUCTIONS


def get(name: str) -> Reproduction:
    load_all()
    if name not in REPRODUCTIONS:
        raise KeyError(f"unknown reproduction {name!r}; known: {', '.join(sorted(REPRODUCTIONS))}")
    return REPRODUCTIONS[name]
