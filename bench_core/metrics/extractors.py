"""Feature extractors for FID/KID/precision-recall, registered with torch-fidelity.

Two extractors, both named by what produced their features (name @ first 12 hex digits of the
weights file's sha256), so that an FID is only ever compared with FIDs from the same weights:

- ``diffbench-digits-cnn``: a small CNN classifier for scikit-learn's 8x8 digits, trained by
  ``scripts/train_digits_extractor.py``; its weights are committed and checksummed.
  Features: ``'64'`` (penultimate layer, used for FID/KID/PRC) and ``'logits'``. Digits stored at
  another resolution or with 3 channels are brought back to 1 x 8 x 8 first (``Extractor.prepare``).
- torch-fidelity's ``inception-v3-compat`` (2048-d pool features) from a weights file the user
  supplies (offline: nothing is downloaded).

``get_extractor(dataset, inception_weights)`` picks between them.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from bench_core.data import convert_channels, load_digits, resize_uint8

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIGITS_WEIGHTS = WEIGHTS_DIR / "digits_cnn.pt"
DIGITS_NAME = "diffbench-digits-cnn"
DIGITS_DATASETS = frozenset({"digits"})
DIGITS_FEATURE_DIM = 64
TRAIN_COMMAND = "python scripts/train_digits_extractor.py"

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_ENV = "DIFFBENCH_INCEPTION_WEIGHTS"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
# torch.hub names weight files after the first 8 hex digits of their sha256.
INCEPTION_SHA256_PREFIX = "6726825d"


class ExtractorWeightsError(RuntimeError):
    """A feature extractor's weights file is missing, corrupted or does not match its checksum."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Data convention shared by the training script and the tests
# --------------------------------------------------------------------------------------------

def load_digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as uint8 images (N, 1, 8, 8) (pixel v -> round(v * 255 / 16)) and labels."""
    ds = load_digits()
    return ds.reference_uint8(), ds.labels.to(torch.int64)


# --------------------------------------------------------------------------------------------
# Digits CNN
# --------------------------------------------------------------------------------------------

class DigitsCNN(nn.Module):
    """8x8 digits classifier; input float images in [0, 1] of shape (N, 1, 8, 8)."""

    def __init__(self, feature_dim: int = DIGITS_FEATURE_DIM, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 2 * 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 64 x 4 x 4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 128 x 2 x 2
        return F.gelu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.embed(x)
        return feats, self.head(self.dropout(feats))

    @staticmethod
    def preprocess(images_u8: torch.Tensor) -> torch.Tensor:
        return images_u8.to(torch.float32) / 255.0


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def _retrain_hint() -> str:
    return f"Re-create it by running `{TRAIN_COMMAND}` from the repository root."


def load_digits_cnn(weights_path: str | os.PathLike | None = None) -> tuple[DigitsCNN, str]:
    """Load the digits CNN after checking the file's sha256 against the json beside it.

    Returns ``(model in eval mode, sha256 hex)``. Raises ``ExtractorWeightsError`` with the
    command to re-create the weights when the file or its json is missing, the checksum does
    not match, or the file does not load.
    """
    path = Path(weights_path) if weights_path is not None else DIGITS_WEIGHTS
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise ExtractorWeightsError(f"Digits feature-extractor weights not found: {path}. {_retrain_hint()}")
    if not meta_path.is_file():
        raise ExtractorWeightsError(
            f"Checksum file for the digits feature extractor not found: {meta_path}. {_retrain_hint()}"
        )
    try:
        expected = str(json.loads(meta_path.read_text())["sha256"]).lower()
    except (ValueError, KeyError, TypeError) as e:
        raise ExtractorWeightsError(f"Unreadable checksum file {meta_path} ({e}). {_retrain_hint()}") from e
    actual = sha256_file(path)
    if actual != expected:
        raise ExtractorWeightsError(
            f"Checksum mismatch for digits feature-extractor weights {path}: sha256 is {actual}, "
            f"but {meta_path.name} records {expected}. The file is corrupted or was replaced. {_retrain_hint()}"
        )
    model = DigitsCNN()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - any load failure means the same thing to the user
        raise ExtractorWeightsError(
            f"Digits feature-extractor weights {path} could not be loaded ({type(e).__name__}: {_first_line(e)}). "
            f"{_retrain_hint()}"
        ) from e
    model.requires_grad_(False)
    model.eval()
    return model, actual


class DigitsCNNFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity wrapper of ``DigitsCNN``: uint8 (N, 1, 8, 8) in, features ``'64'``/``'logits'`` out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, self.sha256 = load_digits_cnn(feature_extractor_weights_path)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise TypeError("Expecting images as a torch.uint8 tensor")
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"Digits extractor expects uint8 images (N, 1, 8, 8), got {tuple(x.shape)}")
        feats, logits = self.net(DigitsCNN.preprocess(x))
        out = {"64": feats, "logits": logits}
        return tuple(out[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "64", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)


if DIGITS_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(DIGITS_NAME, DigitsCNNFeatureExtractor)


def prepare_images(images_u8: torch.Tensor, channels: int, resolution: int | None) -> torch.Tensor:
    """uint8 images (N, C, H, W) to ``channels`` and ``resolution`` x ``resolution``.

    Channels: 1 -> 3 by repetition, 3 -> 1 by luma; size: bilinear resizing (antialiased when
    shrinking) and re-quantising to uint8; both by ``bench_core.data``'s image helpers.
    """
    if not torch.is_tensor(images_u8) or images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise ValueError("images must be a uint8 tensor (N, C, H, W) in [0, 255]; use to_uint8() on model output")
    if images_u8.shape[1] not in (1, 3):
        raise ValueError(f"expected 1- or 3-channel images, got {images_u8.shape[1]} channels")
    return resize_uint8(convert_channels(images_u8, channels), resolution)


_CLASSIFIER: dict[tuple[str, str], DigitsCNN] = {}


@torch.inference_mode()
def classify(images_u8: torch.Tensor, weights_path: str | os.PathLike | None = None,
             batch_size: int = 1024) -> torch.Tensor:
    """Digits-CNN logits (N, 10) for uint8 digit images; e.g. class accuracy of guided samples.

    Images other than (N, 1, 8, 8) are converted first (``prepare_images``).
    """
    images_u8 = prepare_images(images_u8, 1, 8)
    path = Path(weights_path) if weights_path is not None else DIGITS_WEIGHTS
    key = (str(path.resolve()), sha256_file(path) if path.is_file() else "")
    if key not in _CLASSIFIER:
        _CLASSIFIER[key] = load_digits_cnn(path)[0]
    net = _CLASSIFIER[key]
    x = images_u8.cpu()
    return torch.cat([net(DigitsCNN.preprocess(b))[1] for b in x.split(batch_size)]) if len(x) else torch.zeros(0, 10)


# --------------------------------------------------------------------------------------------
# The extractor handed to the metrics
# --------------------------------------------------------------------------------------------

@dataclass
class Extractor:
    """A torch-fidelity feature extractor with the identity that every FID it produces carries.

    ``identity`` is ``"<torch-fidelity name>@<sha256[:12] of the weights file>"``.
    """

    name: str
    identity: str
    module: torch_fidelity.FeatureExtractorBase = field(repr=False)
    feature_layer: str
    in_channels: int
    resolution: int | None = None  # square size the network takes; None = any (it resizes itself)
    device: torch.device = torch.device("cpu")
    batch_size: int = 256

    @property
    def sha256(self) -> str:
        return self.identity.rsplit("@", 1)[1]

    def prepare(self, images_u8: torch.Tensor) -> torch.Tensor:
        """Bring uint8 images (N, C, H, W) to what the network takes (see ``prepare_images``)."""
        return prepare_images(images_u8, self.in_channels, self.resolution)

    def features(self, images_u8: torch.Tensor) -> torch.Tensor:
        """float32 features (N, D) on the CPU for uint8 images (N, C, H, W)."""
        x = self.prepare(images_u8)
        out = []
        with torch.inference_mode():
            for b in x.split(self.batch_size):
                feats = self.module(b.to(self.device).contiguous())
                out.append(self.module.convert_features_tuple_to_dict(feats)[self.feature_layer].float().cpu())
        if not out:
            raise ValueError("no images given")
        return torch.cat(out)


def _fidelity_module(name: str, layer: str, weights_path, device) -> torch_fidelity.FeatureExtractorBase:
    module = create_feature_extractor(
        name, [layer], cuda=False, verbose=False, feature_extractor_weights_path=weights_path
    )
    return module.to(device)


def digits_extractor(weights_path: str | os.PathLike | None = None, *, device="cpu",
                     batch_size: int = 1024) -> Extractor:
    """The committed digits CNN (checksum verified) as an ``Extractor``."""
    layer = DigitsCNNFeatureExtractor.get_default_feature_layer_for_metric("fid")
    module = _fidelity_module(DIGITS_NAME, layer, None if weights_path is None else str(weights_path), device)
    return Extractor(
        name=DIGITS_NAME,
        identity=f"{DIGITS_NAME}@{module.sha256[:12]}",
        module=module,
        feature_layer=layer,
        in_channels=1,
        resolution=8,
        device=torch.device(device),
        batch_size=batch_size,
    )


def _inception_hint() -> str:
    return (
        "Download torch-fidelity's Inception-v3 weights (pt_inception-2015-12-05, "
        f"{INCEPTION_URL}; torch.hub names them after their sha256 prefix {INCEPTION_SHA256_PREFIX}) "
        f"and pass the file as inception_weights or set {INCEPTION_ENV}=/path/to/file."
    )


def inception_extractor(weights_path: str | os.PathLike, *, device="cpu", batch_size: int = 64) -> Extractor:
    """torch-fidelity's ``inception-v3-compat`` (2048-d) from a local weights file; never downloads."""
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ExtractorWeightsError(f"Inception weights file not found: {path}. {_inception_hint()}")
    sha = sha256_file(path)
    # torch-fidelity loads the file with weights_only=False; make sure first that it is plain tensors.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ExtractorWeightsError(
            f"{path} is not a plain PyTorch state dict ({type(e).__name__}: {_first_line(e)}). {_inception_hint()}"
        ) from e
    if not isinstance(state, dict):
        raise ExtractorWeightsError(f"{path} does not hold a state dict. {_inception_hint()}")
    del state
    layer = "2048"
    try:
        module = _fidelity_module(INCEPTION_NAME, layer, str(path), device)
    except Exception as e:  # noqa: BLE001
        raise ExtractorWeightsError(
            f"{path} does not fit torch-fidelity's InceptionV3 ({type(e).__name__}: {_first_line(e)}). "
            f"{_inception_hint()}"
        ) from e
    if not sha.startswith(INCEPTION_SHA256_PREFIX):
        warnings.warn(
            f"Inception weights {path} (sha256 {sha[:12]}) are not the standard FID weights "
            f"(sha256 {INCEPTION_SHA256_PREFIX}...); FIDs will not compare with published numbers.",
            stacklevel=2,
        )
    return Extractor(
        name=INCEPTION_NAME,
        identity=f"{INCEPTION_NAME}@{sha[:12]}",
        module=module,
        feature_layer=layer,
        in_channels=3,
        resolution=None,
        device=torch.device(device),
        batch_size=batch_size,
    )


def get_extractor(dataset: str, inception_weights: str | os.PathLike | None = None, *,
                  device="cpu") -> Extractor:
    """The feature extractor for FID on ``dataset``.

    Inception-v3 when a weights file is given (argument, else ``$DIFFBENCH_INCEPTION_WEIGHTS``);
    otherwise the committed digits CNN for the digits dataset; otherwise an error.
    """
    if inception_weights is None:
        inception_weights = os.environ.get(INCEPTION_ENV) or None
    if inception_weights is not None:
        return inception_extractor(inception_weights, device=device)
    if dataset in DIGITS_DATASETS:
        return digits_extractor(device=device)
    raise ExtractorWeightsError(
        f"No feature extractor for dataset {dataset!r}: the embedded digits CNN only covers "
        f"{sorted(DIGITS_DATASETS)}. Pass an Inception weights file (inception_weights=... or "
        f"{INCEPTION_ENV}). {_inception_hint()}"
    )
