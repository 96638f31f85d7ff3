"""Where diffbench keeps files of its own by default: the user's cache folder, never the source tree.

An installed wheel lives in a read-only (or shared) site-packages, and a checkout should stay clean, so trained
models, reference statistics and user datasets default to the XDG cache folder; each has its own variable to
override it (``$DIFFBENCH_CACHE`` in :func:`bench_core.train.default_cache_dir`, ``$DIFFBENCH_DATA`` in
:func:`bench_core.data.default_data_root`).
"""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/diffbench``, else ``~/.cache/diffbench``.  A relative ``$XDG_CACHE_HOME`` is ignored, as
    the XDG Base Directory specification says."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path("~/.cache").expanduser()
    return base / "diffbench"
