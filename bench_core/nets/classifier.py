"""A noise-aware classifier p_phi(y | x, sigma) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

ADM's classifier is the downsampling half of its U-Net with the timestep embedding and an attention
pool.  Ours is the same idea at digits scale: the shared U-Net's residual blocks (AdaGN scale-shift
conditioning on the noise level, BigGAN-style downsampling blocks), then GroupNorm, SiLU, a global
average pool and a linear head.  It works in the denoiser's coordinates: ``forward(x, sigma)`` with
x = x0 + sigma n; the input is scaled by c_in = 1 / sqrt(1 + sigma^2) (the VP scaling, bounded for any
sigma) and the noise level is embedded sinusoidally from c_noise = t_scale * ln(sigma) / 4 (EDM's c_noise).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..denoiser import bcast, expand_sigma
from .unet import ResBlock, group_norm, timestep_embedding


@dataclass
class ClassifierConfig:
    """Noise-aware classifier hyper-parameters (digits scale; ADM's ImageNet classifiers are U-Net encoders)."""

    in_channels: int = 1
    resolution: int = 8
    num_classes: int = 10
    ch: int = 16
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    norm_groups: int = 8
    dropout: float = 0.0
    t_scale: float = 250.0  # c_noise = ln(sigma) / 4 scaled to the sinusoid's range (as bench_core.denoiser.EDMPrecond)

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2**(len(ch_mult)-1)")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    def replace(self, **kw) -> "ClassifierConfig":
        return dataclasses.replace(self, **kw)


class NoisyClassifier(nn.Module):
    """logits of p_phi(y | x, sigma); forward(x, sigma) with x = x0 + sigma n, sigma of shape (B,) or scalar."""

    def __init__(self, cfg: ClassifierConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else ClassifierConfig()
        self.cfg = cfg
        ch, emb_dim, G = cfg.ch, 4 * cfg.ch, cfg.norm_groups
        self.temb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        blocks, cur = [], ch
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cur, ch * mult, emb_dim, cfg.dropout, G, scale_shift_norm=True))
                cur = ch * mult
            if level != len(cfg.ch_mult) - 1:
                blocks.append(ResBlock(cur, cur, emb_dim, cfg.dropout, G, scale_shift_norm=True, down=True))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(cur, G)
        self.head = nn.Linear(cur, cfg.num_classes)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = expand_sigma(sigma, x)
        c_in = bcast(1.0 / (1.0 + sigma**2).sqrt(), x)
        c_noise = self.cfg.t_scale * sigma.log() / 4
        emb = self.temb(timestep_embedding(c_noise, self.cfg.ch).to(self.conv_in.weight.dtype))
        h = self.conv_in((x * c_in).to(self.conv_in.weight.dtype))
        for blk in self.blocks:
            h = blk(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


def noisy_classifier_loss(sigmas: Tensor):
    """Cross-entropy of p_phi(y | x0 + sigma_t n, sigma_t) with t uniform over the diffusion's training grid
    (Dhariwal & Nichol 2021, Sec. 4: the classifier is trained on the same noise distribution as the model)."""

    def loss_fn(model, x0, y, generator):
        if y is None:
            raise ValueError("the noise-aware classifier needs labelled data")
        t = torch.randint(0, sigmas.shape[0], (x0.shape[0],), generator=generator)
        n = torch.randn(x0.shape, generator=generator).to(x0.device)
        s = sigmas[t].to(x0.device, x0.dtype)
        x = x0 + bcast(s, x0) * n
        return F.cross_entropy(model(x, s), y)

    return loss_fn
