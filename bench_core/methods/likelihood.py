"""Log-likelihood and bits/dim through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

In the denoiser's coordinates (x = x0 + sigma n, u = log sigma) the probability-flow ODE is
dx/du = f(x, u) = x - D(x, e^u), and the instantaneous change of variables gives

    log p_{sigma_min}(x) = log p_{sigma_max}(x(u_1)) + int_{u_0}^{u_1} div_x f(x(u), u) du,

integrated with the adaptive Dormand-Prince solver of ``bench_core.samplers`` on the augmented
state (x, int div f).  The prior at sigma_max is N(0, sigma_max^2 I) (the data's spread is
negligible against sigma_max).  The divergence is exact (autograd Jacobian diagonal, one
backward pass per dimension: for 2-D data) or Hutchinson's estimate v^T (df/dx) v with one
Rademacher or Gaussian probe v per sample, fixed along the trajectory (Eq. 40).

Images: uint8 values k are dequantised uniformly, y = k + U[0, 1) in [0, 256), and mapped to the
model space [-1, 1) by x = y / 128 - 1; the density of y is p_x(x) (2/256)^D, hence
bits/dim = -log p_x(x) / (D ln 2) + 7.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..samplers import dopri5, prob_flow_rhs
from ..seeding import SampleNoise, randn_like


def _probe(x: Tensor, kind: str, generator=None) -> Tensor:
    """Hutchinson probe with E[v v^T] = I: Rademacher (+-1) or Gaussian."""
    z = randn_like(x, generator)
    if kind == "rademacher":
        return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    if kind == "gaussian":
        return z
    raise ValueError(f"unknown probe {kind!r}; use 'rademacher' or 'gaussian'")


def divergence_exact(f, x: Tensor, u: Tensor) -> Tensor:
    """div_x f as the sum of the autograd Jacobian diagonal (one backward pass per dimension); returns (f, div)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        fx = f(x, u)
        flat = fx.flatten(1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat.shape[1]):
            g, = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < flat.shape[1] - 1)
            div = div + g.flatten(1)[:, i]
    return fx.detach(), div.detach()


def divergence_hutchinson(f, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Hutchinson-Skilling estimate v^T (df/dx) v of div_x f (Song et al. 2021, Eq. 40); returns (f, div)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        fx = f(x, u)
        g, = torch.autograd.grad((fx * v).sum(), x)
    return fx.detach(), (g * v).flatten(1).sum(1).detach()


def ode_log_likelihood(denoiser, x: Tensor, *, sigma_min: float | None = None, sigma_max: float | None = None,
                       trace: str = "hutchinson", probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                       generator=None, cond: dict | None = None) -> Tensor:
    """log p_{sigma_min}(x) per sample (nats) through the probability-flow ODE (Song et al. 2021, Eq. 39)."""
    cond = cond or {}
    s0 = float(sigma_min if sigma_min is not None else denoiser.sigma_min)
    s1 = float(sigma_max if sigma_max is not None else denoiser.sigma_max)
    B, shape = x.shape[0], x.shape[1:]
    D = x[0].numel()
    v = _probe(x, probe, generator) if trace == "hutchinson" else None
    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"unknown trace {trace!r}; use 'hutchinson' or 'exact'")

    f = prob_flow_rhs(denoiser, cond)

    def rhs(y, u):
        """Augmented ODE: d/du (x, Delta) = (f(x, u), div f(x, u))."""
        xs = y[:, :D].reshape(B, *shape)
        fx, div = divergence_exact(f, xs, u) if trace == "exact" else divergence_hutchinson(f, xs, u, v)
        return torch.cat([fx.flatten(1), div[:, None]], dim=1)

    y0 = torch.cat([x.detach().flatten(1), x.new_zeros(B, 1)], dim=1)
    with torch.no_grad():
        y1 = dopri5(rhs, y0, math.log(s0), math.log(s1), rtol=rtol, atol=atol)
    x1, delta = y1[:, :D].double(), y1[:, D].double()
    log_prior = -0.5 * (x1**2).sum(1) / s1**2 - 0.5 * D * math.log(2 * math.pi * s1**2)
    return log_prior + delta


def dequantize(u8: Tensor, generator=None) -> Tensor:
    """Uniform dequantization: y = k + U[0, 1), mapped to the model space by x = y / 128 - 1 (in [-1, 1))."""
    noise = torch.rand(u8.shape, generator=generator) if isinstance(generator, torch.Generator) else torch.rand(u8.shape)
    return (u8.float() + noise.to(u8.device)) / 128.0 - 1.0


def bits_per_dim(denoiser, u8: Tensor, *, seed: int = 0, trace: str = "hutchinson", probe: str = "rademacher",
                 rtol: float = 1e-5, atol: float = 1e-5, cond: dict | None = None) -> Tensor:
    """Bits/dim of uint8 images under the model (per image): -log p_x(x) / (D ln 2) + log2(256 / 2), x dequantized."""
    g = torch.Generator().manual_seed(int(seed))
    x = dequantize(u8.cpu(), g).to(getattr(denoiser, "sigmas", torch.zeros(1)).device)
    noise = SampleNoise([int(seed) * 1_000_000 + i for i in range(x.shape[0])], x.device)
    logp = ode_log_likelihood(denoiser, x, trace=trace, probe=probe, rtol=rtol, atol=atol, generator=noise, cond=cond)
    D = x[0].numel()
    return -logp / (D * math.log(2)) + math.log2(256 / 2)


# --------------------------------------------------------------------------------------------
# Baselines a likelihood is read against
# --------------------------------------------------------------------------------------------
def gaussian_log_density(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """log N(x; mean, cov) per row of ``x`` (N, D), float64, through the Cholesky factor of ``cov``."""
    x, mean, cov = x.double().flatten(1), mean.double().flatten(), cov.double()
    L = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(L, (x - mean).T, upper=False)          # L z = (x - mean)
    D = x.shape[1]
    return -0.5 * (z**2).sum(0) - torch.log(torch.diagonal(L)).sum() - 0.5 * D * math.log(2 * math.pi)


def fit_gaussian(x: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood mean and full covariance of rows of ``x`` (N, D), float64."""
    x = x.double().flatten(1)
    mean = x.mean(0)
    xc = x - mean
    return mean, xc.T @ xc / x.shape[0]


def gaussian_bits_per_dim(train_u8: Tensor, eval_u8: Tensor, *, seed: int = 0) -> Tensor:
    """Bits/dim of ``eval_u8`` under a full-covariance Gaussian fitted to ``train_u8``, per image: the baseline a
    model's ``bits_per_dim`` is read against.  Both sets are dequantized exactly as ``bits_per_dim`` does
    (y = k + U[0, 1), x = y / 128 - 1; the evaluation set with the same ``seed``, so image i gets the same
    dequantization noise as under the model), hence bits/dim = -log N(x) / (D ln 2) + 7."""
    g_eval = torch.Generator().manual_seed(int(seed))
    x_eval = dequantize(eval_u8.cpu(), g_eval).flatten(1)
    x_train = dequantize(train_u8.cpu(), torch.Generator().manual_seed(int(seed) + 1)).flatten(1)
    mean, cov = fit_gaussian(x_train)   # positive definite: the dequantization noise has variance 1/(12*128^2)
    D = x_eval.shape[1]
    return -gaussian_log_density(x_eval, mean, cov) / (D * math.log(2)) + math.log2(256 / 2)


def knn_entropy(x: Tensor, k: int = 4) -> tuple[float, float]:
    """Kozachenko-Leonenko estimate of the differential entropy (nats) of the distribution of the rows of ``x``
    (N, d), with its standard error: H = psi(N) - psi(k) + log V_d + d * mean(log r_k), r_k the Euclidean
    distance of each point to its k-th nearest other point, V_d the volume of the unit d-ball (Kozachenko &
    Leonenko 1987; Kraskov, Stoegbauer & Grassberger 2004, Eq. 20).  The standard error is that of the mean
    of the per-point terms (the terms are weakly dependent; a guide to the noise, not an exact interval)."""
    from scipy.special import digamma, gammaln  # noqa: PLC0415 - lazy: scipy only for the k-NN entropy

    x = x.double().flatten(1)
    N, d = x.shape
    if N <= k:
        raise ValueError(f"need more than k={k} points, got {N}")
    log_r = torch.empty(N, dtype=torch.float64)
    for i in range(0, N, 1024):  # blocks of rows: memory O(1024 N)
        dist = torch.cdist(x[i:i + 1024], x)
        dist[torch.arange(dist.shape[0]), torch.arange(i, i + dist.shape[0])] = float("inf")  # not itself
        r_k = dist.kthvalue(k, dim=1).values
        log_r[i:i + 1024] = torch.log(r_k.clamp_min(1e-300))
    log_vd = 0.5 * d * math.log(math.pi) - float(gammaln(0.5 * d + 1))
    terms = d * log_r
    H = float(digamma(N) - digamma(k)) + log_vd + float(terms.mean())
    return H, float(terms.std() / math.sqrt(N))
