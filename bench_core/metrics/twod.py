"""Sample-quality metrics for low-dimensional (2-D toy) data: sliced Wasserstein, MMD, mode weights.

All functions take (N, D) arrays or tensors and compute in float64 numpy.
"""
from __future__ import annotations

import hashlib

import numpy as np

DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or len(a) == 0:
        raise ValueError(f"expected a non-empty (N, D) array, got shape {a.shape}")
    return a


def _w2_squared_1d_sorted(a_sorted: np.ndarray, b_sorted: np.ndarray) -> np.ndarray:
    """Exact squared W2 between empirical measures, per row: int_0^1 (F_a^-1(u) - F_b^-1(u))^2 du.

    ``a_sorted`` (P, n), ``b_sorted`` (P, m), rows sorted. The quantile functions are step
    functions with jumps at i/n and j/m; integrate over the merged breakpoints exactly.
    With n == m this is the mean of squared differences of the sorted values.
    """
    n, m = a_sorted.shape[1], b_sorted.shape[1]
    if n == m:
        return np.mean((a_sorted - b_sorted) ** 2, axis=1)
    u = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid = 0.5 * (u[:-1] + u[1:])
    w = np.diff(u)
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return ((a_sorted[:, ia] - b_sorted[:, ib]) ** 2) @ w


def sliced_wasserstein(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance, sqrt(E_theta W2^2(theta.a, theta.b)) over ``n_proj`` random unit directions.

    Sample counts may differ (exact 1-D W2 between the empirical quantile functions).
    Directions come from ``numpy.random.default_rng(seed)``, so the value is deterministic.
    """
    a, b = _np(a), _np(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: {a.shape[1]} vs {b.shape[1]}")
    theta = np.random.default_rng(seed).standard_normal((n_proj, a.shape[1]))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    pa = np.sort(theta @ a.T, axis=1)  # (P, N_a)
    pb = np.sort(theta @ b.T, axis=1)  # (P, N_b)
    return float(np.sqrt(np.mean(_w2_squared_1d_sorted(pa, pb))))


def _kernel_sum(x: np.ndarray, y: np.ndarray, bandwidths, block: int = 2048) -> float:
    """sum_ij k(x_i, y_j) for k = sum_s exp(-|x - y|^2 / (2 s^2)), in blocks to bound memory."""
    inv = np.array([1.0 / (2.0 * s * s) for s in bandwidths])
    total = 0.0
    yy = np.sum(y * y, axis=1)
    for i in range(0, len(x), block):
        xb = x[i:i + block]
        d2 = np.maximum(np.sum(xb * xb, axis=1)[:, None] + yy[None, :] - 2.0 * xb @ y.T, 0.0)
        total += float(sum(np.exp(-d2 * c).sum() for c in inv))
    return total


_SELF_SUMS: dict[tuple, float] = {}


def _self_kernel_sum(y: np.ndarray, bandwidths) -> float:
    """``_kernel_sum(y, y)``, remembered per (points, bandwidths): the reference set's term is the same in every
    run against it and is the costly one (20k reference points: 4e8 kernel terms per bandwidth)."""
    key = (hashlib.sha1(np.ascontiguousarray(y).tobytes()).hexdigest(), y.shape, y.dtype.str, tuple(bandwidths))
    if key not in _SELF_SUMS:
        if len(_SELF_SUMS) > 32:
            _SELF_SUMS.clear()
        _SELF_SUMS[key] = _kernel_sum(y, y, bandwidths)
    return _SELF_SUMS[key]


def mmd_rbf(a, b, bandwidths=DEFAULT_BANDWIDTHS) -> float:
    """Unbiased estimate of MMD^2 (Gretton et al. 2012, Eq. 3) with a sum of RBF kernels.

    k(x, y) = sum_s exp(-|x - y|^2 / (2 s^2)) over ``bandwidths`` (data of roughly unit scale).
    The estimate is a U-statistic: it is ~0 (and may be slightly negative) for samples of the
    same distribution. Requires at least 2 points in each set.
    """
    x, y = _np(a), _np(b)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 points in each set")
    k = len(bandwidths)  # k(x, x) = number of kernels: remove the diagonal from the within-set sums
    kxx = (_kernel_sum(x, x, bandwidths) - n * k) / (n * (n - 1))
    kyy = (_self_kernel_sum(y, bandwidths) - m * k) / (m * (m - 1))
    kxy = _kernel_sum(x, y, bandwidths) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


def points_metrics(samples, reference, *, n_proj: int = 256, seed: int = 0,
                   bandwidths=DEFAULT_BANDWIDTHS) -> dict:
    """``{"sliced_wasserstein": ..., "mmd": ...}`` of samples against reference points."""
    return {
        "sliced_wasserstein": sliced_wasserstein(samples, reference, n_proj=n_proj, seed=seed),
        "mmd": mmd_rbf(samples, reference, bandwidths=bandwidths),
    }


def mode_weights(samples, centers) -> np.ndarray:
    """Fraction of samples nearest (Euclidean) to each center; shape (K,), sums to 1."""
    x, c = _np(samples), _np(centers)
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: samples {x.shape[1]} vs centers {c.shape[1]}")
    d2 = np.sum(x * x, axis=1)[:, None] + np.sum(c * c, axis=1)[None, :] - 2.0 * x @ c.T
    counts = np.bincount(np.argmin(d2, axis=1), minlength=len(c))
    return counts / len(x)
