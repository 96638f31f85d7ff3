"""Records: the single source of truth.  Append-only JSONL, one line per
(entry, model, sampler, steps, seed).

Crash safety: each record is serialised first, then written with a single ``os.write`` on a
file opened with O_APPEND and fsync'd, so a killed run leaves every finished line intact.  If a
previous run was killed in the middle of a write the unterminated tail is moved to
``<file>.partial`` (never silently dropped) before the next append.  A failed write (disk full, I/O
error) is cut back to the previous size and raised as :class:`StorageError`: records are complete or absent.

Every line read is validated against the record schema (:func:`validate_record`).  Readers skip a line
that is not a record with one warning per file naming its line numbers; the run's own store
(:class:`RecordStore`) also moves such lines to ``<file>.rejected`` before it next writes.
"""
from __future__ import annotations

import base64
import json
import os
import platform
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from .atomic import StorageError, atomic_write_bytes, write_all  # noqa: F401 - StorageError: the runner catches it from here

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
# Schema: what a line must be to be trusted as a record
# --------------------------------------------------------------------------------------------
class RecordWarning(UserWarning):
    """Lines of a records file that are not records were skipped (or set aside)."""


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "dict": (dict,)}


def _field_types() -> dict[str, tuple[tuple[type, ...], bool]]:
    """Record field -> (accepted JSON value types, None allowed), read from the dataclass annotations so
    the check follows the schema; a field of another annotation is not type-checked."""
    out = {}
    for f in fields(Record):
        parts = [p.strip() for p in str(f.type).split("|")]
        if all(p in _JSON_TYPES or p == "None" for p in parts):
            out[f.name] = (tuple(t for p in parts if p != "None" for t in _JSON_TYPES[p]), "None" in parts)
    return out


FIELD_TYPES = _field_types()


def _json_kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


def validate_record(obj) -> str | None:
    """Why ``obj`` (a parsed JSON line) is not a record, or None when it is one.

    A record is a JSON object holding every field of ``REQUIRED_FIELDS``, every known field with its
    declared JSON type (booleans are not numbers) and a known ``status``.  Fields a record may lack
    (older records have no ``train_seed``) and fields this version does not know are accepted.
    """
    if not isinstance(obj, dict):
        return f"not a JSON object but {_json_kind(obj)}"
    problems = []
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        problems.append("missing " + ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))
    for k, v in obj.items():
        spec = FIELD_TYPES.get(k)
        if spec is None or (v is None and spec[1]):
            continue
        if isinstance(v, bool) or not isinstance(v, spec[0]):
            want = " or ".join(dict.fromkeys("a number" if t in (int, float) and float in spec[0] else
                                             {str: "a string", int: "an integer", dict: "an object"}[t]
                                             for t in spec[0]))
            problems.append(f"{k} is {_json_kind(v)}, expected {want}" + (" or null" if spec[1] else ""))
    if isinstance(obj.get("status"), str) and obj["status"] not in STATUSES:
        problems.append(f"status {obj['status'][:20]!r} is not one of {', '.join(STATUSES)}")
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "") or None


class _Line(NamedTuple):
    number: int          # 1-based line number in the file
    raw: bytes           # the line without its newline
    record: dict | None  # the record, or None when the line is not one
    why: str             # why not ("" for a record)


def _parse_line(raw: bytes) -> tuple[dict | None, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start})"
    try:
        obj = json.loads(text)
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        return None, f"not JSON ({getattr(e, 'msg', str(e))[:60]}; a cut or damaged line?)"
    why = validate_record(obj)
    return (None, why) if why else (obj, "")


def _scan(path: Path) -> list[_Line]:
    """Every complete (newline-terminated), non-blank line of a records file, parsed and validated.
    An unterminated last line is the tail of a killed write and is left out (see ``RecordStore``)."""
    out = []
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                break
            raw = line[:-1]
            if not raw.strip():
                continue
            rec, why = _parse_line(raw.strip())
            out.append(_Line(number, raw, rec, why))
    return out


def _describe_bad(bad: list[_Line], k: int = 8) -> str:
    shown = "; ".join(f"line {ln.number}: {ln.why}" for ln in bad[:k])
    return shown + (f"; and {len(bad) - k} more line(s)" if len(bad) > k else "")


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------
class RecordStore:
    """Append-only JSONL file of records: the run's own store (``--out/records.jsonl``).

    Before its first write the store puts its file in order: an unterminated tail (a killed write) goes
    to ``<file>.partial`` and lines that are not records to ``<file>.rejected``, each with a warning;
    nothing is dropped.  Reading (:meth:`load`, :meth:`done_keys`) never changes the file.
    """

    RESUME_HINT = ("the records file holds only complete records; free space (or fix the folder) and rerun "
                   "with --resume to continue where the run stopped")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._checked = False  # bad lines set aside (once, before the first append)

    @property
    def partial_path(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    @property
    def rejected_path(self) -> Path:
        return self.path.with_name(self.path.name + ".rejected")

    def _repair_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            _append_synced(self.partial_path, data[cut:] + b"\n")
            f.truncate(cut)
            warnings.warn(f"{self.path}: an unterminated last line (a killed or failed write) was moved to "
                          f"{self.partial_path.name}", RecordWarning, stacklevel=3)

    def set_aside_bad_lines(self) -> int:
        """Move the complete lines that are not records to ``<file>.rejected`` (appended, fsync'd first),
        then rewrite the file with the good lines (atomically); returns how many lines were moved."""
        if not self.path.is_file():
            return 0
        lines = _scan(self.path)
        bad = [ln for ln in lines if ln.record is None]
        if not bad:
            return 0
        _append_synced(self.rejected_path, b"".join(ln.raw + b"\n" for ln in bad))
        atomic_write_bytes(self.path, b"".join(ln.raw + b"\n" for ln in lines if ln.record is not None),
                           what="records file", hint=self.RESUME_HINT)
        warnings.warn(f"{self.path}: {len(bad)} line(s) are not records and were moved to {self.rejected_path.name} "
                      f"({_describe_bad(bad)})", RecordWarning, stacklevel=3)
        return len(bad)

    def append(self, record: Record | dict) -> None:
        """Append one record, whole or not at all.  A write failure (disk full, I/O error, read-only
        folder) cuts the file back to its previous size and raises :class:`StorageError`.  A record
        that fails the schema (``validate_record``) raises ValueError and is not written."""
        rec = asdict(record) if isinstance(record, Record) else dict(record)
        line = (json.dumps(rec, sort_keys=True, allow_nan=True, default=_json_default) + "\n").encode()
        why = validate_record(json.loads(line))
        if why:
            raise ValueError(f"not writing an invalid record to {self.path}: {why}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair_tail()
            if not self._checked:
                self.set_aside_bad_lines()
                self._checked = True
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(self.path, e, what="a record to", hint=self.RESUME_HINT) from e
        try:
            size = os.fstat(fd).st_size
            try:
                write_all(fd, line)  # O_APPEND: every piece lands at the end
                os.fsync(fd)
            except OSError as e:
                try:  # no cut line: back to the previous size
                    os.ftruncate(fd, size)
                except OSError:
                    pass  # the cut line stays unterminated: readers skip it, the next append moves it aside
                raise StorageError(self.path, e, what="a record to", hint=self.RESUME_HINT) from e
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.load())

    def load(self) -> list[dict]:
        """The records in the file (lines that are not records are skipped with a warning)."""
        return load_records(self.path)

    def done_keys(self) -> set[tuple]:
        return {record_key(r) for r in self.load() if r.get("status") in ("ok", "diverged")}


def _append_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_records(*paths: str | os.PathLike) -> list[dict]:
    """Every record in the given JSONL files (or folders: every ``*.jsonl`` below them).

    Read-only: a line that is not a record (not UTF-8, not JSON, not an object, missing fields, wrong
    types; see :func:`validate_record`) is skipped with one :class:`RecordWarning` per file naming its
    line numbers; an unterminated last line (a killed write) is skipped silently; an unreadable file is
    skipped with a warning.
    """
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
        for f in files:
            if not f.is_file():
                continue
            try:
                lines = _scan(f)
            except OSError as e:
                warnings.warn(f"{f}: cannot read records ({e.strerror or e}); skipped", RecordWarning, stacklevel=2)
                continue
            bad = [ln for ln in lines if ln.record is None]
            if bad:
                warnings.warn(f"{f}: {len(bad)} line(s) are not records and were skipped ({_describe_bad(bad)})",
                              RecordWarning, stacklevel=2)
            out.extend(ln.record for ln in lines if ln.record is not None)
    return out


def records_frame(records: Iterable[dict]):
    """Records as a pandas DataFrame, with sampler options flattened into a readable label."""
    import pandas as pd  # noqa: PLC0415 - lazy: pandas only for reports, not for writing records

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
    import torch  # noqa: PLC0415 - lazy: reading records (reports, leaderboard) needs no torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torch_fidelity", "numpy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        v["diffbench"] = package_version("diffbench")
    except Exception:
        pass
    return v


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
