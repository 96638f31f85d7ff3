"""Datasets: embedded loaders against their sources, user folders, the CIFAR-10 and MNIST readers
on files the tests write, and the errors for missing files."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from bench_core.data import (DATASETS, GMM_PRESETS, Dataset, DatasetError, DatasetNotFound, dataset_errors,
                             from_uint8, load_dataset, read_idx)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------
def test_digits_shape_range_labels():
    d = load_dataset("digits")
    assert isinstance(d, Dataset) and d.kind == "image" and d.name == "digits"
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == torch.float32
    assert d.x.min() == -1.0 and d.x.max() == 1.0
    assert d.labels.dtype == torch.long and d.labels.shape == (1797,)
    assert d.num_classes == 10 and set(d.labels.tolist()) == set(range(10))
    assert d.sample_shape == (1, 8, 8) and len(d) == 1797


def test_digits_uint8_round_trip_matches_sklearn():
    from sklearn.datasets import load_digits

    sk = load_digits()
    expected = np.round(sk.images * 255.0 / 16.0).astype(np.uint8)  # values 0..16 -> 0..255
    u8 = load_dataset("digits").reference_uint8()
    assert u8.dtype == torch.uint8 and u8.shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal(u8[:, 0].numpy(), expected)
    np.testing.assert_array_equal(load_dataset("digits").labels.numpy(), sk.target)


def test_digits_resolution_32_is_bilinear_on_the_uint8_grid():
    d8, d32 = load_dataset("digits"), load_dataset("digits", resolution=32)
    assert d32.x.shape == (1797, 1, 32, 32)
    # x is exactly on the 8-bit grid, so the reference round-trips bit-for-bit
    assert torch.equal(from_uint8(d32.reference_uint8()), d32.x)
    # bilinear (align_corners=False) x4: output pixel (4i+1.5, 4j+1.5) centres sit on input pixel i, j
    # for interior pixels: pixel 4i+1 has source coordinate i - 1/8, pixel 4i+2 has i + 1/8.
    u8 = d8.reference_uint8().float()[:, 0]
    u32 = d32.reference_uint8().float()[:, 0]
    i, j = 3, 4
    src_r, src_c = i - 0.125, j - 0.125  # output pixel (4i+1, 4j+1)
    r0, c0 = int(np.floor(src_r)), int(np.floor(src_c))
    wr, wc = src_r - r0, src_c - c0
    by_hand = ((1 - wr) * (1 - wc) * u8[:, r0, c0] + (1 - wr) * wc * u8[:, r0, c0 + 1]
               + wr * (1 - wc) * u8[:, r0 + 1, c0] + wr * wc * u8[:, r0 + 1, c0 + 1])
    assert torch.allclose(u32[:, 4 * i + 1, 4 * j + 1], by_hand.round(), atol=1)
    assert load_dataset("digits", resolution=32, channels=3).x.shape == (1797, 3, 32, 32)
    assert load_dataset("digits", limit=10).x.shape[0] == 10


# --------------------------------------------------------------------------------------------
# 2-D toys
# --------------------------------------------------------------------------------------------
def test_swiss_roll_shape_range_and_seed():
    s = load_dataset("swiss_roll")
    assert s.kind == "points" and s.x.shape == (10_000, 2) and s.x.dtype == torch.float32
    assert s.labels is None and s.x.abs().max() < 2.0 and s.x.abs().max() > 1.0
    assert torch.equal(s.x, load_dataset("swiss_roll").x)
    assert not torch.equal(s.x, load_dataset("swiss_roll", seed=1).x)
    assert load_dataset("swiss_roll", n=500).x.shape == (500, 2)
    with pytest.raises(TypeError):
        s.reference_uint8()


def test_gmm2d_ring8_oracle():
    g = load_dataset("gmm2d", preset="ring8")
    assert g.kind == "points" and g.x.shape == (10_000, 2) and g.num_classes == 8
    assert torch.allclose(g.oracle.weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    radii = g.oracle.means.norm(dim=1)
    assert torch.allclose(radii, torch.full((8,), 2.0, dtype=torch.float64))
    # every sample is near its labelled component's mean
    d = (g.x.double() - g.oracle.means[g.labels]).norm(dim=1)
    assert d.max() < 10 * GMM_PRESETS["ring8"]["stds"][0] * 2


def test_gmm2d_ncsn_toy_weights_and_samples():
    g = load_dataset("gmm2d", preset="ncsn_toy", n=20_000)
    assert torch.allclose(g.oracle.weights, torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert torch.allclose(g.oracle.means, torch.tensor([[5.0, 5.0], [-5.0, -5.0]], dtype=torch.float64))
    assert torch.allclose(g.oracle.stds, torch.ones(2, dtype=torch.float64))
    # E[x] = 0.8 * 5 + 0.2 * (-5) = 3 per coordinate; std of the mean ~ 4/sqrt(20000) = 0.03
    assert torch.allclose(g.x.mean(0), torch.tensor([3.0, 3.0]), atol=0.15)
    assert abs(g.labels.float().mean().item() - 0.2) < 0.02
    # the oracle is the exact denoiser: at a tiny sigma it returns (almost) its input
    x = g.x[:100]
    assert torch.allclose(g.oracle(x, torch.tensor(1e-4)), x, atol=1e-3)


def test_gmm2d_custom_and_unknown_preset():
    g = load_dataset("gmm2d", means=[[0.0, 0.0], [3.0, 0.0]], stds=[0.1, 0.1], n=100)
    assert g.oracle.weights.tolist() == [0.5, 0.5] and g.info["preset"] == "custom"
    with pytest.raises(DatasetError, match="ring8"):
        load_dataset("gmm2d", preset="nope")


# --------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------
def _write_png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)


def test_folder_loader(tmp_path):
    colours = [(255, 0, 0), (0, 128, 255), (10, 20, 30)]
    for k, c in enumerate(colours):
        a = np.zeros((40, 60, 3), np.uint8)  # non-square: centre crop to 40x40
        a[:, :] = c
        a[:, :10] = 255  # left strip is cropped away (crop keeps columns 10..49)
        _write_png(tmp_path / f"img{k}.png", a)
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_dataset("folder", root=tmp_path, resolution=16)
    assert d.x.shape == (3, 3, 16, 16) and d.labels is None and d.kind == "image"
    u8 = d.reference_uint8()
    for k, c in enumerate(colours):
        assert (u8[k].reshape(3, -1).T == torch.tensor(c, dtype=torch.uint8)).all()
    g = load_dataset("folder", root=tmp_path, resolution=8, channels=1)
    assert g.x.shape == (3, 1, 8, 8)
    # ITU-R 601 luma of pure red: 0.299 * 255 = 76.2 -> 76
    assert g.reference_uint8()[0].unique().tolist() == [76]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFound, match="no .png/.jpg images"):
        load_dataset("folder", root=tmp_path)
    with pytest.raises(DatasetNotFound, match="not a folder"):
        load_dataset("folder", root=tmp_path / "missing")
    with pytest.raises(DatasetNotFound, match="needs root"):
        load_dataset("folder")


# --------------------------------------------------------------------------------------------
# CIFAR-10: a tiny CIFAR-format folder written here
# --------------------------------------------------------------------------------------------
def _cifar_images(n, offset):
    """n images whose R, G, B planes are constant offset+i, 100+i, 200 - i, with pixel (0,0) of R = 7."""
    data = np.zeros((n, 3072), np.uint8)
    for i in range(n):
        data[i, :1024] = offset + i
        data[i, 1024:2048] = 100 + i
        data[i, 2048:] = 200 - i
        data[i, 0] = 7
    return data


def _write_tiny_cifar(root, per_batch=3, protocol=pickle.DEFAULT_PROTOCOL, train=True, test=True, meta=True):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    files = ([f"data_batch_{b}" for b in range(1, 6)] if train else []) + (["test_batch"] if test else [])
    for b, name in enumerate(files):
        d = {b"batch_label": name.encode(), b"labels": [(b + i) % 10 for i in range(per_batch)],
             b"data": _cifar_images(per_batch, 10 * b), b"filenames": [b"x.png"] * per_batch}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
    if meta:
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f,
                        protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar10_reader_on_test_written_files(tmp_path, protocol):
    _write_tiny_cifar(tmp_path, protocol=protocol)
    d = load_dataset("cifar10", root=tmp_path)
    assert d.x.shape == (15, 3, 32, 32) and d.num_classes == 10 and d.kind == "image"
    assert d.class_names[0] == "airplane" and d.class_names[9] == "truck"
    assert d.labels.tolist()[:3] == [0, 1, 2] and d.labels.tolist()[3:6] == [1, 2, 3]
    u8 = d.reference_uint8()
    # batch 2 (index 1), image 2: planes R=10+2, G=100+2, B=200-2, R(0,0)=7
    img = u8[3 + 2]
    assert img[0, 0, 0] == 7 and img[0, 0, 1] == 12 and (img[1] == 102).all() and (img[2] == 198).all()
    assert d.info["official"] is False  # our files are not the official release
    t = load_dataset("cifar10", root=tmp_path, split="test")
    assert t.x.shape == (3, 3, 32, 32)
    with pytest.raises(DatasetError, match="differ from the official"):
        load_dataset("cifar10", root=tmp_path, verify=True)


def test_torchvision_cifar10_rejects_files_that_are_not_the_official_release(tmp_path):
    """Why we read CIFAR-10 ourselves: torchvision checks every file's md5 against the official one."""
    torchvision = pytest.importorskip("torchvision")
    _write_tiny_cifar(tmp_path)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)


def test_cifar10_only_the_split_needed_and_meta_optional(tmp_path):
    _write_tiny_cifar(tmp_path, train=False, meta=False)
    t = load_dataset("cifar10", root=tmp_path, split="test")
    assert t.x.shape == (3, 3, 32, 32) and t.class_names[0] == "airplane"
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("cifar10", root=tmp_path, split="train")
    assert "data_batch_1" in str(e.value)


def test_cifar10_refuses_pickled_code(tmp_path):
    folder = _write_tiny_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_missing_files_error_says_what_to_get(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBENCH_DATA", str(tmp_path / "default_root"))
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("cifar10")  # default root from $DIFFBENCH_DATA
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for needed in ("cifar-10-batches-py", "data_batch_1", "data_batch_5", "test_batch", "batches.meta",
                   "cifar-10-python.tar.gz", str(tmp_path / "default_root"), "DIFFBENCH_DATA"):
        assert needed in msg, needed
    # a tarball sitting in root: the message says it only needs extracting
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetNotFound, match="only needs extracting"):
        load_dataset("cifar10", root=tmp_path / "r")


# --------------------------------------------------------------------------------------------
# MNIST: idx files written here
# --------------------------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_mnist_reader_and_pad(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.arange(5 * 28 * 28, dtype=np.int64).reshape(5, 28, 28).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (raw / "train-images-idx3-ubyte").write_bytes(_idx_bytes(imgs))
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as f:  # .gz accepted too
        f.write(_idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(raw / "train-images-idx3-ubyte"), imgs)
    d = load_dataset("mnist", root=tmp_path)
    assert d.x.shape == (5, 1, 28, 28) and d.labels.tolist() == [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(d.reference_uint8()[:, 0].numpy(), imgs)
    p = load_dataset("mnist", root=tmp_path, resolution=32, mode="pad")
    assert p.x.shape == (5, 1, 32, 32)
    assert (p.x[:, :, :2] == -1).all() and (p.x[:, :, :, -2:] == -1).all()
    np.testing.assert_array_equal(p.reference_uint8()[:, 0, 2:30, 2:30].numpy(), imgs)
    assert load_dataset("mnist", root=tmp_path, resolution=32).x.shape == (5, 1, 32, 32)
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("mnist", root=tmp_path, split="test")
    for needed in ("MNIST/raw", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte"):
        assert needed in str(e.value), needed


def test_mnist_truncated_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10])
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_unknown_name_and_options():
    with pytest.raises(DatasetError) as e:
        load_dataset("imagenet")
    for name in ("digits", "swiss_roll", "gmm2d", "folder", "cifar10", "mnist"):
        assert name in str(e.value)
    with pytest.raises(DatasetError, match="resolution"):
        load_dataset("digits", resoluton=32)
    with pytest.raises(DatasetError, match="takes no root"):
        load_dataset("digits", root="/tmp")
    assert set(DATASETS) == {"digits", "swiss_roll", "gmm2d", "folder", "cifar10", "mnist"}
    assert dataset_errors("digits", {"resolution": 32}) == []
    assert dataset_errors("cifar10", {"root": "/data", "split": "test"}) == []
    assert dataset_errors("gmm2d", {"bogus": 1}) and dataset_errors("nope")
