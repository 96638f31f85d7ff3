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
    """
    cond = cond or {}
    for i in range(len(sigmas) - 1):
        s_t, s_s = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _sig(s_t, x), **cond)
        eps = (x - x0) / s_t
        if s_s > 0:
            s_up = (eta * s_s * (1 - s_s**2 / s_t**2).clamp(min=0).sqrt()).clamp(max=s_s)
            x = x0 + (s_s**2 - s_up**2).sqrt() * eps
            if eta > 0:
                x = x + s_up * randn_like(x, generator)
        else:
            x = x0
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
