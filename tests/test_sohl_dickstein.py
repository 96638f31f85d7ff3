"""Sohl-Dickstein et al. 2015: the bound K against a closed form, the kernel through the denoiser and the
sampler, and the reproduction end to end through the harness (smoke size)."""
from __future__ import annotations

import math

import pytest
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
    for k in ("K_bits", "K_minus_L_null_bits", "L_null_bits", "K_full_bits", "gauss_baseline_mmd", "trajectory",
              "K_stderr_bits", "data_entropy_bits", "achievable_gain_bits"):
        assert k in m
    assert set(m["trajectory"]["reverse"]) == {"0", "20", "40"}
    df = records_frame(recs)
    # even at smoke size the samples are clearly better than the isotropic Gaussian fit
    assert m["sliced_wasserstein"] < 0.75 * m["gauss_baseline_sliced_wasserstein"]
    assert m["mmd"] < 0.75 * m["gauss_baseline_mmd"]
    res = {c.id: c.check(df) for c in SD_REPRO.claims()}
    assert all(v.status in ("pass", "fail", "inconclusive") for v in res.values()), res
    assert all(v.why for v in res.values() if v.status != "pass"), res
    assert m["achievable_gain_bits"] > 3  # the roll allows several bits over the isotropic Gaussian
    assert SD_REPRO.tables(df)
    assert SD_REPRO.plots(df, tmp_path / "plots")
    # claims on no records are "not run", never an exception
    empty = records_frame([])
    assert all(c.check(empty).status == "not run" for c in SD_REPRO.claims())


# --------------------------------------------------------------------------------------------
# The achievable value: k-NN entropy, and the claims on synthetic records
# --------------------------------------------------------------------------------------------
def test_knn_entropy_matches_the_gaussian_closed_form():
    """H(N(mu, C)) = 1/2 log det(2 pi e C), in 1, 2 and 3 dimensions, within 4 standard errors + a small bias."""
    from bench_core.methods.likelihood import knn_entropy

    g = torch.Generator().manual_seed(0)
    for d in (1, 2, 3):
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        C = A @ A.T + 0.3 * torch.eye(d, dtype=torch.float64)
        x = 2.0 + torch.randn(4000, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(C).T
        H, se = knn_entropy(x)
        true = 0.5 * torch.logdet(2 * math.pi * math.e * C).item()
        assert abs(H - true) < 4 * se + 0.02, (d, H, true, se)
        assert 0 < se < 0.05
    # the estimate tells a wider distribution apart: scaling by 2 adds d log 2
    x = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    assert abs(knn_entropy(2 * x)[0] - knn_entropy(x)[0] - 2 * math.log(2)) < 1e-9


def test_swiss_roll_entropy_estimate_matches_the_noisy_curve():
    """The roll is a curve r(t) = 0.1 t (cos t, sin t), t ~ U(1.5 pi, 4.5 pi), plus N(0, 0.01^2 I): with noise much
    narrower than the curve's radius and the gap between its turns, H = E log(3 pi |r'(t)|) + 1/2 log(2 pi e 0.01^2)
    (arc-length density times the normal noise), |r'(t)| = 0.1 sqrt(1 + t^2); computed here by quadrature."""
    from bench_core.data import load_swiss_roll
    from reproductions.sohl_dickstein import achievable

    t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, 200_001, dtype=torch.float64)
    H_curve = math.log(3 * math.pi * 0.1) + (0.5 * torch.log1p(t**2)).mean().item()
    H = H_curve + 0.5 * math.log(2 * math.pi * math.e * 0.01**2)
    x = load_swiss_roll(5000).x
    got = achievable(x, L_null_bits=-3.0)
    assert abs(got["data_entropy_bits"] - H / math.log(2)) < 0.15, (got, H / math.log(2))
    assert got["achievable_gain_bits"] == pytest.approx(-got["data_entropy_bits"] + 3.0, abs=1e-3)


def _sd_rec(seed=0, train_seed=0, **metrics):
    base = {"K_bits": 0.0, "K_full_bits": 0.0, "L_null_bits": -3.0, "K_minus_L_null_bits": 0.4, "K_stderr_bits": 0.02,
            "K_full_minus_L_null_bits": 1.2, "K_unit_var_bits": -3.7, "data_entropy_bits": -1.5,
            "data_entropy_stderr_bits": 0.02, "achievable_gain_bits": 4.5, "sliced_wasserstein": 0.07,
            "gauss_baseline_sliced_wasserstein": 0.18, "mmd": 0.03, "gauss_baseline_mmd": 0.1}
    base.update(metrics)
    return {"status": "ok", "reproduction": "sohl_dickstein", "entry": "sd", "model": "swiss_roll",
            "sampler": "sohl_dickstein", "sampler_opts": {"variance": "learned"}, "grid": {"kind": "uniform"},
            "steps": 40, "nfe": 40, "seed": seed, "train_seed": train_seed, "num_samples": 500, "metrics": base}


def _sd_claims(recs):
    df = records_frame(recs)
    return {c.id: c.check(df) for c in SD_REPRO.claims()}


def test_bound_claims_on_synthetic_records():
    by_kind = {c.id: c.kind for c in SD_REPRO.claims()}
    assert by_kind == {"sd-bound-half-achievable": "paper", "sd-bound-above-null": "sanity",
                       "sd-samples-beat-gaussian": "sanity"}
    # one trained model: Monte-Carlo standard errors decide.  Half of 4.5 is 2.25
    one = lambda v, se=0.02: [_sd_rec(s, K_minus_L_null_bits=v, K_stderr_bits=se) for s in (0, 1, 2)]
    assert _sd_claims(one(3.0))["sd-bound-half-achievable"].status == "pass"
    r = _sd_claims(one(0.4))
    assert r["sd-bound-half-achievable"].status == "fail" and r["sd-bound-half-achievable"].why
    assert r["sd-bound-above-null"].status == "pass"
    assert _sd_claims(one(2.26, se=0.5))["sd-bound-half-achievable"].status == "inconclusive"
    assert _sd_claims(one(-0.5))["sd-bound-above-null"].status == "fail"
    # several training seeds: a t-test over them (the sampling seeds repeat the model's value)
    two = lambda a, b: [_sd_rec(s, t, K_minus_L_null_bits=v) for t, v in ((0, a), (1, b)) for s in (0, 1, 2)]
    assert _sd_claims(two(3.0, 3.1))["sd-bound-half-achievable"].status == "pass"
    assert _sd_claims(two(0.3, 0.4))["sd-bound-half-achievable"].status == "fail"
    res = _sd_claims(two(1.0, 3.6))["sd-bound-half-achievable"]
    assert res.status == "inconclusive" and "2 training seeds" in res.ours
    # records without the entropy estimate: not run
    old = [_sd_rec()]
    del old[0]["metrics"]["achievable_gain_bits"]
    assert _sd_claims(old)["sd-bound-half-achievable"].status == "not run"


def test_samples_claim_on_synthetic_records():
    recs = lambda sw: [_sd_rec(s, sliced_wasserstein=v, mmd=v / 2) for s, v in enumerate(sw)]
    assert _sd_claims(recs([0.07, 0.08, 0.075]))["sd-samples-beat-gaussian"].status == "pass"
    assert _sd_claims(recs([0.05, 0.30, 0.10]))["sd-samples-beat-gaussian"].status == "inconclusive"
    r = _sd_claims(recs([0.40, 0.41, 0.42]))["sd-samples-beat-gaussian"]
    assert r.status == "fail" and r.why
