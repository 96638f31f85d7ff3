"""Import diffusers-format ``UNet2DModel`` checkpoints into our :class:`~bench_core.nets.unet.UNet`.

A diffusers model folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
``.bin``).  This module reads such a folder **without importing diffusers** and downloads nothing:

    from bench_core.nets.diffusers_import import load_diffusers_unet, ddpm_denoiser_from_diffusers
    net = load_diffusers_unet("ddpm-cifar10-32")              # our UNet, eval mode, fp32
    den = ddpm_denoiser_from_diffusers("ddpm-cifar10-32")     # DiscreteVPEpsDenoiser for the samplers

To benchmark the public DDPM CIFAR-10 weights, fetch them yourself (online), for example
``huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32``, and pass the folder.

Supported: the DDPM / ADM-like layouts UNet2DModel can express with our U-Net -- positional time
embedding (any ``flip_sin_to_cos`` / ``freq_shift``), ``DownBlock2D`` / ``AttnDownBlock2D`` and the
mirrored ``UpBlock2D`` / ``AttnUpBlock2D``, a ``UNetMidBlock2D`` with attention, conv resampling
(``downsample_padding`` 0 or 1), ``resnet_time_scale_shift`` "default" or "scale_shift", SiLU, any
``attention_head_dim``.  Anything else (class embeddings, Fourier / learned time embeddings, resnet
resampling, output scale factors, ...) raises :class:`DiffusersImportError` naming the field.

Weights are mapped by an explicit key table built from the config (never by position); diffusers'
separate ``to_q`` / ``to_k`` / ``to_v`` linears become our fused 1x1 ``qkv`` conv, ``to_out.0``
our ``proj_out``.  The legacy attention names of older checkpoints (``query`` / ``key`` / ``value``
/ ``proj_attn``, as in ``google/ddpm-cifar10-32``) are accepted too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from bench_core.denoiser import DiscreteVPEpsDenoiser
from bench_core.nets.unet import UNet, UNetConfig
from bench_core.schedules import alphas_cumprod, linear_betas

__all__ = [
    "DiffusersImportError", "unet_config_from_diffusers", "convert_diffusers_state_dict",
    "load_diffusers_unet", "ddpm_denoiser_from_diffusers", "load_diffusers_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel.__init__ defaults, used for keys a config.json leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


class DiffusersImportError(ValueError):
    """A diffusers checkpoint or config our U-Net cannot represent exactly."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Our :class:`UNetConfig` computing the same function as a diffusers ``UNet2DModel`` config.

    ``config`` is the parsed ``config.json`` (keys starting with "_" are metadata and ignored;
    missing keys take UNet2DModel's defaults).  Raises :class:`DiffusersImportError` listing every
    unsupported field/value."""
    cls = config.get("_class_name")
    if cls is not None and cls != "UNet2DModel":
        raise DiffusersImportError(f"only diffusers UNet2DModel checkpoints are supported, got _class_name={cls!r}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise DiffusersImportError(f"unsupported UNet2DModel config fields (unknown to this importer): {unknown}")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    errors: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    def must_equal(key: str, allowed) -> None:
        allowed = allowed if isinstance(allowed, (tuple, list)) else (allowed,)
        need(c[key] in allowed, f"{key}={c[key]!r} (supported: {' or '.join(map(repr, allowed))})")

    must_equal("center_input_sample", False)
    must_equal("time_embedding_type", "positional")
    must_equal("mid_block_type", "UNetMidBlock2D")
    must_equal("add_attention", True)
    must_equal("mid_block_scale_factor", (1, 1.0))
    must_equal("downsample_type", "conv")
    must_equal("upsample_type", "conv")
    must_equal("act_fn", ("silu", "swish"))
    must_equal("class_embed_type", None)
    must_equal("num_class_embeds", None)
    must_equal("resnet_time_scale_shift", ("default", "scale_shift"))
    must_equal("downsample_padding", (0, 1))

    chans = [int(v) for v in c["block_out_channels"]]
    ch = chans[0]
    need(all(v % ch == 0 for v in chans),
         f"block_out_channels={chans}: every entry must be a multiple of the first")
    ch_mult = tuple(v // ch for v in chans)
    need(c["time_embedding_dim"] in (None, 4 * ch),
         f"time_embedding_dim={c['time_embedding_dim']!r} (supported: None or 4 * block_out_channels[0] = {4 * ch})")

    G = int(c["norm_num_groups"])
    need(all(v % G == 0 for v in chans), f"norm_num_groups={G} must divide every block_out_channels entry {chans}")
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    # The mid-block attention has a GroupNorm only with attn_norm_num_groups set or the default time shift.
    ag = c["attn_norm_num_groups"]
    need(ag in (None, G), f"attn_norm_num_groups={ag!r} (supported: None or norm_num_groups={G})")
    need(not (scale_shift and ag is None),
         "resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None (mid-block attention without a "
         "GroupNorm) is not supported")

    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        need(len(size) == 2 and size[0] == size[1], f"sample_size={list(size)} (only square inputs are supported)")
        size = size[0]
    need(size is not None, "sample_size is missing (needed for the attention resolutions)")
    size = int(size) if size is not None else 32

    downs, ups = list(c["down_block_types"]), list(c["up_block_types"])
    need(len(downs) == len(chans) == len(ups),
         f"down_block_types ({len(downs)}), block_out_channels ({len(chans)}) and up_block_types ({len(ups)}) "
         "must have the same length")
    bad = [t for t in downs if t not in _DOWN] + [t for t in ups if t not in _UP]
    need(not bad, f"unsupported block types {bad} (supported: {sorted(_DOWN)} and {sorted(_UP)})")
    attn_res: list[int] = []
    if not bad and len(downs) == len(ups):
        for level, (d, u) in enumerate(zip(downs, reversed(ups))):
            need(_DOWN[d] == _UP[u], f"down_block_types[{level}]={d!r} and its mirror "
                 f"up_block_types[{len(ups) - 1 - level}]={u!r} disagree on attention (our U-Net mirrors it)")
            if _DOWN[d]:
                attn_res.append(size // 2**level)
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        att_chans = [v for v, d in zip(chans, downs) if _DOWN.get(d)] + [chans[-1]]
        need(all(v % int(head_dim) == 0 for v in att_chans),
             f"attention_head_dim={head_dim} must divide the attention blocks' channels {att_chans}")
    if errors:
        raise DiffusersImportError("unsupported diffusers UNet2DModel config: " + "; ".join(errors))

    try:
        return UNetConfig(
            in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]), resolution=size, ch=ch,
            ch_mult=ch_mult, num_res_blocks=int(c["layers_per_block"]), attn_resolutions=tuple(attn_res),
            dropout=float(c["dropout"]), num_heads=1,
            num_head_channels=None if head_dim is None else int(head_dim), num_classes=None,
            resamp_with_conv=True, norm_groups=G, scale_shift_norm=scale_shift, resblock_updown=False,
            time_flip_sin_to_cos=bool(c["flip_sin_to_cos"]), time_freq_shift=float(c["freq_shift"]),
            downsample_padding=int(c["downsample_padding"]), norm_eps=float(c["norm_eps"]),
        )
    except ValueError as e:
        raise DiffusersImportError(f"unsupported diffusers UNet2DModel config: {e}") from e


# --------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------
# (our key, source keys, combine(source tensors) -> our tensor)
_Rule = tuple[str, tuple[tuple[str, ...], ...], Callable[..., Tensor]]


def _same(t: Tensor) -> Tensor:
    return t


def _linear_to_conv1x1(t: Tensor) -> Tensor:
    return t[:, :, None, None] if t.ndim == 2 else t


def _qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _linear_to_conv1x1(torch.cat([q, k, v], dim=0))


def _key_table(cfg: UNetConfig) -> list[_Rule]:
    """The explicit mapping, built by walking the architecture as both models lay it out.

    Each source is a tuple of accepted names (current diffusers name first, legacy name second)."""
    rules: list[_Rule] = []

    def param(ours: str, theirs: str, fn=_same) -> None:
        for p in ("weight", "bias"):
            rules.append((f"{ours}.{p}", ((f"{theirs}.{p}",),), fn))

    def resnet(ours: str, theirs: str, in_ch: int, out_ch: int) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"),
                     ("norm2", "norm2"), ("conv2", "conv2")):
            param(f"{ours}.{a}", f"{theirs}.{b}")
        if in_ch != out_ch:
            param(f"{ours}.skip", f"{theirs}.conv_shortcut")

    def attention(ours: str, theirs: str) -> None:
        param(f"{ours}.norm", f"{theirs}.group_norm")
        for p in ("weight", "bias"):
            rules.append((f"{ours}.qkv.{p}", tuple((f"{theirs}.{new}.{p}", f"{theirs}.{old}.{p}")
                                                   for new, old in (("to_q", "query"), ("to_k", "key"),
                                                                    ("to_v", "value"))), _qkv))
            rules.append((f"{ours}.proj_out.{p}", ((f"{theirs}.to_out.0.{p}", f"{theirs}.proj_attn.{p}"),),
                          _linear_to_conv1x1))

    param("temb.0", "time_embedding.linear_1")
    param("temb.2", "time_embedding.linear_2")
    param("conv_in", "conv_in")

    ch, n = cfg.ch, cfg.num_res_blocks
    levels = len(cfg.ch_mult)
    i, cur, r = 0, ch, cfg.resolution
    skip_chs = [ch]
    for level, mult in enumerate(cfg.ch_mult):
        out = ch * mult
        for j in range(n):
            resnet(f"down.{i}.res", f"down_blocks.{level}.resnets.{j}", cur, out)
            if r in cfg.attn_resolutions:
                attention(f"down.{i}.attn", f"down_blocks.{level}.attentions.{j}")
            cur = out
            skip_chs.append(cur)
            i += 1
        if level != levels - 1:
            param(f"down.{i}.conv", f"down_blocks.{level}.downsamplers.0.conv")
            skip_chs.append(cur)
            i += 1
            r //= 2

    resnet("mid.0", "mid_block.resnets.0", cur, cur)
    attention("mid.1", "mid_block.attentions.0")
    resnet("mid.2", "mid_block.resnets.1", cur, cur)

    i = 0
    for k, (level, mult) in enumerate(reversed(list(enumerate(cfg.ch_mult)))):
        out = ch * mult
        for j in range(n + 1):
            in_ch = cur + skip_chs.pop()
            resnet(f"up.{i}.res", f"up_blocks.{k}.resnets.{j}", in_ch, out)
            if r in cfg.attn_resolutions:
                attention(f"up.{i}.attn", f"up_blocks.{k}.attentions.{j}")
            cur = out
            i += 1
        if level != 0:
            param(f"up.{i}.conv", f"up_blocks.{k}.upsamplers.0.conv")
            i += 1
            r *= 2

    param("norm_out", "conv_norm_out")
    param("conv_out", "conv_out")
    return rules


def convert_diffusers_state_dict(sd: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Our U-Net's state_dict from a diffusers ``UNet2DModel`` state_dict, for the config
    :func:`unet_config_from_diffusers` gave.

    Every source tensor must be used exactly once; a missing key, a leftover key or a shape that
    differs from our network's raises :class:`DiffusersImportError` naming the first such key."""
    # the target's shapes (building the randomly initialised network takes well under a second at CIFAR size)
    expected = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for ours, sources, fn in _key_table(cfg):
        tensors = []
        for names in sources:
            name = next((n for n in names if n in sd), None)
            if name is None:
                raise DiffusersImportError(
                    f"diffusers state_dict has no {' or '.join(map(repr, names))} (needed for our {ours!r})")
            used.add(name)
            tensors.append(sd[name])
        try:
            out[ours] = fn(*tensors).detach().to(torch.float32).contiguous()
        except RuntimeError as e:  # e.g. q/k/v of different widths
            raise DiffusersImportError(f"{ours!r}: cannot combine {[tuple(t.shape) for t in tensors]}: {e}") from e
        if ours not in expected:
            raise DiffusersImportError(f"internal key table error: our UNet has no {ours!r}")
        if tuple(out[ours].shape) != tuple(expected[ours]):
            raise DiffusersImportError(
                f"shape mismatch at {ours!r} (from {[n for names in sources for n in names if n in sd]}): "
                f"checkpoint gives {tuple(out[ours].shape)}, our UNet expects {tuple(expected[ours])}")
    leftover = [k for k in sd if k not in used]
    if leftover:
        raise DiffusersImportError(
            f"{len(leftover)} diffusers tensors have no place in our UNet, first {leftover[0]!r} (all: {leftover[:8]}"
            + (" ...)" if len(leftover) > 8 else ")"))
    missing = [k for k in expected if k not in out]
    if missing:
        raise DiffusersImportError(f"our UNet's {missing[0]!r} has no source in the checkpoint")
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _model_dir(path_or_dir: str | Path) -> tuple[Path, Path]:
    """(folder with config.json, weights file) for a model folder, a pipeline folder (``unet/``)
    or a weights file next to its config.json."""
    p = Path(path_or_dir).expanduser()
    if p.is_file():
        d = p.parent
        if not (d / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{d / CONFIG_NAME} not found (the diffusers config beside {p.name})")
        return d, p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such diffusers model folder (download it yourself; nothing is fetched)")
    if not (p / CONFIG_NAME).is_file() and (p / "unet" / CONFIG_NAME).is_file():
        p = p / "unet"
    if not (p / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{p / CONFIG_NAME} not found: not a diffusers UNet2DModel folder")
    for name in WEIGHTS_NAMES:
        if (p / name).is_file():
            return p, p / name
    raise FileNotFoundError(f"{p}: none of {list(WEIGHTS_NAMES)} found")


def load_diffusers_state_dict(weights: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` (needs the ``safetensors`` package) or ``.bin`` file, on CPU."""
    weights = Path(weights)
    if weights.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # noqa: PLC0415 - optional dependency, .safetensors files only
        except ImportError as e:
            raise ImportError(f"reading {weights.name} needs the safetensors package: pip install safetensors") from e
        return load_file(str(weights), device="cpu")
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise DiffusersImportError(f"{weights}: expected a state_dict, got {type(sd).__name__}")
    return sd


def load_diffusers_unet(path_or_dir: str | Path, **runtime) -> UNet:
    """Our :class:`UNet` (fp32, eval mode, on CPU) with the weights of a local diffusers
    ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``).

    ``runtime`` may set runtime-only config fields (``attn_impl``).  Nothing is downloaded and
    diffusers is not imported."""
    d, weights = _model_dir(path_or_dir)
    config = json.loads((d / CONFIG_NAME).read_text())
    cfg = unet_config_from_diffusers(config)
    bad = set(runtime) - set(UNetConfig.RUNTIME_FIELDS)
    if bad:
        raise ValueError(f"only runtime fields {UNetConfig.RUNTIME_FIELDS} may be overridden, got {sorted(bad)}")
    cfg = cfg.replace(**runtime)
    sd = convert_diffusers_state_dict(load_diffusers_state_dict(weights), cfg)
    net = UNet(cfg)
    net.load_state_dict(sd, strict=True)
    return net.eval()


def _scheduler_config(d: Path) -> dict:
    for cand in (d / "scheduler_config.json", d / "scheduler" / "scheduler_config.json",
                 d.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return {}


def ddpm_denoiser_from_diffusers(path: str | Path, **runtime):
    """A :class:`~bench_core.denoiser.DiscreteVPEpsDenoiser` over a local diffusers DDPM checkpoint.

    The U-Net comes from :func:`load_diffusers_unet`; the noise schedule is DDPM's linear betas
    (:func:`bench_core.schedules.linear_betas`, T=1000 from 1e-4 to 0.02) unless a
    ``scheduler_config.json`` beside the model (or in a pipeline's ``scheduler/``) says otherwise;
    only linear schedules and epsilon prediction are supported.  For ``google/ddpm-cifar10-32``
    (downloaded by the user) this is the paper's CIFAR-10 model on data in [-1, 1]:

        den = ddpm_denoiser_from_diffusers("ddpm-cifar10-32")
        # den(x, sigma) -> x0 estimate; use any sampler with e.g. schedules.discrete_grid(abar, 50)
    """
    net = load_diffusers_unet(path, **runtime)
    if net.cfg.out_channels != net.cfg.in_channels:
        raise DiffusersImportError(
            f"out_channels={net.cfg.out_channels} != in_channels={net.cfg.in_channels}: "
            "a learned-variance output is not an epsilon-prediction DDPM model")
    d, _ = _model_dir(path)
    sch = _scheduler_config(d)
    if sch.get("beta_schedule", "linear") != "linear":
        raise DiffusersImportError(f"beta_schedule={sch['beta_schedule']!r} (only 'linear' is supported)")
    if sch.get("prediction_type", "epsilon") != "epsilon":
        raise DiffusersImportError(f"prediction_type={sch['prediction_type']!r} (only 'epsilon' is supported)")
    if sch.get("trained_betas") is not None:
        raise DiffusersImportError("trained_betas are not supported")
    betas = linear_betas(int(sch.get("num_train_timesteps", 1000)), float(sch.get("beta_start", 1e-4)),
                         float(sch.get("beta_end", 0.02)))
    return DiscreteVPEpsDenoiser(net, alphas_cumprod(betas)).eval()
