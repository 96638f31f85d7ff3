"""One module per paper.  A reproduction declares its models, training loss, samplers, claims,
tables and plots; the harness in ``bench_core`` does the rest.

Registry: ``REPRODUCTIONS[name]`` -> a ``Reproduction`` instance.  Importing this package
registers every paper module listed in ``MODULES``.
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

from bench_core.limits import Range, field_range

# every module of this package is a paper; they register themselves on import
MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")))

REPRODUCTIONS: dict[str, "Reproduction"] = {}


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
    extra: dict = field(default_factory=dict)
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
        from bench_core.data import DatasetError, load_dataset
        from bench_core.train import CheckpointCache, CheckpointError

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


# --- records -----------------------------------------------------------------------------------------
def ok_rows(df, *present: str, **eq):
    """Records (a DataFrame) with status ok, a value (not None/NaN) in every column named in ``present``, and the
    given column values; ``opt_<key>=v`` and ``grid_<key>=v`` match one key of ``sampler_opts`` / ``grid``.
    None or an empty frame is returned as it is."""
    if df is None or len(df) == 0:
        return df
    m = df["status"] == "ok"
    for c in present:
        m &= df[c].notna()
    for k, v in eq.items():
        if k.startswith("opt_"):
            key = k[4:]
            m &= df["sampler_opts"].map(lambda o: isinstance(o, dict) and o.get(key) == v)
        elif k.startswith("grid_"):
            key = k[5:]
            m &= df["grid"].map(lambda o: isinstance(o, dict) and o.get(key) == v)
        else:
            m &= df[k] == v
    return df[m]


def train_seed_of(t) -> int:
    """A record's training seed (0 for records from before ``train_seed`` existed: None or NaN)."""
    try:
        return 0 if t is None or t != t else int(t)
    except (TypeError, ValueError):
        return 0


def seed_values(df, col: str = "fid") -> dict:
    """Replicate values of ``col`` keyed by (train_seed, seed): the input of ``bench_core.stats``' verdicts
    (two sides keyed alike are paired).  Duplicate keys (e.g. a re-run) are averaged; NaN values dropped."""
    if df is None or len(df) == 0 or col not in df:
        return {}
    ts = df["train_seed"] if "train_seed" in df else [0] * len(df)
    out: dict = {}
    for t, s, v in zip(ts, df["seed"], df[col]):
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if v == v and abs(v) != float("inf"):
            out.setdefault((train_seed_of(t), int(s)), []).append(v)
    return {k: sum(v) / len(v) for k, v in out.items()}


def combine(parts: list[tuple[str, "ClaimResult"]]) -> "ClaimResult":
    """One verdict from named parts that must all hold (``bench_core.stats.all_of``'s rule: fail if any fails,
    else inconclusive if any is, else not run if any is, else pass)."""
    from bench_core.stats import Verdict, all_of

    v = all_of([Verdict(r.status, r.ours, r.why) for _, r in parts], [name for name, _ in parts])
    return ClaimResult(v.status, v.text, v.why)


def fid_seeds(df, col: str = "fid", **eq) -> dict:
    """``seed_values`` of the ok records matching ``eq`` (``ok_rows``' filters): the replicates of one side of a
    comparison."""
    return seed_values(ok_rows(df, col, **eq), col)


def primary(df):
    """The records of the primary model of each preset: the lowest training seed present (a suite run with
    ``--train-seed K`` shifts every seed by K; extra training seeds of a comparison are left to their claim)."""
    if df is None or len(df) == 0 or "train_seed" not in df:
        return df
    ts = df["train_seed"].map(train_seed_of)
    lowest = ts.groupby(df["reproduction"].astype(str) + "/" + df["model"].astype(str)).transform("min")
    return df[ts == lowest]


def largest_group(df, *cols: str):
    """The rows of the most common combination of ``cols`` (a table or claim compares like with like: the
    same extractor, sample count, ...); ties go to the combination seen first."""
    key = df[cols[0]].astype(str)
    for c in cols[1:]:
        key = key + "|" + df[c].astype(str)
    return df[key == key.value_counts().idxmax()]


def unet_config_hash(family: str, cfg) -> str:
    """Checkpoint key of a config holding a U-Net under ``unet``: the network's architecture (not its
    kernels' runtime choices) and every other field."""
    from bench_core.train import config_hash

    d = asdict(cfg)
    d["unet"] = cfg.unet.arch_dict()
    return config_hash({"family": family}, d)


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



def register(rep: Reproduction) -> Reproduction:
    REPRODUCTIONS[rep.name] = rep
    return rep


_loaded = False
LOAD_ERRORS: dict[str, str] = {}  # paper module -> why it did not import


def load_all() -> dict[str, Reproduction]:
    """Import every paper module (once).  A module that fails to import is recorded in ``LOAD_ERRORS`` and the
    others still register; the first failure is raised after all were tried, so no caller mistakes a partial
    registry for the whole one (a later call tries the failed modules again)."""
    global _loaded
    if not _loaded:
        LOAD_ERRORS.clear()
        for m in MODULES:
            try:
                importlib.import_module(f"reproductions.{m}")
            except Exception as e:  # noqa: BLE001 - recorded, then raised below
                LOAD_ERRORS[m] = f"{type(e).__name__}: {e}"
        if LOAD_ERRORS:
            name, msg = next(iter(LOAD_ERRORS.items()))
            raise ImportError(f"reproduction module reproductions.{name} failed to import: {msg}"
                              + (f" (and {len(LOAD_ERRORS) - 1} more)" if len(LOAD_ERRORS) > 1 else ""))
        _loaded = True
    return REPRODUCTIONS


def get(name: str) -> Reproduction:
    load_all()
    if name not in REPRODUCTIONS:
        raise KeyError(f"unknown reproduction {name!r}; known: {', '.join(sorted(REPRODUCTIONS))}")
    return REPRODUCTIONS[name]
