"""A KL-regularised convolutional autoencoder with downsampling factor f (Rombach et al. 2022, Sec. 3 and App. G).

``encode(x)`` returns the diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))) over latents of
shape (z_channels, H / f, W / f); ``decode(z)`` maps latents back to images.  The loss is LDM's without
the perceptual and adversarial terms: L1 reconstruction + kl_weight * KL(q(z | x) || N(0, I)), both summed
over a sample's elements and divided by its number of pixels.

``LatentDecoder`` is the denoiser-side piece of latent diffusion: the sampler runs on the (scaled) latents
and the harness applies ``decode`` inside its timed region (``LoadedModel.decode``), so latency and memory
include the decoder.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import group_norm


@dataclass
class AutoencoderConfig:
    """Autoencoder hyper-parameters; f = 2 ** len(ch_mult) (LDM's f = 4: ch_mult (1, 2, 4), z 3 channels)."""

    in_channels: int = 1
    resolution: int = 32
    f: int = 4                       # downsampling factor, a power of 2 (f = 1: no autoencoder, pixel space)
    z_channels: int = 2
    ch: int = 8
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)   # channel multiplier per downsampling level (the first log2 f are used)
    norm_groups: int = 8
    kl_weight: float = 1e-6          # LDM's KL weight (KL-f4 / f8 configs)

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.f < 1 or self.f & (self.f - 1):
            raise ValueError(f"f must be a power of 2, got {self.f}")
        if self.resolution % self.f:
            raise ValueError(f"resolution {self.resolution} is not divisible by f = {self.f}")
        if self.levels > len(self.ch_mult):
            raise ValueError(f"f = {self.f} needs {self.levels} channel multipliers, ch_mult has {len(self.ch_mult)}")
        if self.z_channels < 1:
            raise ValueError(f"z_channels must be >= 1, got {self.z_channels}")

    @property
    def levels(self) -> int:
        return int(round(math.log2(self.f)))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        r = self.resolution // self.f
        return (self.z_channels, r, r)

    def replace(self, **kw) -> "AutoencoderConfig":
        return dataclasses.replace(self, **kw)


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) with its reparametrised sample and KL to N(0, I)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        n = torch.randn(self.mean.shape, generator=generator).to(self.mean)
        return self.mean + self.std * n

    def kl(self) -> Tensor:
        """KL(N(mean, var) || N(0, I)) = 1/2 sum(mean^2 + var - 1 - log var), per sample (B,)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class _Res(nn.Module):
    """GroupNorm-SiLU-conv twice, with a residual connection (no time embedding)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.n1, self.c1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class Autoencoder(nn.Module):
    """KL autoencoder: images (B, C, H, W) <-> latents (B, z_channels, H / f, W / f)."""

    def __init__(self, cfg: AutoencoderConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else AutoencoderConfig()
        self.cfg = cfg
        G, L = cfg.norm_groups, cfg.levels
        chs = [cfg.ch * m for m in cfg.ch_mult[:L]] or [cfg.ch]
        # encoder: conv, per level a residual block and a strided conv, a residual block, (mean, logvar)
        enc, cur = [nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)], cfg.ch
        for c in chs[:L]:
            enc += [_Res(cur, c, G), nn.Conv2d(c, c, 3, stride=2, padding=1)]
            cur = c
        enc += [_Res(cur, cur, G), group_norm(cur, G), nn.SiLU(), nn.Conv2d(cur, 2 * cfg.z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        # decoder: the mirror, nearest upsampling followed by a conv
        dec = [nn.Conv2d(cfg.z_channels, cur, 3, padding=1), _Res(cur, cur, G)]
        for c in reversed(chs[:L]):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cur, c, 3, padding=1), _Res(c, c, G)]
            cur = c
        dec += [group_norm(cur, G), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        q = self.encode(x)
        return self.decode(q.sample(generator)), q


def autoencoder_loss(kl_weight: float):
    """LDM's first-stage loss without LPIPS and GAN: (sum |x - x_rec| + kl_weight * KL) / pixels, batch mean."""

    def loss_fn(model, x, y, generator):
        x_rec, q = model(x, generator)
        pixels = x[0].numel()
        rec = (x - x_rec).abs().flatten(1).sum(1)
        return ((rec + kl_weight * q.kl()) / pixels).mean()

    return loss_fn


class LatentDecoder(nn.Module):
    """Scaled latents -> images: x = decoder(z / scale_factor) (LDM rescales latents to unit variance)."""

    def __init__(self, autoencoder: Autoencoder, scale_factor: float):
        super().__init__()
        self.autoencoder, self.scale_factor = autoencoder, float(scale_factor)

    @torch.no_grad()
    def forward(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale_factor)

    @torch.no_grad()
    def encode(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Scaled posterior means of images (the latent diffusion model's training data)."""
        return torch.cat([self.autoencoder.encode(b).mean for b in x.split(batch_size)]) * self.scale_factor
