"""Noise schedules and sigma grids.

Every grid is a 1-D float tensor of decreasing sigmas ending at 0 (samplers take it as is).
Discrete-time grids come from the VP ``alphas_cumprod`` of a trained model; continuous grids
from (sigma_min, sigma_max).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------
# DDPM beta schedules (Ho et al. 2020)
# --------------------------------------------------------------------------------------------
def linear_betas(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    """DDPM's linear schedule, beta_t from 1e-4 to 0.02 over T=1000 steps (Ho et al. 2020, Sec. 4)."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17)."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


def alphas_cumprod(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def vp_sigmas(abar: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t): the VP chain in the denoiser's (VE) coordinates."""
    abar = abar.double()
    return ((1 - abar) / abar).sqrt()


# --------------------------------------------------------------------------------------------
# DDIM timestep subsets (Song, Meng & Ermon 2021, Sec. 4.2 and App. D.2)
# --------------------------------------------------------------------------------------------
def ddim_timesteps(T: int, steps: int, skip: str = "uniform") -> np.ndarray:
    """Increasing 0-based timestep indices tau_1 < ... < tau_S used by DDIM."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if skip == "uniform":
        c = T // steps
        ts = np.arange(0, T, c)[:steps]
    elif skip == "quadratic":
        # the paper's code: int((linspace(0, sqrt(0.8 T), S))^2); repeated indices are kept, as
        # there (a repeated index is a no-op step that still costs one NFE), so NFE = S.
        ts = (np.linspace(0, math.sqrt(T * 0.8), steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM skip type {skip!r}; use 'uniform' or 'quadratic'")
    return ts.astype(np.int64)


def discrete_grid(abar: Tensor, steps: int, skip: str = "uniform") -> Tensor:
    """Sigma grid for a discrete-time VP model: sigma at the chosen timesteps (descending), then 0."""
    ts = ddim_timesteps(len(abar), steps, skip)
    sig = vp_sigmas(abar)[torch.from_numpy(ts[::-1].copy())]
    return torch.cat([sig, sig.new_zeros(1)]).float()


# --------------------------------------------------------------------------------------------
# Continuous grids
# --------------------------------------------------------------------------------------------
def karras_grid(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's grid, sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0 (Karras et al. 2022, Eq. 5)."""
    i = torch.arange(steps, dtype=torch.float64)
    inv = 1.0 / rho
    denom = max(steps - 1, 1)
    sig = (sigma_max**inv + i / denom * (sigma_min**inv - sigma_max**inv)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).float()


def geometric_grid(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Geometric sigmas from sigma_max to sigma_min (NCSN, VE SDE), then 0."""
    sig = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64))
    return torch.cat([sig, sig.new_zeros(1)]).float()


def uniform_grid(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sigmas uniform in sigma (rho=1), then 0."""
    sig = torch.linspace(sigma_max, sigma_min, steps, dtype=torch.float64)
    return torch.cat([sig, sig.new_zeros(1)]).float()


def make_grid(kind: str, steps: int, denoiser, **opts) -> Tensor:
    """Build a sigma grid by name for a denoiser.

    kinds: ``uniform`` / ``quadratic`` (DDIM timestep subsets; the denoiser must be discrete-time,
    i.e. expose ``sigmas``), ``karras`` (opts: rho, sigma_min, sigma_max), ``geometric``,
    ``linear`` (uniform in sigma).
    """
    smin = opts.get("sigma_min", getattr(denoiser, "sigma_min", 0.002))
    smax = opts.get("sigma_max", getattr(denoiser, "sigma_max", 80.0))
    if kind in ("uniform", "quadratic"):
        sigmas = getattr(denoiser, "sigmas", None)
        if sigmas is None:
            raise ValueError(f"grid {kind!r} needs a discrete-time model; use 'karras' or 'geometric' for this one")
        abar = 1.0 / (1.0 + sigmas.double().cpu() ** 2)
        return discrete_grid(abar, steps, kind)
    if kind == "karras":
        return karras_grid(steps, smin, smax, opts.get("rho", 7.0))
    if kind == "geometric":
        return geometric_grid(steps, smin, smax)
    if kind == "linear":
        return uniform_grid(steps, smin, smax)
    raise ValueError(f"unknown grid {kind!r}; known: {', '.join(GRIDS)}")


GRIDS = ("uniform", "quadratic", "karras", "geometric", "linear")
