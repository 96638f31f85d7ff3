"""Score SDE (Song et al. 2021): SDE algebra, the adapter, the samplers against the Gaussian oracle,
the probability-flow likelihood against exact densities, and the reproduction through the harness."""
import math

import pytest
import torch

from bench_core.denoiser import GaussianDenoiser, GMMDenoiser, NFECounter, SDEEpsDenoiser
from bench_core.methods.likelihood import bits_per_dim, dequantize, ode_log_likelihood
from bench_core.samplers import get_sampler
from bench_core.schedules import geometric_grid
from bench_core.seeding import SampleNoise
from reproductions.score_sde import SCORE_SDE_REPRO, SDEConfig

MU, STD = 0.5, 0.7
SDES = [SDEConfig("vp"), SDEConfig("subvp"), SDEConfig("ve", sigma_min=0.01, sigma_max=50.0, eps=1e-5)]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: s.kind)
def test_sde_sigma_and_inverse(sde):
    t = torch.linspace(sde.eps, 1, 101, dtype=torch.float64)
    sig = sde.sigma(t)
    torch.testing.assert_close(sde.t_of_sigma(sig), t, rtol=1e-7, atol=1e-9)
    if sde.kind == "vp":  # sigma = sqrt((1 - abar) / abar), abar = exp(-int beta), Eq. 33
        abar = torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
        torch.testing.assert_close(sig, ((1 - abar) / abar).sqrt())
    if sde.kind == "subvp":  # Eq. 35: std = 1 - exp(-int beta), alpha = exp(-int beta / 2)
        ib = 0.1 * t + 0.5 * 19.9 * t**2
        torch.testing.assert_close(sig, (1 - torch.exp(-ib)) / torch.exp(-0.5 * ib))
    if sde.kind == "ve":  # Eq. 30: geometric
        torch.testing.assert_close(sig, 0.01 * (50 / 0.01) ** t)


class ExactNoiseNet(torch.nn.Module):
    """The exact noise predictor E[n | x_sde] of an SDE for N(MU, STD^2) data; checks the adapter's scaling."""

    def __init__(self, sde, t_scale=999.0):
        super().__init__()
        self.sde, self.t_scale = sde, t_scale

    def forward(self, x_sde, t_in):
        t = (t_in.double() / self.t_scale)
        a = self.sde.alpha(t).reshape(-1, *([1] * (x_sde.ndim - 1)))
        s = self.sde.std(t).reshape(-1, *([1] * (x_sde.ndim - 1)))
        # x_sde = a x0 + s n with x0 ~ N(MU, STD^2): E[n | x_sde] = s (x_sde - a MU) / (a^2 STD^2 + s^2)
        return (s * (x_sde.double() - a * MU) / (a**2 * STD**2 + s**2)).to(x_sde.dtype)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: s.kind)
def test_adapter_is_the_exact_denoiser(sde):
    den = SDEEpsDenoiser(ExactNoiseNet(sde), sde)
    x = torch.randn(9, 4, dtype=torch.float64)
    for sigma in (den.sigma_min, 0.3, 2.0, den.sigma_max):
        torch.testing.assert_close(den(x, torch.tensor(sigma)), GaussianDenoiser(MU, STD)(x, torch.tensor(sigma)),
                                   rtol=1e-6, atol=1e-6)
    assert den.sigmas[0] == pytest.approx(float(sde.sigma(torch.tensor(sde.eps))), rel=1e-5)


def _run(sampler, n=4000, d=4, steps=100, seed=0, **opts):
    den = GaussianDenoiser(MU, STD)
    sig = geometric_grid(steps, 0.01, 80.0)
    noise = SampleNoise([seed * 100_000 + i for i in range(n)])
    x = noise.randn((d,)) * sig[0]
    c = NFECounter(den)
    out = get_sampler(sampler).fn(c, x, sig, generator=noise, **opts)
    return out, c.count


@pytest.mark.parametrize("sampler,opts,nfe", [
    ("reverse_diffusion", {}, 400), ("reverse_diffusion", {"form": "vp"}, 400),
    ("ancestral", {}, 400), ("ancestral", {"form": "vp"}, 400),
    ("pc", {}, 800), ("pc", {"predictor": "ancestral", "n_corrector": 2}, 1200),
])
def test_stochastic_samplers_recover_the_gaussian(sampler, opts, nfe):
    # the corrector's snr step rule assumes high dimension (the norms concentrate): PC runs at d = 256
    out, count = _run(sampler, n=500 if sampler == "pc" else 2000, d=256 if sampler == "pc" else 16, steps=400, **opts)
    assert count == nfe   # one denoiser call per predictor / corrector step; the last step is the denoising step
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(STD, rel=0.04)


def test_langevin_corrector_alone_needs_many_levels():
    """Corrector only (Song et al. 2021, C2000): on 2000 levels it tracks N(MU, STD^2 + sigma^2) down to the data
    (the snr rule's stationary variance is v / (1 - r^2) in high dimension: a few % too wide); on 500 it has not
    contracted from sigma_max (the step shrinks with ||s||, so far from equilibrium it barely moves)."""
    out, count = _run("langevin_corrector", n=300, d=64, steps=2000)
    assert count == 2000 + 1
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(STD, rel=0.06)
    short, _ = _run("langevin_corrector", n=300, d=64, steps=500)
    assert short.std().item() > 5 * STD


def test_corrector_only_is_worse_than_pc_at_few_levels():
    """At 10 noise levels the corrector alone has not mixed (the paper's 'corrector-only is poor')."""
    c, _ = _run("langevin_corrector", n=500, d=64, steps=30)
    pc, _ = _run("pc", n=500, d=64, steps=30)
    assert abs(c.std().item() - STD) > 3 * abs(pc.std().item() - STD)


def test_ancestral_is_ddpm_in_sigma_coordinates():
    """Eq. 47 (VE) is DDPM's posterior step (beta-tilde); Eq. 47 (VP) is DDPM's sigma^2 = beta step."""
    for form, variance in (("sigma", "beta_tilde"), ("vp", "beta")):
        a, _ = _run("ancestral", n=64, steps=30, form=form)
        b, _ = _run("ddpm", n=64, steps=30, variance=variance)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_prob_flow_hits_the_exact_ode_endpoint_and_nfe_is_counted():
    den = GaussianDenoiser(MU, STD)
    sig = geometric_grid(2, 0.01, 80.0)  # only the ends matter to the adaptive solver
    x_T = torch.linspace(-3, 3, 31).reshape(-1, 1).repeat(1, 2) * 80.0
    counts = []
    for tol in (1e-3, 1e-6):
        c = NFECounter(den)
        out = get_sampler("prob_flow").fn(c, x_T, sig, rtol=tol, atol=tol)
        # exact: x(sigma) = MU + sqrt(STD^2 + sigma^2) z; then the denoising step D(x, 0.01)
        x_end = MU + math.sqrt(STD**2 + 0.01**2) / math.sqrt(STD**2 + 80.0**2) * (x_T - MU)
        torch.testing.assert_close(out, GaussianDenoiser(MU, STD)(x_end, torch.tensor(0.01)), rtol=0, atol=20 * tol)
        assert (c.count - 2) % 6 == 0  # first stage + 6 per attempted step (FSAL) + the denoising step
        counts.append(c.count)
    assert counts[1] > counts[0] > 8


def test_samples_do_not_depend_on_the_batch():
    den = GMMDenoiser([0.3, 0.7], [[-1.0, 0.0], [1.0, 0.5]], [0.2, 0.3])
    sig = geometric_grid(8, 0.01, 40.0)
    for sampler in ("pc", "prob_flow", "reverse_diffusion"):
        full_noise = SampleNoise(range(6))
        full = get_sampler(sampler).fn(den, full_noise.randn((2,)) * sig[0], sig, generator=full_noise)
        part_noise = SampleNoise(range(3, 5))
        part = get_sampler(sampler).fn(den, part_noise.randn((2,)) * sig[0], sig, generator=part_noise)
        torch.testing.assert_close(part, full[3:5], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------------
def test_ode_likelihood_matches_the_mixture_density():
    """Exact trace: mean |log p_ODE - log p_true| < 0.02 nats on a 2-D mixture with the exact score;
    Hutchinson: unbiased (mean gap within 4 standard errors of 0)."""
    den = GMMDenoiser([0.5, 0.3, 0.2], [[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], [0.3, 0.5, 0.2])
    x = den.sample(128, torch.Generator().manual_seed(1)).double()
    true = den.log_prob(x, 0.01)
    exact = ode_log_likelihood(den, x, sigma_min=0.01, sigma_max=200.0, trace="exact")
    assert (exact - true).abs().mean().item() < 0.02
    hutch = ode_log_likelihood(den, x, sigma_min=0.01, sigma_max=200.0, trace="hutchinson", probe="gaussian",
                               generator=torch.Generator().manual_seed(0))
    gap = hutch - true
    assert abs(gap.mean().item()) < 4 * gap.std().item() / math.sqrt(len(gap)) + 0.02
    assert gap.std().item() > 0.01  # it is an estimate, not the exact trace


def test_bits_per_dim_of_a_gaussian_model_is_the_closed_form():
    """For N(MU, STD^2 I) data the Jacobian of the ODE drift is c I, so a Rademacher probe is exact and
    bits/dim = -log N(x; MU, STD^2 + smin^2) / (D ln 2) + 7 on the dequantized x = (k + u) / 128 - 1."""
    den = GaussianDenoiser(MU, STD, sigma_min=0.01, sigma_max=3000.0)
    u8 = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bpd = bits_per_dim(den, u8, seed=3)
    x = dequantize(u8, torch.Generator().manual_seed(3)).double().flatten(1)
    assert x.min() >= -1 and x.max() < 1
    var = STD**2 + 0.01**2
    logp = (-0.5 * (x - MU) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(1)
    torch.testing.assert_close(bpd.double(), -logp / (16 * math.log(2)) + 7, rtol=0, atol=2e-3)


# --------------------------------------------------------------------------------------------
# The reproduction through the harness
# --------------------------------------------------------------------------------------------
def test_overrides_are_validated():
    assert SCORE_SDE_REPRO.override_errors("digits_vp", {"sde": {"kind": "nope"}})
    assert SCORE_SDE_REPRO.override_errors("digits_vp", {"sde": {"bogus": 1}})
    assert not SCORE_SDE_REPRO.override_errors("digits_ve", {"train": {"steps": 5}})
    assert SCORE_SDE_REPRO.model_hash("digits_vp", {}) != SCORE_SDE_REPRO.model_hash("digits_subvp", {})
    # likelihood settings do not retrain the model
    assert SCORE_SDE_REPRO.model_hash("digits_vp", {"likelihood": {"n_images": 8}}) == SCORE_SDE_REPRO.model_hash("digits_vp", {})


def test_suite_run_records_likelihood_gap_and_bits_per_dim(tmp_path):
    from bench_core.records import load_records
    from bench_core.runner import run_suite
    from bench_core.suite import parse_suite
    import pandas as pd

    suite = parse_suite({"name": "t", "defaults": {"num_samples": 32, "batch_size": 32}, "entries": [
        {"name": "gmm", "reproduction": "score_sde", "model": "gmm_exact", "sampler": "pc",
         "grid": {"kind": "geometric"}, "steps": 20, "model_overrides": {"n_eval": 64}},
        {"name": "vp", "reproduction": "score_sde", "model": "digits_vp", "sampler": "reverse_diffusion",
         "steps": [5], "model_overrides": {"train": {"steps": 20, "warmup": 2},
                                           "likelihood": {"n_images": 4, "rtol": 1e-2, "atol": 1e-2}}},
        {"name": "vp-pc", "reproduction": "score_sde", "model": "digits_vp", "sampler": "pc",
         "steps": [5], "model_overrides": {"train": {"steps": 20, "warmup": 2},
                                           "likelihood": {"n_images": 4, "rtol": 1e-2, "atol": 1e-2}}},
    ]})
    summary = run_suite(suite, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, log=lambda *a: None)
    assert summary["ok"] == 3, summary
    recs = load_records(tmp_path / "out" / "records.jsonl")
    gmm = [r for r in recs if r["model"] == "gmm_exact"][0]
    assert gmm["metrics"]["ll_gap_exact_mean_abs"] < 0.02
    assert abs(sum(gmm["metrics"]["mode_weights"]) - 1) < 1e-6
    vp = [r for r in recs if r["model"] == "digits_vp"]
    assert all(math.isfinite(r["metrics"]["bits_per_dim"]) for r in vp)
    assert [r["nfe"] for r in vp] == [5, 10]   # counted by the harness: P5, PC5 (5 predictor + 5 corrector)
    df = pd.DataFrame(recs)
    by_id = {c.id: c.check(df) for c in SCORE_SDE_REPRO.claims()}
    assert by_id["sde-ode-likelihood"].status == "pass"
    # equal NFE needs P at twice PC's steps, and the claim is decided on the VE model: not run here
    assert by_id["sde-pc-beats-predictor"].status == "not run"
    # the Gaussian baseline is recorded beside the model's bits/dim, per image
    assert len(vp[0]["metrics"]["gauss_bits_per_dim_images"]) == 4 and vp[0]["metrics"]["gauss_bits_per_dim"] > 0
    assert by_id["sde-bits-per-dim"].status in ("pass", "fail", "inconclusive")
    assert by_id["sde-subvp-likelihood"].status == "not run"
    assert by_id["sde-cross-model"].status == "not run"
    assert all(c.check(df.iloc[:0]).status == "not run" for c in SCORE_SDE_REPRO.claims())
    assert SCORE_SDE_REPRO.tables(df)


# --------------------------------------------------------------------------------------------
# The Gaussian bits/dim baseline
# --------------------------------------------------------------------------------------------
def test_gaussian_log_density_is_scipys():
    from scipy.stats import multivariate_normal

    from bench_core.methods.likelihood import gaussian_log_density

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    C, mu = A @ A.T + 0.1 * torch.eye(5, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    ref = multivariate_normal(mu.numpy(), C.numpy()).logpdf(x.numpy())
    torch.testing.assert_close(gaussian_log_density(x, mu, C), torch.from_numpy(ref))


def test_gaussian_bits_per_dim_baseline_is_the_gaussian_entropy():
    """Pixels y ~ N(m, C) in [0, 256) with std >> 1, quantized to k = floor(y) and dequantized by k + U: the
    dequantized density is the Gaussian's up to O(1/std^2), so the fitted baseline's bits/dim on fresh images
    is the entropy 1/2 log2 det(2 pi e C) / D (in uint8 units, where bits/dim is read)."""
    from bench_core.methods.likelihood import gaussian_bits_per_dim

    g = torch.Generator().manual_seed(0)
    D = 4
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    C = 100.0 * (A @ A.T) + 200.0 * torch.eye(D, dtype=torch.float64)   # stds ~ 15-40 pixel levels
    y = 128.0 + torch.randn(24_000, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(C).T
    keep = ((y >= 0) & (y < 256)).all(1)
    assert keep.float().mean() > 0.99                                    # truncation negligible
    u8 = y[keep].floor().to(torch.uint8).reshape(-1, 1, 2, 2)
    train, test = u8[:20_000], u8[20_000:]
    bpd = gaussian_bits_per_dim(train, test, seed=3)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * C).item() / (D * math.log(2))
    se = bpd.std().item() / math.sqrt(len(bpd))
    assert abs(bpd.mean().item() - entropy) < 4 * se + 0.01, (bpd.mean().item(), entropy, se)


# --------------------------------------------------------------------------------------------
# The claims on synthetic records
# --------------------------------------------------------------------------------------------
def _rec(model, sampler, steps, nfe, fid, seed=0, train_seed=0, reproduction="score_sde", opts=None, **metrics):
    return {"status": "ok", "reproduction": reproduction, "entry": f"{model}-{sampler}-{steps}", "model": model,
            "sampler": sampler, "sampler_opts": opts if opts is not None else (
                {"n_corrector": 1, "predictor": "reverse_diffusion", "snr": 0.16, "form": "sigma"} if sampler == "pc" else {}),
            "grid": {"kind": "uniform"}, "steps": steps, "nfe": nfe, "seed": seed, "train_seed": train_seed,
            "num_samples": 500, "fid": fid, "metrics": {"fid_real_data": 2.0, **metrics}}


def _claims(recs):
    import pandas as pd

    df = pd.DataFrame(recs)
    return {c.id: c.check(df) for c in SCORE_SDE_REPRO.claims()}


def _pc_p(pc_fids, p_fids, model="digits_ve"):
    return ([_rec(model, "pc", 50, 100, f, s) for s, f in enumerate(pc_fids)]
            + [_rec(model, "reverse_diffusion", 100, 100, f, s) for s, f in enumerate(p_fids)]
            + [_rec(model, "reverse_diffusion", 50, 50, 5.0, s) for s in range(3)])   # P50: not equal NFE


def test_pc_beats_predictor_at_equal_nfe_on_synthetic_records():
    kinds = {c.id: c.kind for c in SCORE_SDE_REPRO.claims()}
    assert kinds["sde-pc-beats-predictor"] == "paper" and kinds["sde-bits-per-dim"] == "sanity"
    assert kinds["sde-subvp-likelihood"] == "paper" and kinds["sde-cross-model"] == "sanity"
    r = _claims(_pc_p([10.0, 11.0, 10.5], [20.0, 21.5, 20.2]))["sde-pc-beats-predictor"]
    assert r.status == "pass" and "PC50" in r.ours and "P100" in r.ours   # compared at NFE 100, not with P50
    assert _claims(_pc_p([10.0, 12.0, 10.5], [11.0, 11.0, 11.0]))["sde-pc-beats-predictor"].status == "inconclusive"
    r = _claims(_pc_p([20.0, 21.5, 20.2], [10.0, 11.0, 10.5]))["sde-pc-beats-predictor"]
    assert r.status == "fail" and r.why
    # VP alone is shown, not decisive: the VE pair is missing
    r = _claims(_pc_p([10.0, 11.0, 10.5], [20.0, 21.5, 20.2], model="digits_vp"))["sde-pc-beats-predictor"]
    assert r.status == "not run" and "digits_vp" in r.ours


def test_corrector_poor_on_synthetic_records():
    def recs(c_fids, p_fids):
        return ([_rec("digits_vp", "langevin_corrector", 50, 51, f, s) for s, f in enumerate(c_fids)]
                + [_rec("digits_vp", "reverse_diffusion", 50, 50, f, s) for s, f in enumerate(p_fids)])
    assert _claims(recs([170.0, 160.0, 175.0], [22.0, 23.0, 21.0]))["sde-corrector-poor"].status == "pass"
    assert _claims(recs([22.0, 30.0, 20.0], [22.0, 23.0, 21.0]))["sde-corrector-poor"].status == "inconclusive"
    assert _claims(recs([12.0, 13.0, 11.0], [22.0, 23.0, 21.0]))["sde-corrector-poor"].status == "fail"


def _bpd_model(model, per_image, gauss_img, train_seed=0):
    return [_rec(model, "reverse_diffusion", 50, 50, 20.0, s, train_seed,
                 bits_per_dim=sum(per_image) / len(per_image), gauss_bits_per_dim=sum(gauss_img) / len(gauss_img),
                 bits_per_dim_images=list(per_image), gauss_bits_per_dim_images=list(gauss_img)) for s in range(3)]


def test_bits_per_dim_beats_gaussian_on_synthetic_records():
    g = torch.Generator().manual_seed(0)
    gauss = (6.35 + 0.3 * torch.randn(64, generator=g, dtype=torch.float64)).tolist()
    noise = (0.2 * torch.randn(64, generator=g, dtype=torch.float64)).tolist()
    better = [x - 1.2 + e for x, e in zip(gauss, noise)]
    close = [x - 0.01 + e for x, e in zip(gauss, noise)]
    worse = [x + 0.8 + e for x, e in zip(gauss, noise)]
    assert _claims(_bpd_model("digits_vp", better, gauss))["sde-bits-per-dim"].status == "pass"
    assert _claims(_bpd_model("digits_vp", close, gauss))["sde-bits-per-dim"].status == "inconclusive"
    r = _claims(_bpd_model("digits_vp", better, gauss) + _bpd_model("digits_ve", worse, gauss))["sde-bits-per-dim"]
    assert r.status == "fail" and "digits_ve" in r.ours   # every model must beat it
    # with two training seeds the seeds are the replicates (the per-image test is not used)
    two = _bpd_model("digits_vp", better, gauss, 0) + _bpd_model("digits_vp", [b + 0.05 for b in better], gauss, 1)
    r = _claims(two)["sde-bits-per-dim"]
    assert r.status == "pass" and "training seeds" in r.ours


def test_subvp_likelihood_on_synthetic_records():
    g = torch.Generator().manual_seed(1)
    base = (5.0 + 0.3 * torch.randn(64, generator=g, dtype=torch.float64)).tolist()
    gauss = [6.3] * 64
    shift = lambda d: [b + d for b in base]
    recs = lambda vp, sub: (sum((_bpd_model("digits_vp", shift(d), gauss, t) for t, d in enumerate(vp)), [])
                            + sum((_bpd_model("digits_subvp", shift(d), gauss, t) for t, d in enumerate(sub)), []))
    assert _claims(recs([0.0, 0.02], [-0.3, -0.31]))["sde-subvp-likelihood"].status == "pass"
    assert _claims(recs([0.0, 0.2], [-0.1, 0.15]))["sde-subvp-likelihood"].status == "inconclusive"
    assert _claims(recs([0.0, 0.02], [0.3, 0.31]))["sde-subvp-likelihood"].status == "fail"
    # one model per SDE: shown over images, never decided
    r = _claims(recs([0.0], [-0.3]))["sde-subvp-likelihood"]
    assert r.status == "inconclusive" and "training seed" in r.why and "sub-VP" in r.ours
    assert _claims(recs([0.0], []))["sde-subvp-likelihood"].status == "not run"


def test_ode_likelihood_and_cross_model_on_synthetic_records():
    gmm = lambda gap: [_rec("gmm_exact", "prob_flow", 100, 188, None, s, ll_gap_exact_mean_abs=gap) for s in range(3)]
    assert _claims(gmm(0.0002))["sde-ode-likelihood"].status == "pass"
    assert _claims(gmm(0.05))["sde-ode-likelihood"].status == "fail"
    ddpm = lambda pc, ode: ([_rec("digits", "pc", 50, 100, f, s, reproduction="ddpm") for s, f in enumerate(pc)]
                            + [_rec("digits", "prob_flow", 50, 86, f, s, reproduction="ddpm", opts={})
                               for s, f in enumerate(ode)])
    assert _claims(ddpm([4.0, 4.5, 4.2], [3.5, 3.6, 3.4]))["sde-cross-model"].status == "pass"  # floor 2: bar 6
    assert _claims(ddpm([4.0, 8.5, 6.2], [3.5, 3.6, 3.4]))["sde-cross-model"].status == "inconclusive"
    assert _claims(ddpm([40.0, 45.0, 42.0], [3.5, 3.6, 3.4]))["sde-cross-model"].status == "fail"
