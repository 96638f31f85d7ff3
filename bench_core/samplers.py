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

import numpy as np
import torch
from torch import Tensor

from .limits import MAX_SAMPLER_INT, too_large
from .plugin import discover, discovery_errors  # the registry only: importing it imports no paper
from .seeding import BrownianPath, randn_like


@dataclass(frozen=True)
class Opt:
    """One sampler option: its type, default and (optionally) the allowed values or range.  A number must be
    finite; an integer option with no ``max`` is held below ``bench_core.limits.MAX_SAMPLER_INT`` (it counts
    steps or evaluations, e.g. Langevin's T) unless the caller allows large values."""

    type: type
    default: Any
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    help: str = ""

    def check(self, name: str, value, allow_large: bool = False) -> str | None:
        t = self.type
        ok = isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            return f"option {name!r} must be {t.__name__}, got {type(value).__name__} {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"option {name!r} must be a finite number, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"option {name!r} must be one of {list(self.choices)}, got {value!r}"
        if self.min is not None and value < self.min:
            return f"option {name!r} must be >= {self.min}, got {value!r}"
        if self.max is not None and value > self.max:
            return f"option {name!r} must be <= {self.max}, got {value!r}"
        if t is int and self.max is None and not allow_large and value > MAX_SAMPLER_INT:
            return too_large(f"option {name!r}:", value, MAX_SAMPLER_INT, "MAX_SAMPLER_INT")
        return None


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable[..., Tensor]
    options: dict[str, Opt] = field(default_factory=dict)
    description: str = ""
    paper: str = ""
    stochastic: bool = False

    def validate(self, opts: dict, allow_large: bool = False) -> list[str]:
        """Every problem with ``opts`` (unknown options, wrong types, values outside their ranges)."""
        errors = []
        for k, v in opts.items():
            if k not in self.options:
                known = ", ".join(self.options) or "none"
                errors.append(f"sampler {self.name!r} has no option {k!r} (known: {known})")
                continue
            msg = self.options[k].check(k, v, allow_large)
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
    """The registered sampler ``name``.  The shared samplers are registered by this module; a name it does not
    know triggers plugin discovery (a paper's own sampler registers when its module is imported)."""
    if name not in SAMPLERS:
        load_all()
    if name not in SAMPLERS:
        broken = "".join(f"; {m} failed to import ({why})" for m, why in discovery_errors().items())
        raise KeyError(f"unknown sampler {name!r}; registered: {', '.join(sorted(SAMPLERS))}{broken}")
    return SAMPLERS[name]


def load_all() -> dict[str, SamplerSpec]:
    """Every sampler: the shared ones and those the paper modules register (plugin discovery, once)."""
    discover(strict=False)
    return SAMPLERS


def sigma_batch(s: Tensor, x: Tensor) -> Tensor:
    """A scalar noise level as the per-sample sigma a denoiser takes for the batch ``x`` (its dtype, shape (B,))."""
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
        x0 = denoiser(x, sigma_batch(s_t, x), **cond)
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
        x0 = denoiser(x, sigma_batch(s_t, x), **cond)
        eps = (x - x0) / s_t
        s_up = (eta * s_s * (1 - s_s**2 / s_t**2).clamp(min=0).sqrt()).clamp(max=s_s)
        x = x0 + (s_s**2 - s_up**2).sqrt() * eps
        if eta > 0 and s_s > 0:  # (eta = 0 never reads s_s on the host)
            x = x + s_up * randn_like(x, generator)
    return x


@register_sampler("euler", description="Euler step on the probability-flow ODE dx/dsigma = (x - D)/sigma "
                  "(Karras et al. 2022, Alg. 1 without Heun)", paper="edm")
def sample_euler(denoiser, x, sigmas, *, generator=None, cond=None):
    """Euler step of the probability-flow ODE, Karras et al. 2022, Eq. 4 with Alg. 1's d_i."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, sigma_batch(s, x), **cond)) / s
        x = x + (s_next - s) * d
    return x


# --------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022) and consistency models (Song et al. 2023)
# --------------------------------------------------------------------------------------------
def heun_step(denoiser, x, t_cur, t_next, cond=None):
    """One step of Karras et al. 2022, Alg. 1 lines 4-8: Euler, then the 2nd-order correction unless t_next = 0.
    ``t_cur``, ``t_next``: scalar tensors, or per-sample (B,) tensors (e.g. a consistency-distillation teacher's
    step from a random point of the grid), all > 0 or all 0."""
    cond = cond or {}
    tc, tn = t_cur.reshape(-1, *([1] * (x.ndim - 1))), t_next.reshape(-1, *([1] * (x.ndim - 1)))
    d = (x - denoiser(x, sigma_batch(t_cur, x), **cond)) / tc
    x_next = x + (tn - tc) * d
    if bool((t_next > 0).all()):
        d_prime = (x_next - denoiser(x_next, sigma_batch(t_next, x), **cond)) / tn
        x_next = x + (tn - tc) * (0.5 * d + 0.5 * d_prime)
    return x_next


@register_sampler("heun", description="Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1); "
                  "no correction on the last step to sigma=0, so N sigmas before 0 cost 2N-1 NFE", paper="edm")
def sample_heun(denoiser, x, sigmas, *, generator=None, cond=None):
    """Deterministic EDM sampler, Karras et al. 2022, Alg. 1 (Heun's method, d_i = (x - D(x; t_i)) / t_i)."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        x = heun_step(denoiser, x, sigmas[i], sigmas[i + 1], cond)
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
        x = heun_step(denoiser, x, t_cur, t_next, cond)
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
    x = denoiser(x, sigma_batch(taus[0], x), **cond)
    for tau in taus[1:]:
        z = randn_like(x, generator)
        x = x + (tau**2 - eps**2).clamp(min=0).sqrt() * z
        x = denoiser(x, sigma_batch(tau, x), **cond)
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
    return (denoiser(x, sigma_batch(s, x), **cond) - x) / s**2


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
    """Langevin corrector, Song et al. 2021, Alg. 4-5: eps = 2 (r ||z|| / ||s||)^2, x += eps s + sqrt(2 eps) z
    (per-sample norms)."""
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
                  description="Score SDE reverse-diffusion predictor (Euler-Maruyama of the reverse SDE, Song et al. "
                              "2021, Eq. 46) + final denoising step",
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
            x = denoiser(x, sigma_batch(s_t, x), **cond)
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
                  description="Score SDE corrector only: Langevin MCMC at each grid sigma (Song et al. 2021, Alg. "
                              "4-5) + final denoising step",
                  paper="score_sde", stochastic=True)
def sample_langevin_corrector(denoiser, x, sigmas, *, generator=None, cond=None, n_corrector=1, snr=0.16):
    """Corrector-only sampling, Song et al. 2021, Alg. 4-5 without a predictor; last step x0 = D(x, eps)."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s_t = sigmas[i]
        x = _langevin(denoiser, x, s_t, generator, cond, n_corrector, snr)
        if sigmas[i + 1] == 0:
            x = denoiser(x, sigma_batch(s_t, x), **cond)
    return x


@register_sampler("pc", options={"predictor": Opt(str, "reverse_diffusion", choices=("reverse_diffusion", "ancestral")),
                                 **_PRED_OPTS, **_CORR_OPTS},
                  description="Score SDE predictor-corrector sampling (Song et al. 2021, Alg. 1-3): corrector then "
                              "predictor at each sigma, final denoising step",
                  paper="score_sde", stochastic=True)
def sample_pc(denoiser, x, sigmas, *, generator=None, cond=None, predictor="reverse_diffusion", form="sigma",
              n_corrector=1, snr=0.16):
    """Predictor-corrector sampler, Song et al. 2021, Alg. 1 (corrector first, as in the paper's code); last step x0
    = D(x, eps)."""
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s_t, s_s = sigmas[i], sigmas[i + 1]
        x = _langevin(denoiser, x, s_t, generator, cond, n_corrector, snr)
        if s_s > 0:
            x = _predictor(predictor, denoiser, x, s_t, s_s, generator, cond, form)
        else:
            x = denoiser(x, sigma_batch(s_t, x), **cond)
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
    """dx/du of the probability-flow ODE in u = log sigma: dx/du = sigma dx/dsigma = x - D(x, sigma) (Song et al.
    2021, Eq. 13 in sigma coordinates)."""
    cond = cond or {}

    def f(x, u):
        return x - denoiser(x, u.exp(), **cond)

    return f


@register_sampler("prob_flow",
                  options={"rtol": Opt(float, 1e-5, min=0.0, help="relative tolerance of the RK45 solver"),
                           "atol": Opt(float, 1e-5, min=0.0, help="absolute tolerance of the RK45 solver")},
                  description="Score SDE probability-flow ODE with an adaptive RK45 (Dormand-Prince) solver + final "
                              "denoising step (Song et al. 2021, Eq. 13)",
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
        x = denoiser(x, sigma_batch(pos[-1], x), **cond)
    return x


# --------------------------------------------------------------------------------------------
# Langevin dynamics (Song & Ermon 2019, NCSN): on any denoiser, score = (D(x, sigma) - x) / sigma^2
# --------------------------------------------------------------------------------------------
def _langevin_step(denoiser, x, sigma, alpha, generator, cond):
    """One Langevin step, Song & Ermon 2019, Eq. 4: x + alpha/2 grad log p_sigma(x) + sqrt(alpha) z."""
    score = (denoiser(x, sigma_batch(sigma, x), **cond) - x) / sigma**2
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
        x = denoiser(x, sigma_batch(sigma_L, x), **cond)
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
        x = denoiser(x, sigma_batch(s, x), **cond)
    return x


# --------------------------------------------------------------------------------------------
# Today's fast ODE/SDE solvers (PAPERS.md, Sec. 12): k-diffusion's ancestral and linear multistep samplers,
# DPM-Solver (Lu et al. 2022), DPM-Solver++ (Lu et al. 2022b), UniPC (Zhao et al. 2023), DEIS and iPNDM
# (Zhang & Chen 2023).
#
# All are written in the denoiser's coordinates x = x0 + sigma n, i.e. the VP papers' x_t / alpha_t, where
# the papers' half-log-SNR is lambda = -log sigma, the noise prediction is eps = (x - D) / sigma and the data
# prediction is D.  In these coordinates every first-order step (DDIM, Euler, DPM-Solver-1, DPM-Solver++(1))
# is x' = D + (sigma' / sigma)(x - D).  A step to sigma = 0 (h = inf) is first order, i.e. x' = D (the final
# denoising step), unless a sampler's docstring says otherwise; on a grid that ends at a positive sigma no
# step is special.  Grids are read to the host once (``sigmas.tolist()``); step coefficients are Python floats,
# or float64 tensors of one value per sample where the step size is per sample (dpm_solver_adaptive).
# --------------------------------------------------------------------------------------------
def _denoise(denoiser, x, s, cond) -> Tensor:
    """D(x, s) with s a float (one sigma for the batch) or a (B,) tensor (one per sample)."""
    sigma = x.new_full((x.shape[0],), s) if isinstance(s, float) else s.to(x.dtype)
    return denoiser(x, sigma, **cond)


def _first_order(x, denoised, s, s_to):
    """First-order exponential-integrator step from sigma s to s_to: DPM-Solver++(1), Lu et al. 2022b, Eq. 9 with
    alpha = 1, x' = (s_to / s) x + (1 - s_to / s) D, which is also DDIM's Eq. 12 (eta = 0) and Euler's step in sigma."""
    return denoised + (s_to / s) * (x - denoised)


def _ancestral_sigmas(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step s -> s_next: sigma_up = min(s_next, eta sqrt(s_next^2 (s^2 - s_next^2) / s^2))
    is DDIM's sigma_tau(eta) (Song et al. 2021, Eq. 16) in sigma coordinates, sigma_down = sqrt(s_next^2 - sigma_up^2)."""
    if eta == 0 or s_next == 0:
        return s_next, 0.0
    s_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - s_up**2), s_up


def _ancestral(denoiser, x, sigmas, generator, cond, eta, s_noise, step):
    """Ancestral sampling: D at sigma_i, ``step`` from sigma_i to sigma_down (to 0: x = D), then s_noise sigma_up z."""
    cond = cond or {}
    grid = sigmas.tolist()
    for s, s_next in zip(grid[:-1], grid[1:]):
        denoised = _denoise(denoiser, x, s, cond)
        s_down, s_up = _ancestral_sigmas(s, s_next, eta)
        x = step(denoiser, x, denoised, s, s_down, cond) if s_down > 0 else denoised
        if s_up > 0:
            x = x + (s_noise * s_up) * randn_like(x, generator)
    return x


def _euler_step(denoiser, x, denoised, s, s_to, cond):
    return _first_order(x, denoised, s, s_to)


def _dpm_2_step(denoiser, x, denoised, s, s_to, cond):
    eps = (x - denoised) / s
    return _dpm_solver_step(denoiser, x, eps, _per_sample(s, x), _per_sample(s_to, x), 2, cond)[0]


def _dpmpp_2s_step(denoiser, x, denoised, s, s_to, cond):
    """DPM-Solver++(2S), Lu et al. 2022b, Alg. 1 with r = 1/2: a first-order step to s_mid = sqrt(s s_to)
    (lambda + h/2), then the step from x with D(u, s_mid)."""
    s_mid = math.exp(0.5 * (math.log(s) + math.log(s_to)))
    u = _first_order(x, denoised, s, s_mid)
    return _first_order(x, _denoise(denoiser, u, s_mid, cond), s, s_to)


_ANCESTRAL_OPTS = {"eta": Opt(float, 1.0, min=0.0, help="noise scale of each step: sigma_up(eta), 0 = deterministic"),
                   "s_noise": Opt(float, 1.0, min=0.0, help="std of the added noise relative to sigma_up")}


@register_sampler("euler_ancestral", options=dict(_ANCESTRAL_OPTS),
                  description="Euler ancestral (k-diffusion): an Euler step to sigma_down, then noise sigma_up "
                              "(DDIM's eta noise, Song et al. 2021, Eq. 16); NFE = steps", stochastic=True)
def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, cond=None, eta=1.0, s_noise=1.0):
    """Euler ancestral step x' = x + (sigma_down - sigma) d + s_noise sigma_up z, d = (x - D)/sigma (Karras et al.
    2022, Eq. 4 with DDIM's sigma_tau(eta), Song et al. 2021, Eq. 16)."""
    return _ancestral(denoiser, x, sigmas, generator, cond, eta, s_noise, _euler_step)


@register_sampler("dpm_2_ancestral", options=dict(_ANCESTRAL_OPTS),
                  description="DPM-2 ancestral (k-diffusion): a DPM-Solver-2 step to sigma_down, then noise sigma_up; "
                              "2 NFE per step, 1 on the last", stochastic=True)
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, generator=None, cond=None, eta=1.0, s_noise=1.0):
    """DPM-Solver-2 step (Lu et al. 2022, Alg. 1) to sigma_down, then s_noise sigma_up z (DDIM's Eq. 16 noise).

    Differs from k-diffusion only where eta is so large that sigma_down = 0 before the last step: k-diffusion then
    adds no noise, here the noise sigma_up = sigma_next is added as in euler_ancestral.
    """
    return _ancestral(denoiser, x, sigmas, generator, cond, eta, s_noise, _dpm_2_step)


@register_sampler("dpmpp_2s_ancestral", options=dict(_ANCESTRAL_OPTS),
                  description="DPM-Solver++(2S) ancestral (Lu et al. 2022b, Alg. 1; k-diffusion): a 2S step to "
                              "sigma_down, then noise sigma_up; 2 NFE per step, 1 on the last", stochastic=True)
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator=None, cond=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) step, Lu et al. 2022b, Alg. 1 (r = 1/2), to sigma_down, then s_noise sigma_up z (DDIM's Eq. 16 noise)."""
    return _ancestral(denoiser, x, sigmas, generator, cond, eta, s_noise, _dpmpp_2s_step)


# ---- DPM-Solver (Lu et al. 2022): singlestep exponential integrator on eps in lambda = -log sigma
def _per_sample(v: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(v), dtype=torch.float64, device=x.device)


def _col(v: Tensor, x: Tensor) -> Tensor:
    """A (B,) float64 coefficient as a column broadcasting against x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _eps(denoiser, x, s, cond):
    return (x - _denoise(denoiser, x, s, cond)) / _col(s, x)


def _dpm_solver_step(denoiser, x, eps, s, s_next, order, cond):
    """One DPM-Solver-k step from sigma s to s_next > 0 ((B,) float64 tensors), h = lambda_next - lambda = log(s / s_next):
    Lu et al. 2022, Eq. 3.7 (k = 1, DDIM), Alg. 1 (k = 2, r1 = 1/2) and Alg. 2 (k = 3, r1 = 1/3, r2 = 2/3).

    Returns (x_k, x_low): x_low is the step of order k - 1 from the same evaluations (for k = 3 the r1 = 1/3
    DPM-Solver-2 step), the embedded pair of DPM-Solver-12 / -23.
    """
    h = (s / s_next).log()
    c = lambda v: _col(v, x)  # noqa: E731
    x_1 = x - c(s_next * h.expm1()) * eps                      # Eq. 3.7
    if order == 1:
        return x_1, x_1
    r1 = 0.5 if order == 2 else 1 / 3
    s_1 = s * (-r1 * h).exp()                                   # sigma at lambda + r1 h
    u_1 = x - c(s_1 * (r1 * h).expm1()) * eps
    eps_1 = _eps(denoiser, u_1, s_1, cond)
    x_2 = x_1 - c(s_next / (2 * r1) * h.expm1()) * (eps_1 - eps)
    if order == 2:
        return x_2, x_1
    r2 = 2 / 3
    s_2 = s * (-r2 * h).exp()
    u_2 = x - c(s_2 * (r2 * h).expm1()) * eps - c(s_2 * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1)) * (eps_1 - eps)
    eps_2 = _eps(denoiser, u_2, s_2, cond)
    x_3 = x_1 - c(s_next / r2 * (h.expm1() / h - 1)) * (eps_2 - eps)
    return x_3, x_2


def _solve_ends(sigmas):
    """(first sigma, last positive sigma, whether the grid ends with the denoising step to 0) of a grid."""
    grid = sigmas.tolist()
    pos = [s for s in grid if s > 0]
    return pos[0], pos[-1], grid[-1] == 0


@register_sampler("dpm_2", description="DPM-2 (k-diffusion): DPM-Solver-2 with its midpoint at the geometric mean of the two "
                                       "sigmas; last step to 0 first order, so N sigmas before 0 cost 2N-1 NFE")
def sample_dpm_2(denoiser, x, sigmas, *, generator=None, cond=None):
    """DPM-Solver-2, Lu et al. 2022, Alg. 1 (r1 = 1/2): k-diffusion's DPM-2 (a midpoint step in sigma) in exact arithmetic."""
    return sample_dpm_solver(denoiser, x, sigmas, cond=cond, order=2)


@register_sampler("dpm_solver", options={"order": Opt(int, 3, min=1, max=3, help="DPM-Solver-k: k NFE per step")},
                  description="DPM-Solver singlestep (Lu et al. 2022, Alg. 1-2) of order 1-3 on the grid; "
                              "last step to 0 first order, so N sigmas before 0 cost k(N-1)+1 NFE")
def sample_dpm_solver(denoiser, x, sigmas, *, generator=None, cond=None, order=3):
    """Singlestep DPM-Solver-k, Lu et al. 2022, Eq. 3.7 / Alg. 1 / Alg. 2, between consecutive grid sigmas; to 0: x = D."""
    cond = cond or {}
    grid = sigmas.tolist()
    for s, s_next in zip(grid[:-1], grid[1:]):
        denoised = _denoise(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
        else:
            x = _dpm_solver_step(denoiser, x, (x - denoised) / s, _per_sample(s, x), _per_sample(s_next, x), order, cond)[0]
    return x


def _fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's orders for an NFE budget K (Lu et al. 2022, Sec. 3.3): M = floor(K/3) + 1 steps,
    order 3 then [2, 1] if 3 | K, else order 3 then K mod 3."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


@register_sampler("dpm_solver_fast",
                  description="DPM-Solver-fast (Lu et al. 2022, Sec. 3.3): steps uniform in lambda, order-3 steps and lower "
                              "orders to fill the budget; the grid fixes the ends and the NFE (len(sigmas) - 1, the last one "
                              "the final denoising step)")
def sample_dpm_solver_fast(denoiser, x, sigmas, *, generator=None, cond=None):
    """DPM-Solver-fast, Lu et al. 2022, Sec. 3.3 (Alg. 1-2 steps, uniform in lambda) from sigmas[0] to the last positive sigma.

    The NFE is len(sigmas) - 1, as for Euler: on a grid ending at 0 the solve gets one less and the last evaluation
    is the denoising step x0 = D(x, sigma_min) (k-diffusion's sample_dpm_fast stops at sigma_min without it).
    """
    cond = cond or {}
    s_start, s_end, to_zero = _solve_ends(sigmas)
    budget = len(sigmas) - 1 - int(to_zero)
    if budget > 0 and s_end < s_start:
        orders = _fast_orders(budget)
        lams = torch.linspace(-math.log(s_start), -math.log(s_end), len(orders) + 1, dtype=torch.float64).tolist()
        for k, lam, lam_next in zip(orders, lams[:-1], lams[1:]):
            s, s_next = _per_sample(math.exp(-lam), x), _per_sample(math.exp(-lam_next), x)
            x = _dpm_solver_step(denoiser, x, _eps(denoiser, x, s, cond), s, s_next, k, cond)[0]
    if to_zero:
        x = _denoise(denoiser, x, s_end, cond)
    return x


@register_sampler(
    "dpm_solver_adaptive",
    options={"order": Opt(int, 3, min=2, max=3, help="3: DPM-Solver-23 (3 NFE per try), 2: DPM-Solver-12 (2 NFE)"),
             "rtol": Opt(float, 0.05, min=0.0, help="relative tolerance of the local error"),
             "atol": Opt(float, 0.0078, min=0.0, help="absolute tolerance (data in [-1, 1]: 1/128)"),
             "h_init": Opt(float, 0.05, min=1e-6, help="first step size in lambda"),
             "accept_safety": Opt(float, 0.81, min=0.0, max=1.0,
                                  help="a step is accepted when its step-size factor is at least this")},
    description="DPM-Solver-12/23 with adaptive step size per sample (Lu et al. 2022, Sec. 3.3 and App. C); the grid fixes "
                "the ends; NFE adaptive (counted by the harness), +1 for the final denoising step")
def sample_dpm_solver_adaptive(denoiser, x, sigmas, *, generator=None, cond=None, order=3, rtol=0.05, atol=0.0078,
                               h_init=0.05, accept_safety=0.81):
    """Adaptive DPM-Solver-12/23, Lu et al. 2022, Sec. 3.3: embedded orders (k-1, k), error E = RMS((x_low - x_high) / delta)
    with delta = max(atol, rtol max(|x_low|, |x_prev|)), step factor 1 + atan(E^(-1/k) - 1) (k-diffusion's I-controller).

    Each sample controls its own step (k-diffusion controls one step for the whole batch), so a sample's trajectory is
    k-diffusion's sample_dpm_adaptive run on that sample alone, whatever its batch; finished samples wait.  The counted
    NFE is k times the largest number of tries in the batch, plus one for the denoising step to 0.
    """
    cond = cond or {}
    s_start, s_end, to_zero = _solve_ends(sigmas)
    lam_end = -math.log(s_end)
    lam = _per_sample(-math.log(s_start), x)
    h = _per_sample(h_init, x)
    x_prev = x
    for _ in range(100_000):
        active = lam < lam_end - 1e-5
        if not bool(active.any()):
            break
        # a finished sample takes a dummy step of its last size (kept out of the result)
        lam_next = torch.where(active, torch.clamp(lam + h, max=lam_end), lam + h.abs())
        s, s_next = (-lam).exp(), (-lam_next).exp()
        x_high, x_low = _dpm_solver_step(denoiser, x, _eps(denoiser, x, s, cond), s, s_next, order, cond)
        delta = torch.maximum(torch.full_like(x, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        err = ((x_low - x_high) / delta).flatten(1).pow(2).mean(1).sqrt().double()
        factor = 1 + torch.atan((1 / (err + 1e-8)) ** (1 / order) - 1)
        accept = active & (factor >= accept_safety)
        acc = _col(accept, x).bool()
        x, x_prev = torch.where(acc, x_high, x), torch.where(acc, x_low, x_prev)
        lam = torch.where(accept, lam_next, lam)
        h = torch.where(active, h * factor, h)
    else:
        raise RuntimeError("dpm_solver_adaptive: not finished after 100000 tries")
    if to_zero:
        x = _denoise(denoiser, x, s_end, cond)
    return x


# ---- DPM-Solver++ (Lu et al. 2022b): the exponential integrator on D, multistep and SDE variants
def _brownian(x, sigmas, generator):
    """The SDE samplers' Brownian path over [smallest positive sigma, sigmas[0]] (in sigma, as k-diffusion's tree)."""
    pos = [s for s in sigmas.tolist() if s > 0]
    return BrownianPath(x, min(pos), max(pos), generator) if len(pos) > 1 and min(pos) < max(pos) else None


def _dpmpp_multistep(denoiser, x, sigmas, generator, cond, order, eta, s_noise, solver_type):
    """Multistep DPM-Solver++ in lambda with orders warming up 1, 2, 3, the last step to 0 being x = D.

    x' = (s'/s) e^{-eta h} x + (1 - e^{-h_eta}) D_0 + corrections + s' sqrt(1 - e^{-2 eta h}) s_noise z, h_eta = (1 + eta) h;
    2nd order: midpoint 0.5 (1 - e^{-h_eta}) d, or heun phi_2 d with phi_2 = (e^{-h_eta} - 1)/h_eta + 1 and
    d = (D_0 - D_1) / r, r = h_1 / h; 3rd order: phi_2 d1 - phi_3 d2 from the last three D's, phi_3 = phi_2/h_eta - 1/2.
    """
    cond = cond or {}
    grid = sigmas.tolist()
    path = _brownian(x, sigmas, generator) if eta > 0 and s_noise > 0 else None
    hist: list[tuple[float, Tensor]] = []  # (h, D) of the previous steps, newest first
    for s, s_next in zip(grid[:-1], grid[1:]):
        denoised = _denoise(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised  # final denoising step
            continue
        h = math.log(s / s_next)
        h_eta = (1 + eta) * h
        one_minus = -math.expm1(-h_eta)
        x = (s_next / s * math.exp(-eta * h)) * x + one_minus * denoised
        k = min(order, len(hist) + 1)
        if k >= 2:
            r0 = hist[0][0] / h
            d1_0 = (denoised - hist[0][1]) / r0
            phi_2 = -one_minus / h_eta + 1
            if k == 2 and solver_type == "midpoint":
                x = x + (0.5 * one_minus) * d1_0
            elif k == 2:
                x = x + phi_2 * d1_0
            else:
                r1 = hist[1][0] / h
                d1_1 = (hist[0][1] - hist[1][1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        if path is not None:
            x = x + (s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise) * path.noise(s, s_next)
        hist.insert(0, (h, denoised))
        del hist[2:]
    return x


@register_sampler("dpmpp_2m", description="DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): multistep, one NFE per step; "
                                          "first and last (to 0) steps first order")
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, cond=None):
    """DPM-Solver++(2M), Lu et al. 2022b, Alg. 2: x' = (s'/s) x - (e^{-h} - 1)((1 + 1/(2r)) D_0 - D_1/(2r)), r = h_last/h."""
    return _dpmpp_multistep(denoiser, x, sigmas, generator, cond, order=2, eta=0.0, s_noise=0.0, solver_type="midpoint")


_SDE_OPTS = {"eta": Opt(float, 1.0, min=0.0, help="0 = the ODE solver, 1 = the reverse SDE"),
             "s_noise": Opt(float, 1.0, min=0.0, help="std of the added noise relative to the SDE's")}


@register_sampler("dpmpp_2m_sde",
                  options={**_SDE_OPTS, "solver_type": Opt(str, "midpoint", choices=("midpoint", "heun"),
                                                           help="the 2nd-order correction: midpoint or heun (phi_2)")},
                  description="SDE-DPM-Solver++(2M) (Lu et al. 2022b; k-diffusion): multistep on the reverse SDE with noise "
                              "from a per-sample Brownian path; one NFE per step, last step x = D", stochastic=True)
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, cond=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """SDE-DPM-Solver++(2M), Lu et al. 2022b, App. (Eq. of SDE-DPM-Solver++(2M)); eta = 0 and midpoint give DPM-Solver++(2M)."""
    return _dpmpp_multistep(denoiser, x, sigmas, generator, cond, order=2, eta=eta, s_noise=s_noise, solver_type=solver_type)


@register_sampler("dpmpp_3m_sde", options=dict(_SDE_OPTS),
                  description="DPM-Solver++(3M) SDE (Lu et al. 2022b; k-diffusion): three-point multistep on the reverse SDE, "
                              "noise from a per-sample Brownian path; one NFE per step, last step x = D; second order "
                              "as written (see docstring)", stochastic=True)
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, generator=None, cond=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) multistep (Lu et al. 2022b, App.) with SDE noise: phi_2 d1 - phi_3 d2; the step before the
    last is third order (no lower-order final).

    As k-diffusion and Lu et al.'s code write it: d2 = (d1_0 - d1_1)/(r0 + r1) is h^2 D''/2, so -phi_3 d2 is half the
    Taylor term -h^2 phi_3 D'' and the method is second order (measured 2.0 on the exact Gaussian; doubling d2 gives 3).
    We keep k-diffusion's formula, so the sampler is the one people run (tests/test_samplers_modern.py).
    """
    return _dpmpp_multistep(denoiser, x, sigmas, generator, cond, order=3, eta=eta, s_noise=s_noise, solver_type="heun")


@register_sampler(
    "dpmpp_sde",
    options={**_SDE_OPTS, "r": Opt(float, 0.5, min=0.01, max=1.0, help="intermediate point at lambda + r h")},
    description="DPM-Solver++ SDE (k-diffusion's stochastic DPM-Solver++(2S)): two ancestral stages per step, noise from "
                "a per-sample Brownian path; 2 NFE per step, 1 on the last", stochastic=True)
def sample_dpmpp_sde(denoiser, x, sigmas, *, generator=None, cond=None, eta=1.0, s_noise=1.0, r=0.5):
    """Stochastic DPM-Solver++(2S), Lu et al. 2022b, Alg. 1 with each stage an ancestral step (DDIM's Eq. 16 noise) and
    D_d = (1 - 1/(2r)) D + D(u, s_r)/(2r); the two stages' noises are increments of one Brownian path."""
    cond = cond or {}
    grid = sigmas.tolist()
    path = _brownian(x, sigmas, generator) if eta > 0 and s_noise > 0 else None
    fac = 1 / (2 * r)
    for s, s_next in zip(grid[:-1], grid[1:]):
        denoised = _denoise(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
            continue
        s_r = s * (s_next / s) ** r   # sigma at lambda + r h
        # stage 1: ancestral first-order step to s_r
        s_down, s_up = _ancestral_sigmas(s, s_r, eta)
        u = _first_order(x, denoised, s, s_down)
        if path is not None:
            u = u + (s_noise * s_up) * path.noise(s, s_r)
        denoised_2 = _denoise(denoiser, u, s_r, cond)
        # stage 2: ancestral step to s_next with the combined D
        s_down, s_up = _ancestral_sigmas(s, s_next, eta)
        x = _first_order(x, (1 - fac) * denoised + fac * denoised_2, s, s_down)
        if path is not None:
            x = x + (s_noise * s_up) * path.noise(s, s_next)
    return x


# ---- Linear multistep on eps (LMS, DEIS, iPNDM): x' = x + sum_j w_j eps_{i-j}, w_j = integral over [sigma_i, sigma_{i+1}]
# of the Lagrange basis through the last k nodes, in the sampler's own time variable
def _lagrange_integrals(nodes: list[float], a: float, b: float, exp_weight: bool = False) -> list[float]:
    """w_j = int_a^b L_j(u) du, or int_a^b L_j(u) e^u du with ``exp_weight`` (b = -inf allowed), for the Lagrange
    basis L_j on ``nodes``; exact (polynomial antiderivatives; int P e^u du = e^u sum_k (-1)^k P^(k)), in u - a."""
    P = np.polynomial.Polynomial
    v_nodes = [n - a for n in nodes]
    v_end = b - a
    ws = []
    for j, n_j in enumerate(v_nodes):
        L = P([1.0])
        for k, n_k in enumerate(v_nodes):
            if k != j:
                L = L * P([-n_k, 1.0]) / (n_j - n_k)
        if not exp_weight:
            F = L.integ()
            ws.append(float(F(v_end) - F(0.0)))
            continue
        derivs = [L.deriv(m) for m in range(L.degree() + 1)]
        F = lambda v: 0.0 if v == -math.inf else math.exp(v) * sum((-1) ** m * d(v) for m, d in enumerate(derivs))  # noqa: E731
        ws.append(math.exp(a) * (F(v_end) - F(0.0)))
    return ws


def _linear_multistep(denoiser, x, sigmas, cond, order, time, lower_order_final):
    """x_{i+1} = x_i + sum_j w_j eps_{i-j} with eps = (x - D)/sigma and k = min(order, i + 1) nodes (lower order at the start);
    ``time``: 'sigma' (LMS), 'log_sigma' (DEIS, weights against e^u du = d sigma) or 'step' (iPNDM: uniform-step
    Adams-Bashforth weights times sigma_{i+1} - sigma_i).  ``lower_order_final``: on a grid ending at 0, k <= steps left."""
    cond = cond or {}
    grid = sigmas.tolist()
    n = len(grid) - 1
    to_zero = grid[-1] == 0
    epss: list[Tensor] = []  # newest first
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        epss.insert(0, (x - _denoise(denoiser, x, s, cond)) / s)
        del epss[order:]
        k = min(order, i + 1, n - i if lower_order_final and to_zero else order)
        if time == "sigma":
            w = _lagrange_integrals(grid[i::-1][:k], s, s_next)
        elif time == "log_sigma":
            w = _lagrange_integrals([math.log(v) for v in grid[i::-1][:k]], math.log(s),
                                    math.log(s_next) if s_next > 0 else -math.inf, exp_weight=True)
        else:
            w = [(s_next - s) * c for c in _lagrange_integrals([-float(j) for j in range(k)], 0.0, 1.0)]
        for w_j, eps_j in zip(w, epss):
            x = x + w_j * eps_j
    return x


@register_sampler("lms", options={"order": Opt(int, 4, min=1, max=4, help="Adams-Bashforth order (lower at the start)")},
                  description="Linear multistep (k-diffusion's LMS): Adams-Bashforth in sigma on d = (x - D)/sigma, Lagrange "
                              "coefficients integrated over sigma; one NFE per step, the last step to 0 at full order")
def sample_lms(denoiser, x, sigmas, *, generator=None, cond=None, order=4):
    """Variable-step Adams-Bashforth on Karras et al. 2022's Eq. 4, dx/dsigma = (x - D)/sigma: x' = x + sum_j (int
    L_j dsigma) d_{i-j}."""
    return _linear_multistep(denoiser, x, sigmas, cond, order, "sigma", lower_order_final=False)


@register_sampler("deis", options={"order": Opt(int, 3, min=1, max=3, help="polynomial order of the eps extrapolation")},
                  description="DEIS multistep (Zhang & Chen 2023): exponential integrator with eps extrapolated by "
                              "a polynomial in log sigma (diffusers' log-rho DEIS); one NFE per step, the last two steps "
                              "to 0 at order <= 1, 2")
def sample_deis(denoiser, x, sigmas, *, generator=None, cond=None, order=3):
    """DEIS-AB, Zhang & Chen 2023, Eq. 14-15: x' = x + sum_j C_j eps_{i-j}, C_j = int L_j(log rho) d rho with rho = sigma.

    The paper's time variable t (the SDE's) is not known to a sampler that sees only sigmas; the polynomial is in
    log rho = log sigma instead, as diffusers' DEISMultistepScheduler ("logrho") does.  On a grid ending at 0 the
    last step is first order (x = D) and the one before at most second order (diffusers does this below 15 steps only).
    """
    return _linear_multistep(denoiser, x, sigmas, cond, order, "log_sigma", lower_order_final=True)


@register_sampler("ipndm", options={"order": Opt(int, 4, min=1, max=4, help="Adams-Bashforth order (lower at the start)")},
                  description="iPNDM (Zhang & Chen 2023): PNDM's linear multistep on eps with the DDIM step and lower-order "
                              "warm-up; fixed (uniform-step) Adams-Bashforth weights; one NFE per step")
def sample_ipndm(denoiser, x, sigmas, *, generator=None, cond=None, order=4):
    """iPNDM, Zhang & Chen 2023, Eq. 23 (PNDM, Liu et al. 2022, Eq. 12 without the Runge-Kutta warm-up):
    x' = x + (sigma' - sigma)(55 eps_0 - 59 eps_1 + 37 eps_2 - 9 eps_3)/24, lower orders for the first steps.

    The weights assume equal steps (in the grid's own variable), as the paper's; on a grid with unequal sigma steps
    (Karras, geometric) orders 3 and 4 are second order (measured on the exact Gaussian).  The last step to 0 is full order.
    """
    return _linear_multistep(denoiser, x, sigmas, cond, order, "step", lower_order_final=False)


# ---- UniPC (Zhao et al. 2023): unified predictor-corrector on D, B(h) variants
def _unipc_update(x, s, s_to, m, past, m_new, variant):
    """UniP-p (``m_new`` None) or UniC-p (``m_new`` = D at the point to correct) from (x, s, D = m) to s_to,
    with ``past`` = [(sigma_k, D_k)] the p - 1 earlier evaluations (Zhao et al. 2023, Alg. 2-3, data prediction):
    x' = (s_to/s) x - (e^{-h} - 1) m - B(h) sum_k rho_k D1_k, D1_k = (D_k - m) / r_k, r_k = (lambda_k - lambda) / h,
    B(h) = -h (bh1) or e^{-h} - 1 (bh2); rho solves R rho = b with R_{ik} = r_k^{i-1}, b_i = i! h phi_{i+1}(-h) / B(h)."""
    h = math.log(s / s_to)
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [math.log(s / s_k) / h for s_k, _ in past]
    D1s = [(m_k - m) / r_k for (_, m_k), r_k in zip(past, rks)]
    p = len(past) + 1
    cols = rks + [1.0]
    R = np.array([[r**i for r in cols] for i in range(p)])
    b, g, fact = [], h_phi_1 / hh - 1, 1.0      # g_i = h phi_{i+1}(-h) (up to sign), by recurrence
    for i in range(1, p + 1):
        b.append(g * fact / B_h)
        fact *= i + 1
        g = g / hh - 1 / fact
    x_new = (s_to / s) * x - h_phi_1 * m
    if m_new is None:   # predictor: rho from the past points only (UniP-2: rho = 1/2, as the paper's code)
        rhos = [0.5] if p == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1])) if p > 2 else []
        res = [(rho, d) for rho, d in zip(rhos, D1s)]
    else:               # corrector: the new evaluation enters with r = 1 (UniC-1: rho = 1/2)
        rhos = [0.5] if p == 1 else list(np.linalg.solve(R, b))
        res = [(rho, d) for rho, d in zip(rhos, D1s + [m_new - m])]
    for rho, d in res:
        x_new = x_new - (B_h * float(rho)) * d
    return x_new


@register_sampler("unipc", options={"order": Opt(int, 3, min=1, max=3,
                                                 help="p of UniPC-p (accuracy order p + 1 with the corrector)"),
                                    "variant": Opt(str, "bh1", choices=("bh1", "bh2"),
                                                   help="B(h) = h (bh1, the paper's choice unguided) or e^h - 1 (bh2, guided)")},
                  description="UniPC (Zhao et al. 2023): UniP predictor + UniC corrector on D, the corrector reusing the next "
                              "step's evaluation (no extra NFE); one NFE per step, orders warm up and fall at the last steps")
def sample_unipc(denoiser, x, sigmas, *, generator=None, cond=None, order=3, variant="bh1"):
    """UniPC-p, Zhao et al. 2023, Alg. 2-3 (data prediction, B(h) variant bh1/bh2), as the paper's code and diffusers.

    Conventions: the corrector corrects x_i with D evaluated at the uncorrected x_i, and that evaluation serves the
    next predictor; no corrector after the last step (it would cost an NFE); the order is min(p, i + 1) and, on a
    grid ending at 0, at most the number of steps left (the last step is x = D).
    """
    cond = cond or {}
    grid = sigmas.tolist()
    n = len(grid) - 1
    to_zero = grid[-1] == 0
    hist: list[tuple[float, Tensor]] = []  # (sigma_k, D_k), newest first
    x_last, p_last = x, 1
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        m = _denoise(denoiser, x, s, cond)
        if hist:  # UniC-p on the point just reached, from the previous point
            x = _unipc_update(x_last, hist[0][0], s, hist[0][1], hist[1:p_last], m, variant)
        hist.insert(0, (s, m))
        del hist[order:]
        p = min(order, i + 1, n - i if to_zero else order)
        x_last, p_last = x, p
        x = m if s_next == 0 else _unipc_update(x, s, s_next, m, hist[1:p], None, variant)
    return x
