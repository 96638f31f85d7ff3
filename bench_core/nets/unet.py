"""The shared configurable U-Net: DDPM (Ho et al. 2020, App. B) with ADM options (Dhariwal & Nichol 2021).

``UNet(cfg)(x, t, y=None)`` returns an epsilon prediction of x's shape.  ``t`` is a real-valued
timestep of shape (B,) (or a scalar); fractional values are fine because the embedding is
sinusoidal.  ``y`` is an optional class label; the index ``num_classes`` is the null label used
for unconditional evaluation (classifier-free guidance), and ``y=None`` means that null label.

Layout (DDPM): conv_in -> per resolution level: ``num_res_blocks`` residual blocks (+ self
attention where the resolution is in ``attn_resolutions``), then a downsample except at the last
level -> middle res/attn/res -> mirrored decoder with ``num_res_blocks + 1`` blocks per level that
concatenate the encoder's skips -> GroupNorm, SiLU, conv_out.

ADM options, default off: ``scale_shift_norm`` (AdaGN: the embedding gives a per-channel scale and
shift after the second GroupNorm), ``resblock_updown`` (BigGAN-style resampling inside a residual
block instead of a plain strided conv / upsample conv) and ``num_head_channels`` (a fixed width per
attention head instead of a fixed number of heads).

Speed options (Chen et al. 2023, "Speed is all you need"), runtime only: they change how the
network computes, never its parameters or state_dict keys (``bench_core.methods.accel`` switches them):
``set_attn_impl("naive" | "chunked" | "sdpa")`` picks the attention kernel and
``set_fused_norm_act(True | "compile" | "triton")`` runs every GroupNorm followed by SiLU as one fused
kernel (torch.compile's, or the hand-written Triton kernel of ``bench_core.nets.triton_norm``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench_core.nets.norm_act import NORM_ACT_KERNELS, norm_act

ATTN_IMPLS = ("naive", "chunked", "sdpa")
DEFAULT_ATTN_CHUNK = 1024  # queries per chunk of the "chunked" attention


@dataclass
class UNetConfig:
    """U-Net hyper-parameters; defaults are DDPM's CIFAR-10 model (Ho et al. 2020, App. B)."""

    in_channels: int = 3
    out_channels: int | None = None  # None: same as in_channels (epsilon prediction)
    resolution: int = 32
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    num_head_channels: int | None = None  # ADM: heads = channels // num_head_channels
    num_classes: int | None = None  # label embedding with num_classes + 1 rows (last = null label)
    resamp_with_conv: bool = True
    norm_groups: int = 32
    scale_shift_norm: bool = False  # ADM adaptive group norm
    resblock_updown: bool = False  # ADM / BigGAN up- and downsampling residual blocks
    attn_impl: str = "sdpa"  # "naive" | "chunked" | "sdpa"; runtime choice, not part of the architecture
    # Compatibility switches for imported checkpoints (bench_core.nets.diffusers_import); none adds or
    # renames a parameter.  Left out of to_dict()/arch_dict() while at their defaults (COMPAT_DEFAULTS),
    # so the dicts and config hashes of every existing config are unchanged.
    time_flip_sin_to_cos: bool = False  # timestep embedding as [cos, sin] instead of [sin, cos]
    time_freq_shift: float = 1.0  # frequencies exp(-ln(1e4) * i / (dim/2 - shift)); 1 = DDPM
    downsample_padding: int = 1  # strided-conv downsample: 1 = pad 1 all round; 0 = pad right/bottom by 1 (TF "SAME")
    norm_eps: float = 1e-6  # GroupNorm epsilon

    # Fields that change how the network computes, not what it is (excluded from arch_dict()).
    RUNTIME_FIELDS = ("attn_impl",)
    # Architecture fields omitted from to_dict()/arch_dict() while they hold these defaults.
    COMPAT_DEFAULTS = {"time_flip_sin_to_cos": False, "time_freq_shift": 1.0, "downsample_padding": 1,
                       "norm_eps": 1e-6}

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        down = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % down:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by 2**(len(ch_mult)-1) = {down}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for YAML and hashing; compatibility fields at their
        defaults are left out (see COMPAT_DEFAULTS)."""
        d = dataclasses.asdict(self)
        for k, default in self.COMPAT_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def arch_dict(self) -> dict[str, Any]:
        """``to_dict()`` without runtime-only fields: hash this to key checkpoints."""
        d = self.to_dict()
        for k in self.RUNTIME_FIELDS:
            d.pop(k, None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **overrides) -> "UNetConfig":
        return dataclasses.replace(self, **overrides)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
# DDPM CIFAR-10, Ho et al. 2020 App. B: 35.7M parameters (official checkpoint: 35,746,307).
DDPM_CIFAR10 = UNetConfig(
    in_channels=3, resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
    attn_resolutions=(16,), dropout=0.1,
)

# Small CPU model for scikit-learn's 8x8 digits (no paper number): 152,417 parameters, 3.2 GFLOP
# per batch of 500.  Sized for the default suite (~4000 denoiser calls on batches of 500 on 2 CPU
# cores): ~40 ms per no-grad batch of 500.  Self-attention only in the 4x4 middle block and
# parameter-free resampling (avg-pool / nearest) save ~20% over the DDPM layout; ch=32 costs ~3.5x.
DIGITS_SMALL = UNetConfig(
    in_channels=1, resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
    dropout=0.1, num_heads=1, resamp_with_conv=False, norm_groups=8,
)

PRESETS: dict[str, UNetConfig] = {"ddpm_cifar10": DDPM_CIFAR10, "digits_small": DIGITS_SMALL}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def num_groups(channels: int, norm_groups: int) -> int:
    """Largest group count <= min(norm_groups, channels) that divides channels."""
    g = max(1, min(norm_groups, channels))
    while channels % g:
        g -= 1
    return g


def group_norm(channels: int, norm_groups: int, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels, norm_groups), channels, eps=eps)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0) -> Tensor:
    """Sinusoidal embedding of real t (Vaswani et al. 2017, as in DDPM's get_timestep_embedding).

    Frequencies ``exp(-ln(max_period) * i / (dim // 2 - freq_shift))``; ``[sin, cos]`` halves, or
    ``[cos, sin]`` with ``flip_sin_to_cos``.  The defaults are DDPM's."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        / max(half - freq_shift, 1)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)],
                    dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Downsample(nn.Module):
    """Halve the resolution: strided 3x3 conv, or 2x2 average pooling.

    ``padding=0`` pads the conv's input by one on the right and bottom only (TensorFlow's "SAME" for
    stride 2, as the original DDPM code and diffusers' ``downsample_padding=0``)."""

    def __init__(self, channels: int, with_conv: bool, padding: int = 1):
        super().__init__()
        self.asym_pad = with_conv and padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        if self.asym_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block with time embedding (DDPM); optional AdaGN and up/down (ADM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, norm_groups: int,
                 scale_shift_norm: bool = False, up: bool = False, down: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.fused_norm_act = False  # runtime: GroupNorm+SiLU as one kernel (see norm_act)
        self.norm1 = group_norm(in_ch, norm_groups, norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift_norm else out_ch)
        self.norm2 = group_norm(out_ch, norm_groups, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # BigGAN-style resampling between the first activation and conv (no parameters, as ADM).
        if up:
            self.resample = Upsample(in_ch, with_conv=False)
        elif down:
            self.resample = Downsample(in_ch, with_conv=False)
        else:
            self.resample = None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = norm_act(self.norm1, x, self.fused_norm_act)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm_act(self.norm2, h, self.fused_norm_act, scale, shift)
        else:
            h = norm_act(self.norm2, h + e, self.fused_norm_act)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over spatial positions with a residual connection.

    ``impl`` selects the kernel, all computing the same function: "naive" (explicit
    softmax(q k^T / sqrt(d)) v, the (HW x HW) weights materialised), "chunked" (query chunks of
    ``chunk`` rows with a partially fused softmax, see :func:`chunked_attention`) or "sdpa" (torch's
    fused scaled_dot_product_attention: FlashAttention / memory-efficient kernels where available).
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int, impl: str = "sdpa",
                 chunk: int = DEFAULT_ATTN_CHUNK, norm_eps: float = 1e-6):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.impl = impl
        self.chunk = int(chunk)
        self.norm = group_norm(channels, norm_groups, norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, heads, C // heads, H * W)
        if self.impl == "naive":
            q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d) views
        else:
            # fused kernels (flash / memory-efficient attention) need the head dim contiguous, or
            # they fall back to the materialising math path: one copy of q, k, v into (3, B, heads, HW, d)
            q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        if self.impl == "sdpa":
            h = F.scaled_dot_product_attention(q, k, v)
        elif self.impl == "naive":
            w = torch.softmax(q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5), dim=-1)
            h = w @ v
        elif self.impl == "chunked":
            h = chunked_attention(q, k, v, self.chunk)
        else:
            raise ValueError(f"unknown attention impl {self.impl!r}")
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, chunk: int = DEFAULT_ATTN_CHUNK) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over query chunks, never holding the full (L x L) weights.

    Per chunk of ``chunk`` queries: the scale is folded into q before the first matmul, the softmax
    is split into its row-max reduction and an in-place exp, and its normalisation is deferred past
    the second matmul (divide the (chunk x d) output, not the (chunk x L) weights) -- the partially
    fused softmax of Chen et al. 2023, Sec. 3.  Peak extra memory: chunk x L weights per head.
    """
    L, d = q.shape[-2], q.shape[-1]
    chunk = max(1, min(int(chunk), L))
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    kT = k.transpose(-1, -2)
    acc = torch.promote_types(q.dtype, torch.float32)  # normalise half precision in fp32
    for i in range(0, L, chunk):
        s = (q[..., i:i + chunk, :] * d**-0.5) @ kT          # (.., c, L) scores
        # the row max only shifts the exponent (softmax is invariant to it): no gradient through it
        s = s.sub_(s.detach().amax(dim=-1, keepdim=True)).exp_()  # unnormalised weights, in place
        den = s.sum(dim=-1, keepdim=True, dtype=acc)
        out[..., i:i + chunk, :] = ((s @ v).to(acc) / den).to(out.dtype)
    return out


class Block(nn.Module):
    """A residual block optionally followed by attention (one U-Net 'layer')."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020, App. B) with ADM options; forward(x, t, y) -> epsilon."""

    def __init__(self, cfg: UNetConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else UNetConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        self.cfg = cfg
        ch, emb_dim, G = cfg.ch, 4 * cfg.ch, cfg.norm_groups

        def heads(c: int) -> int:
            return c // cfg.num_head_channels if cfg.num_head_channels else cfg.num_heads

        def res(i: int, o: int, **kw) -> ResBlock:
            return ResBlock(i, o, emb_dim, cfg.dropout, G, cfg.scale_shift_norm, norm_eps=cfg.norm_eps, **kw)

        def attn(c: int, r: int) -> AttnBlock | None:
            return (AttnBlock(c, heads(c), G, cfg.attn_impl, norm_eps=cfg.norm_eps)
                    if r in cfg.attn_resolutions else None)

        # Timestep (and label) embedding.
        self.temb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None

        # Encoder.
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, cur, r = [ch], ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Block(res(cur, ch * mult), attn(ch * mult, r)))
                cur = ch * mult
                skip_chs.append(cur)
            if level != len(cfg.ch_mult) - 1:
                if cfg.resblock_updown:
                    self.down.append(res(cur, cur, down=True))
                else:
                    self.down.append(Downsample(cur, cfg.resamp_with_conv, cfg.downsample_padding))
                r //= 2
                skip_chs.append(cur)

        # Middle.
        self.mid = nn.ModuleList([
            res(cur, cur), AttnBlock(cur, heads(cur), G, cfg.attn_impl, norm_eps=cfg.norm_eps), res(cur, cur)
        ])

        # Decoder.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Block(res(cur + skip_chs.pop(), ch * mult), attn(ch * mult, r)))
                cur = ch * mult
            if level != 0:
                if cfg.resblock_updown:
                    self.up.append(res(cur, cur, up=True))
                else:
                    self.up.append(Upsample(cur, cfg.resamp_with_conv))
                r *= 2
        assert not skip_chs

        # Output.
        self.norm_out = group_norm(cur, G, cfg.norm_eps)
        self.conv_out = nn.Conv2d(cur, cfg.out_channels, 3, padding=1)
        self.fused_norm_act = False  # runtime: norm_out + SiLU as one kernel

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DDPM init: Xavier-uniform weights, zero biases; zero the convs that end a residual
        branch (ResBlock.conv2, attention proj_out) and the output conv."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    def set_attn_impl(self, impl: str, chunk: int | None = None) -> "UNet":
        """Switch every attention block to "naive", "chunked" (``chunk`` queries at a time) or
        "sdpa" (weights unchanged)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"attention chunk must be >= 1, got {chunk}")
        self.cfg = self.cfg.replace(attn_impl=impl)
        for m in self.modules():
            if isinstance(m, AttnBlock):
                m.impl = impl
                if chunk is not None:
                    m.chunk = int(chunk)
        return self

    def set_fused_norm_act(self, on: bool | str = True) -> "UNet":
        """Run every GroupNorm followed by SiLU as one fused kernel (weights unchanged): ``True`` or
        "compile" for torch.compile's, "compile_static" for torch.compile's specialised to each shape and layout,
        "triton" for the hand-written Triton kernel; ``False`` unfused."""
        if on is True:
            on = "compile"
        if on not in (False, None, *NORM_ACT_KERNELS):
            raise ValueError(f"fused GroupNorm+SiLU kernel must be one of {NORM_ACT_KERNELS} (or False), got {on!r}")
        for m in self.modules():
            if isinstance(m, (ResBlock, UNet)):
                m.fused_norm_act = on or False
        return self

    def embed(self, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Time embedding MLP(sinusoid(t)), plus the label embedding when class-conditional."""
        emb = self.temb(timestep_embedding(t, self.cfg.ch, flip_sin_to_cos=self.cfg.time_flip_sin_to_cos,
                                           freq_shift=self.cfg.time_freq_shift).to(self.conv_in.weight.dtype))
        if self.label_emb is not None:
            if y is None:  # unconditional: the null label
                y = torch.full_like(t, self.cfg.num_classes, dtype=torch.long)
            emb = emb + self.label_emb(y.long())
        elif y is not None:
            raise ValueError("labels given to an unconditional UNet (num_classes is None)")
        return emb

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, y)

        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, (Block, ResBlock)) else m(h)
            hs.append(h)

        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)

        for m in self.up:
            if isinstance(m, Block):
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        return self.conv_out(norm_act(self.norm_out, h, self.fused_norm_act))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
