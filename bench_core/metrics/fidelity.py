"""FID, KID and precision/recall of image samples against a reference set, via torch-fidelity.

Features come from a registered torch-fidelity extractor (``extractors.get_extractor``); the
metrics themselves are torch-fidelity's functions applied to those features:

- FID: ``metric_fid.fid_features_to_statistics`` + ``fid_statistics_to_metric`` (Heusel et al. 2017),
  features in float64. For wide features (Inception's 2048) the trace term uses symmetric
  eigenproblems instead of torch-fidelity's general eigendecomposition (same value, ~20x faster).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, mean and std over
  ``kid_subsets`` random subsets: torch-fidelity's estimator with its subsets (the same RandomState
  draws), computed by :func:`kid_from_features` from the kernel matrices of all features once instead
  of three kernel matrices per subset (~10x faster at n = 500; equal to ``metric_kid`` to 1e-12,
  tests/test_metrics*.py).
- Precision/recall: ``metric_prc.prc_features_to_metric`` (Kynkaanniemi et al. 2019), k-NN balls.

Reference features are cached on disk (npz), keyed by the extractor identity (which includes the
weights' checksum), the reference name, the reference count and a hash of the reference images.
The file is written whole or not at all (``bench_core.atomic``); one that is unreadable or garbage is
recomputed with a warning (it is a cache), a folder in its place is a clear error.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch_fidelity import metric_fid, metric_prc

from bench_core.atomic import atomic_path
from bench_core.data import to_uint8  # noqa: F401  - re-exported: model space [-1, 1] -> uint8

from .extractors import Extractor

KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000
KID_FULL_KERNEL_MAX = 5000  # up to this many features a side, KID uses the full kernel matrices (200 MB at 5000)
RNG_SEED = 2020  # torch-fidelity's default rng_seed for the KID subsets
FID_TORCH_FIDELITY_MAX_DIM = 512  # above this, the symmetric trace term (see fid_from_features)


def compute_features(extractor: Extractor, images_u8: torch.Tensor) -> torch.Tensor:
    """float32 features (N, D) of uint8 images (N, C, H, W); batched, inference mode."""
    return extractor.features(images_u8)


def _as_tensor64(f) -> torch.Tensor:
    t = f if torch.is_tensor(f) else torch.from_numpy(np.asarray(f))
    if t.dim() != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(t.shape)}")
    return t.detach().cpu().to(torch.float64)


def _trace_sqrt_product_symmetric(f1: torch.Tensor, f2: torch.Tensor, sigma1: np.ndarray,
                                  sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) from symmetric eigenproblems only.

    With S1 = L1 L1^T, the eigenvalues of S1 S2 equal those of the symmetric PSD L1^T S2 L1. L1 is
    the centred features / sqrt(N1 - 1) (N1 x D -> rank <= N1, cheap) when N1 <= D, else
    V diag(sqrt(lambda)) from eigh(S1). Same number as torch-fidelity's general eigvals(S1 S2).
    """
    if len(f2) < len(f1):  # tr sqrt(S1 S2) = tr sqrt(S2 S1): factor the smaller set
        f1, f2, sigma1, sigma2 = f2, f1, sigma2, sigma1
    n1, d = f1.shape
    if n1 <= d:
        a1 = f1.numpy()
        l1 = (a1 - a1.mean(0)).T / np.sqrt(n1 - 1)
    else:
        lam, v = np.linalg.eigh(sigma1)
        l1 = v * np.sqrt(np.clip(lam, 0.0, None))
    m = l1.T @ sigma2 @ l1
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))


def fid_from_features(f1, f2, method: str = "auto") -> float:
    """Frechet distance (Heusel et al. 2017) between Gaussians fitted to feature sets (N1, D), (N2, D).

    Statistics come from torch-fidelity (``fid_features_to_statistics``, float64). The trace term
    tr((S1 S2)^(1/2)): ``"torch-fidelity"`` uses its ``fid_statistics_to_metric`` (a general
    eigendecomposition of S1 S2: ~20 s on 2 CPU cores at D=2048); ``"symmetric"`` uses
    symmetric eigenproblems (same value, a second or less). ``"auto"``: torch-fidelity up to D=512.
    """
    t1, t2 = _as_tensor64(f1), _as_tensor64(f2)
    if t1.shape[1] != t2.shape[1]:
        raise ValueError(f"feature dimensions differ: {t1.shape[1]} vs {t2.shape[1]}")
    if min(len(t1), len(t2)) < 2:
        raise ValueError("FID needs at least 2 feature vectors on each side")
    if method == "auto":
        method = "torch-fidelity" if t1.shape[1] <= FID_TORCH_FIDELITY_MAX_DIM else "symmetric"
    s1 = metric_fid.fid_features_to_statistics(t1)
    s2 = metric_fid.fid_features_to_statistics(t2)
    if method == "torch-fidelity":
        return float(metric_fid.fid_statistics_to_metric(s1, s2, False)[metric_fid.KEY_METRIC_FID])
    if method != "symmetric":
        raise ValueError(f"unknown FID method {method!r}")
    diff = s1["mu"] - s2["mu"]
    tr_covmean = _trace_sqrt_product_symmetric(t1, t2, s1["sigma"], s2["sigma"])
    return float(diff @ diff + np.trace(s1["sigma"]) + np.trace(s2["sigma"]) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------
# Reference-feature cache
# --------------------------------------------------------------------------------------------

def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def images_digest(images_u8: torch.Tensor) -> str:
    """sha256 of the images' shape and bytes."""
    x = images_u8.detach().cpu().contiguous()
    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


def reference_cache_path(cache_dir: str | os.PathLike, extractor: Extractor, reference_name: str,
                         count: int, digest: str) -> Path:
    """Cache file for reference features: one per (extractor identity, layer, name, count, content)."""
    return Path(cache_dir) / (
        f"ref-{_slug(reference_name)}-n{count}-{_slug(extractor.identity)}-{extractor.feature_layer}-{digest[:16]}.npz"
    )


def reference_features(reference_u8: torch.Tensor, *, extractor: Extractor, reference_name: str,
                       cache_dir: str | os.PathLike | None) -> torch.Tensor:
    """Features of the reference images, loaded from / stored to ``cache_dir`` when given."""
    if cache_dir is None:
        return compute_features(extractor, reference_u8)
    count = int(reference_u8.shape[0])
    digest = images_digest(reference_u8)
    path = reference_cache_path(cache_dir, extractor, reference_name, count, digest)
    if path.exists() and not path.is_file():
        raise ReferenceCacheError(f"reference-statistics cache entry {path} is a folder (or special file), not a "
                                  f"file; remove it and run again: rm -r '{path}'")
    if path.is_file():
        cached = _read_reference_cache(path, extractor, reference_name, count, digest)
        if cached is not None:
            return cached
    feats = compute_features(extractor, reference_u8)
    with atomic_path(path, what="reference statistics",
                     hint="free space in the cache folder (--cache-dir or $DIFFBENCH_CACHE) and run again") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=feats.numpy(), identity=extractor.identity, reference_name=reference_name,
                     count=count, digest=digest, feature_layer=extractor.feature_layer)
    return feats


class ReferenceCacheError(RuntimeError):
    """A reference-statistics cache entry that cannot be replaced (a folder in its place)."""


def _read_reference_cache(path: Path, extractor: Extractor, reference_name: str, count: int,
                          digest: str) -> torch.Tensor | None:
    """The cached features, or None (with a warning) when the file is unreadable, garbage or another
    reference's: it is a cache, so it is recomputed and overwritten."""
    try:
        with np.load(path, allow_pickle=False) as z:
            same = (str(z["identity"]) == extractor.identity and str(z["reference_name"]) == reference_name
                    and int(z["count"]) == count and str(z["digest"]) == digest
                    and str(z["feature_layer"]) == extractor.feature_layer)
            feats = z["features"] if same else None
            if feats is not None and not (feats.ndim == 2 and feats.shape[0] == count
                                          and np.issubdtype(feats.dtype, np.floating)):
                raise ValueError(f"features of shape {feats.shape} and dtype {feats.dtype}, expected ({count}, D) floats")
    except Exception as e:  # noqa: BLE001 - garbage in a cache file: zip, pickle, key, shape errors alike
        warnings.warn(f"reference-statistics cache {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                      "recomputing and overwriting it")
        return None
    if feats is None:
        warnings.warn(f"reference-statistics cache {path} holds another reference's features; recomputing it")
        return None
    return torch.from_numpy(np.array(feats))


# --------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------

FLOOR_SUBSETS = 20


def real_data_floor(reference_u8: torch.Tensor, n: int, *, extractor: Extractor, reference_name: str,
                    cache_dir: str | os.PathLike | None = None, subsets: int = FLOOR_SUBSETS, seed: int = 0) -> dict:
    """The FID that real data itself scores at sample size ``n``: the FID of ``subsets`` random subsets of ``n``
    reference images (drawn without replacement, one ``randperm`` each from ``seed``) against the whole
    reference, summarised over the subsets.  A single subset is one draw (it moves by about one standard
    deviation); claims compare against the mean and its spread.

    Returns ``mean, sd, n_subsets, n, values`` (the per-subset FIDs)."""
    n_r = int(reference_u8.shape[0])
    if not 2 <= n <= n_r:
        raise ValueError(f"the floor needs 2 <= n <= {n_r} reference images, got n={n}")
    if subsets < 2:
        raise ValueError(f"the floor needs at least 2 subsets for a spread, got {subsets}")
    f_ref = _as_tensor64(reference_features(reference_u8, extractor=extractor, reference_name=reference_name,
                                            cache_dir=cache_dir))
    g = torch.Generator().manual_seed(int(seed))
    values = [fid_from_features(f_ref[torch.randperm(n_r, generator=g)[:n]], f_ref) for _ in range(int(subsets))]
    mean = float(np.mean(values))
    return {"mean": mean, "sd": float(np.std(values, ddof=1)), "n_subsets": int(subsets), "n": int(n),
            "values": [float(v) for v in values]}


def kid_from_features(f_gen: torch.Tensor, f_ref: torch.Tensor, *, subsets: int = KID_SUBSETS,
                      subset_size: int, seed: int = RNG_SEED, degree: int = 3, coef0: float = 1.0) -> tuple[float, float]:
    """KID's mean and std over ``subsets`` random subsets of ``subset_size`` from each side: torch-fidelity's
    ``kid_features_to_metric`` (polynomial kernel ``(x.y / d + coef0) ** degree``, unbiased MMD^2, subsets drawn
    by ``np.random.RandomState(seed).choice(n, size, replace=False)``, generated then reference, per subset).

    Each subset's sums are read off the kernel matrices of all features, computed once: for a subset given by
    its 0/1 indicator vector ``s`` (the indices are distinct), the sum of the kernel over the subset's pairs is
    ``s^T K s``, so all subsets' sums are two matrix products with the stacked indicators."""
    x, y = f_gen.double().cpu().numpy(), f_ref.double().cpu().numpy()
    n_x, n_y, d = x.shape[0], y.shape[0], x.shape[1]
    m = int(subset_size)
    if not 2 <= m <= min(n_x, n_y):
        raise ValueError(f"KID subset size must be in [2, {min(n_x, n_y)}], got {m}")
    rng = np.random.RandomState(seed)
    s_x, s_y = np.zeros((subsets, n_x)), np.zeros((subsets, n_y))
    for i in range(subsets):  # the draws in torch-fidelity's order: generated, then reference
        s_x[i, rng.choice(n_x, m, replace=False)] = 1.0
        s_y[i, rng.choice(n_y, m, replace=False)] = 1.0

    def kernel(a, b):
        return (a @ b.T / d + coef0) ** degree

    def pair_sums(s_a, k, s_b):  # s_a[i]^T k s_b[i] for every subset i
        return np.einsum("si,ij,sj->s", s_a, k, s_b, optimize=True)

    if max(n_x, n_y) <= KID_FULL_KERNEL_MAX:
        k_xx, k_xy = kernel(x, x), kernel(x, y)
        sum_xx = pair_sums(s_x, k_xx, s_x) - s_x @ np.diagonal(k_xx)
        # the reference side depends only on the reference and the subsets (which depend on n_x, m, the seed and
        # the count): a suite measures every run against the same reference, so it is computed once
        key = ("kid_yy", _digest(y), n_x, m, int(seed), int(subsets), degree, float(coef0))

        def ref_sums():
            k_yy = kernel(y, y)
            return pair_sums(s_y, k_yy, s_y) - s_y @ np.diagonal(k_yy)
        sum_yy = _ref_memo(key, ref_sums)
        sum_xy = pair_sums(s_x, k_xy, s_y)
    else:  # a large reference (e.g. 50,000 CIFAR-10 images): the subsets' kernel matrices one at a time
        sum_xx, sum_yy, sum_xy = (np.empty(subsets) for _ in range(3))
        for i in range(subsets):
            a, b = x[s_x[i] > 0], y[s_y[i] > 0]
            k_aa, k_bb = kernel(a, a), kernel(b, b)
            sum_xx[i] = k_aa.sum() - np.trace(k_aa)
            sum_yy[i] = k_bb.sum() - np.trace(k_bb)
            sum_xy[i] = kernel(a, b).sum()
    mmd2 = (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * sum_xy / (m * m)
    return float(np.mean(mmd2)), float(np.std(mmd2))


_REF_MEMO: dict = {}
_REF_MEMO_MAX = 16


def _digest(a) -> str:
    """A content key for a feature array (the reference's features: the same bytes give the same key)."""
    a = np.ascontiguousarray(a.numpy() if torch.is_tensor(a) else a)
    return hashlib.sha1(a.view(np.uint8).reshape(-1)).hexdigest() + str(a.shape) + str(a.dtype)


def _ref_memo(key: tuple, compute):
    """The reference-side parts of KID and precision/recall, computed once per reference and settings (at most
    _REF_MEMO_MAX kept)."""
    if key not in _REF_MEMO:
        if len(_REF_MEMO) >= _REF_MEMO_MAX:
            _REF_MEMO.pop(next(iter(_REF_MEMO)))
        _REF_MEMO[key] = compute()
    return _REF_MEMO[key]


def precision_recall(f_gen: torch.Tensor, f_ref: torch.Tensor, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as torch-fidelity's
    ``metric_prc.prc_features_to_metric`` computes them (features_1 generated, features_2 real; the same distance
    calls, so the same values), with the reference's k-NN radii computed once per reference.  Above 50M distance
    pairs it is torch-fidelity's own memory-saving path."""
    n_s, n_r = f_gen.shape[0], f_ref.shape[0]
    if n_s * n_r > 50_000_000 or n_r * n_r > 50_000_000:
        prc = metric_prc.prc_features_to_metric(f_gen, f_ref, prc_neighborhood=neighborhood, save_cpu_ram=True,
                                                verbose=False)
        return float(prc[metric_prc.KEY_METRIC_PRECISION]), float(prc[metric_prc.KEY_METRIC_RECALL])
    cdist = metric_prc.calc_cdist_full
    nn_gen = cdist(f_gen, f_gen).kthvalue(neighborhood + 1).values
    nn_ref = _ref_memo(("prc_radii", _digest(f_ref), int(neighborhood)),
                       lambda: cdist(f_ref, f_ref).kthvalue(neighborhood + 1).values)
    d_ref_gen = cdist(f_ref, f_gen)
    recall = (d_ref_gen <= nn_gen).any(dim=1).float().mean().item()        # real inside a generated ball
    precision = (d_ref_gen.T <= nn_ref).any(dim=1).float().mean().item()   # generated inside a real ball
    return float(precision), float(recall)


def image_metrics(samples_u8: torch.Tensor, reference_u8: torch.Tensor, *, extractor: Extractor,
                  reference_name: str, cache_dir: str | os.PathLike | None = None,
                  kid_subset_size: int | None = None, kid_subsets: int = KID_SUBSETS,
                  prc_neighborhood: int = 3, seed: int = RNG_SEED) -> dict:
    """FID, KID (mean, std) and precision/recall of ``samples_u8`` against ``reference_u8``.

    Both are uint8 (N, C, H, W). KID uses subsets of ``kid_subset_size`` (default
    ``min(1000, N_samples, N_reference)``) drawn with ``seed``. Returns ``fid, kid, kid_std,
    precision, recall, fid_extractor`` (identity with checksum) and ``fid_reference``
    (``"<reference_name>:<N_reference>"``).
    """
    n_s, n_r = int(samples_u8.shape[0]), int(reference_u8.shape[0])
    n_min = min(n_s, n_r)
    if n_min < 2:
        raise ValueError(f"need at least 2 samples and 2 reference images, got {n_s} and {n_r}")
    if kid_subset_size is None:
        kid_subset_size = min(KID_MAX_SUBSET_SIZE, n_min)
    if not 2 <= kid_subset_size <= n_min:
        raise ValueError(f"kid_subset_size must be in [2, min(N samples, N reference) = {n_min}], got {kid_subset_size}")
    if not 1 <= prc_neighborhood < n_min:
        raise ValueError(f"prc_neighborhood must be in [1, {n_min - 1}] for {n_s} samples and {n_r} references")

    f_ref = reference_features(reference_u8, extractor=extractor, reference_name=reference_name, cache_dir=cache_dir)
    f_gen = compute_features(extractor, samples_u8)
    f_gen64, f_ref64 = _as_tensor64(f_gen), _as_tensor64(f_ref)

    fid = fid_from_features(f_gen64, f_ref64)
    kid_mean, kid_std = kid_from_features(f_gen64, f_ref64, subsets=kid_subsets, subset_size=kid_subset_size,
                                          seed=seed)
    precision, recall = precision_recall(f_gen64, f_ref64, prc_neighborhood)
    return {
        "fid": fid,
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "fid_extractor": extractor.identity,
        "fid_reference": f"{reference_name}:{n_r}",
    }
