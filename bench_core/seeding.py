"""Per-sample seeding: a sample's noise depends only on its own seed, never on its batch.

Each sample owns a ``torch.Generator``.  Noise is drawn per sample in fixed-size chunks
(``chunk`` draws of the sample's shape at a time) so the cost is amortised over many sampler
steps while the stream a sample sees is the same whatever the batch size.
"""
from __future__ import annotations

import bisect
import math
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


class BrownianPath:
    """A Brownian motion W(t) on [t_lo, t_hi], one independent path per sample, drawn from the per-sample streams.

    W is fixed at t_lo (W = 0) and t_hi; every other time is drawn on first use from the Brownian bridge between
    its two known neighbours (mean by linear interpolation, variance (t - t_a)(t_b - t) / (t_b - t_a)), so the
    increments of overlapping or nested queries are jointly those of one Brownian path.  The draws come from
    ``randn_like(x, generator)``: with a ``SampleNoise`` a sample's path depends only on its seed and on the
    sequence of query times (which a sampler fixes from its grid), never on its batch.  A time within a relative
    1e-9 of a known one is taken as that one, so rounding (exp(log sigma)) draws nothing new.
    """

    def __init__(self, x: Tensor, t_lo: float, t_hi: float, generator=None):
        if not t_hi > t_lo:
            raise ValueError(f"BrownianPath needs t_lo < t_hi, got [{t_lo}, {t_hi}]")
        self.generator = generator
        self.t = [float(t_lo), float(t_hi)]
        self.w = [torch.zeros_like(x), math.sqrt(t_hi - t_lo) * randn_like(x, generator)]

    def __call__(self, t: float) -> Tensor:
        """W(t), drawn from the bridge between the known neighbours if t is new."""
        t = float(t)
        i = bisect.bisect_left(self.t, t)
        for j in (i - 1, i):  # a known time up to rounding (e.g. exp(log sigma)) is that time
            if 0 <= j < len(self.t) and abs(self.t[j] - t) <= 1e-9 * abs(t):
                return self.w[j]
        if i == 0 or i == len(self.t):
            raise ValueError(f"time {t} outside the Brownian path's [{self.t[0]}, {self.t[-1]}]")
        t_a, t_b, w_a, w_b = self.t[i - 1], self.t[i], self.w[i - 1], self.w[i]
        std = math.sqrt((t - t_a) * (t_b - t) / (t_b - t_a))
        w = w_a + (t - t_a) / (t_b - t_a) * (w_b - w_a) + std * randn_like(w_a, self.generator)
        self.t.insert(i, t)
        self.w.insert(i, w)
        return w

    def noise(self, s: float, s_next: float) -> Tensor:
        """The increment W(s_next) - W(s) over sqrt(|s_next - s|): standard normal, as a sampler's injected noise."""
        return (self(s_next) - self(s)) / math.sqrt(abs(s_next - s))
