"""Timing and memory protocol, device info."""
from __future__ import annotations

import time

import pytest
import torch

from bench_core.measure import (PeakMemory, Stopwatch, device_info, device_name, resolve_device, synchronize,
                                time_fn)

N = 50_000_000
BIG_MB = N * 4 / 2**20  # 190.7 MiB
CPU_METHODS = ("cpu-vmhwm-clear-refs", "cpu-rss-sampling-5ms")


def _clear_refs_writable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _allocate_and_free(hold: float = 0.0):
    a = torch.full((N,), 1.0)  # filled: every page touched
    if hold:
        time.sleep(hold)
    s = float(a[::1_000_000].sum())
    del a
    return s


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def test_peak_memory_sees_a_200mb_allocation():
    with PeakMemory("cpu") as pm:
        _allocate_and_free(hold=0.05)
    assert pm.method in CPU_METHODS
    assert pm.peak_mb == pytest.approx(BIG_MB, rel=0.25)


def test_peak_memory_small_for_a_tiny_allocation():
    with PeakMemory("cpu") as pm:
        a = torch.ones(1000)
        a.sum()
        del a
    assert pm.method in CPU_METHODS
    assert pm.peak_mb is not None and pm.peak_mb < 0.05 * BIG_MB


@pytest.mark.skipif(not _clear_refs_writable(), reason="/proc/self/clear_refs is not writable here")
def test_peak_memory_clear_refs_method():
    with PeakMemory("cpu", cpu_method="clear_refs") as pm:
        _allocate_and_free()  # no hold needed: the kernel's high-water mark misses nothing
    assert pm.method == "cpu-vmhwm-clear-refs"
    assert pm.peak_mb == pytest.approx(BIG_MB, rel=0.25)
    # the block after it starts from a reset counter: the earlier peak is not seen again
    with PeakMemory("cpu", cpu_method="clear_refs") as pm2:
        pass
    assert pm2.peak_mb < 0.05 * BIG_MB


def test_peak_memory_sampling_fallback():
    with PeakMemory("cpu", cpu_method="sampling") as pm:
        _allocate_and_free(hold=0.1)  # held well beyond the 5 ms sampling interval
    assert pm.method == "cpu-rss-sampling-5ms"
    assert pm.peak_mb == pytest.approx(BIG_MB, rel=0.25)


def test_peak_memory_falls_back_to_sampling_when_clear_refs_is_refused(monkeypatch):
    import bench_core.measure as measure

    monkeypatch.setattr(measure, "_reset_hwm", lambda: False)
    with PeakMemory("cpu") as pm:
        _allocate_and_free(hold=0.1)
    assert pm.method == "cpu-rss-sampling-5ms"
    assert pm.peak_mb == pytest.approx(BIG_MB, rel=0.25)
    with pytest.raises(RuntimeError, match="clear_refs"):
        with PeakMemory("cpu", cpu_method="clear_refs"):
            pass


def test_peak_memory_nested_blocks():
    with PeakMemory("cpu") as outer:
        _allocate_and_free(hold=0.05)
        with PeakMemory("cpu") as inner:  # resets the counter: the outer block must still see the peak
            pass
    assert inner.peak_mb < 0.05 * BIG_MB
    assert outer.peak_mb == pytest.approx(BIG_MB, rel=0.25)


def test_peak_memory_bad_method():
    with pytest.raises(ValueError):
        PeakMemory("cpu", cpu_method="guess")


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_time_fn_is_the_median_of_repeats_after_warmup():
    clock = FakeClock()
    durations = iter([100.0, 3.0, 1.0, 2.0])  # the first call is warm-up and must not count
    calls = []

    def fn():
        calls.append(1)
        clock.t += next(durations)

    r = time_fn(fn, warmup=1, repeats=3, device="cpu", clock=clock)
    assert len(calls) == 4
    assert r["all"] == [3.0, 1.0, 2.0] and r["median"] == 2.0 and r["min"] == 1.0
    assert r["repeats"] == 3 and r["warmup"] == 1
    with pytest.raises(ValueError):
        time_fn(fn, repeats=0)


def test_time_fn_real_clock_ordering():
    fast = time_fn(lambda: time.sleep(0.001), warmup=0, repeats=3)
    slow = time_fn(lambda: time.sleep(0.03), warmup=0, repeats=3)
    assert slow["median"] >= 0.03 and slow["median"] > fast["median"]


def test_stopwatch():
    clock = FakeClock()
    with Stopwatch("cpu", clock=clock) as sw:
        clock.t += 1.25
    assert sw.elapsed == 1.25
    with Stopwatch() as sw:
        time.sleep(0.01)
    assert sw.elapsed >= 0.01


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------
def test_device_name_and_info():
    name = device_name("cpu")
    assert name and "cores" in name
    info = device_info("cpu")
    assert info == {"device": "cpu", "device_name": name}
    synchronize("cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    with PeakMemory("cuda") as pm:
        a = torch.full((N,), 1.0, device="cuda")
        del a
    assert pm.method == "cuda-max-allocated"
    assert pm.peak_mb == pytest.approx(BIG_MB, rel=0.05)
    assert device_name("cuda")
