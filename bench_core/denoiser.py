"""The one abstraction: a denoiser over noise level sigma (EDM / k-diffusion convention).

Data ``x0``, noise level ``sigma``, noisy sample ``x = x0 + sigma * n``.  A denoiser returns an
estimate of ``E[x0 | x]``.  Every paper's parametrisation is turned into a denoiser by an adapter
here, so every sampler runs on every model.
"""
from __future__ import annotations

import math
import warnings
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .guard import check_deadline


@runtime_checkable
class Denoiser(Protocol):
    sigma_min: float
    sigma_max: float

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:  # estimate of E[x0 | x]
        ...


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Sigma as a per-sample tensor of shape (B,), on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (B,) tensor to broadcast against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------
class DiscreteVPEpsDenoiser(nn.Module):
    """Discrete-time VP epsilon-prediction model (DDPM, DDIM, ADM, LDM) as a denoiser.

    The model sees ``x_vp = sqrt(abar_t) * x`` and ``t``; ``sigma_t = sqrt((1 - abar_t) / abar_t)``.
    Sigmas between the training grid's map to a fractional ``t`` by interpolating in log-sigma
    (the network's sinusoidal time embedding accepts real t).
    """

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor):
        super().__init__()
        self.model = model
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        sigmas = ((1 - abar) / abar).sqrt()
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        w = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo.float() + w.clamp(0, 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return self.sigmas.to(t.device)[t.long()]

    def eps(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = expand_sigma(sigma, x)
        c_in = 1.0 / (1.0 + sigma**2).sqrt()
        t = self.sigma_to_t(sigma)
        return self.model(x * bcast(c_in, x), t, **cond)

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = expand_sigma(sigma, x)
        return x - bcast(sigma, x) * self.eps(x, sigma, **cond)


class DenoiserWrapper:
    """Base of the denoiser wrappers (NFE counter, guidance, CUDA graphs): holds ``self.denoiser`` and passes
    every attribute it does not define itself (sigma_min, sigma_max, sigmas, sigma_to_t, ...) through to it."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __getattr__(self, name):
        if name == "denoiser":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.denoiser, name)


class NFECounter(DenoiserWrapper):
    """Wraps a denoiser and counts network function evaluations (one call on a batch = 1 NFE).

    Samplers never count; the harness reads ``count`` after a run.  Attribute access falls
    through to the wrapped denoiser (sigma_min, sigma_max, ...).
    """

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.count = 0

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        self.count += 1
        return self.denoiser(x, sigma, **cond)

    def reset(self) -> None:
        self.count = 0


class DenoiserOutputError(TypeError):
    """A denoiser returned something other than an estimate of x0 shaped like its input."""


class CheckedDenoiser(DenoiserWrapper):
    """Holds a denoiser to its contract on every call: the output is a torch tensor of the input's shape with a
    floating dtype (a learned-kernel denoiser asked for ``kernel_variance`` returns two such tensors, both
    checked).  Another floating dtype is cast to the input's, with one warning; anything else raises
    :class:`DenoiserOutputError` naming what was expected and what came back.  Each call also checks the run's
    time limit (``bench_core.guard``), so a run past it stops at its next denoiser call."""

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self._warned = False

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        check_deadline()
        out = self.denoiser(x, sigma, **cond)
        if cond.get("kernel_variance") and getattr(self.denoiser, "learned_kernel", False):
            # a learned-kernel denoiser (Sohl-Dickstein) asked for its kernel variance returns (x0, variance)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise DenoiserOutputError(f"the denoiser was asked for its kernel variance and returned "
                                          f"{type(out).__qualname__}; expected a pair (x0, variance)")
            return self._check(x, out[0]), self._check(x, out[1])
        return self._check(x, out)

    def _check(self, x: Tensor, out) -> Tensor:
        want = f"a torch.Tensor of shape {tuple(x.shape)} and a floating dtype"
        if not isinstance(out, torch.Tensor):
            raise DenoiserOutputError(f"the denoiser returned {type(out).__module__}.{type(out).__qualname__} "
                                      f"where {want} was expected (the x0 estimate for the input batch)")
        if tuple(out.shape) != tuple(x.shape):
            raise DenoiserOutputError(f"the denoiser returned shape {tuple(out.shape)} for an input of shape "
                                      f"{tuple(x.shape)}; expected {want} (one x0 estimate per input sample)")
        if not out.is_floating_point():
            raise DenoiserOutputError(f"the denoiser returned dtype {out.dtype}; expected {want}")
        if out.dtype != x.dtype:
            if not self._warned:
                warnings.warn(f"the denoiser returned {out.dtype} for {x.dtype} input; cast to {x.dtype}",
                              stacklevel=2)
                self._warned = True
            out = out.to(x.dtype)
        return out


# --------------------------------------------------------------------------------------------
# Exact denoisers (oracles)
# --------------------------------------------------------------------------------------------
class GaussianDenoiser:
    """Exact E[x0 | x] for x0 ~ N(mu, s^2 I) (isotropic, per-dimension): a closed form oracle."""

    def __init__(self, mu: Tensor | float = 0.0, std: float = 1.0, sigma_min=0.002, sigma_max=80.0):
        self.mu = torch.as_tensor(mu, dtype=torch.float32)
        self.std = float(std)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        s2 = bcast(expand_sigma(sigma, x), x) ** 2
        v = self.std**2
        mu = self.mu.to(x)
        return mu + v / (v + s2) * (x - mu)

    def marginal_std(self, sigma: float) -> float:
        return math.sqrt(self.std**2 + sigma**2)


class GMMDenoiser:
    """Exact E[x0 | x] for a mixture of isotropic Gaussians sum_k w_k N(mu_k, s_k^2 I) in R^d.

    Also gives the exact score of the noised density, grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2,
    and the exact log-density of the noised data (used by likelihood tests).
    """

    def __init__(self, weights, means, stds, sigma_min=0.002, sigma_max=80.0):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, d)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)  # (K,)
        if self.stds.numel() == 1:
            self.stds = self.stds.expand(self.means.shape[0]).clone()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _responsibilities(self, x: Tensor, sigma: Tensor):
        xf = x.reshape(x.shape[0], -1).double()
        s2 = expand_sigma(sigma, x).double()[:, None] ** 2  # (B,1)
        var = self.stds[None, :] ** 2 + s2  # (B,K)
        d2 = ((xf[:, None, :] - self.means[None]) ** 2).sum(-1)  # (B,K)
        d = self.dim
        logp = self.weights.log()[None] - 0.5 * d2 / var - 0.5 * d * (2 * math.pi * var).log()
        return xf, var, logp

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        _, _, logp = self._responsibilities(x, torch.as_tensor(sigma, dtype=self.means.dtype))  # a Python float stays float64
        return torch.logsumexp(logp, dim=1)

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        xf, var, logp = self._responsibilities(x, sigma)
        r = torch.softmax(logp, dim=1)  # (B,K)
        v0 = self.stds[None, :] ** 2
        # per component posterior mean: mu_k + v0/(v0+s2) (x - mu_k)
        post = self.means[None] + (v0 / var)[..., None] * (xf[:, None, :] - self.means[None])
        out = (r[..., None] * post).sum(1)
        return out.to(x.dtype).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float()


def score_from_denoiser(denoiser, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
    """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie)."""
    s = bcast(expand_sigma(sigma, x), x)
    return (denoiser(x, expand_sigma(sigma, x), **cond) - x) / s**2


# --------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022) and the consistency parametrisation (Song et al. 2023)
# --------------------------------------------------------------------------------------------
class EDMPrecond(nn.Module):
    """EDM preconditioning, Karras et al. 2022, Eq. 7 and Table 1: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
    c_noise = ln(sigma) / 4, sd = sigma_data = 0.5.  The network's time input is ``t_scale * c_noise``:
    our U-Net embeds a real t sinusoidally with periods up to 10^4 (made for DDPM's t in [0, 1000]),
    so ``t_scale=250`` maps sigma in [0.002, 80] to t in about [-388, 274], a range like DDPM's.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, t_scale: float = 250.0):
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_scale = float(t_scale)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022, Table 1 (EDM column)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1.0 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = expand_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model(x * bcast(c_in, x), self.t_scale * c_noise, **cond)
        return bcast(c_skip, x) * x + bcast(c_out, x) * F_x.to(x.dtype)


class ConsistencyPrecond(EDMPrecond):
    """Consistency function f(x, sigma) = c_skip x + c_out F(c_in x, c_noise), Song et al. 2023, Eq. 5 and App. C.

    c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = sd (sigma - eps) / sqrt(sd^2 + sigma^2), so that the
    boundary condition f(x, eps) = x holds exactly (c_skip(eps) = 1, c_out(eps) = 0); c_in and c_noise as
    in EDM.  sigma is clamped to [eps, inf).  A consistency model is a denoiser: f estimates x0.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, eps: float = 0.002, sigma_max: float = 80.0,
                 t_scale: float = 250.0):
        super().__init__(model, sigma_data, eps, sigma_max, t_scale)
        self.eps = float(eps)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of Song et al. 2023, App. C."""
        sd, eps = self.sigma_data, self.eps
        _, _, c_in, c_noise = super().coefficients(sigma)  # c_in and c_noise as in EDM
        c_skip = sd**2 / ((sigma - eps) ** 2 + sd**2)
        c_out = sd * (sigma - eps) / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = expand_sigma(sigma, x).clamp(min=self.eps)
        return super().forward(x, sigma, **cond)


class SDEEpsDenoiser(nn.Module):
    """A continuous-time Score SDE model (VE, VP or sub-VP; Song et al. 2021) as a denoiser.

    The SDE's perturbation kernel is x_sde = alpha(t) x0 + std(t) n; in the denoiser's coordinates
    x = x_sde / alpha(t) it is x0 + sigma(t) n with sigma(t) = std(t) / alpha(t) (VP:
    sqrt((1 - abar) / abar) with abar = exp(-int beta); VE: alpha = 1).  The network F(x_sde, c_t t)
    predicts the noise n, i.e. the score is s = -F / std (the lambda(t) = std^2 weighting of Eq. 7
    makes the loss ||F - n||^2), so grad_x log p = -F / sigma and D(x, sigma) = x - sigma F.

    ``sde`` gives ``sigma(t)``, ``t_of_sigma(sigma)``, ``alpha(t)`` and ``eps`` (tensors in, tensors out).
    ``sigmas`` holds sigma(t) on ``n_grid`` times uniform in [eps, 1], so the ``uniform`` grid kind
    is the paper's uniform-in-t discretisation (ending at eps; the sampler's last step denoises).
    """

    def __init__(self, model: nn.Module, sde, t_scale: float = 999.0, n_grid: int = 1000):
        super().__init__()
        self.model, self.sde, self.t_scale = model, sde, float(t_scale)
        t = torch.linspace(float(sde.eps), 1.0, int(n_grid), dtype=torch.float64)
        sig = sde.sigma(t)
        self.register_buffer("sigmas", sig.float(), persistent=False)
        self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = expand_sigma(sigma, x)
        t = self.sde.t_of_sigma(sigma.double()).clamp(0.0, 1.0)
        alpha = self.sde.alpha(t).to(x.dtype)
        F = self.model(x * bcast(alpha, x), (self.t_scale * t).to(x.dtype), **cond)
        return x - bcast(sigma, x) * F
