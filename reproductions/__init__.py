"""One module per paper.  A reproduction declares its models, training loss, samplers, claims,
tables and plots; the harness in ``bench_core`` does the rest.

The contract (``Reproduction``, ``LoadedModel``, ``Claim``, ``register``, discovery) lives in
``bench_core.plugin`` and the record helpers of claims in ``bench_core.claims``; both are re-exported here for
the paper modules.  Importing this package imports no paper: ``bench_core.plugin.discover()`` does, once.
"""
from __future__ import annotations

from dataclasses import asdict

from bench_core.claims import combine, fid_seeds, largest_group, ok_rows, primary, seed_values, train_seed_of
from bench_core.plugin import (CLAIM_KINDS, REGISTRY, Claim, ClaimResult, LoadedModel, Reproduction, apply_overrides,
                               discover, get, override_errors, register, size_errors)
from bench_core.train import config_hash

__all__ = ["CLAIM_KINDS", "REGISTRY", "REPRODUCTIONS", "Claim", "ClaimResult", "LoadedModel", "Reproduction",
           "apply_overrides", "combine", "discover", "fid_seeds", "get", "largest_group", "ok_rows", "override_errors",
           "primary", "register", "seed_values", "size_errors", "train_seed_of", "unet_config_hash"]

REPRODUCTIONS = REGISTRY  # the same dict


def unet_config_hash(family: str, cfg) -> str:
    """Checkpoint key of a config holding a U-Net under ``unet``: the network's architecture (not its
    kernels' runtime choices) and every other field."""
    d = asdict(cfg)
    d["unet"] = cfg.unet.arch_dict()
    return config_hash({"family": family}, d)
