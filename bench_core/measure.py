"""The one timing protocol and the one memory protocol (house rule 6), and device information.

Timing (:func:`time_fn`, :class:`Stopwatch`): synchronise the device before starting the clock
and before stopping it (CUDA kernels are asynchronous); ``warmup`` untimed calls first (lazy
initialisation, cuDNN autotuning, allocator growth); the reported number is the **median** of
``repeats`` timed calls, with every call's time kept in ``all``.

Peak memory (:class:`PeakMemory`), the extra memory a block needs at its peak, in MB
(MiB, 2**20 bytes), over what was in use when the block began:

- CUDA (``method="cuda-max-allocated"``): ``torch.cuda.reset_peak_memory_stats`` on entry, then
  ``max_memory_allocated`` at exit minus ``memory_allocated`` at entry.  This counts tensors
  allocated by PyTorch's caching allocator, not the allocator's reserved-but-free cache nor the
  CUDA context / cuBLAS workspaces.
- CPU, Linux (``method="cpu-vmhwm-clear-refs"``): on entry, Python garbage is collected and freed
  heap is returned to the OS (glibc ``malloc_trim(0)`` through ctypes, where available); the
  kernel's peak-RSS counter is reset by writing ``5`` to ``/proc/self/clear_refs``; the entry RSS
  is ``VmRSS``.  At exit the peak is ``VmHWM`` (the high-water mark since the reset) minus the
  entry ``VmRSS``.  Exact (page granular) and costless, for the whole process (all threads).
- CPU fallback (``method="cpu-rss-sampling-5ms"``): when ``clear_refs`` cannot be written, a
  background thread samples the RSS every ~5 ms; peak = highest sample minus the entry RSS.  It
  can miss peaks shorter than the interval.  Where no RSS source exists, ``peak_mb`` is None and
  ``method="unavailable"``.

Nested ``PeakMemory`` blocks are allowed: an inner reset first passes the high-water mark seen
so far to the enclosing blocks, so the outer measurement stays right.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
import re
import statistics
import threading
import time
from typing import Callable

import torch

MB = float(2**20)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cpu"``; ``"cuda"``/``"cuda:N"`` (errors
    clearly when CUDA is not there)."""
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = torch.version.cuda or "none (a CPU-only build)"
            raise RuntimeError(f"device {spec!r} requested but CUDA is not available "
                               f"(torch {torch.__version__}, CUDA build {build}); use --device cpu or auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the block with ``n`` torch CPU threads, then restore the previous count (small 2-D networks, whose
    steps are ~1 ms of work, run fastest on one thread: more only add synchronisation)."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str | torch.device = "cpu") -> str:
    """CPU model and core count (e.g. ``"AMD EPYC 7B13 (2 cores)"``) or the CUDA device's name."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_count()} cores)"


def device_info(device: str | torch.device) -> dict:
    """``{"device": "cpu"|"cuda", "device_name": ...}`` for records."""
    device = resolve_device(device)
    return {"device": device.type, "device_name": device_name(device)}


def synchronize(device: str | torch.device = "cpu") -> None:
    """Wait for queued work on the device (a no-op on CPU)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3, device: str | torch.device = "cpu",
            clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` calls each bracketed by device
    synchronisation.  Returns seconds: ``{"median", "all", "min", "mean", "repeats", "warmup"}``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = clock()
        fn()
        synchronize(device)
        times.append(clock() - t0)
    return {"median": statistics.median(times), "all": times, "min": min(times),
            "mean": sum(times) / len(times), "repeats": repeats, "warmup": warmup}


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.elapsed`` seconds; synchronises on enter and exit."""

    def __init__(self, device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.elapsed: float | None = None

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._t0 = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.elapsed = self.clock() - self._t0


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process, from /proc/self/statm (or psutil), None if unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # noqa: PLC0415 - optional (not a dependency): the fallback when /proc is absent

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


_LIBC = None


def trim_heap() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where unavailable."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _LIBC.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory of a block: ``with PeakMemory(device) as pm: ...`` then ``pm.peak_mb`` and
    ``pm.method`` (see the module docstring for the protocol).

    ``cpu_method``: ``"auto"`` (clear_refs when writable, else sampling), ``"clear_refs"`` or
    ``"sampling"`` (forcing a method, e.g. to test it).
    """

    _active: list["PeakMemory"] = []  # open blocks, outermost first (for nesting)

    def __init__(self, device: str | torch.device = "cpu", *, cpu_method: str = "auto", interval: float = 0.005):
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        if cpu_method not in ("auto", "clear_refs", "sampling"):
            raise ValueError(f"cpu_method must be 'auto', 'clear_refs' or 'sampling', got {cpu_method!r}")
        self.cpu_method, self.interval = cpu_method, interval
        self.peak_mb: float | None = None
        self.entry_mb: float | None = None
        self.method: str = ""
        self._seen = 0  # highest absolute peak (bytes) recorded by nested resets
        self._thread: threading.Thread | None = None

    # -- absolute readings per method ------------------------------------------------------
    def _peak_abs(self) -> int | None:
        if self.method == "cuda-max-allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == "cpu-vmhwm-clear-refs":
            kb = _status_kb("VmHWM")
            return kb * 1024 if kb is not None else None
        if self.method == "cpu-rss-sampling-5ms":
            return self._sampled_max
        return None

    def _note_peak_before_reset(self) -> None:
        """An inner reset is about to erase the high-water mark: give it to the open blocks."""
        for outer in PeakMemory._active:
            if outer.method == self.method:
                v = outer._peak_abs()
                if v is not None:
                    outer._seen = max(outer._seen, v)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            v = current_rss_bytes()
            if v is not None and v > self._sampled_max:
                self._sampled_max = v

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            self.method = "cuda-max-allocated"
            self._note_peak_before_reset()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._entry = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            trim_heap()
            use_clear_refs = self.cpu_method in ("auto", "clear_refs") and _status_kb("VmHWM") is not None
            if use_clear_refs:
                self.method = "cpu-vmhwm-clear-refs"
                self._note_peak_before_reset()
                if not _reset_hwm():
                    if self.cpu_method == "clear_refs":
                        raise RuntimeError(f"cannot write {_CLEAR_REFS} to reset the peak-RSS counter")
                    use_clear_refs = False
            elif self.cpu_method == "clear_refs":
                raise RuntimeError(f"no VmHWM in {_STATUS}: the clear_refs method needs Linux /proc")
            if use_clear_refs:
                kb = _status_kb("VmRSS")
                self._entry = kb * 1024 if kb is not None else 0
            else:
                rss = current_rss_bytes()
                if rss is None:
                    self.method = "unavailable"
                    self._entry = 0
                else:
                    self.method = "cpu-rss-sampling-5ms"
                    self._entry = self._sampled_max = rss
                    self._stop = threading.Event()
                    self._thread = threading.Thread(target=self._sample, name="PeakMemory-sampler", daemon=True)
                    self._thread.start()
        self.entry_mb = self._entry / MB
        PeakMemory._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
        if self._thread is not None:
            v = current_rss_bytes()
            if v is not None:
                self._sampled_max = max(self._sampled_max, v)
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self in PeakMemory._active:
            PeakMemory._active.remove(self)
        peak = self._peak_abs()
        if peak is None:
            self.peak_mb = None
            return
        self.peak_mb = max(0, max(peak, self._seen) - self._entry) / MB
