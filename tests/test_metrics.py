"""Metrics: FID/KID/PRC through torch-fidelity, the digits and Inception extractors, 2-D metrics.

Checks against independent computations: scipy's sqrtm for the Frechet distance,
torch-fidelity's own calculate_metrics for the registered extractor, a naive kernel sum for
MMD, and the replicated-points construction for the 1-D Wasserstein distance.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from bench_core.metrics import extractors, fidelity, twod
from bench_core.metrics.extractors import (
    DIGITS_NAME,
    DIGITS_WEIGHTS,
    ExtractorWeightsError,
    classify,
    digits_extractor,
    get_extractor,
    load_digits_uint8,
    sha256_file,
)
from bench_core.metrics.fidelity import fid_from_features, image_metrics, to_uint8


@pytest.fixture(scope="module")
def digits():
    return load_digits_uint8()


@pytest.fixture(scope="module")
def extractor():
    return get_extractor("digits")


def _split(images, n_a, seed=0):
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[perm[:n_a]], images[perm[n_a:]]


def _add_noise(images_u8, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (images_u8.float() + std * torch.randn(images_u8.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def _fid_scipy(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance, Heusel et al. 2017: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# --------------------------------------------------------------------------------------------
# Conventions and the digits extractor
# --------------------------------------------------------------------------------------------

def test_to_uint8():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_digits_weights_json_and_accuracy(digits):
    meta = json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(DIGITS_WEIGHTS)
    assert meta["heldout_accuracy"] >= 0.97
    assert meta["n_train"] + meta["n_test"] == 1797 and meta["feature_dim"] == 64
    images, labels = digits
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8 and int(images.max()) == 255
    logits = classify(images)
    assert logits.shape == (1797, 10)
    assert (logits.argmax(1) == labels).float().mean() >= 0.97


def test_extractor_identity_and_registration(extractor):
    import torch_fidelity.registry

    assert torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[DIGITS_NAME] is extractors.DigitsCNNFeatureExtractor
    assert extractor.identity == f"diffbench-digits-cnn@{sha256_file(DIGITS_WEIGHTS)[:12]}"
    assert extractor.feature_layer == "64"
    with pytest.raises(ValueError, match="channels"):
        extractor.features(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        extractor.features(torch.zeros(2, 1, 8, 8))


def test_digits_at_other_resolutions_and_channels(extractor):
    """Digits stored as 3 x 32 x 32 (data.py options) are brought back to 1 x 8 x 8 for the CNN."""
    from bench_core.data import load_digits

    native = load_digits(limit=300).reference_uint8()
    rgb = native.repeat(1, 3, 1, 1)
    assert torch.equal(extractor.features(rgb), extractor.features(native))
    big = load_digits(resolution=32, channels=3, limit=300)
    assert (classify(big.reference_uint8()).argmax(1) == big.labels).float().mean() > 0.9
    m = image_metrics(big.reference_uint8(), big.reference_uint8(), extractor=extractor,
                      reference_name="digits,resolution=32", kid_subsets=2)
    assert abs(m["fid"]) < 1e-6


def test_digits_checksum_verified(tmp_path):
    bad = tmp_path / "digits_cnn.pt"
    shutil.copy(DIGITS_WEIGHTS, bad)
    shutil.copy(DIGITS_WEIGHTS.with_suffix(".json"), tmp_path / "digits_cnn.json")
    digits_extractor(bad)  # an intact copy loads
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    loaders = (
        extractors.load_digits_cnn,
        digits_extractor,
        lambda p: classify(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), weights_path=p),
    )
    for load in loaders:
        with pytest.raises(ExtractorWeightsError, match="Checksum mismatch") as e:
            load(bad)
        assert "scripts/train_digits_extractor.py" in str(e.value)
    # A file whose checksum was recorded but that does not load is also a clear error.
    bad.write_bytes(b"not a torch file")
    (tmp_path / "digits_cnn.json").write_text(json.dumps({"sha256": sha256_file(bad)}))
    with pytest.raises(ExtractorWeightsError, match="(?s)could not be loaded.*train_digits_extractor"):
        extractors.load_digits_cnn(bad)
    with pytest.raises(ExtractorWeightsError, match="not found.*train_digits_extractor"):
        extractors.load_digits_cnn(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------
# FID / KID / precision-recall
# --------------------------------------------------------------------------------------------

def test_fid_matches_scipy_and_torch_fidelity(digits, extractor):
    a, b = _split(digits[0], 900)
    b = _add_noise(b, 20.0)
    f1, f2 = fidelity.compute_features(extractor, a), fidelity.compute_features(extractor, b)
    ref = _fid_scipy(f1.double().numpy(), f2.double().numpy())
    assert fid_from_features(f1, f2) == pytest.approx(ref, rel=1e-4)
    m = image_metrics(a, b, extractor=extractor, reference_name="digits-noisy-half", kid_subsets=5)
    assert m["fid"] == pytest.approx(ref, rel=1e-4)
    assert m["fid_extractor"] == extractor.identity and m["fid_reference"] == f"digits-noisy-half:{len(b)}"

    # torch-fidelity's own pipeline with the registered extractor (float32 statistics inside).
    import torch_fidelity

    class _Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    out = torch_fidelity.calculate_metrics(
        input1=_Images(a), input2=_Images(b), fid=True, feature_extractor=DIGITS_NAME, cuda=False,
        cache=False, verbose=False, save_cpu_ram=True, batch_size=512,
    )
    assert out["frechet_inception_distance"] == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("n1,n2", [(40, 120), (900, 600)])
def test_fid_trace_term_methods_agree(n1, n2):
    """Wide features: the symmetric trace term equals torch-fidelity's eigvals(S1 S2) and scipy's sqrtm."""
    g = torch.Generator().manual_seed(n1)
    d = 300
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    f1 = torch.randn(n1, d, generator=g, dtype=torch.float64) @ mix
    f2 = 1.2 * torch.randn(n2, d, generator=g, dtype=torch.float64) @ mix + 0.1
    ref = _fid_scipy(f1.numpy(), f2.numpy())
    assert fid_from_features(f1, f2, method="symmetric") == pytest.approx(ref, rel=1e-5)
    assert fid_from_features(f1, f2, method="torch-fidelity") == pytest.approx(ref, rel=1e-5)
    assert fid_from_features(f1, f2) == pytest.approx(ref, rel=1e-5)


def test_fid_self_zero_and_grows_with_noise(digits, extractor, tmp_path):
    images = digits[0]
    kw = dict(extractor=extractor, reference_name="digits", cache_dir=tmp_path, kid_subsets=3)
    same = image_metrics(images, images, **kw)
    assert abs(same["fid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    clean = image_metrics(images[:600], images, **kw)
    fids = [image_metrics(_add_noise(images[:600], s), images, **kw)["fid"] for s in (16.0, 48.0, 96.0)]
    assert clean["fid"] < fids[0] < fids[1] < fids[2]
    assert fids[2] > 5 * clean["fid"]


def test_kid_and_precision_recall_plausible(digits, extractor):
    a, b = _split(digits[0], 600)
    kw = dict(extractor=extractor, reference_name="digits-half", kid_subset_size=300, kid_subsets=20)
    same = image_metrics(b, b, **kw)
    near = image_metrics(a, b, **kw)
    far = image_metrics(_add_noise(a, 96.0), b, **kw)
    blank = image_metrics(torch.zeros_like(a), b, **{**kw, "kid_subsets": 2})
    for m in (same, near, far, blank):
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0 and m["kid_std"] >= 0.0
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert abs(near["kid"]) < 0.1 * far["kid"] and abs(same["kid"]) < 0.1 * far["kid"]
    assert near["precision"] > 0.8 and near["recall"] > 0.8
    # All-blank samples sit in one point: recall collapses (they cover almost none of the data).
    assert blank["recall"] < 0.1 and blank["kid"] > far["kid"]
    with pytest.raises(ValueError, match="kid_subset_size"):
        image_metrics(a[:50], b, extractor=extractor, reference_name="x", kid_subset_size=51)


def test_reference_cache_hit_and_keyed_by_count(digits, extractor, tmp_path, monkeypatch):
    images = digits[0]
    calls = []
    real = fidelity.compute_features

    def counting(ex, x):
        calls.append(len(x))
        return real(ex, x)

    monkeypatch.setattr(fidelity, "compute_features", counting)
    kw = dict(extractor=extractor, reference_name="digits", cache_dir=tmp_path, kid_subsets=5)
    samples = images[:200]
    first = image_metrics(samples, images, **kw)
    assert calls == [1797, 200]
    second = image_metrics(samples, images, **kw)
    assert calls == [1797, 200, 200]  # reference features came from the cache
    assert second == first
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # A different reference count is a different cache entry.
    third = image_metrics(samples, images[:1000], **kw)
    assert calls[-2:] == [1000, 200] and len(list(tmp_path.glob("*.npz"))) == 2
    assert third["fid_reference"] == "digits:1000" and third["fid"] != first["fid"]
    # A different extractor identity (checksum) is a different cache entry as well.
    other = extractors.Extractor(**{**extractor.__dict__, "identity": "diffbench-digits-cnn@000000000000"})
    image_metrics(samples, images, **{**kw, "extractor": other})
    assert calls[-2:] == [1797, 200] and len(list(tmp_path.glob("*.npz"))) == 3


# --------------------------------------------------------------------------------------------
# Inception path (random weights written by the test; nothing is downloaded)
# --------------------------------------------------------------------------------------------

# the random_inception_weights fixture (an Inception weights file written by the tests) is in conftest.py

@pytest.mark.filterwarnings("ignore:Inception weights")
def test_inception_path(random_inception_weights, monkeypatch):
    sha = sha256_file(random_inception_weights)
    monkeypatch.delenv(extractors.INCEPTION_ENV, raising=False)
    ex = get_extractor("cifar10", inception_weights=random_inception_weights)
    assert ex.identity == f"inception-v3-compat@{sha[:12]}" and ex.feature_layer == "2048"
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8)  # grayscale -> RGB inside
    reference = torch.randint(0, 256, (3, 3, 12, 12), generator=g, dtype=torch.uint8)  # any size: resized inside
    m = image_metrics(samples, reference, extractor=ex, reference_name="random", kid_subsets=2, prc_neighborhood=1)
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    assert sha[:12] in m["fid_extractor"] and m["fid_reference"] == "random:3"
    # The environment variable is the default for inception_weights, also for digits.
    seen = []
    monkeypatch.setattr(extractors, "inception_extractor", lambda path, **kw: seen.append(str(path)))
    monkeypatch.setenv(extractors.INCEPTION_ENV, str(random_inception_weights))
    get_extractor("digits")
    assert seen == [str(random_inception_weights)]


def test_inception_and_dataset_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(extractors.INCEPTION_ENV, raising=False)
    with pytest.raises(ExtractorWeightsError, match="not found.*pt_inception-2015-12-05"):
        get_extractor("cifar10", inception_weights=tmp_path / "nope.pth")
    with pytest.raises(ExtractorWeightsError, match="Inception weights"):
        get_extractor("cifar10")
    junk = tmp_path / "junk.pth"
    torch.save({"conv.weight": torch.zeros(1)}, junk)
    with pytest.raises(ExtractorWeightsError, match="InceptionV3"):
        get_extractor("cifar10", inception_weights=junk)


# --------------------------------------------------------------------------------------------
# 2-D metrics
# --------------------------------------------------------------------------------------------

def _mixture(n, seed, drop_mode=False):
    rng = np.random.default_rng(seed)
    centers = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    k = rng.integers(0, 3 if drop_mode else 4, size=n)
    return centers[k] + 0.3 * rng.standard_normal((n, 2)), centers


def test_sliced_wasserstein_exact_in_1d():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(5), rng.standard_normal(3) + 1.0
    # Independent: replicate each point so both sets have 15 equally weighted points.
    ra, rb = np.sort(np.repeat(a, 3)), np.sort(np.repeat(b, 5))
    w2 = np.sqrt(np.mean((ra - rb) ** 2))
    assert twod.sliced_wasserstein(a[:, None], b[:, None], n_proj=8) == pytest.approx(w2, rel=1e-12)
    assert twod.sliced_wasserstein(a[:, None], a[::-1, None]) == pytest.approx(0.0, abs=1e-12)


def test_mmd_matches_naive_sum():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((7, 2)), rng.standard_normal((5, 2)) + 0.5
    bw = (0.5, 1.0)

    def k(p, q):
        d2 = np.sum((p[:, None] - q[None]) ** 2, axis=-1)
        return sum(np.exp(-d2 / (2 * s * s)) for s in bw)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    ref = ((kxx.sum() - np.trace(kxx)) / 42 + (kyy.sum() - np.trace(kyy)) / 20 - 2 * kxy.mean())
    assert twod.mmd_rbf(x, y, bandwidths=bw) == pytest.approx(ref, rel=1e-10)


def test_points_metrics_detect_dropped_mode():
    ref, centers = _mixture(2000, 0)
    same, _ = _mixture(2000, 1)
    dropped, _ = _mixture(2000, 2, drop_mode=True)
    m_same = twod.points_metrics(torch.from_numpy(same), ref)
    m_drop = twod.points_metrics(dropped, ref)
    # Same distribution: only sampling noise (mode masses differ by ~2%, W2 is sensitive to that).
    assert m_same["sliced_wasserstein"] < 0.25 and abs(m_same["mmd"]) < 0.01
    assert m_drop["sliced_wasserstein"] > 4 * m_same["sliced_wasserstein"]
    assert m_drop["mmd"] > 20 * max(abs(m_same["mmd"]), 1e-3)
    w = twod.mode_weights(dropped, centers)
    assert w.shape == (4,) and w.sum() == pytest.approx(1.0) and w[3] == 0.0
    assert np.allclose(w[:3], 1 / 3, atol=0.05)
    assert np.allclose(twod.mode_weights(ref, centers), 0.25, atol=0.04)


@pytest.mark.parametrize("full_max", [fidelity.KID_FULL_KERNEL_MAX, 10])  # full kernel matrices / per subset
@pytest.mark.parametrize("n_gen,n_ref,dim,size", [(500, 900, 64, 500), (120, 80, 2048, 50), (40, 60, 3, 2)])
def test_kid_equals_torch_fidelity(monkeypatch, full_max, n_gen, n_ref, dim, size):
    """Our KID (kernel matrices of all features once, subsets read off them) against torch-fidelity's own
    per-subset loop, the same subsets (same seed): mean and std to 1e-12."""
    from torch_fidelity import metric_kid

    monkeypatch.setattr(fidelity, "KID_FULL_KERNEL_MAX", full_max)
    g = torch.Generator().manual_seed(n_gen + dim)
    a = torch.randn(n_gen, dim, generator=g, dtype=torch.float64)
    b = 1.2 * torch.randn(n_ref, dim, generator=g, dtype=torch.float64) + 0.3
    ref = metric_kid.kid_features_to_metric(a, b, kid_subsets=30, kid_subset_size=size, rng_seed=11, verbose=False)
    mean, std = fidelity.kid_from_features(a, b, subsets=30, subset_size=size, seed=11)
    assert mean == pytest.approx(ref[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-12, abs=1e-14)
    assert std == pytest.approx(ref[metric_kid.KEY_METRIC_KID_STD], rel=1e-9, abs=1e-14)
    assert mean > 0  # the two sets differ: a positive MMD^2 on average
    with pytest.raises(ValueError, match="subset size"):
        fidelity.kid_from_features(a, b, subsets=3, subset_size=min(n_gen, n_ref) + 1)


def test_reference_side_memo_equals_torch_fidelity():
    """KID and precision/recall keep the reference's side (KID's reference kernel sums, the real k-NN radii) from
    one call to the next: a second and a third generated set against the same reference still equal
    torch-fidelity's own computation of each pair, and another reference is not served the first one's."""
    from torch_fidelity import metric_kid, metric_prc

    g = torch.Generator().manual_seed(5)
    refs = [torch.randn(300, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    fidelity._REF_MEMO.clear()
    for ref in (refs[0], refs[0], refs[1], refs[0]):
        gen = 0.8 * torch.randn(120, 16, generator=g, dtype=torch.float64) + 0.2
        want = metric_prc.prc_features_to_metric(gen, ref, prc_neighborhood=3, save_cpu_ram=False, verbose=False)
        p, r = fidelity.precision_recall(gen, ref, 3)
        assert p == want[metric_prc.KEY_METRIC_PRECISION] and r == want[metric_prc.KEY_METRIC_RECALL]
        kid = metric_kid.kid_features_to_metric(gen, ref, kid_subsets=20, kid_subset_size=100, rng_seed=3,
                                                verbose=False)
        mean, _ = fidelity.kid_from_features(gen, ref, subsets=20, subset_size=100, seed=3)
        assert mean == pytest.approx(kid[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-12, abs=1e-14)
    assert 0 < p < 1 and 0 < r < 1  # neither side's balls hold everything: the comparison decides
    assert len(fidelity._REF_MEMO) == 4  # radii and KID sums, per reference
