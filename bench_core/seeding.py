"""Per-sample seeding: a sample's noise depends only on its own seed, never on its batch.

Each sample owns a ``torch.Generator``.  Noise is drawn per sample in fixed-size chunks
(``chunk`` draws of the sample's shape at a time) so the cost is amortised over many sampler
steps while the stream a sample sees is the same whatever the batch size.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def sample_seed(base_seed: int, index: int) -> int:
    """Seed of sample ``index`` in an entry with base seed ``base_seed``."""
    return int(base_seed) * 1_000_000 + int(index)


class SampleNoise:
    """Independent Gaussian streams, one per sample.

    ``randn_like(x)`` returns noise of x's shape whose row i is the next draw of sample i's
    stream.  Samplers accept this object as their ``generator``.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", chunk: int = 32):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.chunk = int(chunk)
        self._gens = [torch.Generator(device="cpu").manual_seed(s) for s in self.seeds]
        self._buf: Tensor | None = None  # (B, chunk, *shape) on CPU
        self._shape: tuple[int, ...] | None = None
        self._pos = 0

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> Tensor:
        """Noise of shape (B, *shape); B = number of seeds."""
        shape = tuple(int(s) for s in shape)
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(f"SampleNoise streams are for shape {self._shape}, got {shape}")
        if self._buf is None or self._pos >= self.chunk:
            self._buf = torch.stack([torch.randn((self.chunk, *shape), generator=g) for g in self._gens])
            self._pos = 0
        out = self._buf[:, self._pos]
        self._pos += 1
        return out.to(device=self.device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.seeds):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.seeds)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)


def randn_like(x: Tensor, generator=None) -> Tensor:
    """Noise like x from a SampleNoise, a torch.Generator, or the global RNG."""
    if isinstance(generator, SampleNoise):
        return generator.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    return torch.randn_like(x)
