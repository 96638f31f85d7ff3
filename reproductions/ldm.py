"""Rombach, Blattmann, Lorenz, Esser & Ommer 2022 — High-Resolution Image Synthesis with Latent Diffusion Models (LDM).

Data: scikit-learn's 8x8 digits **resized to 32x32** (bilinear, ``dataset_opts: {resolution: 32}``).  FID,
precision and recall use the digits CNN, which takes 8x8 inputs: the 32x32 samples and the 32x32 reference
are both brought back to 8x8 (antialiased bilinear, ``metrics.extractors.prepare_images``) before features
are taken; the reference is tagged ``digits,resolution=32``.  So our FIDs measure the samples as digits,
not the fine 32x32 texture.

Models (one U-Net configuration, the DDPM digits one, at the working resolution; the same DDPM noise
schedule and training for every model):
- ``pixel``: DDPM in pixel space at 32x32 (1 channel) -- the baseline;
- ``f2``, ``f4``, ``f8``: a KL autoencoder (``bench_core.nets.autoencoder``; LDM's first stage without the
  perceptual and GAN losses) with downsampling factor f and 2 latent channels, then DDPM on its latents,
  rescaled to unit variance (LDM's scale factor).  The sampler runs in latent space; the decoder is the
  model's ``LoadedModel.decode``, which the harness applies inside its timed region, so samples/s and peak
  memory are end to end.  The autoencoder's reconstruction FID (rFID, 500 reconstructions against the same
  reference, beside the FID of 500 real images) is in every record's ``metrics``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from bench_core.denoiser import DiscreteVPEpsDenoiser
from bench_core.nets.autoencoder import Autoencoder, AutoencoderConfig, LatentDecoder, autoencoder_loss
from bench_core.nets.unet import UNet, count_parameters
from bench_core.schedules import alphas_cumprod
from bench_core.train import CheckpointCache, TrainConfig, config_hash, seeded_init, train
from reproductions import Claim, ClaimResult, LoadedModel, Reproduction, largest_group, ok_rows, register, unet_config_hash
from reproductions.ddpm import MODELS as DDPM_MODELS, DDPMConfig, config_dict, l_simple

RESOLUTION = 32
RFID_N = 500  # reconstructions in the rFID: as many as the suite's samples, the same subset as the real-data floor


@dataclass
class LDMConfig:
    """A latent (or, with autoencoder.f = 1, pixel-space) diffusion model on 32x32 digits."""

    diffusion: DDPMConfig = field(default_factory=DDPMConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ae_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=500, batch_size=32, lr=2e-3, warmup=50, grad_clip=1.0, ema_decay=0.0, seed=0))


# The diffusion half of every preset: the DDPM digits U-Net (ch 16, ch_mult (1, 2)) at the working
# resolution and channels, trained identically (fewer steps and a smaller batch than the DDPM digits model:
# the pixel model at 32x32 costs ~10x an 8x8 step on 2 CPU cores).  Autoencoders: ch 8, 500 steps.
_DIFF_TRAIN = TrainConfig(steps=800, batch_size=32, lr=3e-3, warmup=100, grad_clip=1.0, ema_decay=0.995, seed=0)


def _preset(f: int) -> LDMConfig:
    ae = AutoencoderConfig(in_channels=1, resolution=RESOLUTION, f=f, z_channels=2)
    c, r = (1, RESOLUTION) if f == 1 else (ae.z_channels, RESOLUTION // f)
    unet = DDPM_MODELS["digits"].unet.replace(in_channels=c, out_channels=c, resolution=r)
    diff = DDPMConfig(dataset="digits", dataset_opts={"resolution": RESOLUTION}, unet=unet, train=_DIFF_TRAIN)
    return LDMConfig(diffusion=diff, autoencoder=ae)


# Paper (≈): CelebA-HQ 256 LDM-4 FID 5.11; LSUN Churches LDM-8 FID 4.02; LDM-4..16 far faster than pixel
# space (LDM-1) at similar or better FID, LDM-32 worse (Fig. 6, 7).
MODELS: dict[str, LDMConfig] = {"pixel": _preset(1), "f2": _preset(2), "f4": _preset(4), "f8": _preset(8)}


class LDM(Reproduction):
    name = "ldm"
    title = "Rombach et al. 2022 — High-Resolution Image Synthesis with Latent Diffusion Models"
    paper_url = "https://arxiv.org/abs/2112.10752"
    models = MODELS

    def check_config(self, model, cfg: LDMConfig):
        ae, d = cfg.autoencoder, cfg.diffusion
        res = (d.dataset_opts or {}).get("resolution")
        if res is not None and int(res) != ae.resolution:
            raise ValueError(f"autoencoder.resolution {ae.resolution} differs from the dataset's resolution {res}")
        want_c, want_r = (ae.in_channels, ae.resolution) if ae.f == 1 else (ae.z_channels, ae.resolution // ae.f)
        if (d.unet.in_channels, d.unet.resolution) != (want_c, want_r):
            raise ValueError(f"diffusion.unet must take {want_c} x {want_r} x {want_r} inputs for f = {ae.f} "
                             f"(has {d.unet.in_channels} x {d.unet.resolution} x {d.unet.resolution})")
        return cfg

    def ae_hash(self, cfg: LDMConfig) -> str | None:
        if cfg.autoencoder.f == 1:
            return None
        d = cfg.diffusion
        return config_hash({"family": "kl-autoencoder"}, asdict(cfg.autoencoder), cfg.ae_train,
                           {"dataset": d.dataset, "dataset_opts": d.dataset_opts})

    def hash_config(self, cfg: LDMConfig) -> str:
        h = unet_config_hash("ddpm-eps", cfg.diffusion)  # pixel space: the same key as a ddpm model
        ae = self.ae_hash(cfg)
        return h if ae is None else config_hash({"family": "ldm-eps"}, ae, h)

    def required_datasets(self, cfg):
        return [(cfg.diffusion.dataset, dict(cfg.diffusion.dataset_opts))]

    def cached_modules(self, model, overrides, cfg):
        out = [(self.hash_config(cfg), lambda: UNet(cfg.diffusion.unet))]
        if self.ae_hash(cfg):
            out.append((self.ae_hash(cfg), lambda: Autoencoder(cfg.autoencoder)))
        return out

    # --- models -----------------------------------------------------------------------------------------
    def load_autoencoder(self, cfg: LDMConfig, *, device, cache_dir, progress=True):
        """The KL autoencoder (cached by config hash) as a LatentDecoder; its meta holds the scale factor and rFID."""
        from bench_core.data import load_dataset

        d = cfg.diffusion
        ae = seeded_init(lambda: Autoencoder(cfg.autoencoder), cfg.ae_train.seed)

        def train_fn(net):
            data = load_dataset(d.dataset, **d.dataset_opts)
            stats = train(net, autoencoder_loss(cfg.autoencoder.kl_weight), data.x, cfg.ae_train, progress=progress,
                          desc=f"train ldm/autoencoder f={cfg.autoencoder.f}", device=device)
            net.eval()
            with torch.no_grad():
                z = torch.cat([net.encode(b.to(device)).mean.cpu() for b in data.x.split(512)])
            stats["scale_factor"] = float(1.0 / z.flatten().std())
            stats.update(reconstruction_metrics(net, data, device))
            return {"config": {"autoencoder": asdict(cfg.autoencoder), "train": asdict(cfg.ae_train)}, **stats}

        meta, trained_now = CheckpointCache(cache_dir).load_or_train(self.ae_hash(cfg), ae, train_fn)
        ae = ae.to(device).eval().requires_grad_(False)
        return LatentDecoder(ae, meta["scale_factor"]).to(device), meta, trained_now

    def load_model(self, model, overrides, *, device, cache_dir, progress=True) -> LoadedModel:
        from bench_core.data import load_dataset

        cfg = self.model_config(model, overrides)
        d, f = cfg.diffusion, cfg.autoencoder.f
        h = self.hash_config(cfg)
        train_sec = 0.0
        decoder, mm = None, {"f": f, "resolution": cfg.autoencoder.resolution}
        if f > 1:
            decoder, ae_meta, ae_now = self.load_autoencoder(cfg, device=device, cache_dir=cache_dir, progress=progress)
            train_sec += ae_meta.get("train_sec", 0.0) if ae_now else 0.0
            mm.update(rfid=ae_meta.get("rfid"), rfid_n=ae_meta.get("rfid_n"), ae_scale_factor=ae_meta["scale_factor"],
                      ae_params=count_parameters(decoder))
        abar = alphas_cumprod(d.betas())
        net = seeded_init(lambda: UNet(d.unet), d.train.seed)

        def train_fn(net):
            data = load_dataset(d.dataset, **d.dataset_opts)
            x = data.x if decoder is None else decoder.encode(data.x.to(device)).cpu()
            stats = train(net, l_simple(abar), x, d.train, progress=progress, desc=f"train ldm/{model}", device=device)
            return {"config": config_dict(cfg), **stats}

        meta, trained_now = CheckpointCache(cache_dir).load_or_train(h, net, train_fn)
        train_sec += meta.get("train_sec", 0.0) if trained_now else 0.0
        net = net.to(device).eval()
        mm["unet_params"] = count_parameters(net)
        mm["latent_shape"] = "x".join(str(s) for s in (d.unet.in_channels, d.unet.resolution, d.unet.resolution))
        den = DiscreteVPEpsDenoiser(net, abar).to(device)
        shape = (d.unet.in_channels, d.unet.resolution, d.unet.resolution)
        return LoadedModel(den, h, d.dataset, shape, train_sec=train_sec if train_sec > 0 else None,
                           dataset_opts=dict(d.dataset_opts), model_metrics=mm, decode=decoder)

    # --- tables, plots, claims ----------------------------------------------------------------------------
    def tables(self, df):
        t = ldm_table(df)
        if not len(t):
            return {}
        show = t.copy()
        for c, fmt in (("fid", "{:.2f}"), ("rfid", "{:.2f}"), ("fid_real_data", "{:.2f}"), ("precision", "{:.3f}"),
                       ("recall", "{:.3f}"), ("samples_per_sec", "{:.3g}"), ("peak_mem_mb", "{:.1f}")):
            show[c] = show[c].map(lambda v, fmt=fmt: "—" if v is None or pd.isna(v) else fmt.format(v))
        return {"LDM on 32x32 digits (resized 8x8; metrics at 8x8): pixel space vs latent f = 2, 4, 8 "
                "(paper ≈: LDM-4..16 far faster than pixel at similar FID, too large f hurts)": show}

    def plots(self, df, outdir):
        """Fig. 7-style: samples/s (end to end, decoder included) against FID, one point per model and run."""
        from pathlib import Path

        from bench_core.report.plots import new_figure, save_figure

        t = ldm_table(df)
        if len(t) < 2:
            return []
        fig = new_figure(5.6, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        for (sampler, steps), g in t.groupby(["sampler", "steps"]):
            ax.plot(g["samples_per_sec"], g["fid"], marker="o", ls="", label=f"{sampler}, {steps} steps")
            for _, r in g.iterrows():
                ax.annotate("pixel" if r["f"] == 1 else f"f={r['f']}", (r["samples_per_sec"], r["fid"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("samples / s (end to end, decoder included)")
        ax.set_ylabel("FID (digits CNN, at 8x8)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("LDM: throughput vs quality, 32x32 digits", fontsize=9)
        return [save_figure(fig, Path(outdir) / "ldm_speed_vs_fid.png")]

    def claims(self):
        return [
            Claim("ldm-latent-faster",
                  "A latent model (f >= 2) samples faster (samples/s, decoder included) than the pixel model with the "
                  "same sampler and steps, at comparable FID (at most 1.5x the pixel model's)",
                  "LDM-4..16 far higher throughput than LDM-1 at similar or better FID (Fig. 7, ≈)", _check_faster),
            Claim("ldm-larger-f-rfid",
                  "Larger f costs reconstruction quality: the largest factor's rFID is above the smallest factor's",
                  "LDM-32 worse than LDM-4..16 (Fig. 6, ≈); rFID grows with f (Tab. 8, ≈)",
                  lambda df: _check_f(df, "rfid")),
            Claim("ldm-larger-f-fid",
                  "Larger f costs sample quality: the largest factor's sample FID is above the smallest factor's "
                  "(same sampler and steps)",
                  "LDM-32 worse than LDM-4..16 (Fig. 6, ≈)", lambda df: _check_f(df, "fid")),
        ]


# --------------------------------------------------------------------------------------------------------
def reconstruction_metrics(ae: Autoencoder, data, device) -> dict:
    """rFID etc. of RFID_N reconstructions (posterior means) against the full reference, digits CNN at 8x8.
    The subset is the one the harness uses for the real-data floor (randperm with seed 0)."""
    from bench_core.data import to_uint8
    from bench_core.metrics.extractors import get_extractor
    from bench_core.metrics.fidelity import image_metrics

    ref = data.reference_uint8()
    n = min(RFID_N, len(ref))
    idx = torch.randperm(len(ref), generator=torch.Generator().manual_seed(0))[:n]
    with torch.no_grad():
        rec = ae.decode(ae.encode(data.x[idx].to(device)).mean).cpu()
    m = image_metrics(to_uint8(rec), ref, extractor=get_extractor(data.name), reference_name="ldm-rfid")
    return {"rfid": m["fid"], "rfid_n": n, "rfid_precision": m["precision"], "rfid_recall": m["recall"],
            "recon_l1": float((rec - data.x[idx]).abs().mean())}


def ldm_table(df) -> pd.DataFrame:
    cols = ["model", "f", "latent_shape", "sampler", "steps", "nfe", "fid", "rfid", "fid_real_data", "precision",
            "recall", "samples_per_sec", "peak_mem_mb"]
    if df is None or len(df) == 0:
        return pd.DataFrame(columns=cols)
    d = ok_rows(df, "fid", reproduction="ldm").copy()
    if len(d) == 0:
        return pd.DataFrame(columns=cols)
    d = largest_group(d, "fid_extractor", "num_samples", "fid_reference")
    for c in ("f", "latent_shape", "rfid", "fid_real_data"):
        d[c] = d["metrics"].map(lambda m, c=c: (m or {}).get(c))
    d["sampler"] = d["sampler"].astype(str) + d["sampler_opts"].map(
        lambda o: "(" + ",".join(f"{k}={v}" for k, v in sorted(o.items())) + ")" if o else "")
    g = d.groupby(["model", "sampler", "steps"], as_index=False).agg(
        {"f": "first", "latent_shape": "first", "nfe": "mean", "fid": "mean", "rfid": "first", "fid_real_data": "first",
         "precision": "mean", "recall": "mean", "samples_per_sec": "mean", "peak_mem_mb": "mean"})
    return g.sort_values(["sampler", "steps", "f"])[cols].reset_index(drop=True)


def _check_faster(df) -> ClaimResult:
    t = ldm_table(df)
    if len(t) == 0:
        return ClaimResult("not run", "no ldm records")
    best = None
    for (sampler, steps), g in t.groupby(["sampler", "steps"]):
        pix = g[g["f"] == 1]
        lat = g[g["f"] > 1]
        if len(pix) == 0 or len(lat) == 0:
            continue
        p = pix.iloc[0]
        ok = lat[(lat["samples_per_sec"] > p["samples_per_sec"]) & (lat["fid"] <= 1.5 * p["fid"])]
        desc = (f"{sampler} {steps} steps: pixel FID {p['fid']:.2f} at {p['samples_per_sec']:.3g}/s; "
                + ", ".join(f"f={int(r['f'])} FID {r['fid']:.2f} at {r['samples_per_sec']:.3g}/s" for _, r in lat.iterrows()))
        if len(ok):
            return ClaimResult("pass", desc)
        best = desc
    if best is None:
        return ClaimResult("not run", "need pixel and latent records with the same sampler and steps")
    return ClaimResult("fail", best)


def _check_f(df, metric: str) -> ClaimResult:
    t = ldm_table(df)
    lat = t[t["f"].map(lambda v: v is not None and v > 1)] if len(t) else t
    if len(lat) == 0 or lat["f"].nunique() < 2:
        return ClaimResult("not run", "need latent records with at least two factors f")
    parts = []
    for (sampler, steps), g in lat.groupby(["sampler", "steps"]):
        if g["f"].nunique() < 2 or g[metric].isna().any():
            continue
        lo, hi = g.loc[g["f"].idxmin()], g.loc[g["f"].idxmax()]
        series = ", ".join(f"f={int(r['f'])} {r[metric]:.2f}" for _, r in g.sort_values("f").iterrows())
        parts.append((hi[metric] > lo[metric], f"{'rFID' if metric == 'rfid' else 'FID'} ({sampler} {steps} steps): {series}"))
        if metric == "rfid":
            break  # rFID is a property of the autoencoders, the same for every sampler
    if not parts:
        return ClaimResult("not run", "need two factors with the same sampler and steps")
    return ClaimResult("pass" if all(ok for ok, _ in parts) else "fail", "; ".join(p for _, p in parts))


LDM_REPRO = register(LDM())
