"""Metrics: FID/KID/precision-recall through torch-fidelity, feature extractors, 2-D metrics.

Names are imported lazily: ``twod`` is light, while ``extractors``/``fidelity`` import
torch-fidelity (seconds) and register the digits extractor with it on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "extractors": (
        "Extractor", "ExtractorWeightsError", "DigitsCNN", "DigitsCNNFeatureExtractor", "classify",
        "digits_extractor", "get_extractor", "inception_extractor", "load_digits_cnn",
        "load_digits_uint8", "prepare_images", "sha256_file", "DIGITS_WEIGHTS", "INCEPTION_ENV",
    ),
    "fidelity": (
        "compute_features", "fid_from_features", "image_metrics", "reference_features", "to_uint8",
    ),
    "twod": ("mmd_rbf", "mode_weights", "points_metrics", "sliced_wasserstein"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
