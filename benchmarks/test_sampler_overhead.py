"""Sampler overhead: sampler wall time / (NFE x one denoiser call), on the digits U-Net at the
default suite's batch size.  Target <= 1.05 on CPU.  Measured, never asserted:

    pytest benchmarks/test_sampler_overhead.py --benchmark-columns=median,rounds

The ratio of every sampler is printed and stored in the benchmark's extra_info (see
``--benchmark-json``).
"""
from pathlib import Path

import pytest
import torch
import yaml

from bench_core.denoiser import DiscreteVPEpsDenoiser, NFECounter
from bench_core.measure import time_fn
from bench_core.nets.unet import DIGITS_SMALL, UNet
from bench_core.samplers import get_sampler
from bench_core.schedules import alphas_cumprod, discrete_grid, linear_betas
from bench_core.seeding import SampleNoise

SUITE = Path(__file__).parent / "suites" / "default.yaml"
BATCH = yaml.safe_load(SUITE.read_text())["defaults"]["batch_size"]
STEPS = 50
DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)  # random weights: latency does not depend on their values
    net = UNet(DIGITS_SMALL).eval()
    return DiscreteVPEpsDenoiser(net, alphas_cumprod(linear_betas(1000)))


@pytest.fixture(scope="module")
def call_time(denoiser):
    x = torch.randn(BATCH, 1, 8, 8)
    s = torch.full((BATCH,), 3.0)
    with torch.no_grad():
        return time_fn(lambda: denoiser(x, s), warmup=3, repeats=30, device=DEVICE)["median"]


def test_denoiser_call(benchmark, denoiser):
    x = torch.randn(BATCH, 1, 8, 8)
    s = torch.full((BATCH,), 3.0)
    with torch.no_grad():
        benchmark(lambda: denoiser(x, s))


@pytest.mark.parametrize("name,opts", [("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}),
                                       ("ddpm", {"variance": "beta"}), ("euler", {})])
def test_sampler_overhead(benchmark, denoiser, call_time, name, opts):
    spec = get_sampler(name)
    sig = discrete_grid(alphas_cumprod(linear_betas(1000)), STEPS, "uniform")
    counter = NFECounter(denoiser)

    def run():
        noise = SampleNoise(range(BATCH))
        with torch.no_grad():
            spec.fn(counter, noise.randn((1, 8, 8)) * sig[0], sig, generator=noise, **opts)

    counter.reset()
    run()
    nfe = counter.count
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    ratio = benchmark.stats.stats.median / (nfe * call_time)
    benchmark.extra_info.update({"nfe": nfe, "denoiser_call_s": call_time, "overhead_ratio": ratio, "batch": BATCH})
    print(f"\n{name}{opts}: {benchmark.stats.stats.median:.3f}s for {nfe} NFE at batch {BATCH}; "
          f"one call {call_time * 1e3:.2f} ms; overhead ratio {ratio:.3f}")
