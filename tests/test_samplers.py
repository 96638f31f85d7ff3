"""Samplers against exact oracles and the papers' equations worked by hand."""
import math

import pytest
import torch

from bench_core.denoiser import DiscreteVPEpsDenoiser, GaussianDenoiser, GMMDenoiser, NFECounter, score_from_denoiser
from bench_core.samplers import get_sampler, load_all
from bench_core.schedules import alphas_cumprod, ddim_timesteps, discrete_grid, karras_grid, linear_betas, vp_sigmas
from bench_core.seeding import SampleNoise, sample_seed

MU, STD = 0.5, 0.7
ABAR = alphas_cumprod(linear_betas(1000))


class ExactEpsModel(torch.nn.Module):
    """A discrete-time epsilon 'network' that is exact for Gaussian data (tests the VP adapter too)."""

    def __init__(self, abar, oracle):
        super().__init__()
        self.sig = vp_sigmas(abar).float()
        self.oracle = oracle

    def forward(self, x_vp, t):
        # fractional t: interpolate sigma in log space, as the adapter does
        lo = t.floor().long().clamp(0, len(self.sig) - 1)
        hi = (lo + 1).clamp(max=len(self.sig) - 1)
        w = (t - lo.float()).reshape(-1)
        log_s = (1 - w) * self.sig[lo].log() + w * self.sig[hi].log()
        s = log_s.exp().reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp * (1 + s**2).sqrt()
        return (x - self.oracle(x, s.reshape(-1))) / s


def gaussian_vp_denoiser():
    return DiscreteVPEpsDenoiser(ExactEpsModel(ABAR, GaussianDenoiser(MU, STD)), ABAR)


def exact_ode_endpoint(x_T, sigma_T):
    """PF-ODE solution for N(mu, s^2) data: x(sigma) = mu + sqrt(s^2 + sigma^2) z, z fixed."""
    z = (x_T - MU) / math.sqrt(STD**2 + sigma_T**2)
    return MU + STD * z


def test_adapter_matches_oracle():
    den = gaussian_vp_denoiser()
    x = torch.randn(7, 3)
    for t in (0, 10, 500, 999):
        s = vp_sigmas(ABAR)[t].float()
        torch.testing.assert_close(den(x, s.expand(7)), GaussianDenoiser(MU, STD)(x, s.expand(7)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_deterministic_samplers_converge_to_exact_ode(sampler):
    den = gaussian_vp_denoiser()
    x_T = torch.linspace(-3, 3, 41).reshape(-1, 1)
    errs = []
    for S in (10, 20, 50, 100, 1000):
        sig = discrete_grid(ABAR, S, "uniform")
        x = get_sampler(sampler).fn(den, x_T * sig[0], sig, eta=0.0) if sampler == "ddim" else \
            get_sampler(sampler).fn(den, x_T * sig[0], sig)
        errs.append((x - exact_ode_endpoint(x_T * sig[0], float(sig[0]))).abs().max().item())
    # first-order methods: the error falls monotonically and about tenfold from S=100 to S=1000
    assert errs[-1] < 1e-2, errs
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-2] / errs[-1] > 5, errs


@pytest.mark.parametrize("sampler,opts", [("ddpm", {"variance": "beta_tilde"}), ("ddpm", {"variance": "beta"}),
                                          ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.5})])
def test_stochastic_samplers_match_target_distribution(sampler, opts):
    den = gaussian_vp_denoiser()
    n = 10000
    std_err = {}
    for S in (10, 1000):
        noise = SampleNoise(range(n), chunk=256)
        sig = discrete_grid(ABAR, S, "uniform")
        x = noise.randn((1,)) * sig[0]
        out = get_sampler(sampler).fn(den, x, sig, generator=noise, **opts)
        std_err[S] = abs(out.std().item() - STD) / STD
    # starting from sigma_max * n instead of the exact marginal changes the target by < 1e-4 here;
    # the standard error of the std with n=10000 is 0.7 %
    assert abs(out.mean().item() - MU) < 0.03
    assert std_err[1000] < 0.025, std_err
    assert std_err[10] > std_err[1000], std_err


def test_stochastic_sampler_error_falls_with_steps():
    """On a 2-D mixture with the exact denoiser, sliced distance to the data falls as steps grow."""
    from bench_core.metrics.twod import sliced_wasserstein

    gmm = GMMDenoiser([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.3])
    ref = gmm.sample(4000, torch.Generator().manual_seed(1))
    dists = []
    for S in (2, 8, 64):
        sig = karras_grid(S, 0.01, 80.0)
        noise = SampleNoise(range(4000), chunk=8)
        x = noise.randn((2,)) * sig[0]
        out = get_sampler("ddim").fn(gmm, x, sig, generator=noise, eta=1.0)
        dists.append(sliced_wasserstein(out, ref))
    assert dists[-1] < dists[0], dists
    assert dists[-1] < 0.1, dists


def test_ddim_step_equals_eq12_by_hand():
    """One DDIM step (Song et al. 2021, Eq. 12) in VP coordinates, worked by hand, vs our sigma-space sampler."""
    torch.manual_seed(0)
    W = torch.randn(4, 4) * 0.3

    class LinearEps(torch.nn.Module):
        def forward(self, x_vp, t):
            return torch.tanh(x_vp @ W) + 0.01 * t.reshape(-1, 1)

    model = LinearEps()
    den = DiscreteVPEpsDenoiser(model, ABAR)
    t, s, eta = 500, 400, 0.5
    a_t, a_s = float(ABAR[t]), float(ABAR[s])
    x_vp = torch.randn(3, 4)
    eps = model(x_vp, torch.full((3,), float(t)))
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
    z = SampleNoise([11, 12, 13]).randn((4,))
    x0_pred = (x_vp - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected_vp = math.sqrt(a_s) * x0_pred + math.sqrt(1 - a_s - sigma**2) * eps + sigma * z

    sig = vp_sigmas(ABAR).float()
    grid = torch.stack([sig[t], sig[s]])
    x_ve = x_vp / math.sqrt(a_t)
    out_ve = get_sampler("ddim").fn(den, x_ve, grid, generator=SampleNoise([11, 12, 13]), eta=eta)
    torch.testing.assert_close(out_ve * math.sqrt(a_s), expected_vp, rtol=1e-4, atol=1e-5)


def test_ddpm_step_equals_ho_alg2_by_hand():
    """One ancestral step, Ho et al. 2020 Alg. 2: x_{t-1} = (x_t - beta_t/sqrt(1-abar_t) eps)/sqrt(alpha_t) + sigma_t z."""
    torch.manual_seed(1)

    class Eps(torch.nn.Module):
        def forward(self, x_vp, t):
            return torch.sin(x_vp)

    den = DiscreteVPEpsDenoiser(Eps(), ABAR)
    betas = linear_betas(1000)
    t = 300
    a_t, a_s, beta = float(ABAR[t]), float(ABAR[t - 1]), float(betas[t])
    x_vp = torch.randn(5, 2)
    eps = torch.sin(x_vp)
    z = SampleNoise(range(5)).randn((2,))
    mean = (x_vp - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(1 - beta)
    sig = vp_sigmas(ABAR).float()
    grid = torch.stack([sig[t], sig[t - 1]])
    for variance, var in (("beta", beta), ("beta_tilde", beta * (1 - a_s) / (1 - a_t))):
        expected = mean + math.sqrt(var) * z
        out = get_sampler("ddpm").fn(den, x_vp / math.sqrt(a_t), grid, generator=SampleNoise(range(5)),
                                     variance=variance)
        torch.testing.assert_close(out * math.sqrt(a_s), expected, rtol=1e-4, atol=1e-5)


def test_ddim_eta1_equals_ddpm_beta_tilde():
    den = gaussian_vp_denoiser()
    sig = discrete_grid(ABAR, 20, "quadratic")
    x = SampleNoise(range(6)).randn((3,)) * sig[0]
    a = get_sampler("ddim").fn(den, x, sig, generator=SampleNoise(range(100, 106)), eta=1.0)
    b = get_sampler("ddpm").fn(den, x, sig, generator=SampleNoise(range(100, 106)), variance="beta_tilde")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("euler", {})])
@pytest.mark.parametrize("S", [1, 7, 50])
def test_counted_nfe_equals_steps(name, opts, S):
    counter = NFECounter(gaussian_vp_denoiser())
    sig = discrete_grid(ABAR, S, "uniform")
    get_sampler(name).fn(counter, torch.randn(4, 2) * sig[0], sig, generator=SampleNoise(range(4)), **opts)
    assert counter.count == S


def test_timestep_subsets_match_paper_code():
    assert list(ddim_timesteps(1000, 10, "uniform")) == list(range(0, 1000, 100))
    q = ddim_timesteps(1000, 10, "quadratic")
    assert len(q) == 10 and q[0] == 0 and q[-1] == int(math.sqrt(800) ** 2)
    assert len(ddim_timesteps(1000, 1000, "quadratic")) == 1000
    g = discrete_grid(ABAR, 10, "uniform")
    assert g[-1] == 0 and torch.all(g[:-1][:-1] >= g[:-1][1:])


def test_seeds_are_independent_of_batch():
    den = gaussian_vp_denoiser()
    sig = discrete_grid(ABAR, 30, "uniform")
    seeds = [sample_seed(3, i) for i in range(12)]

    def draw(batch_seeds):
        noise = SampleNoise(batch_seeds)
        return get_sampler("ddpm").fn(den, noise.randn((2, 2)) * sig[0], sig, generator=noise)

    full = draw(seeds)
    singles = torch.cat([draw([s]) for s in seeds])
    halves = torch.cat([draw(seeds[:5]), draw(seeds[5:])])
    assert torch.equal(full, singles) and torch.equal(full, halves)


def test_seeds_are_independent_of_batch_with_unet():
    from bench_core.nets.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), dropout=0.0)).eval()
    den = DiscreteVPEpsDenoiser(net, ABAR)
    sig = discrete_grid(ABAR, 5, "uniform")
    seeds = list(range(9))
    with torch.no_grad():
        def draw(bs):
            noise = SampleNoise(bs)
            return get_sampler("ddim").fn(den, noise.randn((1, 8, 8)) * sig[0], sig, generator=noise, eta=0.5)

        full = draw(seeds)
        singles = torch.cat([draw([s]) for s in seeds])
    torch.testing.assert_close(full, singles, rtol=1e-5, atol=1e-5)


def test_registry_rejects_bad_options():
    load_all()
    assert get_sampler("ddim").validate({"eta": "big"})
    assert get_sampler("ddim").validate({"etta": 0.1})
    assert get_sampler("ddpm").validate({"variance": "huge"})
    assert not get_sampler("ddpm").validate({"variance": "beta"})
    with pytest.raises(KeyError, match="unknown sampler"):
        get_sampler("nope")


def test_gmm_oracle_score_matches_autograd():
    gmm = GMMDenoiser([0.8, 0.2], [[5.0, 5.0], [-5.0, -5.0]], [1.0])
    x = torch.randn(6, 2, dtype=torch.float64) * 4
    sigma = torch.full((6,), 1.7, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    logp = gmm.log_prob(xg, 1.7).sum()
    (g,) = torch.autograd.grad(logp, xg)
    torch.testing.assert_close(score_from_denoiser(gmm, x, sigma), g, rtol=1e-6, atol=1e-8)


def test_gmm_log_prob_keeps_float64_for_a_python_float_sigma():
    """A Python-float sigma is taken in the mixture's dtype: the closed form N(0, (1 + s^2) I) to 1e-14, not the
    ~1e-8 a float32 sigma would cost."""
    import math

    from bench_core.denoiser import GMMDenoiser

    g = GMMDenoiser([1.0], [[0.0, 0.0]], [1.0])
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    s = 0.1234567891234
    v = 1 + s * s
    exact = -math.log(2 * math.pi * v) - (0.3**2 + 0.7**2) / (2 * v)
    assert abs(g.log_prob(x, s).item() - exact) <= 1e-14 * abs(exact)
