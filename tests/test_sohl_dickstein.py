"""Sohl-Dickstein et al. 2015: the bound K against a closed form, the kernel through the denoiser and the
sampler, and the reproduction end to end through the harness (smoke size)."""
from __future__ import annotations

import math

import torch
import yaml

from bench_core.cli import main
from bench_core.records import load_records, records_frame
from bench_core.schedules import make_grid
from reproductions.sohl_dickstein import (
    MODELS, SD_REPRO, Chain, KernelMLP, SohlDicksteinDenoiser, bound_bits, sample_sohl_dickstein,
)


def _zero_kernel(dim=2) -> KernelMLP:
    """f_mu = f_Sigma = 0: the untrained kernel N(x_t sqrt(1 - beta_t), beta_t)."""
    net = KernelMLP(dim, MODELS["swiss_roll"].net)
    last = net.net[-1]
    torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)
    return net


def _closed_form_bits(betas: torch.Tensor, v: float, d: int = 2) -> tuple[float, float]:
    """K (Eq. 14) and the full bound for data N(0, v I) and the kernel N(x_t sqrt(1-beta_t), beta_t), by hand.

    q(x_{t-1}|x_t,x0) = N(a x0 + b x_t, vt); p = N(c x_t, beta_t), c = sqrt(1-beta_t); with
    x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) n:  E(m_q - m_p)^2 = (a + (b-c) sqrt(ab_t))^2 v + (b-c)^2 (1-ab_t).
    """
    b_ = [float(x) for x in betas]
    T = len(b_)
    ab = [1.0]
    for beta in b_:
        ab.append(ab[-1] * (1 - beta))
    kl_sum = 0.0
    for t in range(2, T + 1):
        beta, ab_t, ab_p = b_[t - 1], ab[t], ab[t - 1]
        a = math.sqrt(ab_p) * beta / (1 - ab_t)
        b = math.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t)
        vt = (1 - ab_p) * beta / (1 - ab_t)
        c = math.sqrt(1 - beta)
        e2 = (a + (b - c) * math.sqrt(ab_t)) ** 2 * v + (b - c) ** 2 * (1 - ab_t)
        kl_sum += d * 0.5 * (math.log(beta / vt) + (vt + e2) / beta - 1)
    b1 = b_[0]
    e2 = b1**2 * v + (1 - b1) * b1  # E (x0 - c x1)^2 at t = 1
    nll1 = d * (0.5 * math.log(2 * math.pi * b1) + e2 / (2 * b1))
    H_T = 0.5 * d * (1 + math.log(2 * math.pi * (1 - ab[T])))
    H_1 = 0.5 * d * (1 + math.log(2 * math.pi * b1))
    H_p = 0.5 * d * (1 + math.log(2 * math.pi))
    cross = 0.5 * d * math.log(2 * math.pi) + 0.5 * d * (ab[T] * v + 1 - ab[T])
    K = -kl_sum + H_T - H_1 - H_p
    K_full = -kl_sum - nll1 + H_T - cross
    return K / math.log(2), K_full / math.log(2)


def test_bound_of_untrained_kernel_matches_closed_form():
    cfg = MODELS["swiss_roll"]
    chain = Chain(cfg.betas())
    v = 0.5
    g = torch.Generator().manual_seed(0)
    x0 = math.sqrt(v) * torch.randn(16_000, 2, generator=g, dtype=torch.float64)
    got = bound_bits(chain, _zero_kernel(), x0, g)
    K, K_full = _closed_form_bits(cfg.betas(), v)
    assert abs(got["K_bits"] - K) < 0.03 * abs(K) + 0.02, (got["K_bits"], K)
    assert abs(got["K_full_bits"] - K_full) < 0.03 * abs(K_full) + 0.02, (got["K_full_bits"], K_full)
    # L_null: the isotropic Gaussian fit of N(0, v I) data, -d/2 log2(2 pi e v)
    assert abs(got["L_null_bits"] - (-math.log2(2 * math.pi * math.e * v))) < 0.02
    # on isotropic Gaussian data no model's true bound can beat the Gaussian fit (cross-entropy >= entropy)
    assert got["K_full_minus_L_null_bits"] < 0


def test_denoiser_and_sampler_reproduce_the_learned_kernel():
    """The sigma-coordinate denoiser + sampler mean/variance equal the kernel of Eq. 5 in VP coordinates."""
    torch.manual_seed(0)
    cfg = MODELS["swiss_roll"]
    chain = Chain(cfg.betas())
    net = KernelMLP(2, cfg.net)
    with torch.no_grad():
        net.net[-1].weight.mul_(20.0)  # make f_mu, f_Sigma clearly non-zero
    den = SohlDicksteinDenoiser(net, chain).double()
    net.double()
    sig = make_grid("uniform", chain.T, den).double()
    assert torch.allclose(sig[:-1].flip(0), chain.sigma[1:], rtol=1e-5)
    for i, t in ((0, chain.T), (20, chain.T - 20), (chain.T - 1, 1)):
        s_t, s_s = sig[i], sig[i + 1]
        x_vp = torch.randn(64, 2, dtype=torch.float64)
        tt = torch.full((64,), t)
        mu, Sigma = chain.kernel(net, x_vp, tt)
        x = x_vp / chain.abar[t].sqrt()
        with torch.no_grad():
            D, gamma = den(x, s_t.expand(64), kernel_variance=True)
        mean = (D + (s_s**2 / s_t**2) * (x - D)) * chain.abar[t - 1].sqrt()
        var = gamma * (s_t**2 - s_s**2) * (1 + s_s**2) / (1 + s_t**2) * chain.abar[t - 1]
        assert torch.allclose(mean, mu.detach(), atol=1e-6), t
        assert torch.allclose(var, Sigma.detach(), rtol=1e-6), t
        assert gamma.std() > 1e-3  # the variance really is learned (not beta_t)
    # the sampler draws x_{t-1} ~ N(mu, Sigma): its mean over many draws from one x_t
    x = torch.full((4000, 2), 0.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = sample_sohl_dickstein(den, x, sig[-3:-1], generator=g)
        D, gamma = den(x[:1], sig[-3:-2], kernel_variance=True)
    r = sig[-2] ** 2 / sig[-3] ** 2
    m = D + r * (x[:1] - D)
    assert torch.allclose(out.mean(0), m[0], atol=0.02)


def test_reproduction_through_the_harness(tmp_path):
    """Smoke-size training, the learned-kernel sampler over its 40 steps, records, claims, table and plot."""
    suite = {"name": "sd-test", "defaults": {"num_samples": 500, "batch_size": 500, "seeds": [0]},
             "entries": [{"name": "sd", "reproduction": "sohl_dickstein", "model": "swiss_roll",
                          "model_overrides": {"train": {"steps": 1000, "warmup": 50}},
                          "sampler": "sohl_dickstein", "grid": {"kind": "uniform"}, "steps": 40}]}
    p = tmp_path / "sd.yaml"
    p.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(p), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress", "--no-report"]) == 0
    recs = load_records(out)
    assert len(recs) == 1 and recs[0]["status"] == "ok", recs[0].get("error")
    r = recs[0]
    assert r["nfe"] == 40  # one counted call per learned step
    m = r["metrics"]
    for k in ("K_bits", "K_minus_L_null_bits", "L_null_bits", "K_full_bits", "gauss_baseline_mmd", "trajectory"):
        assert k in m
    assert set(m["trajectory"]["reverse"]) == {"0", "20", "40"}
    df = records_frame(recs)
    # even at smoke size the samples are clearly better than the isotropic Gaussian fit
    assert m["sliced_wasserstein"] < 0.75 * m["gauss_baseline_sliced_wasserstein"]
    assert m["mmd"] < 0.75 * m["gauss_baseline_mmd"]
    res = {c.id: c.check(df) for c in SD_REPRO.claims()}
    assert all(v.status in ("pass", "fail") for v in res.values()), res
    assert SD_REPRO.tables(df)
    assert SD_REPRO.plots(df, tmp_path / "plots")
    # claims on no records are "not run", never an exception
    empty = records_frame([])
    assert all(c.check(empty).status == "not run" for c in SD_REPRO.claims())
