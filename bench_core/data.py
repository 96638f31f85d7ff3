"""Datasets: embedded defaults first, user datasets by path.

``load_dataset(name, root=None, **opts)`` returns a :class:`Dataset`: the whole set as one tensor
(images ``(N, C, H, W)`` in [-1, 1], points ``(N, d)``), labels, and for Gaussian-mixture data the
exact denoiser (``oracle``).

Images are 8-bit: every image loader quantises to the uint8 grid *after* any resize, so ``x`` is
exactly ``u8 / 127.5 - 1`` and :meth:`Dataset.reference_uint8` gives the FID reference back
bit-for-bit.

Registry (``DATASETS``):

- ``digits``      scikit-learn's bundled 8x8 digits (1797 images, 10 classes); no files needed.
- ``swiss_roll``  2-D Swiss roll (Sohl-Dickstein et al. 2015 toy); no files needed.
- ``gmm2d``       2-D Gaussian mixtures with their exact denoiser; no files needed.
- ``folder``      a folder of png/jpg images (``root`` = the folder).
- ``cifar10``     the CIFAR-10 python batches, read by our own reader (see :func:`read_cifar10`).
- ``mnist``       the MNIST idx files, read by our own reader (see :func:`read_idx`).

Nothing here downloads: a missing file raises :class:`DatasetNotFound` saying what to fetch and
where to put it.  The default root for file-backed datasets is ``$DIFFBENCH_DATA``, else
``$XDG_CACHE_HOME/diffbench/data`` or ``~/.cache/diffbench/data`` (:func:`default_data_root`).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench_core.denoiser import GMMDenoiser
from bench_core.paths import user_cache_root


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are missing; the message says what to download and where to put it."""


class DatasetError(ValueError):
    """A dataset's files exist but cannot be used (bad format, failed verification, bad option)."""


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """A whole dataset in memory.

    ``x``: float32, images ``(N, C, H, W)`` scaled to [-1, 1] or points ``(N, d)``.
    ``labels``: long ``(N,)`` or None.  ``oracle``: the exact denoiser (``GMMDenoiser``) where the
    data distribution is known in closed form.  ``info``: where the data came from and the options
    that shaped it (json-able; goes into records and cache keys).
    """

    name: str
    x: Tensor
    labels: Tensor | None = None
    num_classes: int = 0
    kind: str = "image"  # "image" | "points"
    oracle: GMMDenoiser | None = None
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.x.shape[1:])

    def reference_uint8(self) -> Tensor:
        """Images as uint8 ``(N, C, H, W)``: ``round((x + 1) * 127.5)``."""
        if self.kind != "image":
            raise TypeError(f"dataset {self.name!r} holds {self.kind}, not images")
        return to_uint8(self.x)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 by ``round((x + 1) * 127.5)``, clamped to [0, 255]."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(u8: Tensor) -> Tensor:
    """uint8 images to float32 in [-1, 1] (``u8 / 127.5 - 1``)."""
    return u8.to(torch.float32) / 127.5 - 1.0


def default_data_root() -> Path:
    """``$DIFFBENCH_DATA``, else ``data`` in the user's cache folder (``$XDG_CACHE_HOME/diffbench/data`` or
    ``~/.cache/diffbench/data``); ``$DIFFBENCH_CACHE`` does not move it, since the user puts datasets there."""
    env = os.environ.get("DIFFBENCH_DATA")
    return Path(env).expanduser() if env else user_cache_root() / "data"


# --------------------------------------------------------------------------------------------
# Image helpers (shared by every image loader)
# --------------------------------------------------------------------------------------------
def resize_uint8(u8: Tensor, resolution: int | None) -> Tensor:
    """Bilinear resize of uint8 images ``(N, C, H, W)`` to ``resolution`` x ``resolution``,
    re-quantised to uint8.  Antialiased when shrinking; a no-op at the same size."""
    if resolution is None:
        return u8
    resolution = int(resolution)
    if resolution <= 0:
        raise DatasetError(f"resolution must be positive, got {resolution}")
    if tuple(u8.shape[-2:]) == (resolution, resolution):
        return u8
    shrink = resolution < max(u8.shape[-2:])
    out = F.interpolate(u8.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out.round().clamp(0, 255).to(torch.uint8)


def pad_uint8(u8: Tensor, resolution: int) -> Tensor:
    """Zero-pad (black) images symmetrically to ``resolution`` x ``resolution`` (MNIST 28 -> 32)."""
    h, w = u8.shape[-2:]
    if resolution < max(h, w):
        raise DatasetError(f"cannot pad {h}x{w} images to {resolution}x{resolution}")
    top, left = (resolution - h) // 2, (resolution - w) // 2
    return F.pad(u8, (left, resolution - w - left, top, resolution - h - top), value=0)


def convert_channels(u8: Tensor, channels: int | None) -> Tensor:
    """1 -> 3 channels by repetition, 3 -> 1 by ITU-R 601 luma (PIL's "L" conversion)."""
    if channels is None or u8.shape[1] == channels:
        return u8
    if u8.shape[1] == 1 and channels == 3:
        return u8.repeat(1, 3, 1, 1)
    if u8.shape[1] == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
        return (u8.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DatasetError(f"cannot convert {u8.shape[1]} channels to {channels}")


def _limit(n_total: int, limit: int | None) -> int:
    if limit is None:
        return n_total
    limit = int(limit)
    if limit <= 0:
        raise DatasetError(f"limit must be positive, got {limit}")
    return min(limit, n_total)


def _image_dataset(name: str, u8: Tensor, labels: Tensor | None, num_classes: int, *, resolution=None,
                   channels=None, limit=None, mode: str = "resize", class_names=None, info=None) -> Dataset:
    """The common tail of every image loader: subset, channels, resize/pad, quantise, scale."""
    n = _limit(u8.shape[0], limit)
    u8, labels = u8[:n], (labels[:n] if labels is not None else None)
    u8 = convert_channels(u8, channels)
    if mode == "pad" and resolution is not None:
        u8 = pad_uint8(u8, int(resolution))
    elif mode == "resize":
        u8 = resize_uint8(u8, resolution)
    else:
        raise DatasetError(f"mode must be 'resize' or 'pad', got {mode!r}")
    info = dict(info or {})
    info.update(resolution=int(u8.shape[-1]), channels=int(u8.shape[1]), n=int(n))
    return Dataset(name, from_uint8(u8).contiguous(), labels, num_classes, "image", class_names=class_names,
                   info=info)


# --------------------------------------------------------------------------------------------
# Embedded datasets
# --------------------------------------------------------------------------------------------
def load_digits(resolution: int | None = None, channels: int | None = None, limit: int | None = None) -> Dataset:
    """scikit-learn's 8x8 digits: values 0..16 quantised to uint8 as round(v * 255 / 16)."""
    from sklearn.datasets import load_digits as sk_digits  # noqa: PLC0415 - lazy: scikit-learn is slow to import; digits only

    d = sk_digits()
    u8 = torch.from_numpy(np.round(d.images * 255.0 / 16.0).astype(np.uint8)).unsqueeze(1)  # (1797,1,8,8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return _image_dataset("digits", u8, labels, 10, resolution=resolution, channels=channels, limit=limit,
                          class_names=[str(i) for i in range(10)], info={"source": "sklearn.datasets.load_digits"})


def load_swiss_roll(n: int = 10_000, noise: float = 0.1, scale: float = 0.1, seed: int = 0) -> Dataset:
    """2-D Swiss roll: sklearn's make_swiss_roll, the (x, z) coordinates times ``scale``.

    As in the toy experiments after Sohl-Dickstein et al. 2015: ``noise`` is in the roll's own
    units (before scaling) and 1/10 maps the roll (|x|, |z| <= 14.2) into about [-1.5, 1.5].
    """
    from sklearn.datasets import make_swiss_roll  # noqa: PLC0415 - lazy: scikit-learn is slow to import; swiss roll only

    pts, _ = make_swiss_roll(n_samples=int(n), noise=float(noise), random_state=int(seed))
    x = torch.from_numpy((pts[:, [0, 2]] * float(scale)).astype(np.float32))
    return Dataset("swiss_roll", x, None, 0, "points",
                   info={"n": int(n), "noise": float(noise), "scale": float(scale), "seed": int(seed)})


def _ring(k: int, radius: float, std: float) -> dict:
    ang = 2 * math.pi * np.arange(k) / k
    return {"weights": [1.0 / k] * k, "means": np.stack([radius * np.cos(ang), radius * np.sin(ang)], 1).tolist(),
            "stds": [std] * k}


def _grid(side: int, spacing: float, std: float) -> dict:
    c = (np.arange(side) - (side - 1) / 2) * spacing
    means = [[float(a), float(b)] for a in c for b in c]
    return {"weights": [1.0 / len(means)] * len(means), "means": means, "stds": [std] * len(means)}


# 2-D mixture presets: weights, means, per-component isotropic stds.
GMM_PRESETS: dict[str, dict] = {
    # 8 equal modes on a circle of radius 2 (the GAN mode-collapse toy), std 0.05.
    "ring8": _ring(8, 2.0, 0.05),
    # 25 modes on a 5x5 grid, spacing 1, std 0.05.
    "grid25": _grid(5, 1.0, 0.05),
    # Song & Ermon 2019 (NCSN), Sec. 3.2: p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I).
    "ncsn_toy": {"weights": [0.8, 0.2], "means": [[5.0, 5.0], [-5.0, -5.0]], "stds": [1.0, 1.0]},
}


def load_gmm2d(preset: str = "ring8", n: int = 10_000, seed: int = 0, weights=None, means=None,
               stds=None) -> Dataset:
    """Samples of a 2-D Gaussian mixture plus its exact denoiser (``Dataset.oracle``).

    ``preset`` names a mixture in ``GMM_PRESETS``; ``weights``/``means``/``stds`` given explicitly
    override it (``preset="custom"`` then names it).  Labels are the component of each sample.
    """
    if weights is not None or means is not None or stds is not None:
        if means is None:
            raise DatasetError("gmm2d: a custom mixture needs at least 'means'")
        k = len(means)
        spec = {"weights": weights if weights is not None else [1.0 / k] * k, "means": means,
                "stds": stds if stds is not None else [1.0] * k}
        preset = "custom" if preset == "ring8" else preset
    else:
        if preset not in GMM_PRESETS:
            raise DatasetError(f"gmm2d: unknown preset {preset!r}; known: {', '.join(GMM_PRESETS)}")
        spec = GMM_PRESETS[preset]
    oracle = GMMDenoiser(spec["weights"], spec["means"], spec["stds"])
    # Sample component then offset; the same as oracle.sample, but keeping the component label.
    g = torch.Generator().manual_seed(int(seed))
    comp = torch.multinomial(oracle.weights.float(), int(n), replacement=True, generator=g)
    z = torch.randn(int(n), oracle.dim, generator=g, dtype=torch.float64)
    x = (oracle.means[comp] + oracle.stds[comp, None] * z).float()
    info = {"preset": preset, "n": int(n), "seed": int(seed), "weights": oracle.weights.tolist(),
            "means": oracle.means.tolist(), "stds": oracle.stds.tolist()}
    return Dataset("gmm2d", x, comp.long(), int(oracle.weights.numel()), "points", oracle=oracle, info=info)


# --------------------------------------------------------------------------------------------
# User folders
# --------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_folder(root: str | os.PathLike | None = None, resolution: int = 32, channels: int = 3,
                limit: int | None = None, recursive: bool = True) -> Dataset:
    """Every png/jpg under ``root`` (sorted by path), centre-cropped to a square, resized to
    ``resolution`` (bilinear), as ``channels`` (1 = greyscale, 3 = RGB).  No labels."""
    from PIL import Image  # noqa: PLC0415 - lazy: Pillow (via torchvision) only for image folders

    if root is None:
        raise DatasetNotFound("dataset 'folder' needs root=<a folder of .png/.jpg images>")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFound(f"dataset 'folder': {root} is not a folder; give root=<a folder of .png/.jpg images>")
    files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir())
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetNotFound(f"dataset 'folder': no .png/.jpg images in {root}"
                              + (" (searched sub-folders too)" if recursive else ""))
    if channels not in (1, 3):
        raise DatasetError(f"dataset 'folder': channels must be 1 or 3, got {channels}")
    files = files[:_limit(len(files), limit)]
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                a = np.array(im, dtype=np.uint8)
        except Exception as e:  # PIL raises many types for a bad file
            raise DatasetError(f"dataset 'folder': cannot read image {p}: {e}") from e
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out.append(resize_uint8(torch.from_numpy(np.ascontiguousarray(a))[None], resolution))
    u8 = torch.cat(out)
    return _image_dataset("folder", u8, None, 0, info={"root": str(root), "files": len(files)})


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python version)
# --------------------------------------------------------------------------------------------
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR10_META = "batches.meta"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _official_cifar10_md5() -> dict[str, str]:
    """The md5 sums torchvision ships for the official files (empty if torchvision is absent)."""
    try:
        from torchvision.datasets import CIFAR10  # noqa: PLC0415 - optional, slow to import; only its md5 table
    except Exception:
        return {}
    sums = {f: m for f, m in CIFAR10.train_list + CIFAR10.test_list}
    sums[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return sums


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (no arbitrary code from a data file)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a data file")


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _ArrayUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Python-2 pickles (the official files) come back with str keys, ours with bytes keys.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cifar_missing_message(root: Path, missing: list[str]) -> str:
    folder = root / CIFAR10_FOLDER
    tarball = root / "cifar-10-python.tar.gz"
    lines = [
        f"dataset 'cifar10': missing {', '.join(missing)} in {folder}/",
        f"  needed: the folder {folder}/ holding {', '.join(CIFAR10_TRAIN)}, {', '.join(CIFAR10_TEST)} "
        f"and {CIFAR10_META}",
        f"  these come from the python version tarball cifar-10-python.tar.gz ({CIFAR10_URL}), extracted:",
        f"      tar xzf cifar-10-python.tar.gz -C {root}",
        f"  root used: {root} (pass root=..., or set $DIFFBENCH_DATA; default {default_data_root()})",
    ]
    if tarball.exists():
        lines.insert(1, f"  found {tarball}: it only needs extracting (command below)")
    return "\n".join(lines)


def read_cifar10(root: str | os.PathLike, train: bool = True, verify: bool = False) -> dict:
    """Read the CIFAR-10 python batches from ``<root>/cifar-10-batches-py/``.

    Our own reader, not ``torchvision.datasets.CIFAR10``: torchvision refuses any file whose md5
    differs from the official one (and checks all six batches even for one split), so a subset or
    a re-packed copy in the same format would not load.  Here each batch is a pickled dict with
    ``data`` (uint8 (n, 3072), planes R, G, B, row-major 32x32) and ``labels``; ``batches.meta``
    (``label_names``) is optional.  Unpickling admits only containers and numpy arrays.

    Returns ``{"u8": (N,3,32,32) uint8, "labels": (N,) long, "classes": [...], "official": bool}``
    where ``official`` says every file read has torchvision's md5 for the official release;
    ``verify=True`` makes a mismatch an error.
    """
    root = Path(root).expanduser()
    folder = root / CIFAR10_FOLDER
    names = CIFAR10_TRAIN if train else CIFAR10_TEST
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFound(_cifar_missing_message(root, missing))
    sums = _official_cifar10_md5()
    data, labels, official = [], [], bool(sums)
    read = list(names) + ([CIFAR10_META] if (folder / CIFAR10_META).is_file() else [])
    for n in names:
        try:
            d = _load_pickle(folder / n)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as e:
            raise DatasetError(f"dataset 'cifar10': {folder / n} is not a CIFAR-10 python batch ({e}); "
                               f"re-extract it from cifar-10-python.tar.gz") from e
        if "data" not in d or ("labels" not in d and "fine_labels" not in d):
            raise DatasetError(f"dataset 'cifar10': {folder / n} lacks 'data'/'labels' (keys: {sorted(d)})")
        a = np.asarray(d["data"], dtype=np.uint8)
        if a.ndim != 2 or a.shape[1] != 3072:
            raise DatasetError(f"dataset 'cifar10': {folder / n}: data has shape {a.shape}, expected (n, 3072)")
        lab = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
        if lab.shape[0] != a.shape[0]:
            raise DatasetError(f"dataset 'cifar10': {folder / n}: {a.shape[0]} images but {lab.shape[0]} labels")
        data.append(a)
        labels.append(lab)
    classes = list(CIFAR10_CLASSES)
    if CIFAR10_META in read:
        meta = _load_pickle(folder / CIFAR10_META)
        if "label_names" in meta:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta["label_names"]]
    if sums:
        bad = [n for n in read if _md5(folder / n) != sums.get(n)]
        official = not bad
        if verify and bad:
            raise DatasetError(f"dataset 'cifar10': {', '.join(bad)} in {folder} differ from the official "
                               f"release (md5); re-extract cifar-10-python.tar.gz")
    elif verify:
        raise DatasetError("dataset 'cifar10': verify=True needs torchvision (it holds the official md5 sums)")
    u8 = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    return {"u8": u8, "labels": torch.from_numpy(np.concatenate(labels)), "classes": classes, "official": official}


def load_cifar10(root: str | os.PathLike | None = None, split: str = "train", resolution: int | None = None,
                 channels: int | None = None, limit: int | None = None, verify: bool = False) -> Dataset:
    """CIFAR-10, 32x32 RGB, 10 classes (``split``: "train" 50k or "test" 10k)."""
    if split not in ("train", "test"):
        raise DatasetError(f"cifar10: split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser() if root is not None else default_data_root()
    r = read_cifar10(root, train=split == "train", verify=verify)
    return _image_dataset("cifar10", r["u8"], r["labels"], 10, resolution=resolution, channels=channels,
                          limit=limit, class_names=r["classes"],
                          info={"root": str(root), "split": split, "official": r["official"]})


# --------------------------------------------------------------------------------------------
# MNIST (idx files)
# --------------------------------------------------------------------------------------------
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of http://yann.lecun.com/exdb/mnist/)"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (LeCun's MNIST format: magic 0x0000 | dtype | ndim, big-endian dims), plain or .gz."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an idx file (bad magic)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DatasetError(f"{path}: unknown idx element type 0x{raw[2]:02x}")
    nd = raw[3]
    dims = struct.unpack(f">{nd}I", raw[4:4 + 4 * nd])
    dt = np.dtype(dtypes[raw[2]])
    body = np.frombuffer(raw, dtype=dt, offset=4 + 4 * nd)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: {body.size} values but header says {dims} (truncated file?)")
    return body.reshape(dims).astype(dt.newbyteorder("="))


def load_mnist(root: str | os.PathLike | None = None, split: str = "train", resolution: int | None = None,
               mode: str = "resize", channels: int | None = None, limit: int | None = None) -> Dataset:
    """MNIST from ``<root>/MNIST/raw/`` (torchvision's layout), 28x28 greyscale, 10 classes.

    ``resolution=32`` with ``mode="pad"`` zero-pads 28 -> 32 (the usual choice); ``mode="resize"``
    resizes bilinearly.  Plain idx files and their ``.gz`` are both accepted.
    """
    if split not in MNIST_FILES:
        raise DatasetError(f"mnist: split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser() if root is not None else default_data_root()
    raw_dir = root / "MNIST" / "raw"
    found, missing = [], []
    for n in MNIST_FILES[split]:
        p = next((c for c in (raw_dir / n, raw_dir / (n + ".gz")) if c.is_file()), None)
        if p is None:
            missing.append(n)
        else:
            found.append(p)
    if missing:
        every = [n for pair in MNIST_FILES.values() for n in pair]
        raise DatasetNotFound("\n".join([
            f"dataset 'mnist': missing {', '.join(missing)} in {raw_dir}/",
            f"  needed: the folder {raw_dir}/ holding {', '.join(every)} (or the same names with .gz)",
            f"  these are the four .gz files from {MNIST_URL}; gunzipping them is optional",
            f"  root used: {root} (pass root=..., or set $DIFFBENCH_DATA; default {default_data_root()})",
        ]))
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"mnist: {found[0].name} {images.shape} and {found[1].name} {labels.shape} do not match")
    u8 = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
    return _image_dataset("mnist", u8, torch.from_numpy(labels.astype(np.int64)), 10, resolution=resolution,
                          channels=channels, limit=limit, mode=mode, class_names=[str(i) for i in range(10)],
                          info={"root": str(root), "split": split, "mode": mode})


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader, kind, the options it accepts and whether it needs files."""

    name: str
    loader: Callable[..., Dataset]
    kind: str
    opts: tuple[str, ...]
    needs_files: bool
    description: str


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", load_digits, "image", ("resolution", "channels", "limit"), False,
                          "scikit-learn 8x8 digits, 1797 images, 10 classes (embedded)"),
    "swiss_roll": DatasetSpec("swiss_roll", load_swiss_roll, "points", ("n", "noise", "scale", "seed"), False,
                              "2-D Swiss roll (embedded)"),
    "gmm2d": DatasetSpec("gmm2d", load_gmm2d, "points", ("preset", "n", "seed", "weights", "means", "stds"), False,
                         "2-D Gaussian mixtures with exact denoiser; presets " + ", ".join(GMM_PRESETS)),
    "folder": DatasetSpec("folder", load_folder, "image", ("resolution", "channels", "limit", "recursive"), True,
                          "a folder of .png/.jpg images (root required)"),
    "cifar10": DatasetSpec("cifar10", load_cifar10, "image", ("split", "resolution", "channels", "limit", "verify"),
                           True, "CIFAR-10 python batches under <root>/cifar-10-batches-py/"),
    "mnist": DatasetSpec("mnist", load_mnist, "image", ("split", "resolution", "mode", "channels", "limit"), True,
                         "MNIST idx files under <root>/MNIST/raw/"),
}


def dataset_errors(name: str, opts: dict | None = None) -> list[str]:
    """Problems with a dataset name and options, without loading anything (suite validation)."""
    if name not in DATASETS:
        return [f"unknown dataset {name!r}; known: {', '.join(DATASETS)}"]
    spec = DATASETS[name]
    accepted = set(spec.opts) | ({"root"} if spec.needs_files else set())
    bad = sorted(set(opts or {}) - accepted)
    return [f"dataset {name!r}: unknown option {k!r} (accepted: {', '.join(DATASETS[name].opts)})" for k in bad]


def load_dataset(name: str, root: str | os.PathLike | None = None, **opts: Any) -> Dataset:
    """Load a registered dataset by name.  ``root`` is the folder for file-backed datasets."""
    errs = dataset_errors(name, opts)
    if errs:
        raise DatasetError("; ".join(errs))
    spec = DATASETS[name]
    if spec.needs_files:
        return spec.loader(root=root, **opts)
    if root is not None:
        raise DatasetError(f"dataset {name!r} is embedded and takes no root (got {root!r})")
    return spec.loader(**opts)
