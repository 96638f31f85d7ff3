"""LDM: the KL autoencoder (shapes, KL against closed forms), the decode hook inside the harness, configs."""
import math

import pytest
import torch

from bench_core.denoiser import GaussianDenoiser
from bench_core.nets.autoencoder import (Autoencoder, AutoencoderConfig, DiagonalGaussian, LatentDecoder,
                                         autoencoder_loss)


@pytest.mark.parametrize("f", [2, 4, 8])
def test_autoencoder_shapes(f):
    cfg = AutoencoderConfig(resolution=32, f=f, z_channels=3, ch=4, norm_groups=2)
    ae = Autoencoder(cfg)
    x = torch.randn(2, 1, 32, 32)
    q = ae.encode(x)
    assert q.mean.shape == (2, 3, 32 // f, 32 // f) == (2, *cfg.latent_shape)
    assert ae.decode(q.mean).shape == x.shape
    x_rec, q2 = ae(x, torch.Generator().manual_seed(0))
    assert x_rec.shape == x.shape


def test_kl_matches_torch_distributions_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    q = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), ref)
    # Monte Carlo: E_q[log q(z) - log N(z; 0, I)] for the first sample
    z = mean[:1] + (0.5 * logvar[:1]).exp() * torch.randn(20000, 2, 4, 4, generator=g, dtype=torch.float64)
    log_q = (-0.5 * ((z - mean[:1]) ** 2 / logvar[:1].exp() + logvar[:1] + math.log(2 * math.pi))).flatten(1).sum(1)
    log_p = (-0.5 * (z**2 + math.log(2 * math.pi))).flatten(1).sum(1)
    mc = (log_q - log_p).mean()
    assert abs(float(mc) - float(q.kl()[0])) < 0.05 * float(q.kl()[0]) + 0.2
    # KL = 0 exactly at the prior
    assert float(DiagonalGaussian(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)).kl()) == 0.0


def test_autoencoder_loss_is_l1_plus_weighted_kl_per_pixel():
    ae = Autoencoder(AutoencoderConfig(resolution=8, f=2, ch=4, norm_groups=2)).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    w = 0.25
    loss = autoencoder_loss(w)(ae, x, None, torch.Generator().manual_seed(5))
    q = ae.encode(x)
    z = q.mean + q.std * torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(5)).double()
    rec = (x - ae.decode(z)).abs().flatten(1).sum(1)
    kl = 0.5 * (q.mean**2 + q.logvar.exp() - 1 - q.logvar).flatten(1).sum(1)
    torch.testing.assert_close(loss, ((rec + w * kl) / 64).mean())


def test_latent_decoder_scale_factor_composes():
    ae = Autoencoder(AutoencoderConfig(resolution=16, f=4, ch=4, norm_groups=2)).eval()
    dec = LatentDecoder(ae, scale_factor=2.5)
    x = torch.randn(4, 1, 16, 16)
    z = dec.encode(x)
    with torch.no_grad():
        torch.testing.assert_close(z, 2.5 * ae.encode(x).mean)
        torch.testing.assert_close(dec(z), ae.decode(ae.encode(x).mean))


def test_autoencoder_config_errors():
    for bad in (dict(f=3), dict(resolution=30, f=4), dict(f=64, resolution=64), dict(z_channels=0)):
        with pytest.raises(ValueError):
            AutoencoderConfig(**bad)


class _Upsampler(torch.nn.Module):
    """A known 'decoder': nearest upsampling x4 of the first latent channel, counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        return torch.nn.functional.interpolate(z[:, :1], scale_factor=4.0, mode="nearest").clamp(-1, 1)


def test_harness_decodes_inside_the_run_and_does_not_count_the_decoder(tmp_path):
    from bench_core.records import decode_preview
    from bench_core.runner import Evaluator, run_one
    from bench_core.suite import Run
    from reproductions import LoadedModel

    dec = _Upsampler()
    lm = LoadedModel(GaussianDenoiser(0.0, 0.5), "t", "digits", (2, 8, 8), dataset_opts={"resolution": 32}, decode=dec)
    run = Run(suite="t", entry="e", reproduction="ldm", model="m", model_overrides={}, sampler="ddim",
              sampler_opts={"eta": 0.0}, grid={"kind": "karras"}, steps=6, seed=0, num_samples=24, batch_size=8)
    rec = run_one(run, lm, Evaluator(tmp_path, None), torch.device("cpu"))
    assert rec.status == "ok", rec.error
    assert rec.nfe == 6                        # the decoder is not a network evaluation of the denoiser
    assert dec.calls == 1 + 3                  # warm-up + one per batch, inside draw()
    p = decode_preview(rec.preview)
    assert p.shape[1:] == (1, 32, 32)          # the records hold decoded images
    assert rec.fid is not None and rec.fid_reference.startswith("digits,resolution=32")


def test_ldm_configs_hashes_and_validation():
    import reproductions

    ldm = reproductions.get("ldm")
    assert set(ldm.models) >= {"pixel", "f2", "f4"}
    h = {m: ldm.model_hash(m, {}) for m in ldm.models}
    assert len(set(h.values())) == len(h)
    # the autoencoder's key does not depend on the diffusion model's training
    c1 = ldm.model_config("f4", {})
    c2 = ldm.model_config("f4", {"diffusion": {"train": {"steps": 7}}})
    assert ldm.ae_hash(c1) == ldm.ae_hash(c2) and ldm.model_hash("f4", {}) != ldm.model_hash(
        "f4", {"diffusion": {"train": {"steps": 7}}})
    assert ldm.ae_hash(ldm.model_config("pixel", {})) is None
    # a U-Net that does not fit the latent, a bad factor, an unknown field
    assert ldm.override_errors("f4", {"autoencoder": {"f": 8}})
    assert ldm.override_errors("f4", {"autoencoder": {"f": 3}})
    assert ldm.override_errors("f4", {"diffusion": {"dataset_opts": {"resolution": 64}}})
    assert ldm.override_errors("f4", {"autoencodr": {}})
    assert ldm.override_errors("f4", {"diffusion": {"train": {"steps": 5}}}) == []
    assert ldm.model_config("f4", {}).diffusion.unet.resolution == 8


def _ldm_df(fids: dict, sps: dict, rfid: dict, flops: dict | None = None, noise: float = 0.5):
    """Synthetic records: 2 training x 3 sampling seeds per factor, a shared per-seed offset times ``noise``."""
    import pandas as pd

    off = {(0, 0): 0.6, (0, 1): -0.8, (0, 2): 0.2, (1, 0): -0.4, (1, 1): 1.0, (1, 2): -0.6}
    rows = []
    for f, fid in fids.items():
        for i, ((ts, s), e) in enumerate(off.items()):
            j = noise * float(torch.randn((), generator=torch.Generator().manual_seed(100 * f + i)))
            rows.append({"status": "ok", "reproduction": "ldm", "model": "pixel" if f == 1 else f"f{f}",
                         "sampler": "ddim", "sampler_opts": {"eta": 0.0}, "steps": 10, "nfe": 10.0, "fid": fid + j,
                         "precision": 0.5, "recall": 0.5, "samples_per_sec": sps[f] * (1 + 0.02 * e), "peak_mem_mb": 1.0,
                         "fid_extractor": "e", "num_samples": 500, "fid_reference": "r", "seed": s, "train_seed": ts,
                         "metrics": {"f": f, "rfid": rfid.get(f), "latent_shape": "x",
                                     "rfid_subsets": None if f == 1 else [rfid[f] + d for d in (0.0, 0.3, -0.3)],
                                     "train_flops": (flops or {}).get(f, 1.2e12), "train_cost_sec": 30.0}})
    return pd.DataFrame(rows)


def test_ldm_claims_from_records():
    import pandas as pd

    import reproductions

    ldm = reproductions.get("ldm")
    status = lambda df: {c.id: c.check(df).status for c in ldm.claims()}
    sps = {1: 20.0, 2: 100.0, 4: 400.0, 8: 600.0, 16: 700.0}
    rfid = {2: 1.0, 4: 2.0, 8: 5.0, 16: 40.0}
    # the paper's picture: f = 4 best, f = 16 worst, pixel slow
    df = _ldm_df({1: 20.0, 2: 12.0, 4: 8.0, 8: 10.0, 16: 60.0}, sps, rfid)
    assert status(df) == {"ldm-latent-faster": "pass", "ldm-pixel-baseline-works": "pass", "ldm-larger-f-rfid": "pass",
                          "ldm-intermediate-f-best": "pass"}
    # a broken pixel baseline (noise: recall ~0) is a failed sanity check, and the comparison with it is not run
    broken = df.copy()
    broken.loc[broken["model"] == "pixel", "recall"] = [0.004, 0.003, 0.005, 0.004, 0.002, 0.006]
    st = {c.id: c.check(broken) for c in ldm.claims()}
    assert st["ldm-pixel-baseline-works"].status == "fail"
    assert st["ldm-latent-faster"].status == "not run" and "broken side" in st["ldm-latent-faster"].why
    # the pixel model undertrained at f = 4's compute (recall ~0) but drawing digits at 4x that budget: the design
    # works, so the equal-compute comparison runs (and passes: the latent model wins at equal compute)
    big = broken[broken["model"] == "pixel"].copy()
    big["model"] = "pixel-4x"
    big["recall"] = [0.45, 0.5, 0.55, 0.5, 0.48, 0.52]
    big["fid"] = big["fid"] - 10.0
    big["metrics"] = [{**m, "train_flops": 4 * 1.2e12} for m in big["metrics"]]
    st = {c.id: c.check(pd.concat([broken, big], ignore_index=True)) for c in ldm.claims()}
    assert st["ldm-pixel-baseline-works"].status == "pass" and "pixel-4x (4.0x" in st["ldm-pixel-baseline-works"].ours
    assert st["ldm-latent-faster"].status == "pass" and "1.20 TFLOP (pixel)" in st["ldm-latent-faster"].ours
    assert st["ldm-intermediate-f-best"].status == "pass"  # the sweep reads the equal-compute pixel model only
    t = ldm.tables(pd.concat([broken, big], ignore_index=True))
    (tab,) = t.values()
    assert sorted(tab.loc[tab["f"] == 1, "compute_x"]) == ["1.00", "4.00"]
    # ... and broken at 4x as well: the sanity check fails, the comparison is not run
    big["recall"] = [0.004, 0.003, 0.005, 0.004, 0.002, 0.006]
    st = {c.id: c.check(pd.concat([broken, big], ignore_index=True)) for c in ldm.claims()}
    assert st["ldm-pixel-baseline-works"].status == "fail" and st["ldm-latent-faster"].status == "not run"
    # inside the noise: f = 4 vs pixel, f = 4 vs f = 2 -> inconclusive
    st = status(_ldm_df({1: 8.3, 2: 8.2, 4: 8.0, 8: 8.4, 16: 8.5}, sps, rfid, noise=3.0))
    assert st["ldm-latent-faster"] == "inconclusive" and st["ldm-intermediate-f-best"] == "inconclusive"
    # reversed: pixel best (an end of the sweep), f = 4 significantly worse than pixel
    st = status(_ldm_df({1: 5.0, 2: 12.0, 4: 15.0, 8: 10.0, 16: 60.0}, sps, rfid))
    assert st["ldm-latent-faster"] == "fail" and st["ldm-intermediate-f-best"] == "fail"
    # the largest f not the worst: f = 2 significantly worse than f = 16
    assert status(_ldm_df({1: 20.0, 2: 70.0, 4: 8.0, 8: 10.0, 16: 60.0}, sps, rfid))["ldm-intermediate-f-best"] == "fail"
    # unequal training compute: no comparison
    st = status(_ldm_df({1: 20.0, 2: 12.0, 4: 8.0, 8: 10.0, 16: 60.0}, sps, rfid, flops={1: 5e12}))
    assert st["ldm-latent-faster"] == "not run"
    # rFID reversed
    assert status(_ldm_df({1: 20.0, 2: 12.0, 4: 8.0, 8: 10.0, 16: 60.0}, sps,
                          {2: 40.0, 4: 2.0, 8: 5.0, 16: 1.0}))["ldm-larger-f-rfid"] == "fail"
    for c in ldm.claims():
        r = c.check(pd.DataFrame())
        assert r.status == "not run" and r.why
    assert ldm.tables(df)


def test_pixel_preset_has_the_f4_training_compute():
    """Equal compute: the pixel model's training FLOPs match f = 4's (autoencoder + diffusion) within 2%, and the
    FLOP counter agrees with a hand count for one convolution."""
    import reproductions
    from reproductions.ldm import PIXEL_COMPUTE, forward_flops, train_flops

    ldm = reproductions.get("ldm")
    pix, f4 = train_flops(ldm.model_config("pixel", {})), train_flops(ldm.model_config("f4", {}))
    assert pix["ae_flops"] == 0 and f4["ae_flops"] > 0
    assert abs(pix["train_flops"] - f4["train_flops"]) < 0.02 * f4["train_flops"]
    # the larger pixel budget: PIXEL_COMPUTE x f = 4's, the same network
    big = train_flops(ldm.model_config(f"pixel-{PIXEL_COMPUTE}x", {}))
    assert abs(big["train_flops"] - PIXEL_COMPUTE * f4["train_flops"]) < 0.02 * PIXEL_COMPUTE * f4["train_flops"]
    assert ldm.model_config(f"pixel-{PIXEL_COMPUTE}x", {}).diffusion.unet == ldm.model_config("pixel", {}).diffusion.unet
    # every GroupNorm group of the pixel U-Net holds at least 2 channels (one channel per group is an instance norm)
    from bench_core.nets.unet import UNet

    groups = [m for m in UNet(ldm.model_config("pixel", {}).diffusion.unet).modules()
              if isinstance(m, torch.nn.GroupNorm)]
    assert groups and min(m.num_channels // m.num_groups for m in groups) >= 2
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert forward_flops(conv, torch.zeros(1, 3, 8, 8)) == 2 * 5 * 3 * 9 * 64
    # the pixel U-Net reaches 4x4 (it sees the whole 32x32 image); the latent U-Nets are sized for their latents
    u = ldm.model_config("pixel", {}).diffusion.unet
    assert u.resolution == 32 and u.resolution // 2 ** (len(u.ch_mult) - 1) == 4
    assert ldm.model_config("f16", {}).diffusion.unet.resolution == 2


def test_pixel_training_lowers_the_loss_and_samples_vary():
    """A few hundred steps of the pixel model (its preset's U-Net, narrower) on 32x32 digits: L_simple on a fixed
    held-out batch drops, and DDIM samples are not constant."""
    import reproductions
    from bench_core.data import load_dataset
    from bench_core.denoiser import DiscreteVPEpsDenoiser
    from bench_core.nets.unet import UNet
    from bench_core.samplers import sample_ddim
    from bench_core.schedules import alphas_cumprod, discrete_grid
    from bench_core.train import seeded_init, train
    from reproductions.ddpm import l_simple

    ldm = reproductions.get("ldm")
    cfg = ldm.model_config("pixel", {"diffusion": {"unet": {"ch": 4, "norm_groups": 4},
                                                   "train": {"steps": 150, "batch_size": 16, "warmup": 20}}})
    d = cfg.diffusion
    x = load_dataset(d.dataset, **d.dataset_opts).x
    abar = alphas_cumprod(d.betas())
    net = seeded_init(lambda: UNet(d.unet), 0)
    held = x[:128]

    def held_loss():
        net.eval()
        with torch.no_grad():
            return float(l_simple(abar)(net, held, None, torch.Generator().manual_seed(3)))

    before = held_loss()
    train(net, l_simple(abar), x[128:], d.train, progress=False)
    after = held_loss()
    assert after < 0.6 * before, (before, after)
    den = DiscreteVPEpsDenoiser(net.eval(), abar)
    sig = discrete_grid(abar, 10)
    z = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * float(sig[0])
    with torch.no_grad():
        s = sample_ddim(den, z, sig, eta=0.0)
    s = s.clamp(-1, 1)  # the harness's uint8 conversion clamps the same way
    assert float(s.std(0).mean()) > 0.05  # samples differ from one another
