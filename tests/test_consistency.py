"""Consistency models (Song et al. 2023): the exact boundary condition, the coefficients and the CT
schedules by hand, the multistep sampler's sigmas and re-noising, the CD loss at the exact
consistency function of Gaussian data, and the claims on records."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from bench_core.denoiser import ConsistencyPrecond, GaussianDenoiser, NFECounter
from bench_core.nets.unet import DIGITS_SMALL, UNet
from bench_core.samplers import get_sampler
from bench_core.schedules import karras_grid
from reproductions.consistency import CONSISTENCY_REPRO, ConsistencyConfig, cm_grid, cm_loss, ct_mu, ct_N, distance


def test_boundary_condition_is_exact():
    torch.manual_seed(0)
    f = ConsistencyPrecond(UNet(DIGITS_SMALL.replace(dropout=0.0)), eps=0.002).eval()
    x = 3 * torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(f(x, torch.full((8,), 0.002)), x)
        assert torch.equal(f(x, torch.full((8,), 0.001)), x)  # below eps: clamped to eps
        assert not torch.allclose(f(x, torch.full((8,), 0.5)), x)


def test_consistency_coefficients_by_hand():
    f = ConsistencyPrecond(nn.Identity(), sigma_data=0.5, eps=0.002)
    s = torch.tensor([0.502], dtype=torch.float64)  # sigma - eps = 0.5 = sigma_data
    c_skip, c_out, c_in, c_noise = f.coefficients(s)
    assert float(c_skip) == pytest.approx(0.5)                       # 0.25 / (0.25 + 0.25)
    assert float(c_out) == pytest.approx(0.25 / math.sqrt(0.25 + 0.502**2))
    assert float(c_in) == pytest.approx(1 / math.sqrt(0.25 + 0.502**2))
    assert float(c_noise) == pytest.approx(math.log(0.502) / 4)


def test_ct_schedules_by_hand():
    # N(0) = ceil(sqrt(s0^2) - 1) + 1 = s0; N(K) = s1 + 1; mu(0) = exp(s0 ln(mu0) / s0) = mu0
    assert ct_N(0, 1000, 2, 150) == 2
    assert ct_N(1000, 1000, 2, 150) == 151
    # k/K = 1/2: sqrt(0.5 (151^2 - 4) + 4) = 106.78 -> ceil(105.78) + 1 = 107
    assert ct_N(500, 1000, 2, 150) == 107
    assert ct_mu(0, 1000, 2, 150, 0.9) == pytest.approx(0.9)
    assert ct_mu(1000, 1000, 2, 150, 0.9) == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    g = cm_grid(18, 0.002, 80.0, 7.0)
    assert len(g) == 18 and float(g[0]) == pytest.approx(0.002) and float(g[-1]) == pytest.approx(80.0)
    assert torch.all(g[1:] > g[:-1])


class _Recorder:
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **cond):
        self.calls.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x)  # f = 0: the re-noised input is pure noise of std sqrt(tau^2 - eps^2)


def test_consistency_sampler_sigmas_nfe_and_renoising():
    sampler = get_sampler("consistency").fn
    n = 20000
    x = 80 * torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    rec = _Recorder()
    c = NFECounter(rec)
    sampler(c, x, karras_grid(1), generator=torch.Generator().manual_seed(1))
    assert c.count == 1 and float(rec.calls[0][1][0]) == pytest.approx(80.0)
    rec.calls.clear()
    c = NFECounter(rec)
    sampler(c, x, karras_grid(2), generator=torch.Generator().manual_seed(1), sigma_mid=0.8)
    assert c.count == 2
    assert [float(s[0]) for _, s in rec.calls] == pytest.approx([80.0, 0.8])
    std = float(rec.calls[1][0].std())
    assert std == pytest.approx(math.sqrt(0.8**2 - 0.002**2), rel=0.02)
    # intermediate sigmas from the grid when sigma_mid = 0
    rec.calls.clear()
    sig = karras_grid(3, sigma_min=0.5)
    sampler(NFECounter(rec), x, sig, generator=torch.Generator().manual_seed(1))
    assert [float(s[0]) for _, s in rec.calls] == pytest.approx([float(v) for v in sig[:-1]])


class _ExactF(nn.Module):
    """The exact consistency function of x0 ~ N(mu, s^2): the ODE from sigma down to eps, in closed form."""

    def __init__(self, mu, s, eps):
        super().__init__()
        self.mu, self.s, self.eps = mu, s, eps
        self.w = nn.Parameter(torch.zeros(()))  # something to copy for the target network

    def forward(self, x, sigma):
        r = torch.sqrt((self.s**2 + self.eps**2) / (self.s**2 + sigma**2)).reshape(-1, *([1] * (x.ndim - 1)))
        return self.mu + r * (x - self.mu) + 0 * self.w


def test_cd_loss_vanishes_at_the_exact_consistency_function():
    """With the Gaussian oracle as teacher, only the Heun step's small error separates the two sides."""
    mu, s = 0.2, 0.5
    cfg = ConsistencyConfig(mode="cd", loss="l2")
    teacher = GaussianDenoiser(mu, s)
    x0 = mu + s * torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = cm_loss(cfg, teacher)(_ExactF(mu, s, cfg.eps), x0, None, torch.Generator().manual_seed(1))

    class Wrong(_ExactF):
        def forward(self, x, sigma):
            return x + 0 * self.w  # the identity: satisfies the boundary condition, nothing else

    wrong = cm_loss(cfg, teacher)(Wrong(mu, s, cfg.eps), x0, None, torch.Generator().manual_seed(1))
    exact, wrong = float(exact.detach()), float(wrong.detach())
    assert exact < 1e-3 * wrong, (exact, wrong)


def test_distances():
    a, b = torch.zeros(2, 64), torch.zeros(2, 64)
    b[0, 0] = 1.0
    assert distance(a, b, "l2").tolist() == pytest.approx([1 / 64, 0.0])
    c = 0.00054 * 8
    assert distance(a, b, "pseudo-huber").tolist() == pytest.approx([math.sqrt(1 + c**2) - c, 0.0])


def test_model_hash_and_overrides():
    rep = CONSISTENCY_REPRO
    assert rep.model_hash("cd-digits", {}) != rep.model_hash("ct-digits", {})
    # CT has no teacher: changing the teacher does not change its checkpoint, but does change CD's
    ov = {"teacher": {"train": {"steps": 10}}}
    assert rep.model_hash("ct-digits", ov) == rep.model_hash("ct-digits", {})
    assert rep.model_hash("cd-digits", ov) != rep.model_hash("cd-digits", {})
    assert rep.override_errors("cd-digits", {"loss": "lpips"})
    assert rep.override_errors("cd-digits", {"nope": 1})
    assert not rep.override_errors("ct-digits", {"loss": "l2", "train": {"steps": 5}})


def _rec(model, mode, nfe, fid, steps=600):
    return {"status": "ok", "reproduction": "consistency", "model": model, "sampler": "consistency", "nfe": float(nfe),
            "steps": nfe, "fid": fid, "fid_extractor": "x", "num_samples": 500, "grid": {"kind": "karras"},
            "sampler_opts": {}, "metrics": {"cm_mode": mode, "cm_train_steps": steps, "cm_batch_size": 64,
                                            "cm_loss": "pseudo-huber"}, "seed": 0}


def test_consistency_claims_on_synthetic_records():
    claims = {c.id: c for c in CONSISTENCY_REPRO.claims()}
    for c in claims.values():
        assert c.check(pd.DataFrame()).status == "not run"
    recs = [_rec("cd-digits", "cd", 1, 10.0), _rec("cd-digits", "cd", 2, 8.0),
            _rec("ct-digits", "ct", 1, 30.0), _rec("ct-digits", "ct", 2, 20.0)]
    df = pd.DataFrame(recs)
    assert claims["cm-2step-beats-1step"].check(df).status == "pass"
    assert claims["cm-cd-beats-ct"].check(df).status == "pass"
    assert claims["cm-beats-euler-1"].check(df).status == "not run"  # no teacher Euler record
    euler = {"status": "ok", "reproduction": "edm", "model": "digits", "sampler": "euler", "nfe": 1.0, "steps": 1,
             "fid": 150.0, "fid_extractor": "x", "num_samples": 500, "grid": {"kind": "karras"}, "sampler_opts": {},
             "metrics": {}, "seed": 0}
    df2 = pd.DataFrame(recs + [euler])
    assert claims["cm-beats-euler-1"].check(df2).status == "pass"
    # unequal budgets: the comparison is not made
    df3 = pd.DataFrame(recs[:2] + [_rec("ct-digits", "ct", 1, 30.0, steps=300), _rec("ct-digits", "ct", 2, 20.0, 300)])
    assert claims["cm-cd-beats-ct"].check(df3).status == "not run"
    assert "CD" in CONSISTENCY_REPRO.tables(df)[next(iter(CONSISTENCY_REPRO.tables(df)))].to_string()
