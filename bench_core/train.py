"""Generic training loop and the checkpoint cache.

The loss comes from the reproduction: ``loss_fn(model, x_batch, y_batch, generator) -> scalar``.
The loop owns everything else (Ho et al. 2020, App. B defaults): Adam, linear learning-rate
warm-up, gradient-norm clipping, an exponential moving average (EMA) of the weights, seeded batch
sampling and a progress bar.

Checkpoints are cached by a hash of the configs that produced them (:func:`config_hash`), so a
second run with the same configs loads instead of training.  A cached file is a dict
``{"format": "diffbench-ckpt-1", "hash", "state_dict", "meta"}`` written atomically and read with
``torch.load(weights_only=True)`` (no code runs from a checkpoint).  Beside it, ``<hash>.pt.sha256``
holds the SHA-256 of its bytes (``sha256sum`` format), also written atomically; every load checks it
first, so a damaged file is refused, naming the command that removes it, before it is deserialised.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .atomic import StorageError, atomic_write_bytes, atomic_write_text

from .limits import MAX_TRAIN_STEPS, ranged
from .paths import user_cache_root

CKPT_FORMAT = "diffbench-ckpt-1"


# --------------------------------------------------------------------------------------------
# Config and its hash
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation settings; defaults are DDPM's CIFAR-10 run (Ho et al. 2020, Sec. 4 and App. B)."""

    # (ranged: the values a suite's model_overrides may give, checked before any work; bench_core/limits.py)
    lr: float = ranged(2e-4, gt=0.0)                                   # Adam learning rate
    batch_size: int = ranged(128, ge=1)
    steps: int = ranged(800_000, ge=1, large=("MAX_TRAIN_STEPS", MAX_TRAIN_STEPS))  # CIFAR-10: 800k steps
    warmup: int = ranged(5000, ge=0)                                   # linear lr warm-up steps
    grad_clip: float = ranged(1.0, ge=0.0)                             # max global gradient norm (0 = off)
    ema_decay: float = ranged(0.9999, ge=0.0, lt=1.0)                  # EMA of the weights (0 = no EMA)
    seed: int = ranged(0, ge=0)
    weight_decay: float = ranged(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = ranged(1e-8, gt=0.0)

    def to_dict(self) -> dict:
        return _canonical(self)


def _canonical(obj: Any) -> Any:
    """JSON-able canonical form: dataclasses via asdict, tuples to lists, numpy/torch scalars to numbers."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"config_hash: cannot hash a {type(obj).__name__} ({obj!r}); use plain values")


def canonical_json(*objs: Any) -> str:
    """Canonical JSON of the given dataclasses/dicts: sorted keys, no whitespace."""
    return json.dumps([_canonical(o) for o in objs], sort_keys=True, separators=(",", ":"), allow_nan=True)


def config_hash(*objs: Any) -> str:
    """sha256 of the canonical JSON of the given dataclasses/dicts, first 16 hex digits."""
    return hashlib.sha256(canonical_json(*objs).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's parameters and floating-point buffers.

    ``shadow <- decay * shadow + (1 - decay) * param`` on each :meth:`update`; non-float buffers
    (counters) are copied.  The shadow starts as a copy of the module.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadow, src = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point() and v.dtype == s.dtype:
                shadow.append(s)
                src.append(v)
            elif s.is_floating_point():
                s.lerp_(v.to(s.dtype), 1.0 - self.decay)
            else:
                s.copy_(v)
        if shadow:  # one multi-tensor kernel per step instead of one per tensor (same arithmetic)
            torch._foreach_lerp_(shadow, src, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.shadow, strict=True)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


MULTI_TENSOR_DEVICES = ("cpu", "cuda")  # devices with fused Adam and multi-tensor (foreach) gradient clipping


def _adam(params: list, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the config's settings; the fused kernel where torch has one for the device (one pass over all
    parameters per step; on CPU a training step of the digits U-Net is ~10 % faster), the per-tensor loop
    elsewhere.  The update is Adam's either way (the two agree to float rounding)."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if device.type in MULTI_TENSOR_DEVICES and all(p.is_floating_point() for p in params):
        try:
            return torch.optim.Adam(params, fused=True, **kw)
        except (RuntimeError, TypeError):  # a build or dtype without the fused kernel
            pass
    return torch.optim.Adam(params, **kw)


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``step`` and ``loss`` say where (records: status "diverged")."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: loss = {loss}")
        self.step, self.loss = step, loss


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant (DDPM)."""
    if cfg.warmup <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup)


class _BatchIndices:
    """Epochs of seeded permutations, cut into batches (wrapping across epochs)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.bs, self.g = n, batch_size, generator
        self.buf = torch.empty(0, dtype=torch.long)

    def next(self) -> Tensor:
        while self.buf.numel() < self.bs:
            self.buf = torch.cat([self.buf, torch.randperm(self.n, generator=self.g)])
        idx, self.buf = self.buf[: self.bs], self.buf[self.bs:]
        return idx


def train(model: nn.Module, loss_fn: Callable, data, cfg: TrainConfig, *, labels: Tensor | None = None,
          progress: bool = True, desc: str = "train", device: str | torch.device = "cpu",
          log_every: int = 25) -> dict:
    """Train ``model`` in place; at the end the **EMA weights are copied into the model** (the
    model is returned in eval mode holding the averaged weights, as DDPM evaluates them; with
    ``ema_decay=0`` it holds the raw weights).

    ``data``: a tensor ``(N, ...)`` or a ``bench_core.data.Dataset`` (its labels are used unless
    ``labels`` is given).  ``loss_fn(model, x_batch, y_batch, generator)`` returns a scalar;
    ``y_batch`` is None without labels; ``generator`` is a seeded **CPU** ``torch.Generator`` for
    the loss's own noise (draw on CPU, then move: the same numbers on every device).

    Deterministic given ``cfg.seed``: batches come from their own generator, and the global RNG
    (dropout) is seeded inside a ``torch.random.fork_rng`` so the caller's RNG state is untouched.

    Returns json-able stats: ``train_sec``, ``final_loss`` (mean of the last 100 losses),
    ``steps``, ``loss_curve`` (up to 100 ``[step, mean loss]`` points), ``params``.
    Raises :class:`TrainingDiverged` on a non-finite loss.  On CUDA losses are read back every
    ``log_every`` steps (one synchronisation each), on CPU every step.
    """
    if hasattr(data, "x") and isinstance(getattr(data, "x"), Tensor):
        labels = labels if labels is not None else getattr(data, "labels", None)
        data = data.x
    if labels is not None and labels.shape[0] != data.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {data.shape[0]} samples")
    device = torch.device(device)
    model.to(device).train()
    n = data.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adam(params, cfg, device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    batch_gen = torch.Generator().manual_seed(cfg.seed)
    loss_gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = _BatchIndices(n, cfg.batch_size, batch_gen)
    fork_devices = [device.index or 0] if device.type == "cuda" else []

    losses_tail: list[float] = []                  # last 100 losses
    bin_size = max(1, math.ceil(cfg.steps / 100))  # loss curve: at most 100 bins
    curve: list[list[float]] = []
    bin_sum, bin_count = 0.0, 0
    pending: list[Tensor] = []                     # losses not yet read back (one sync per log_every)

    def flush(step: int) -> None:
        nonlocal bin_sum, bin_count
        if not pending:
            return
        vals = torch.stack(pending).tolist()
        first = step - len(vals) + 1
        pending.clear()
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise TrainingDiverged(first + i, v)
            bin_sum += v
            bin_count += 1
            if (first + i + 1) % bin_size == 0 or first + i + 1 == cfg.steps:
                curve.append([first + i + 1, bin_sum / bin_count])
                bin_sum, bin_count = 0.0, 0
        losses_tail.extend(vals)
        del losses_tail[:-100]

    every = max(1, log_every) if device.type == "cuda" else 1  # reading a loss back costs a sync on GPU only
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
        for step in bar:
            idx = batches.next()
            x = data[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True) if labels is not None else None
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = loss_fn(model, x, y, loss_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=device.type in MULTI_TENSOR_DEVICES)
            opt.step()
            if ema is not None:
                ema.update(model)
            pending.append(loss.detach().float())
            if len(pending) >= every or step == cfg.steps - 1:
                flush(step)
                if losses_tail:
                    bar.set_postfix(loss=f"{losses_tail[-1]:.4f}", refresh=False)
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_sec = time.perf_counter() - t0

    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return {
        "train_sec": train_sec,
        "final_loss": sum(losses_tail) / len(losses_tail) if losses_tail else float("nan"),
        "steps": int(cfg.steps),
        "loss_curve": curve,
        "params": int(sum(p.numel() for p in model.parameters())),
    }


# --------------------------------------------------------------------------------------------
# Checkpoint cache
# --------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A cached checkpoint cannot be used; the message names the file and what to do."""


def default_cache_dir() -> Path:
    """``$DIFFBENCH_CACHE``, else ``$XDG_CACHE_HOME/diffbench``, else ``~/.cache/diffbench``: the user's cache
    folder, never the source tree (an installed wheel's site-packages may be read-only)."""
    env = os.environ.get("DIFFBENCH_CACHE")
    return Path(env).expanduser() if env else user_cache_root()


class CheckpointCache:
    """Trained weights keyed by config hash: ``<dir>/<hash>.pt`` and its checksum ``<dir>/<hash>.pt.sha256``."""

    WRITE_HINT = "free space in the cache folder (--cache-dir or $DIFFBENCH_CACHE) and run again; no cut file was left"

    def __init__(self, dir: str | os.PathLike | None = None):
        self.dir = Path(dir).expanduser() if dir is not None else default_cache_dir()

    def path(self, hash: str) -> Path:
        if not hash or any(c in hash for c in "/\\") or hash.startswith("."):
            raise ValueError(f"not a checkpoint hash: {hash!r}")
        return self.dir / f"{hash}.pt"

    def checksum_path(self, hash: str) -> Path:
        """The SHA-256 sidecar of a checkpoint, in ``sha256sum`` format (``sha256sum -c`` checks it)."""
        path = self.path(hash)
        return path.with_name(path.name + ".sha256")

    def exists(self, hash: str) -> bool:
        return self.path(hash).is_file()

    def save(self, hash: str, model: nn.Module, meta: dict | None = None) -> Path:
        """Write the checkpoint, then its SHA-256 sidecar, each whole or not at all (a temporary file in
        the same folder, fsync'd, then ``os.replace``; see ``bench_core.atomic``).  A write failure (disk
        full, I/O error) raises ``StorageError`` naming the file; the old checkpoint, if any, stays whole.
        The old sidecar is removed first, so no crash can pair a new checkpoint with an old checksum."""
        try:  # stored as its JSON round trip: plain types only, loadable with weights_only=True
            meta = json.loads(json.dumps(dict(meta or {}), allow_nan=True, default=_json_scalar))
        except TypeError as e:
            raise TypeError(f"checkpoint meta must be json-able: {e}") from e
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        obj = {"format": CKPT_FORMAT, "hash": hash, "state_dict": state, "meta": meta,
               "torch": str(torch.__version__), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        buf = io.BytesIO()  # serialised in memory: a disk error is then a plain OSError, not torch's zip-writer error
        torch.save(obj, buf)
        data = buf.getvalue()
        path, side = self.path(hash), self.checksum_path(hash)
        try:
            side.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(side, e, what="checkpoint checksum", hint=self.WRITE_HINT) from e
        atomic_write_bytes(path, data, what="checkpoint", hint=self.WRITE_HINT)
        atomic_write_text(side, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n", what="checkpoint checksum",
                          hint=self.WRITE_HINT)
        return path

    def _verified_bytes(self, path: Path, side: Path) -> bytes:
        """The checkpoint's bytes, checked against its sidecar.  A checkpoint without one (written before
        checksums existed, or a save cut between the two files) is checked with the CRC-32 its zip
        archive holds per entry instead; the sidecar is then written by :meth:`load` once it has loaded."""
        fix = f"delete it to retrain: rm -f '{path}' '{side}'"
        if side.exists() and not side.is_file():
            raise CheckpointError(f"checkpoint checksum {side} is not a file; remove it: rm -r '{side}'")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e}); {fix}") from e
        if not side.is_file():
            if data[:4] == b"PK\x03\x04":  # a torch zip archive; anything else fails torch.load below
                try:
                    with zipfile.ZipFile(io.BytesIO(data)) as z:
                        bad = z.testzip()
                except (zipfile.BadZipFile, OSError, ValueError, EOFError):
                    bad = None  # truncated or not a zip: torch.load reports it
                if bad is not None:
                    raise CheckpointError(f"checkpoint {path} is corrupted: entry {bad!r} fails its CRC-32 check; {fix}")
            return data
        try:
            expected = side.read_text(encoding="ascii").split()[0].lower()
        except (OSError, UnicodeDecodeError, IndexError):
            expected = ""
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
            raise CheckpointError(f"checkpoint checksum {side} is damaged (no SHA-256 in it); {fix}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 {actual[:16]}... differs from the one "
                                  f"written when it was saved ({expected[:16]}..., in {side.name}); {fix}")
        return data

    def load(self, hash: str, model: nn.Module) -> dict | None:
        """Load the cached weights into ``model`` and return the meta; None when not cached.

        Raises :class:`CheckpointError` for a cache entry that is not a file, a corrupted file (its
        SHA-256 differs from its sidecar's, or unreadable) or a mismatched one (wrong format, another
        hash, missing/unexpected keys, shape mismatch); the model is left untouched in that case.
        The suite's preflight calls this for every cached checkpoint before any work.
        """
        path, side = self.path(hash), self.checksum_path(hash)
        if path.exists() and not path.is_file():
            raise CheckpointError(f"checkpoint cache entry {path} is a {'folder' if path.is_dir() else 'special file'}, "
                                  f"not a file; remove it to retrain: rm -r '{path}'")
        if not path.is_file():
            return None
        data = self._verified_bytes(path, side)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, garbage bytes, foreign pickle, ...
            raise CheckpointError(f"checkpoint {path} is corrupted and cannot be read ({_load_failure(path, e)}); "
                                  f"delete it to retrain: rm '{path}'") from e
        fix = f"delete it to retrain: rm '{path}'"
        if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
            fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"checkpoint {path} is not a {CKPT_FORMAT} file (format: {fmt!r}); {fix}")
        if obj.get("hash") != hash:
            raise CheckpointError(f"checkpoint {path} holds hash {obj.get('hash')!r}, expected {hash!r}; {fix}")
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path} has no state_dict; {fix}")
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        problems = []
        if missing:
            problems.append(f"missing keys {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_few(unexpected)}")
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if shapes:
            problems.append(f"shape mismatch {_few(shapes)}")
        if problems:
            raise CheckpointError(f"checkpoint {path} does not match the model ({'; '.join(problems)}); "
                                  f"the model code changed without changing its config hash? {fix}")
        model.load_state_dict(state, strict=True)
        if not side.is_file():  # an older checkpoint that passed its zip CRC check and loaded: adopt it
            try:
                atomic_write_text(side, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n",
                                  what="checkpoint checksum")
                warnings.warn(f"checkpoint {path} had no checksum (written by an older diffbench, or its save was "
                              f"cut short); it passed its archive's CRC check and loaded, and its SHA-256 is now "
                              f"kept in {side.name}")
            except StorageError as e:
                warnings.warn(f"checkpoint {path} has no checksum and none could be written ({e}); "
                              "it is checked by its archive's CRC only")
        meta = obj.get("meta")
        return dict(meta) if isinstance(meta, dict) else {}

    def load_or_train(self, hash: str, model: nn.Module, train_fn: Callable[[nn.Module], dict | None]
                      ) -> tuple[dict, bool]:
        """Cached weights if present, else ``meta = train_fn(model)`` (trains in place) and save.

        Returns ``(meta, trained_now)``.  Holds a file lock on the checkpoint while it looks and trains, so
        that two processes sharing the cache (``--train-jobs``, two suites at once) never train it twice: the
        second waits, then loads what the first saved.
        """
        with self._lock(hash):
            meta = self.load(hash, model)
            if meta is not None:
                return meta, False
            meta = train_fn(model) or {}
            self.save(hash, model, meta)
        return dict(meta), True

    @contextlib.contextmanager
    def _lock(self, hash: str):
        """An exclusive ``flock`` on ``<dir>/.locks/<hash>.lock`` (POSIX; elsewhere, or where the folder cannot
        take the file, no lock: a second process may then train the same checkpoint, and the last save wins)."""
        try:
            import fcntl  # noqa: PLC0415 - POSIX only
        except ImportError:
            yield
            return
        path = self.dir / ".locks" / f"{self.path(hash).stem}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _json_scalar(o):
    if hasattr(o, "item") and callable(o.item) and getattr(o, "ndim", 0) == 0:  # numpy / torch scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _load_failure(path: Path, e: BaseException) -> str:
    """Why torch.load failed, in a few words (torch's own advice to retry without weights_only is
    not repeated: a cache file never needs it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as oe:
        return f"unreadable: {oe}"
    if size == 0:
        return "empty file"
    if head != b"PK\x03\x04":
        return f"not a torch zip archive: garbage or truncated, {size} bytes"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if "central directory" in str(e) or "zip archive" in str(e):
        return f"truncated or damaged torch zip archive, {size} bytes"
    unsafe = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), None)
    if unsafe:
        return "holds objects other than tensors and plain data: " + unsafe[:200]
    return f"{type(e).__name__}: {lines[0].split('. ')[0][:160] if lines else ''}"


def _few(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def seeded_init(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` with its weight initialisation drawn from ``seed`` (inside ``fork_rng``: the caller's RNG
    state is untouched), so a checkpoint trained from a config is the same on every run."""
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        return factory()
