"""Records: the single source of truth.  Append-only JSONL, one line per
(entry, model, sampler, steps, seed).

Crash safety: each record is serialised first, then written with a single ``os.write`` on a
file opened with O_APPEND and fsync'd, so a killed run leaves every finished line intact.  If a
previous run was killed in the middle of a write the unterminated tail is moved to
``<file>.partial`` (never silently dropped) before the next append.
"""
from __future__ import annotations

import base64
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SCHEMA_VERSION = 1

# Fields every record has (issue 2 lists the first block as the minimum).
REQUIRED_FIELDS = (
    "reproduction", "model", "dataset", "sampler", "sampler_opts", "steps", "nfe", "num_samples",
    "batch_size", "seed", "fid", "fid_extractor", "sec_per_batch", "samples_per_sec", "peak_mem_mb",
    "device", "git_sha", "status",
)
STATUSES = ("ok", "diverged", "error")


@dataclass
class Record:
    # what ran
    suite: str = ""
    entry: str = ""
    reproduction: str = ""
    model: str = ""              # model preset name
    model_hash: str = ""         # hash of the model + training config (the checkpoint cache key)
    dataset: str = ""
    sampler: str = ""
    sampler_opts: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)   # sigma grid: {"kind": ..., plus options}
    steps: int = 0
    nfe: float = 0.0             # counted by the harness (mean per sample trajectory)
    grad_evals: float = 0.0      # classifier-gradient evaluations, counted apart from NFE
    num_samples: int = 0
    batch_size: int = 0
    seed: int = 0                # sampling seed
    train_seed: int = 0          # training seed of the model (part of model_hash); replicates of trained models
    dtype: str = "float32"
    # what was measured
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    fid_extractor: str | None = None        # "name@sha256[:12]"
    fid_reference: str | None = None        # reference set: dataset, split and count
    metrics: dict = field(default_factory=dict)  # other metrics (sliced_wasserstein, mmd, bits, ...)
    sec_per_batch: float | None = None
    samples_per_sec: float | None = None
    timing_repeats: int = 0
    peak_mem_mb: float | None = None
    peak_mem_method: str = ""
    train_sec: float | None = None
    wall_sec: float | None = None  # wall time of this run: sampling + metrics (+ loading or training its model, first run)
    preview: dict | None = None  # a few samples for grids: {"shape": [...], "dtype": "uint8"|"float16", "b64": ...}
    # where and provenance
    device: str = ""             # "cpu" / "cuda"
    device_name: str = ""        # CPU model or GPU name
    git_sha: str = ""
    versions: dict = field(default_factory=dict)
    timestamp: str = ""
    schema: int = SCHEMA_VERSION
    status: str = "ok"
    error: str | None = None

    def key(self) -> tuple:
        return record_key(asdict(self))


def record_key(r: dict) -> tuple:
    """Identity of a measurement: resume skips a key that is already recorded with ok/diverged."""
    return (
        r.get("suite", ""), r.get("entry", ""), r.get("model_hash", ""), r.get("sampler", ""),
        json.dumps(r.get("sampler_opts", {}), sort_keys=True), json.dumps(r.get("grid", {}), sort_keys=True),
        int(r.get("steps", 0)), int(r.get("seed", 0)), int(r.get("num_samples", 0)),
    )


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------
class RecordStore:
    """Append-only JSONL file of records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _repair_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            with open(str(self.path) + ".partial", "ab") as p:
                p.write(data[cut:] + b"\n")
            f.truncate(cut)

    def append(self, record: Record | dict) -> None:
        rec = asdict(record) if isinstance(record, Record) else dict(record)
        line = (json.dumps(rec, sort_keys=True, allow_nan=True, default=_json_default) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):  # a short write is continued, never interleaved
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.load())

    def load(self) -> list[dict]:
        return load_records(self.path)

    def done_keys(self) -> set[tuple]:
        return {record_key(r) for r in self.load() if r.get("status") in ("ok", "diverged")}


def load_records(*paths: str | os.PathLike) -> list[dict]:
    """Every complete record in the given JSONL files (or folders holding records.jsonl)."""
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
        for f in files:
            if not f.exists():
                continue
            with open(f, "rb") as fh:
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        continue  # unterminated tail of a killed write: not a record
                    raw = raw.strip()
                    if not raw:
                        continue
                    try:
                        out.append(json.loads(raw))
                    except json.JSONDecodeError:
                        continue
    return out


def records_frame(records: Iterable[dict]):
    """Records as a pandas DataFrame, with sampler options flattened into a readable label."""
    import pandas as pd

    rows = []
    for r in records:
        r = dict(r)
        r["sampler_label"] = sampler_label(r)
        rows.append(r)
    return pd.DataFrame(rows)


def sampler_label(r: dict) -> str:
    """A readable sampler configuration, e.g. ``ddim(eta=0.2) uniform``."""
    opts = r.get("sampler_opts") or {}
    s = r.get("sampler", "")
    if opts:
        s += "(" + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")"
    grid = dict(r.get("grid") or {})
    kind = grid.pop("kind", "")
    if kind:
        s += f" {kind}"
        if grid:
            s += "(" + ", ".join(f"{k}={v}" for k, v in sorted(grid.items())) + ")"
    return s


# --------------------------------------------------------------------------------------------
# Helpers for writers
# --------------------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def encode_preview(arr: np.ndarray, kind: str = "uint8") -> dict:
    """Embed a few samples in a record: images as uint8 (values already in [0, 255]), points as float16."""
    arr = np.asarray(arr)
    a = arr.astype(np.uint8 if kind == "uint8" else np.float16)
    return {"shape": list(a.shape), "dtype": a.dtype.name, "b64": base64.b64encode(a.tobytes()).decode()}


def decode_preview(p: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(p["b64"]), dtype=np.dtype(p["dtype"])).reshape(p["shape"])


_GIT_SHA: str | None = None


def git_sha() -> str:
    global _GIT_SHA
    if _GIT_SHA is None:
        try:
            root = Path(__file__).resolve().parent.parent
            sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                 text=True, timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            _GIT_SHA = (sha + ("-dirty" if dirty else "")) if sha else "unknown"
        except Exception:
            _GIT_SHA = "unknown"
    return _GIT_SHA


def versions() -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torch_fidelity", "numpy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        from importlib.metadata import version

        v["diffbench"] = version("diffbench")
    except Exception:
        pass
    return v


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
