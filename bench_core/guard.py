"""Guards around one run: a time limit, and SIGINT / SIGTERM turned into a clean stop.

- ``time_limit(seconds)``: a run past its limit raises :class:`RunTimeout` inside the run (SIGALRM in the
  main thread; elsewhere the check in :class:`bench_core.denoiser.CheckedDenoiser` stops it at the next
  denoiser call), so the model is stopped, not left running.  The runner turns it into an ``error`` record.
- ``stop_on_signals()``: SIGINT and SIGTERM raise :class:`Interrupted` (a BaseException, so no per-run
  ``except Exception`` swallows it); inside ``deferred()`` (a record being appended) the signal waits until
  the block ends, so nothing is written half.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time


class RunTimeout(Exception):
    """A run went past its time limit (``--run-timeout``, suite key ``timeout``, ``evaluate(timeout=...)``)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"the run went past its time limit of {seconds:g} s (--run-timeout, suite key 'timeout', "
                         f"evaluate(timeout=...)) and was stopped")


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a run; ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.where = ""  # what was running: filled in by the runner
        super().__init__(signal.Signals(signum).name)


_deadline: float | None = None  # time.monotonic() past which the current run stops (None: no limit)
_limit: float | None = None


def check_deadline() -> None:
    """Raise RunTimeout when the current run is past its time limit (called on every denoiser call)."""
    if _deadline is not None and time.monotonic() > _deadline:
        raise RunTimeout(_limit)


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Stop the block with RunTimeout after ``seconds`` (None or 0: no limit)."""
    global _deadline, _limit
    if not seconds:
        yield
        return
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    previous = None
    if use_alarm:
        def on_alarm(signum, frame):
            raise RunTimeout(seconds)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, float(seconds))
    _deadline, _limit = time.monotonic() + float(seconds), float(seconds)
    try:
        yield
    finally:
        _deadline = _limit = None
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


_defer_depth = 0
_pending: int | None = None


def _on_signal(signum, frame):
    global _pending
    if _defer_depth:
        _pending = signum  # raised when the deferred block ends
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred():
    """A block that a SIGINT / SIGTERM does not cut: the signal is raised as Interrupted when it ends."""
    global _defer_depth, _pending
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if not _defer_depth and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise Interrupted inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
