"""Shared U-Net: DDPM parameter count, shapes, batch independence, attention paths, dropout, time."""
from __future__ import annotations

import pytest
import torch

from bench_core.nets import DDPM_CIFAR10, DIGITS_SMALL, UNet, UNetConfig
from bench_core.nets.unet import count_parameters, num_groups, timestep_embedding

TINY = UNetConfig(in_channels=1, resolution=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), num_heads=2, dropout=0.1)

CONFIGS = {
    "tiny_gray8": TINY,
    "digits_small": DIGITS_SMALL,
    "rgb16_two_attn": UNetConfig(in_channels=3, resolution=16, ch=16, ch_mult=(1, 2, 2),
                                 num_res_blocks=1, attn_resolutions=(8, 4), norm_groups=4),
    "class_cond": TINY.replace(num_classes=10),
    "adm_options": TINY.replace(scale_shift_norm=True, resblock_updown=True, num_head_channels=4,
                                num_classes=3, out_channels=2),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero-initialised layers' weights so every path contributes to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(1.0)
    return model


def build(cfg: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomize(UNet(cfg), seed)


def test_ddpm_cifar10_parameter_count():
    # Ho et al. 2020: 35.7M; the official checkpoint has 35,746,307 parameters.
    with torch.device("meta"):
        model = UNet(DDPM_CIFAR10)
    n = count_parameters(model)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert n == 35_746_307


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape(name):
    cfg = CONFIGS[name]
    model = build(cfg).eval()
    x = torch.randn(3, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.tensor([0.0, 10.5, 999.0])
    y = torch.tensor([0, 1, cfg.num_classes]) if cfg.num_classes else None
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (3, cfg.out_channels, cfg.resolution, cfg.resolution)
    assert torch.isfinite(out).all()
    if cfg.out_channels == cfg.in_channels:
        assert out.shape == x.shape


def test_default_init_output_is_zero():
    # DDPM zero-initialises the output conv, so an untrained model predicts eps = 0.
    model = UNet(TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", ["tiny_gray8", "class_cond", "adm_options"])
def test_batch_independence(name):
    cfg = CONFIGS[name]
    model = build(cfg).eval()
    x = torch.randn(5, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.tensor([0.0, 1.5, 250.0, 500.25, 999.0])
    y = torch.tensor([0, 1, 2, cfg.num_classes, 1]) if cfg.num_classes else None
    with torch.no_grad():
        full = model(x, t, y)
        for i in range(5):
            yi = y[i : i + 1] if y is not None else None
            row = model(x[i : i + 1], t[i : i + 1], yi)
            torch.testing.assert_close(full[i : i + 1], row, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny_gray8", "rgb16_two_attn", "adm_options"])
def test_attention_naive_matches_sdpa(name):
    cfg = CONFIGS[name]
    model = build(cfg).eval()
    x = torch.randn(4, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.tensor([3.0, 30.0, 300.0, 900.0])
    y = torch.tensor([0, 1, 2, 3]) if cfg.num_classes else None
    with torch.no_grad():
        out_sdpa = model.set_attn_impl("sdpa")(x, t, y)
        out_naive = model.set_attn_impl("naive")(x, t, y)
    assert model.cfg.attn_impl == "naive"
    torch.testing.assert_close(out_naive, out_sdpa, atol=1e-5, rtol=1e-5)
    # The same switch through the config gives the same network.
    model2 = UNet(cfg.replace(attn_impl="naive"))
    model2.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model2.eval()(x, t, y), out_sdpa, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode():
    model = build(TINY.replace(dropout=0.5))
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5.0, 50.0])
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x, t), model(x, t))
        model.train()
        torch.manual_seed(1)
        a = model(x, t)
        torch.manual_seed(2)
        b = model(x, t)
    assert not torch.allclose(a, b)

    no_dropout = build(TINY.replace(dropout=0.0)).train()
    with torch.no_grad():
        assert torch.equal(no_dropout(x, t), no_dropout(x, t))


def test_time_embedding_distinguishes_t_and_accepts_fractions():
    emb = timestep_embedding(torch.tensor([0.0, 999.0, 499.5]), 32)
    assert emb.shape == (3, 32)
    # t = 0: sin = 0, cos = 1 in every frequency (DDPM's get_timestep_embedding).
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(16), torch.ones(16)]))
    assert not torch.allclose(emb[0], emb[1])
    # Worked by hand: the lowest-frequency pair is (sin t, cos t).
    t = torch.tensor(499.5)
    torch.testing.assert_close(emb[2, [0, 16]], torch.stack([t.sin(), t.cos()]))

    model = build(TINY).eval()
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([0.0, 999.0, 10.0]))
        out_frac = model(x[:1], torch.tensor([10.5]))
    assert not torch.allclose(out[0], out[1])
    assert torch.isfinite(out_frac).all() and not torch.allclose(out_frac[0], out[2])
    # A scalar t broadcasts over the batch.
    with torch.no_grad():
        torch.testing.assert_close(model(x, 10.0), out[2:3].expand(3, -1, -1, -1))


def test_class_conditioning_and_null_label():
    # with one channel per group, GroupNorm removes an added per-channel embedding entirely (the label would
    # move the output only by rounding): two channels per group keep the conditioning path visible
    cfg = CONFIGS["class_cond"].replace(norm_groups=max(1, TINY.ch // 2))
    model = build(cfg).eval()
    assert model.label_emb.num_embeddings == cfg.num_classes + 1
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    t = torch.tensor([100.0, 100.0])
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 1]))
        null = model(x, t, torch.tensor([cfg.num_classes] * 2))
        uncond = model(x, t)
    assert (out[0] - out[1]).abs().max() > 1e-2 * out.abs().max()  # the label changes the output
    torch.testing.assert_close(uncond, null)  # y=None means the null label
    with pytest.raises(ValueError):
        build(TINY)(x, t, torch.tensor([0, 1]))


def test_group_count_divides_channels():
    assert num_groups(8, 32) == 8
    assert num_groups(48, 32) == 24
    assert num_groups(128, 32) == 32
    assert num_groups(3, 2) == 1
    for m in build(CONFIGS["rgb16_two_attn"]).modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0


def test_every_parameter_gets_a_gradient():
    cfg = CONFIGS["adm_options"]
    model = build(cfg).train()
    x = torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution)
    model(x, torch.tensor([1.0, 500.0]), torch.tensor([0, 3])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert model.label_emb.weight.grad[[0, 3]].abs().sum() > 0


def test_float64_forward():
    model = build(TINY).double().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([3.0, 4.5]))
    assert out.dtype == torch.float64


def test_config_round_trip():
    cfg = DDPM_CIFAR10.replace(num_classes=10)
    d = cfg.to_dict()
    assert d["ch_mult"] == [1, 2, 2, 2] and d["out_channels"] == 3
    assert UNetConfig.from_dict(d) == cfg
    assert "attn_impl" not in cfg.arch_dict()
    assert cfg.replace(attn_impl="naive").arch_dict() == cfg.arch_dict()
    with pytest.raises(ValueError):
        UNetConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        UNetConfig(resolution=6, ch_mult=(1, 2, 2))
