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


def _rec(model, mode, nfe, fid, seed=0, train_seed=0, cost=None):
    cost = cost if cost is not None else (729600 if mode == "cd" else 729600)
    return {"status": "ok", "reproduction": "consistency", "model": model, "sampler": "consistency", "nfe": float(nfe),
            "steps": nfe, "fid": fid, "fid_extractor": "x", "num_samples": 500, "grid": {"kind": "karras"},
            "sampler_opts": {}, "metrics": {"cm_mode": mode, "train_cost_evals": cost, "train_cost_sec": 100.0,
                                            "cm_loss": "pseudo-huber"}, "seed": seed, "train_seed": train_seed}


# FID offsets per (train_seed, seed): the same sampling seed shifts both sides alike (pairing), noise ~ 0.5
_NOISE = {(0, 0): 0.3, (0, 1): -0.4, (0, 2): 0.1, (1, 0): -0.2, (1, 1): 0.5, (1, 2): -0.3}


def _records(cd1, cd2, ct1, ct2, jitter=0.0, ct_cost=729600):
    recs = []
    for i, ((ts, s), e) in enumerate(_NOISE.items()):
        j = jitter * (1 if i % 2 else -1)  # unpaired noise of size `jitter` on top of the shared offset
        recs += [_rec("cd-digits", "cd", 1, cd1 + e, s, ts), _rec("cd-digits", "cd", 2, cd2 + e + j, s, ts),
                 _rec("ct-digits", "ct", 1, ct1 + e - j, s, ts, ct_cost), _rec("ct-digits", "ct", 2, ct2 + e, s, ts, ct_cost)]
    return pd.DataFrame(recs)


def _status(df):
    return {c.id: c.check(df).status for c in CONSISTENCY_REPRO.claims()}


def test_consistency_claims_on_synthetic_records():
    claims = {c.id: c for c in CONSISTENCY_REPRO.claims()}
    assert claims["cm-beats-euler-1"].kind == "sanity" and claims["cm-ct-trains"].kind == "target"
    assert claims["cm-2step-beats-1step"].kind == claims["cm-cd-beats-ct"].kind == "paper"
    for c in claims.values():
        r = c.check(pd.DataFrame())
        assert r.status == "not run" and r.why
    # clear differences beyond the noise: everything passes (CT 30 <= 3 x CD 15 = 45)
    st = _status(_records(15.0, 12.0, 30.0, 25.0))
    assert st == {"cm-ct-trains": "pass", "cm-2step-beats-1step": "pass", "cm-cd-beats-ct": "pass",
                  "cm-beats-euler-1": "not run"}  # no teacher Euler record
    # differences inside the noise: inconclusive (2-step vs 1-step, CD vs CT at 1 step)
    st = _status(_records(15.0, 14.9, 15.1, 14.0, jitter=3.0))
    assert st["cm-2step-beats-1step"] == "inconclusive" and st["cm-cd-beats-ct"] == "inconclusive"
    # a significant reversal fails: CT's 2-step worse than its 1-step, CT better than CD
    st = _status(_records(15.0, 12.0, 10.0, 14.0))
    assert st["cm-2step-beats-1step"] == "fail" and st["cm-cd-beats-ct"] == "fail"
    # an untrained CT (FID 543): its bar fails and its halves are not run rather than passing vacuously
    df = _records(15.0, 12.0, 543.0, 391.0)
    r = {c.id: c.check(df) for c in claims.values()}
    assert r["cm-ct-trains"].status == "fail"
    assert r["cm-cd-beats-ct"].status == "not run" and "bar" in r["cm-cd-beats-ct"].why
    assert r["cm-2step-beats-1step"].status == "not run" and "CT" in r["cm-2step-beats-1step"].why
    # unequal training costs: the comparison is not made
    assert _status(_records(15.0, 12.0, 30.0, 25.0, ct_cost=102400))["cm-cd-beats-ct"] == "not run"
    # the sanity check against the teacher's one Euler step: 2 x CD must beat it beyond the noise
    euler = [{"status": "ok", "reproduction": "edm", "model": "digits", "sampler": "euler", "nfe": 1.0, "steps": 1,
              "fid": 150.0 + e, "fid_extractor": "x", "num_samples": 500, "grid": {"kind": "karras"},
              "sampler_opts": {}, "metrics": {}, "seed": s, "train_seed": 0} for s, e in enumerate((0.5, -1.0, 0.2))]
    df2 = pd.concat([_records(15.0, 12.0, 30.0, 25.0), pd.DataFrame(euler)], ignore_index=True)
    assert claims["cm-beats-euler-1"].check(df2).status == "pass"
    df3 = pd.concat([_records(90.0, 80.0, 200.0, 150.0), pd.DataFrame(euler)], ignore_index=True)
    assert claims["cm-beats-euler-1"].check(df3).status == "fail"  # 2 x 90 > 150
    assert "CD" in CONSISTENCY_REPRO.tables(df2)[next(iter(CONSISTENCY_REPRO.tables(df2)))].to_string()


def test_ct_schedules_ict_and_costs():
    from reproductions.consistency import MODELS, index_probs, ict_N, train_cost_evals

    # iCT: K' = floor(K / (log2(1280 / 10) + 1)) = floor(800 / 8) = 100; N doubles every K' steps from s0 + 1
    assert [ict_N(k, 800, 10, 1280) for k in (0, 99, 100, 250, 799)] == [11, 11, 21, 41, 1281]
    g = cm_grid(11, 0.002, 80.0, 7.0)
    p = index_probs(g, -1.1, 2.0)
    assert len(p) == 10 and float(p.sum()) == pytest.approx(1.0)
    # p(n) is the N(-1.1, 2^2) mass of ln sigma in [ln t_n, ln t_{n+1}]: check one cell against scipy's CDF
    from scipy.stats import norm
    lo, hi = math.log(float(g[3])), math.log(float(g[4]))
    total = norm.cdf(math.log(80.0), -1.1, 2.0) - norm.cdf(math.log(0.002), -1.1, 2.0)
    assert float(p[3]) == pytest.approx((norm.cdf(hi, -1.1, 2.0) - norm.cdf(lo, -1.1, 2.0)) / total, rel=1e-6)
    # the presets compare CD and CT at an equal total cost (the teacher's included), within the claim's 10%
    cd, ct = train_cost_evals(MODELS["cd-digits"]), train_cost_evals(MODELS["ct-digits"])
    t = MODELS["cd-digits"].teacher.train
    assert cd == t.steps * t.batch_size * 3 + MODELS["cd-digits"].train.steps * MODELS["cd-digits"].train.batch_size * 6
    assert abs(ct - cd) <= 0.1 * cd
    # a training seed moves the consistency model's seed, not its teacher's (the shared EDM digits model)
    assert CONSISTENCY_REPRO.train_seed_overrides("cd-digits", 1) == {"train": {"seed": 1}}


def test_ct_training_lowers_the_loss_and_samples_vary():
    """A few hundred CT steps on digits (a small U-Net): the consistency loss on a fixed held-out batch at a fixed
    grid drops, the denoising error of f at sigma = 0.5 drops, and one-step samples are not constant."""
    from bench_core.data import load_dataset
    from bench_core.train import seeded_init, train
    from reproductions import apply_overrides
    from reproductions.consistency import MODELS

    cfg = apply_overrides(MODELS["ct-digits"], {"unet": {"ch": 8, "norm_groups": 4},
                                                "train": {"steps": 250, "batch_size": 32, "warmup": 20}})
    cfg = CONSISTENCY_REPRO.check_config("ct-digits", cfg)
    x = load_dataset("digits").x
    held = x[:256]
    f = seeded_init(lambda: CONSISTENCY_REPRO.build(cfg), 0)
    fixed = apply_overrides(cfg, {"curriculum": "ct", "s0": 10, "s1": 9})  # N = 10 throughout

    def held_out():
        f.eval()
        with torch.no_grad():
            loss = float(cm_loss(fixed)(f, held, None, torch.Generator().manual_seed(3)))
            z = torch.randn(held.shape, generator=torch.Generator().manual_seed(4))
            den = float(((f(held + 0.5 * z, torch.full((len(held),), 0.5)) - held) ** 2).mean())
        return loss, den

    loss0, den0 = held_out()
    train(f, cm_loss(cfg), x[256:], cfg.train, progress=False)
    loss1, den1 = held_out()
    assert loss1 < 0.95 * loss0, (loss0, loss1)
    assert den1 < 0.7 * den0, (den0, den1)
    with torch.no_grad():
        s = get_sampler("consistency").fn(f.eval(), 80 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
                                          karras_grid(1))
    assert float(s.std(0).mean()) > 0.1  # samples differ from one another (data std per pixel ~0.6)
    assert s.abs().max() < 5
