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
    from bench_core.suite import Run, _Metrics, run_one
    from reproductions import LoadedModel

    dec = _Upsampler()
    lm = LoadedModel(GaussianDenoiser(0.0, 0.5), "t", "digits", (2, 8, 8), dataset_opts={"resolution": 32}, decode=dec)
    run = Run(suite="t", entry="e", reproduction="ldm", model="m", model_overrides={}, sampler="ddim",
              sampler_opts={"eta": 0.0}, grid={"kind": "karras"}, steps=6, seed=0, num_samples=24, batch_size=8)
    rec = run_one(run, lm, _Metrics(tmp_path, None), torch.device("cpu"))
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


def test_ldm_claims_from_records():
    import pandas as pd

    import reproductions

    ldm = reproductions.get("ldm")
    rows = []
    for model, f, fid, rfid, sps in (("pixel", 1, 10.0, None, 10.0), ("f2", 2, 11.0, 2.0, 50.0),
                                     ("f4", 4, 12.0, 3.0, 200.0), ("f8", 8, 30.0, 20.0, 300.0)):
        rows.append({"status": "ok", "reproduction": "ldm", "model": model, "sampler": "ddim", "sampler_opts": {},
                     "steps": 20, "nfe": 20.0, "fid": fid, "precision": 0.5, "recall": 0.5, "samples_per_sec": sps,
                     "peak_mem_mb": 1.0, "fid_extractor": "e", "num_samples": 500, "fid_reference": "r",
                     "metrics": {"f": f, "rfid": rfid, "latent_shape": "x", "fid_real_data": 3.0}})
    df = pd.DataFrame(rows)
    assert {c.id: c.check(df).status for c in ldm.claims()} == {
        "ldm-latent-faster": "pass", "ldm-larger-f-rfid": "pass", "ldm-larger-f-fid": "pass"}
    df.loc[df["model"] == "f8", "fid"] = 5.0
    status = {c.id: c.check(df).status for c in ldm.claims()}
    assert status["ldm-larger-f-fid"] == "fail" and status["ldm-larger-f-rfid"] == "pass"
    df.loc[df["model"] == "pixel", "fid"] = 2.0  # latent faster but not at comparable FID (all > 1.5 x 2)
    assert {c.id: c.check(df).status for c in ldm.claims()}["ldm-latent-faster"] == "fail"
    assert {c.check(pd.DataFrame()).status for c in ldm.claims()} == {"not run"}
