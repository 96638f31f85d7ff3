"""Stateless samplers over a sigma grid, and the shared sampler registry.

Signature of every sampler::

    fn(denoiser, x, sigmas, *, generator=None, cond=None, **opts) -> Tensor

``x`` arrives already scaled to ``sigmas[0]`` (x = x0 + sigmas[0] * n); ``sigmas`` is a
decreasing 1-D tensor ending at 0.  Samplers never count NFE: the harness wraps the denoiser.
``generator`` is a ``SampleNoise`` (per-sample streams), a ``torch.Generator`` or None.

Reproductions register their samplers with ``register_sampler``; the suite validator reads the
option specs declared there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .seeding import randn_like


@dataclass(frozen=True)
class Opt:
    """One sampler option: its type, default and (optionally) the allowed values or range."""

    type: type
    default: Any
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    help: str = ""

    def check(self, name: str, value) -> str | None:
        t = self.type
        ok = isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            return f"option {name!r} must be {t.__name__}, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"option {name!r} must be one of {list(self.choices)}, got {value!r}"
        if self.min is not None and value < self.min:
            return f"option {name!r} must be >= {self.min}, got {value!r}"
        if self.max is not None and value > self.max:
            return f"option {name!r} must be <= {self.max}, got {value!r}"
        return None


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable[..., Tensor]
    options: dict[str, Opt] = field(default_factory=dict)
    description: str = ""
    paper: str = ""
    stochastic: bool = False

    def validate(self, opts: dict) -> list[str]:
        errors = []
        for k, v in opts.items():
            if k not in self.options:
                known = ", ".join(self.options) or "none"
                errors.append(f"sampler {self.name!r} has no option {k!r} (known: {known})")
                continue
            msg = self.options[k].check(k, v)
            if msg:
                errors.append(f"sampler {self.name!r}: {msg}")
        return errors

    def resolve(self, opts: dict) -> dict:
        """Options with defaults filled in (what a record stores)."""
        return {k: opts.get(k, o.default) for k, o in self.options.items()}


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(name: str, *, options: dict[str, Opt] | None = None, description: str = "",
                     paper: str = "", stochastic: bool = False):
    """Decorator: add a sampler function to the shared registry under ``name``."""

    def deco(fn):
        if name in SAMPLERS and SAMPLERS[name].fn is not fn:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = SamplerSpec(name, fn, dict(options or {}), description or (fn.__doc__ or "").strip().split("\n")[0],
                                     paper, stochastic)
        return fn

    return deco


def get_sampler(name: str) -> SamplerSpec:
    load_all()
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; registered: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def load_all() -> None:
    """Import every reproduction so their samplers are registered."""
    import reproductions  # noqa: F401  (registers on import)

    reproductions.load_all()


def _sig(s: Tensor, x: Tensor) -> Tensor:
    return s.to(x.dtype).expand(x.shape[0])


# --------------------------------------------------------------------------------------------
# Samplers shared by several papers
# --------------------------------------------------------------------------------------------
@register_sampler(
    "ddpm",
    options={"variance": Opt(str, "beta_tilde", choices=("beta", "beta_tilde"),
                             help="sigma_t^2 = beta_t (larger) or beta-tilde_t (posterior variance)")},
    description="DDPM ancestral sampling (Ho et al. 2020, Alg. 2); on a skipped grid with variance=beta it is DDIM's sigma-hat",
    paper="ddpm", stochastic=True)
def sample_ddpm(denoiser, x, sigmas, *, generator=None, cond=None, variance="beta_tilde"):
    """DDPM ancestral step, Ho et al. 2020, Eq. 6-7 and Alg. 2, written in sigma coordinates.

    In x = x_vp / sqrt(abar) coordinates the VP chain is x_t = x0 + sigma_t n, so the posterior
    q(x_s | x_t, x0) has mean x0 + (sigma_s^2 / sigma_t^2)(x_t - x0) and variance
    sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2 (= beta-tilde / abar_s).  With variance=beta the
    noise is beta_t / abar_s = (sigma_t^2 - sigma_s^2)(1 + sigma_s^2) / (1 + sigma_t^2).
    No noise is added on the last step (to sigma = 0).
    """
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s_t, s_s = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _sig(s_t, x), **cond)
        mean = x0 + (s_s**2 / s_t**2) * (x - x0)
        if s_s > 0:
            if variance == "beta_tilde":
                var = s_s**2 * (s_t**2 - s_s**2) / s_t**2
            else:
                var = (s_t**2 - s_s**2) * (1 + s_s**2) / (1 + s_t**2)
            x = mean + var.sqrt() * randn_like(x, generator)
        else:
            x = mean
    return x


@register_sampler(
    "ddim",
    options={"eta": Opt(float, 0.0, min=0.0, help="0 = deterministic DDIM, 1 = DDPM posterior variance")},
    description="DDIM generalised update (Song, Meng & Ermon 2021, Eq. 12)", paper="ddim", stochastic=True)
def sample_ddim(denoiser, x, sigmas, *, generator=None, cond=None, eta=0.0):
    """DDIM update, Song, Meng & Ermon 2021, Eq. 12, in sigma coordinates.

    sigma_t(eta) = eta sqrt((1-abar_s)/(1-abar_t)) sqrt(1-abar_t/abar_s) becomes, divided by
    sqrt(abar_s), sigma_up = eta * sigma_s * sqrt(1 - sigma_s^2/sigma_t^2); then
    x_s = x0 + sqrt(sigma_s^2 - sigma_up^2) * eps + sigma_up * z with eps = (x_t - x0)/sigma_t.
    The step to sigma_s = 0 needs no branch (sigma_up = 0 and x_s = x0 exactly), so with eta = 0 the loop
    never reads a grid value on the host (a CUDA graph can capture it).
    """
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s_t, s_s = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _sig(s_t, x), **cond)
        eps = (x - x0) / s_t
        s_up = (eta * s_s * (1 - s_s**2 / s_t**2).clamp(min=0).sqrt()).clamp(max=s_s)
        x = x0 + (s_s**2 - s_up**2).sqrt() * eps
        if eta > 0 and s_s > 0:  # (eta = 0 never reads s_s on the host)
            x = x + s_up * randn_like(x, generator)
    return x


@register_sampler("euler", description="Euler step on the probability-flow ODE dx/dsigma = (x - D)/sigma (Karras et al. 2022, Alg. 1 without Heun)",
                  paper="edm")
def sample_euler(denoiser, x, sigmas, *, generator=None, cond=None):
    """Euler step of the probability-flow ODE, Karras et al. 2022, Eq. 4 with Alg. 1's d_i."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, _sig(s, x), **cond)) / s
        x = x + (s_next - s) * d
    return x


# --------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022) and consistency models (Song et al. 2023)
# --------------------------------------------------------------------------------------------
def _heun_step(denoiser, x, t_cur, t_next, cond):
    """One step of Karras et al. 2022, Alg. 1 lines 4-8: Euler, then the 2nd-order correction unless t_next = 0."""
    d = (x - denoiser(x, _sig(t_cur, x), **cond)) / t_cur
    x_next = x + (t_next - t_cur) * d
    if t_next > 0:
        d_prime = (x_next - denoiser(x_next, _sig(t_next, x), **cond)) / t_next
        x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
    return x_next


@register_sampler("heun", description="Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1); "
                  "no correction on the last step to sigma=0, so N sigmas before 0 cost 2N-1 NFE", paper="edm")
def sample_heun(denoiser, x, sigmas, *, generator=None, cond=None):
    """Deterministic EDM sampler, Karras et al. 2022, Alg. 1 (Heun's method, d_i = (x - D(x; t_i)) / t_i)."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        x = _heun_step(denoiser, x, sigmas[i], sigmas[i + 1], cond)
    return x


@register_sampler(
    "edm_stochastic",
    options={"S_churn": Opt(float, 0.0, min=0.0, help="total churn; gamma_i = min(S_churn / N, sqrt(2) - 1)"),
             "S_tmin": Opt(float, 0.0, min=0.0, help="churn only where sigma >= S_tmin"),
             "S_tmax": Opt(float, 1e6, min=0.0, help="churn only where sigma <= S_tmax (1e6: everywhere)"),
             "S_noise": Opt(float, 1.0, min=0.0, help="std of the added noise (slightly > 1 offsets detail loss)")},
    description="EDM stochastic sampler: churn noise up to t_hat, then a Heun step (Karras et al. 2022, Alg. 2)",
    paper="edm", stochastic=True)
def sample_edm_stochastic(denoiser, x, sigmas, *, generator=None, cond=None, S_churn=0.0, S_tmin=0.0, S_tmax=1e6,
                          S_noise=1.0):
    """Stochastic EDM sampler, Karras et al. 2022, Alg. 2; with S_churn = 0 it is Alg. 1 exactly."""
    cond = cond or {}
    N = len(sigmas) - 1
    for i in range(N):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / N, math.sqrt(2.0) - 1.0) if S_tmin <= float(t_cur) <= S_tmax else 0.0
        if gamma > 0:
            # raise the noise level to t_hat = (1 + gamma) t_i by adding fresh noise (Alg. 2, lines 5-6)
            t_hat = t_cur + gamma * t_cur
            eps = S_noise * randn_like(x, generator)
            x = x + (t_hat**2 - t_cur**2).sqrt() * eps
            t_cur = t_hat
        x = _heun_step(denoiser, x, t_cur, t_next, cond)
    return x


@register_sampler(
    "consistency",
    options={"eps": Opt(float, 0.002, min=0.0, help="the consistency model's smallest sigma (re-noising target)"),
             "sigma_mid": Opt(float, 0.0, min=0.0,
                              help="0: intermediate sigmas from the grid; > 0: two-step sampling [sigma_max, sigma_mid] "
                                   "(used when the grid has 2 positive sigmas; 1 step ignores it)")},
    description="Consistency-model sampling: one step f(x_T, T), then re-noise and re-evaluate at each further sigma "
                "(Song et al. 2023, Alg. 1); NFE = number of positive sigmas",
    paper="consistency", stochastic=True)
def sample_consistency(denoiser, x, sigmas, *, generator=None, cond=None, eps=0.002, sigma_mid=0.0):
    """Multistep consistency sampling, Song et al. 2023, Alg. 1: x <- f(x, tau_n) after x <- x + sqrt(tau_n^2 - eps^2) z."""
    cond = cond or {}
    taus = [s for s in sigmas if s > 0]
    if sigma_mid > 0 and len(taus) == 2:
        taus = [taus[0], torch.as_tensor(sigma_mid, dtype=sigmas.dtype, device=sigmas.device)]
    elif sigma_mid > 0 and len(taus) > 2:
        raise ValueError(f"sigma_mid sets the one intermediate sigma of two-step sampling; this grid has {len(taus)} sigmas")
    x = denoiser(x, _sig(taus[0], x), **cond)
    for tau in taus[1:]:
        z = randn_like(x, generator)
        x = x + (tau**2 - eps**2).clamp(min=0).sqrt() * z
        x = denoiser(x, _sig(tau, x), **cond)
    return x


# --------------------------------------------------------------------------------------------
# Score SDE samplers (Song et al. 2021), in sigma coordinates.
#
# With x = x_sde / alpha(t) every SDE of the paper (VE, VP, sub-VP) is the VE-type process
# x = x0 + sigma n, i.e. dx = sqrt(d[sigma^2]/dt) dw with the schedule sigma(t) = std(t) / alpha(t);
# its reverse SDE is dx = -d[sigma^2] grad log p_sigma(x) + sqrt(d[sigma^2]/dt) dw_bar and the
# score is (D(x, sigma) - x) / sigma^2.  So the samplers take only the denoiser and the sigma grid.
# ``form="vp"`` runs the paper's VP-form updates instead, with abar = 1 / (1 + sigma^2) read off the
# grid (x_vp = sqrt(abar) x): the same SDE, discretised in the VP variable.  The grid ends at the
# SDE's epsilon and then 0: the last step (to sigma = 0) is the final denoising step x0 = D(x, eps).
# --------------------------------------------------------------------------------------------
def _score(denoiser, x, s, cond):
    """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie; Song et al. 2021, Eq. 7 target)."""
    return (denoiser(x, _sig(s, x), **cond) - x) / s**2


def _vp_step(x, s_t, s_s, score, z, ancestral: bool):
    """VP-form predictor, Song et al. 2021, App. E Eq. 46 / Eq. 47 (VP), mapped from and back to sigma coordinates."""
    abar_t, abar_s = 1 / (1 + s_t**2), 1 / (1 + s_s**2)
    beta = 1 - abar_t / abar_s                       # discrete beta_i between the two grid points
    x_vp, s_vp = abar_t.sqrt() * x, score / abar_t.sqrt()
    if ancestral:   # Eq. 47 (VP): x_{i-1} = (x_i + beta_i s) / sqrt(1 - beta_i) + sqrt(beta_i) z
        x_vp = (x_vp + beta * s_vp) / (1 - beta).sqrt() + beta.sqrt() * z
    else:           # Eq. 46 (VP): x_{i-1} = (2 - sqrt(1 - beta_i)) x_i + beta_i s + sqrt(beta_i) z
        x_vp = (2 - (1 - beta).sqrt()) * x_vp + beta * s_vp + beta.sqrt() * z
    return x_vp / abar_s.sqrt()


def _predictor(kind, denoiser, x, s_t, s_s, generator, cond, form):
    """One predictor step from sigma s_t to s_s > 0 (reverse diffusion or ancestral)."""
    score = _score(denoiser, x, s_t, cond)
    z = randn_like(x, generator)
    if form == "vp":
        return _vp_step(x, s_t, s_s, score, z, ancestral=(kind == "ancestral"))
    d_var = s_t**2 - s_s**2
    if kind == "ancestral":
        # Eq. 47 (VE): x_{i-1} = x_i + (s_i^2 - s_{i-1}^2) s + sqrt(s_{i-1}^2 (s_i^2 - s_{i-1}^2) / s_i^2) z
        return x + d_var * score + (s_s**2 * d_var / s_t**2).sqrt() * z
    # Eq. 46 (VE), Euler-Maruyama of the reverse SDE: x_{i-1} = x_i + (s_i^2 - s_{i-1}^2) s + sqrt(s_i^2 - s_{i-1}^2) z
    return x + d_var * score + d_var.sqrt() * z


def _langevin(denoiser, x, s, generator, cond, n_steps, snr):
    """Langevin corrector, Song et al. 2021, Alg. 4-5: eps = 2 (r ||z|| / ||s||)^2, x += eps s + sqrt(2 eps) z (per-sample norms)."""
    for _ in range(n_steps):
        g = _score(denoiser, x, s, cond)
        z = randn_like(x, generator)
        dims = tuple(range(1, x.ndim))
        g_norm = g.flatten(1).norm(dim=1).clamp(min=1e-30)
        z_norm = z.flatten(1).norm(dim=1)
        eps = (2 * (snr * z_norm / g_norm) ** 2).reshape(-1, *([1] * len(dims)))
        x = x + eps * g + (2 * eps).sqrt() * z
    return x


_PRED_OPTS = {"form": Opt(str, "sigma", choices=("sigma", "vp"),
                          help="update written in sigma coordinates (VE form) or the paper's VP form (abar = 1/(1+sigma^2))")}


@register_sampler("reverse_diffusion", options=dict(_PRED_OPTS),
                  description="Score SDE reverse-diffusion predictor (Euler-Maruyama of the reverse SDE, Song et al. 2021, Eq. 46) + final denoising step",
                  paper="score_sde", stochastic=True)
def sample_reverse_diffusion(denoiser, x, sigmas, *, generator=None, cond=None, form="sigma"):
    """Reverse-diffusion predictor, Song et al. 2021, App. E Eq. 46; last step x0 = D(x, eps)."""
    return _predictor_only("reverse_diffusion", denoiser, x, sigmas, generator, cond or {}, form)


def _predictor_only(kind, denoiser, x, sigmas, generator, cond, form):
    """A predictor over the grid, then the final denoising step x0 = D(x, eps)."""
    for i in range(len(sigmas) - 1):
        s_t, s_s = sigmas[i], sigmas[i + 1]
        if s_s > 0:
            x = _predictor(kind, denoiser, x, s_t, s_s, generator, cond, form)
        else:
            x = denoiser(x, _sig(s_t, x), **cond)
    return x


@register_sampler("ancestral", options=dict(_PRED_OPTS),
                  description="Score SDE ancestral-sampling predictor (Song et al. 2021, Eq. 47) + final denoising step",
                  paper="score_sde", stochastic=True)
def sample_ancestral(denoiser, x, sigmas, *, generator=None, cond=None, form="sigma"):
    """Ancestral predictor, Song et al. 2021, Eq. 47 (VE form; VP form = DDPM with sigma^2 = beta); last step x0 = D(x, eps)."""
    return _predictor_only("ancestral", denoiser, x, sigmas, generator, cond or {}, form)


_CORR_OPTS = {
    "n_corrector": Opt(int, 1, min=1, help="Langevin corrector steps per noise level"),
    "snr": Opt(float, 0.16, min=0.0, help="signal-to-noise ratio r of the corrector step 2 (r ||z|| / ||s||)^2"),
}


@register_sampler("langevin_corrector", options=dict(_CORR_OPTS),
                  description="Score SDE corrector only: Langevin MCMC at each grid sigma (Song et al. 2021, Alg. 4-5) + final denoising step",
                  paper="score_sde", stochastic=True)
def sample_langevin_corrector(denoiser, x, sigmas, *, generator=None, cond=None, n_corrector=1, snr=0.16):
    """Corrector-only sampling, Song et al. 2021, Alg. 4-5 without a predictor; last step x0 = D(x, eps)."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s_t = sigmas[i]
        x = _langevin(denoiser, x, s_t, generator, cond, n_corrector, snr)
        if sigmas[i + 1] == 0:
            x = denoiser(x, _sig(s_t, x), **cond)
    return x


@register_sampler("pc", options={"predictor": Opt(str, "reverse_diffusion", choices=("reverse_diffusion", "ancestral")),
                                 **_PRED_OPTS, **_CORR_OPTS},
                  description="Score SDE predictor-corrector sampling (Song et al. 2021, Alg. 1-3): corrector then predictor at each sigma, final denoising step",
                  paper="score_sde", stochastic=True)
def sample_pc(denoiser, x, sigmas, *, generator=None, cond=None, predictor="reverse_diffusion", form="sigma",
              n_corrector=1, snr=0.16):
    """Predictor-corrector sampler, Song et al. 2021, Alg. 1 (corrector first, as in the paper's code); last step x0 = D(x, eps)."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s_t, s_s = sigmas[i], sigmas[i + 1]
        x = _langevin(denoiser, x, s_t, generator, cond, n_corrector, snr)
        if s_s > 0:
            x = _predictor(predictor, denoiser, x, s_t, s_s, generator, cond, form)
        else:
            x = denoiser(x, _sig(s_t, x), **cond)
    return x


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980), FSAL.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4


def dopri5(f, y: Tensor, u0: float, u1: float, *, rtol: float = 1e-5, atol: float = 1e-5, h0: float | None = None,
           max_steps: int = 10_000) -> Tensor:
    """Adaptive Runge-Kutta 5(4) (Dormand-Prince) from u0 to u1 with a step size per sample.

    ``f(y, u) -> dy/du`` takes a batch ``y`` (B, ...) and per-sample times ``u`` (B,).  Each sample
    controls its own step (error norm: RMS of err / (atol + rtol max(|y|, |y_new|)) over its
    entries), so a sample's trajectory does not depend on the batch it is in; the stages of all
    samples are one batched call of f.  Finished samples take zero-length steps.
    """
    B = y.shape[0]
    shape = (-1, *([1] * (y.ndim - 1)))
    dtype = torch.float64
    u = torch.full((B,), float(u0), dtype=dtype, device=y.device)
    direction = 1.0 if u1 >= u0 else -1.0
    span = abs(u1 - u0)
    h = torch.full((B,), direction * (h0 if h0 is not None else span * 1e-2), dtype=dtype, device=y.device)
    k1 = f(y, u.to(y.dtype))
    for _ in range(max_steps):
        remaining = (u1 - u) * direction
        done = remaining <= span * 1e-12
        if bool(done.all()):
            return y
        h = torch.where(done, torch.zeros_like(h), direction * torch.minimum(h.abs(), remaining.clamp(min=0)))
        hb = h.to(y.dtype).reshape(shape)
        ks = [k1]
        for i in range(1, 7):
            yi = y + hb * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(f(yi, (u + _DP_C[i] * h).to(y.dtype)))
        y_new = y + hb * sum(b * k for b, k in zip(_DP_B, ks) if b != 0.0)
        err = hb * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = (err / scale).flatten(1).pow(2).mean(1).sqrt().double()
        accept = (err_norm <= 1.0) | done
        acc_b = accept.reshape(shape)
        y = torch.where(acc_b, y_new, y)
        k1 = torch.where(acc_b, ks[6], k1)   # FSAL: the last stage is f at the new point
        u = torch.where(accept & ~done, u + h, u)
        # step-size control (safety 0.9, factor in [0.2, 10]; exponent 1/5 for a 5(4) pair)
        factor = (0.9 * err_norm.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        factor = torch.where(accept, factor, factor.clamp(max=1.0))
        h = torch.where(done, h, h * factor)
    raise RuntimeError(f"dopri5: not finished after {max_steps} steps")


def prob_flow_rhs(denoiser, cond=None):
    """dx/du of the probability-flow ODE in u = log sigma: dx/du = sigma dx/dsigma = x - D(x, sigma) (Song et al. 2021, Eq. 13 in sigma coordinates)."""
    cond = cond or {}

    def f(x, u):
        return x - denoiser(x, u.exp(), **cond)

    return f


@register_sampler("prob_flow",
                  options={"rtol": Opt(float, 1e-5, min=0.0, help="relative tolerance of the RK45 solver"),
                           "atol": Opt(float, 1e-5, min=0.0, help="absolute tolerance of the RK45 solver")},
                  description="Score SDE probability-flow ODE with an adaptive RK45 (Dormand-Prince) solver + final denoising step (Song et al. 2021, Eq. 13)",
                  paper="score_sde")
def sample_prob_flow(denoiser, x, sigmas, *, generator=None, cond=None, rtol=1e-5, atol=1e-5):
    """Probability-flow ODE, Song et al. 2021, Eq. 13, integrated adaptively in log sigma from sigmas[0] to the last
    nonzero sigma (the grid only fixes the ends), then the denoising step x0 = D(x, eps)."""
    cond = cond or {}
    pos = sigmas[sigmas > 0]
    s_start, s_end = float(pos[0]), float(pos[-1])
    if s_end < s_start:
        x = dopri5(prob_flow_rhs(denoiser, cond), x, math.log(s_start), math.log(s_end), rtol=rtol, atol=atol)
    if sigmas[-1] == 0:
        x = denoiser(x, _sig(pos[-1], x), **cond)
    return x


# --------------------------------------------------------------------------------------------
# Langevin dynamics (Song & Ermon 2019, NCSN): on any denoiser, score = (D(x, sigma) - x) / sigma^2
# --------------------------------------------------------------------------------------------
def _langevin_step(denoiser, x, sigma, alpha, generator, cond):
    """One Langevin step, Song & Ermon 2019, Eq. 4: x + alpha/2 grad log p_sigma(x) + sqrt(alpha) z."""
    score = (denoiser(x, _sig(sigma, x), **cond) - x) / sigma**2
    return x + 0.5 * alpha * score + alpha.sqrt() * randn_like(x, generator)


@register_sampler(
    "annealed_langevin",
    options={"T": Opt(int, 100, min=1, help="Langevin steps per noise level (paper: 100)"),
             "eps": Opt(float, 2e-5, min=0.0, help="step scale: alpha_i = eps * sigma_i^2 / sigma_L^2 (paper: 2e-5)"),
             "denoise": Opt(bool, False, help="finish with x = D(x, sigma_L) (one more NFE; not in the 2019 paper)")},
    description="Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over every positive sigma of the grid; "
                "NFE = levels * T (+1 with denoise)",
    paper="ncsn", stochastic=True)
def sample_annealed_langevin(denoiser, x, sigmas, *, generator=None, cond=None, T=100, eps=2e-5, denoise=False):
    """Annealed Langevin dynamics, Song & Ermon 2019, Alg. 1: alpha_i = eps sigma_i^2 / sigma_L^2, T steps per level."""
    cond = cond or {}
    levels = sigmas[sigmas > 0].to(x.dtype)
    sigma_L = levels[-1]
    for sigma_i in levels:
        alpha_i = eps * sigma_i**2 / sigma_L**2
        for _ in range(T):
            x = _langevin_step(denoiser, x, sigma_i, alpha_i, generator, cond)
    if denoise:
        x = denoiser(x, _sig(sigma_L, x), **cond)
    return x


@register_sampler(
    "langevin",
    options={"T": Opt(int, 1000, min=1, help="Langevin steps"),
             "lr": Opt(float, 0.1, min=0.0, help="step size epsilon of Eq. 4"),
             "sigma": Opt(float, 0.0, min=0.0, help="noise level of the score; 0 = the grid's smallest positive sigma"),
             "denoise": Opt(bool, False, help="finish with x = D(x, sigma) (one more NFE)")},
    description="Plain Langevin dynamics at one noise level (Song & Ermon 2019, Eq. 4); the grid only sets the "
                "initial scale (x ~ N(0, sigmas[0]^2)) and, by default, sigma; NFE = T (+1 with denoise)",
    paper="ncsn", stochastic=True)
def sample_langevin(denoiser, x, sigmas, *, generator=None, cond=None, T=1000, lr=0.1, sigma=0.0, denoise=False):
    """Langevin dynamics, Song & Ermon 2019, Eq. 4: x_t = x_{t-1} + eps/2 grad log p(x_{t-1}) + sqrt(eps) z_t."""
    cond = cond or {}
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device) if sigma > 0 else sigmas[sigmas > 0][-1].to(x.dtype)
    alpha = torch.as_tensor(lr, dtype=x.dtype, device=x.device)
    for _ in range(T):
        x = _langevin_step(denoiser, x, s, alpha, generator, cond)
    if denoise:
        x = denoiser(x, _sig(s, x), **cond)
    return x
