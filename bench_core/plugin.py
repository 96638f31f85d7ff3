"""The plugin contract between the harness and the papers: ``Reproduction`` (what a paper declares: models,
claims, tables, plots), ``LoadedModel`` (what the harness samples and measures), ``Claim`` / ``ClaimResult``
(a verdict against the records), ``register`` and ``discover``.

A paper is a module that builds a ``Reproduction`` subclass and calls ``register(...)`` on import.  Discovery
imports the plugin packages once, at the entry points (the CLI, ``evaluate``, the runner, the report): the
bundled ``reproductions`` package, every package named by the ``diffbench.reproductions`` entry-point group,
and the comma-separated packages in ``$DIFFBENCH_PLUGINS``; each package's modules (names not starting with
``_``) are imported.  Every import error is collected: ``discover()`` raises one :class:`DiscoveryError`
naming them all, ``discover(strict=False)`` returns the partial registry and leaves the errors in
``discovery_errors()`` for the caller to show (the report does).  No module of ``bench_core`` imports a paper;
the samplers registry imports none until a sampler name it does not know is asked for.
"""
from __future__ import annotations

import copy
import importlib
import os
import pkgutil
import warnings
from dataclasses import dataclass, field, fields, is_dataclass, replace
from importlib.metadata import entry_points
from typing import Any, Callable

from .limits import Range, field_range

PLUGIN_GROUP = "diffbench.reproductions"   # entry-point group of third-party paper packages
BUNDLED = "reproductions"                  # the package of the eleven papers, shipped with diffbench

REGISTRY: dict[str, "Reproduction"] = {}

CLAIM_KINDS = ("paper", "sanity", "target")


@dataclass
class ClaimResult:
    """A claim's verdict.  ``status``: "pass" | "fail" | "inconclusive" | "not run" (the rule that decides
    between them is ``bench_core.stats``'); ``why``: one line for every status but pass."""

    status: str
    ours: str      # what our records show, as text (means with their intervals)
    why: str = ""

    @classmethod
    def of(cls, verdict, prefix: str = "") -> "ClaimResult":
        """From a ``bench_core.stats.Verdict`` (``prefix`` is put before its text)."""
        text = f"{prefix}{verdict.text}" if prefix and verdict.text else (verdict.text or prefix)
        return cls(verdict.status, text, verdict.why)


@dataclass
class Claim:
    """A claim and the check of it against our records (a pandas DataFrame of records).

    ``kind``: "paper" (what a paper reports), "sanity" (a check any working model passes) or "target" (an
    engineering goal of ours).  A threshold in ``text`` comes from the paper or from the measured noise, never
    from where our last run landed; its derivation is written in the text."""

    id: str
    text: str
    reported: str                                  # the paper's number(s); "(≈)" marks unverified
    check: Callable[[Any], ClaimResult]
    kind: str = "paper"

    def __post_init__(self):
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"claim {self.id!r}: kind {self.kind!r} is not one of {CLAIM_KINDS}")


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
    # metrics of the model itself (e.g. a variational bound or bits/dim), copied into every record's `metrics`;
    # the key "model_label" names a variant of one preset (e.g. "scale=2") in the leaderboard's model column
    model_metrics: dict = field(default_factory=dict)
    # paper-specific metrics of the samples: fn(samples: Tensor on CPU) -> dict, merged into `metrics`
    sample_metrics: Callable[[Any], dict] | None = None
    # per-sample conditioning from sample indices: fn(indices: LongTensor (B,)) -> dict merged into `cond` for
    # that batch (e.g. requested class labels), so a sample's condition never depends on its batch
    batch_cond: Callable[[Any], dict] | None = None
    # maps the sampler's output to samples (e.g. an LDM decoder: latents -> images); the harness calls it
    # inside the timed and memory-measured region.  None: the sampler's output are the samples.
    decode: Callable[[Any], Any] | None = None
    dtype: str = "float32"         # the network's compute dtype (recorded; e.g. bfloat16 under speed options)


class Reproduction:
    name: str = ""
    title: str = ""
    paper_url: str = ""
    models: dict[str, Any] = {}      # preset name -> typed config (dataclass)

    def load_model(self, model: str, overrides: dict, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        raise NotImplementedError

    def model_hash(self, model: str, overrides: dict) -> str:
        """The checkpoint-cache key of a model preset with overrides (cheap: no training)."""
        return self.hash_config(self.model_config(model, overrides))

    def hash_config(self, cfg) -> str:
        """The checkpoint-cache key of a finished config (``model_config``'s result): ``load_model``, which
        has the config already, calls this rather than building it again through ``model_hash``."""
        raise NotImplementedError

    def cached_net(self, h: str, build: Callable[[], Any], seed: int, train_fn: Callable[[Any], dict | None], *,
                   cache_dir) -> tuple[Any, dict, float | None]:
        """Train or load from the cache, the one sequence every paper uses: ``build()`` with its initialisation
        drawn from ``seed``, then the cached weights of hash ``h`` if present, else ``train_fn(net)`` (trains in
        place; returns the metadata to store) and saved.  Returns ``(net, meta, spent)``: ``spent`` the seconds
        training took now (``meta["train_sec"]``), None when the weights came from the cache."""
        from .train import CheckpointCache, seeded_init  # noqa: PLC0415 - lazy: no torch in the registry (CLI, reports)

        net = seeded_init(build, seed)
        meta, trained_now = CheckpointCache(cache_dir).load_or_train(h, net, train_fn)
        return net, meta, (float(meta.get("train_sec") or 0.0) if trained_now else None)

    def model_config(self, model: str, overrides: dict | None = None):
        """The preset's typed config with the suite's overrides applied (then ``check_config``)."""
        if model not in self.models:
            raise KeyError(f"{self.name}: unknown model {model!r}; known: {', '.join(self.models)}")
        cfg = apply_overrides(self.models[model], overrides or {})
        return self.check_config(model, cfg)

    def check_config(self, model: str, cfg):
        """Finish and validate a config after overrides (raise ValueError with the reason); returns it."""
        return cfg

    def train_seed_overrides(self, model: str, seed: int) -> dict:
        """Overrides that train ``model`` with training seed ``seed``: every integer ``seed`` field of the
        preset's nested configs (network init and batches, an autoencoder's or a classifier's training, a
        calibration) offset by ``seed``, so the checkpoint hash and every random choice of training change."""
        def walk(cfg) -> dict:
            out = {}
            for f in fields(cfg):
                v = getattr(cfg, f.name)
                if f.name == "seed" and isinstance(v, int) and not isinstance(v, bool):
                    out["seed"] = v + int(seed)
                elif is_dataclass(v):
                    sub = walk(v)
                    if sub:
                        out[f.name] = sub
            return out
        return walk(self.models[model]) if model in self.models and is_dataclass(self.models[model]) else {}

    def override_errors(self, model: str, overrides: dict, *, allow_large: bool = True) -> list[str]:
        """Every problem with a model name and its suite overrides (validated before any work starts): unknown
        fields, wrong types, values outside their fields' ranges, and with ``allow_large=False`` (what the suite
        validator passes unless told otherwise) values above a size bound (``size_errors``)."""
        if model not in self.models:
            return [f"unknown model {model!r} for reproduction {self.name!r} (known: {', '.join(self.models)})"]
        errs = override_errors(self.models[model], overrides or {})
        if not errs:
            try:
                cfg = self.model_config(model, overrides)  # e.g. a value outside the allowed choices
            except (ValueError, TypeError, KeyError) as e:
                errs.append(str(e))
            else:
                if not allow_large:
                    errs += self.size_errors(cfg)
        return errs

    def size_errors(self, cfg) -> list[str]:
        """Values of a finished config above their fields' size bounds (e.g. training steps above
        ``bench_core.limits.MAX_TRAIN_STEPS``), which ``--allow-large`` lifts."""
        return size_errors(cfg)

    def timesteps(self, model: str, cfg) -> int | None:
        """T, the number of discrete timesteps of the model's denoiser (its ``sigmas`` table, of which the
        ``uniform`` and ``quadratic`` grids take a subset of at most T steps), or None for a continuous-time model
        (those grids are refused for it).  Default: the config's integer ``T`` field, else None; a reproduction
        whose denoiser holds a timestep table elsewhere says so here."""
        T = getattr(cfg, "T", None)
        return T if isinstance(T, int) and not isinstance(T, bool) else None

    # what ``preflight`` checks: the datasets a model needs and the checkpoints it would load
    def required_datasets(self, cfg) -> list[tuple[str, dict]]:
        """(dataset name, options) pairs needed for training and for the metrics' reference."""
        return [(cfg.dataset, dict(cfg.dataset_opts))] if hasattr(cfg, "dataset") else []

    def cached_modules(self, model: str, overrides: dict, cfg) -> list[tuple[str, Callable[[], Any]]]:
        """(checkpoint hash, module factory) pairs whose cached files must load into that module."""
        return []

    def needed_checkpoints(self, model: str, overrides: dict, cfg) -> list[str]:
        """Hashes of every checkpoint-cache entry the model loads (all present: nothing to train or calibrate).
        Default: the ``cached_modules`` hashes when the reproduction declares them (none for exact denoisers),
        else the model's own hash."""
        if type(self).cached_modules is not Reproduction.cached_modules:
            return [h for h, _ in self.cached_modules(model, overrides, cfg)]
        return [self.hash_config(cfg)]

    def preflight(self, model: str, overrides: dict, *, cache_dir) -> list[str]:
        """Problems to report before any work starts: missing dataset files, a cached checkpoint
        that is corrupted or does not match.  The harness calls it for every model a suite uses."""
        from bench_core.data import DatasetError, load_dataset  # noqa: PLC0415 - lazy: no torch in the registry (CLI, reports)
        from bench_core.train import CheckpointCache, CheckpointError  # noqa: PLC0415 - lazy: no torch in the registry (CLI, reports)

        cfg = self.model_config(model, overrides)
        problems = []
        for name, opts in self.required_datasets(cfg):
            try:
                load_dataset(name, **opts)
            except (FileNotFoundError, DatasetError) as e:
                problems.append(f"{self.name}/{model}: {e}")
        cache = CheckpointCache(cache_dir)
        for h, make in self.cached_modules(model, overrides, cfg):
            try:
                if cache.path(h).exists():  # a folder in its place is refused by load too
                    cache.load(h, make())
            except CheckpointError as e:
                problems.append(f"{self.name}/{model}: {e}")
        return problems

    def claims(self) -> list[Claim]:
        return []

    def tables(self, df) -> dict[str, Any]:
        """Paper tables regenerated from records: title -> pandas DataFrame (Markdown-able)."""
        return {}

    def plots(self, df, outdir) -> list:
        """Paper-specific plots regenerated from records; returns the written paths."""
        return []


# --- typed configs from YAML overrides --------------------------------------------------------------
def apply_overrides(cfg, overrides: dict, path: str = ""):
    """A copy of a (nested) dataclass config with YAML overrides applied; unknown fields raise."""
    cfg = copy.deepcopy(cfg)
    for k, v in (overrides or {}).items():
        names = {f.name for f in fields(cfg)}
        if k not in names:
            raise KeyError(f"{path}{k}: unknown field (known: {', '.join(sorted(names))})")
        cur = getattr(cfg, k)
        if is_dataclass(cur):
            if not isinstance(v, dict):
                raise TypeError(f"{path}{k}: expected a mapping of fields, got {type(v).__name__}")
            v = apply_overrides(cur, v, f"{path}{k}.")
        elif isinstance(cur, tuple) and isinstance(v, list):
            v = tuple(v)
        cfg = replace(cfg, **{k: v})
    return cfg


def override_errors(cfg, overrides: dict, path: str = "") -> list[str]:
    """Every problem with a mapping of overrides against a dataclass config (for suite validation)."""
    errs = []
    if not isinstance(overrides, dict):
        return [f"{path or 'model_overrides'}: expected a mapping, got {type(overrides).__name__}"]
    known = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    ranges = {f.name: field_range(f) for f in fields(cfg)}
    for k, v in overrides.items():
        if k not in known:
            errs.append(f"{path}{k}: unknown field (known: {', '.join(sorted(known))})")
            continue
        cur = known[k]
        if is_dataclass(cur):
            errs += override_errors(cur, v, f"{path}{k}.") if isinstance(v, dict) else [
                f"{path}{k}: expected a mapping of fields, got {type(v).__name__}"]
        elif cur is not None and not _same_kind(cur, v):
            errs.append(f"{path}{k}: expected {type(cur).__name__}, got {type(v).__name__} {v!r}")
        else:  # the declared range (size bounds apart: ``size_errors``); a float must be finite whatever its field
            msg = (ranges[k] or Range()).check(v, allow_large=True)
            if msg:
                errs.append(f"{path}{k}: {msg}")
    return errs


def size_errors(cfg, path: str = "") -> list[str]:
    """Fields of a (nested) dataclass config above their declared size bound (``Range.large``)."""
    errs = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            errs += size_errors(v, f"{path}{f.name}.")
        elif (r := field_range(f)) is not None and r.large is not None:
            msg = r.check(v)
            if msg:
                errs.append(f"{path}{f.name}: {msg}")
    return errs


def _same_kind(cur, v) -> bool:
    if isinstance(cur, bool) or isinstance(v, bool):
        return isinstance(cur, bool) and isinstance(v, bool)
    if isinstance(cur, (int, float)):
        return isinstance(v, (int, float)) and (isinstance(cur, float) or isinstance(v, int))
    if isinstance(cur, (tuple, list)):
        return isinstance(v, (tuple, list))
    return isinstance(v, type(cur))


def register(rep: "Reproduction") -> "Reproduction":
    """Add a paper to the registry (its module calls this on import); a second paper of the same name is refused."""
    old = REGISTRY.get(rep.name)
    if old is not None and type(old) is not type(rep):
        raise ValueError(f"reproduction {rep.name!r} registered twice ({type(old).__module__} and {type(rep).__module__})")
    REGISTRY[rep.name] = rep
    return rep


class DiscoveryError(ImportError):
    """One or more plugin modules failed to import; ``errors`` maps each module to why."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        lines = "\n".join(f"  {m}: {why}" for m, why in self.errors.items())
        super().__init__(f"{len(self.errors)} reproduction module(s) failed to import (the registry would be "
                         f"partial, so nothing was run):\n{lines}")


_discovered = False
_ERRORS: dict[str, str] = {}


def plugin_packages() -> list[str]:
    """The packages discovery imports: the bundled papers, the ``diffbench.reproductions`` entry points, then
    ``$DIFFBENCH_PLUGINS`` (comma-separated), each once."""
    names = [BUNDLED] + [ep.value for ep in entry_points(group=PLUGIN_GROUP)]
    names += [n.strip() for n in os.environ.get("DIFFBENCH_PLUGINS", "").split(",") if n.strip()]
    return list(dict.fromkeys(names))


def _import_package(name: str) -> None:
    """Import a plugin package and every public module in it, recording each failure in ``_ERRORS``."""
    try:
        pkg = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - collected and reported by discover()
        _ERRORS[name] = f"{type(e).__name__}: {e}"
        return
    for m in sorted(pkgutil.iter_modules(getattr(pkg, "__path__", []))):
        if m.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{name}.{m.name}")
        except Exception as e:  # noqa: BLE001 - collected and reported by discover()
            _ERRORS[f"{name}.{m.name}"] = f"{type(e).__name__}: {e}"


def discover(strict: bool = True) -> dict[str, "Reproduction"]:
    """Import every plugin package once and return the registry.  ``strict``: raise :class:`DiscoveryError`
    when any module failed (every failure named, on every call, so a partial registry is never mistaken for
    the whole); otherwise return what registered and leave the failures to ``discovery_errors()``."""
    global _discovered
    if not _discovered:
        _ERRORS.clear()
        for name in plugin_packages():
            _import_package(name)
        _discovered = True  # after the imports: a failure above is remembered, not forgotten
        if _ERRORS and not strict:  # said once, loudly, where the caller goes on with what registered
            lines = "; ".join(f"{m}: {why}" for m, why in _ERRORS.items())
            warnings.warn(f"{len(_ERRORS)} reproduction module(s) failed to import and are left out: {lines}",
                          RuntimeWarning, stacklevel=2)
    if strict and _ERRORS:
        raise DiscoveryError(_ERRORS)
    return REGISTRY


def discovery_errors() -> dict[str, str]:
    """Module -> why it failed to import, from the last discovery (empty when all imported)."""
    return dict(_ERRORS)


def get(name: str) -> "Reproduction":
    """The registered paper ``name`` (discovering the plugins first if nobody has); an unknown name is a KeyError
    that lists the known ones and any module that failed to import (the paper may be in it)."""
    discover(strict=False)
    if name not in REGISTRY:
        broken = "".join(f"; {m} failed to import ({why})" for m, why in _ERRORS.items())
        raise KeyError(f"unknown reproduction {name!r}; known: {', '.join(sorted(REGISTRY))}{broken}")
    return REGISTRY[name]
