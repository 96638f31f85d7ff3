"""diffusers UNet2DModel checkpoints -> our UNet: the converted network computes the same function.

diffusers is an optional test dependency (never a runtime one): the comparisons skip without it; the
config checks and the importer itself need no diffusers.
Tolerance: max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|) in float32 on CPU (the two differ
only in summation order: fused vs separate q/k/v projections, kernel choices).
"""
from __future__ import annotations

import json

import pytest
import torch

from bench_core.nets.diffusers_import import (
    DiffusersImportError, convert_diffusers_state_dict, ddpm_denoiser_from_diffusers, load_diffusers_unet,
    unet_config_from_diffusers,
)
from bench_core.nets.unet import DDPM_CIFAR10, DIGITS_SMALL, UNet, UNetConfig, count_parameters


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")

RTOL = 1e-4

# google/ddpm-cifar10-32's config.json (the DDPM CIFAR-10 model of Ho et al. 2020, converted).
DDPM_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
    downsample_padding=0, act_fn="silu", center_input_sample=False, time_embedding_type="positional",
    mid_block_scale_factor=1,
)
# Small configs exercising the other switches: diffusers' defaults for the embedding, symmetric
# downsample padding, multi-head attention, norm_eps 1e-5, AdaGN ("scale_shift").
SMALL = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=8, norm_num_groups=8,
)
SMALL_SCALE_SHIFT = dict(SMALL, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8,
                         flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, layers_per_block=2)


def _random_diffusers(diffusers, config: dict, tmp_path, seed: int = 0, perturb: bool = True):
    """A randomly initialised UNet2DModel saved with save_pretrained to tmp_path / "model"."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    if perturb:  # move every tensor off its init (GroupNorm affines at 1/0, zero biases): a mis-mapped one shows
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "model"
    model.save_pretrained(path)
    return model, path


def _max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("config", [SMALL, SMALL_SCALE_SHIFT], ids=["small", "small_scale_shift"])
def test_small_configs_match_diffusers(diffusers, config, tmp_path):
    ref, path = _random_diffusers(diffusers, config, tmp_path)
    net = load_diffusers_unet(path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0.0, 17.0, 999.0])
    with torch.no_grad():
        want = ref(x, t).sample
        got = net(x, t)
    assert _max_rel_diff(got, want) <= RTOL
    for impl in ("naive", "chunked"):  # every attention kernel computes the imported function
        with torch.no_grad():
            assert _max_rel_diff(net.set_attn_impl(impl, chunk=64)(x, t), want) <= RTOL


def test_ddpm_cifar10_matches_diffusers(diffusers, tmp_path):
    ref, path = _random_diffusers(diffusers, DDPM_CIFAR10_DIFFUSERS, tmp_path)
    net = load_diffusers_unet(path)
    assert count_parameters(net) == count_parameters(ref) == 35_746_307
    # the same architecture as our DDPM preset, plus the original code's compatibility switches
    assert net.cfg.replace(dropout=DDPM_CIFAR10.dropout, downsample_padding=1) == DDPM_CIFAR10
    assert net.cfg.downsample_padding == 0 and "downsample_padding" in net.cfg.arch_dict()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([3, 640])
    with torch.no_grad():
        want = ref(x, t).sample
        got = net(x, t)
    diff = _max_rel_diff(got, want)
    print(f"DDPM CIFAR-10: max |ours - diffusers| / max(1, max|diffusers|) = {diff:.2e}")
    assert diff <= RTOL

    # as a denoiser with the DDPM linear schedule: eps at an integer timestep is the network's
    den = ddpm_denoiser_from_diffusers(path)
    assert den.num_timesteps == 1000
    sigma = den.sigmas[640].reshape(1)
    assert abs(float(den.sigma_to_t(sigma)) - 640) < 1e-3
    with torch.no_grad():  # the denoiser feeds the network x * sqrt(abar_t) = x / sqrt(1 + sigma^2)
        eps = den.eps(x[1:] * (1 + sigma**2).sqrt(), sigma)
    assert _max_rel_diff(eps, want[1:]) <= RTOL


def test_legacy_attention_names_and_bin_weights(diffusers, tmp_path):
    """Older checkpoints (e.g. google/ddpm-cifar10-32) name attention query/key/value/proj_attn, in a .bin."""
    ref, path = _random_diffusers(diffusers, SMALL, tmp_path)
    sd = ref.state_dict()
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    (path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(legacy, path / "diffusion_pytorch_model.bin")
    net = load_diffusers_unet(path / "diffusion_pytorch_model.bin")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 500.0])
    with torch.no_grad():
        assert _max_rel_diff(net(x, t), ref(x, t).sample) <= RTOL

    # a pipeline's scheduler_config.json sets the schedule; only linear epsilon-prediction DDPM imports
    (path / "scheduler_config.json").write_text(json.dumps(
        {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.03, "num_train_timesteps": 500}))
    den = ddpm_denoiser_from_diffusers(path)
    abar_1 = (1 - 2e-4) * (1 - (2e-4 + (0.03 - 2e-4) / 499))
    assert den.num_timesteps == 500 and float(den.sigmas[1]) == pytest.approx(((1 - abar_1) / abar_1) ** 0.5)
    (path / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(DiffusersImportError, match="squaredcos_cap_v2"):
        ddpm_denoiser_from_diffusers(path)


def test_compat_fields_keep_existing_config_dicts():
    """The import switches stay out of to_dict()/arch_dict() at their defaults: no existing hash moves."""
    compat = set(UNetConfig.COMPAT_DEFAULTS)
    for cfg in (DDPM_CIFAR10, DIGITS_SMALL, UNetConfig()):
        assert not compat & set(cfg.to_dict()) and not compat & set(cfg.arch_dict())
        assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    imported = unet_config_from_diffusers(DDPM_CIFAR10_DIFFUSERS)
    assert imported.arch_dict()["downsample_padding"] == 0
    assert UNetConfig.from_dict(imported.to_dict()) == imported
    with torch.device("meta"):  # shapes only: no 143 MB of random initialisation
        assert count_parameters(UNet(imported)) == 35_746_307


def test_unsupported_config_is_named(tmp_path):
    with pytest.raises(DiffusersImportError, match="class_embed_type='timestep'"):
        unet_config_from_diffusers(dict(SMALL, class_embed_type="timestep"))
    with pytest.raises(DiffusersImportError, match="time_embedding_type='fourier'.*upsample_type='resnet'"):
        unet_config_from_diffusers(dict(SMALL, time_embedding_type="fourier", upsample_type="resnet"))
    with pytest.raises(DiffusersImportError, match="CrossAttnDownBlock2D"):
        unet_config_from_diffusers(dict(SMALL, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")))
    with pytest.raises(DiffusersImportError, match="disagree on attention"):
        unet_config_from_diffusers(dict(SMALL, up_block_types=("UpBlock2D", "UpBlock2D")))
    with pytest.raises(DiffusersImportError, match="unknown to this importer.*'wibble'"):
        unet_config_from_diffusers(dict(SMALL, wibble=1))
    # a config.json on disk goes through the same check
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(SMALL, num_class_embeds=10)))
    (tmp_path / "m" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DiffusersImportError, match="num_class_embeds=10"):
        load_diffusers_unet(tmp_path / "m")


def test_state_dict_errors_name_the_key(diffusers):
    cfg = unet_config_from_diffusers(SMALL)
    torch.manual_seed(0)
    sd = diffusers.UNet2DModel(**SMALL).state_dict()
    bad = dict(sd)
    bad["down_blocks.1.resnets.0.conv1.weight"] = bad["down_blocks.1.resnets.0.conv1.weight"][:, :-1]
    with pytest.raises(DiffusersImportError, match=r"shape mismatch at 'down\.2\.res\.conv1\.weight'"):
        convert_diffusers_state_dict(bad, cfg)
    missing = {k: v for k, v in sd.items() if k != "mid_block.attentions.0.to_k.bias"}
    with pytest.raises(DiffusersImportError, match="mid_block.attentions.0.to_k.bias"):
        convert_diffusers_state_dict(missing, cfg)
    with pytest.raises(DiffusersImportError, match="'extra.weight'"):
        convert_diffusers_state_dict({**sd, "extra.weight": torch.zeros(1)}, cfg)
