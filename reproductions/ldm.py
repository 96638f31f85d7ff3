"""Rombach, Blattmann, Lorenz, Esser & Ommer 2022 — High-Resolution Image Synthesis with Latent Diffusion Models (LDM).

Data: scikit-learn's 8x8 digits **resized to 32x32** (bilinear, ``dataset_opts: {resolution: 32}``).  FID,
precision and recall use the digits CNN, which takes 8x8 inputs: the 32x32 samples and the 32x32 reference
are both brought back to 8x8 (antialiased bilinear, ``metrics.extractors.prepare_images``) before features
are taken; the reference is tagged ``digits,resolution=32``.  So our FIDs measure the samples as digits,
not the fine 32x32 texture.

Models (the same DDPM noise schedule and L_simple for every model; a U-Net sized for its input, ``unet_for``):
- ``pixel``: DDPM in pixel space at 32x32 (1 channel), f = 1 -- the baseline, trained with the same training
  FLOPs as ``f4`` (autoencoder included; ``train_flops`` in every record's ``metrics``); ``pixel-4x``: the same
  model with 4x that budget, which shows that the pixel design draws digits when given the compute;
- ``f2``, ``f4``, ``f8``, ``f16``: a KL autoencoder (``bench_core.nets.autoencoder``; LDM's first stage without the
  perceptual and GAN losses) with downsampling factor f and 2 latent channels (f = 16: a 2 x 2 x 2 latent), then
  DDPM on its latents, rescaled to unit variance (LDM's scale factor), 800 steps each.  The sampler runs in latent
  space; the decoder is the model's ``LoadedModel.decode``, which the harness applies inside its timed region, so
  samples/s and peak memory are end to end.  The autoencoder's reconstruction FID (rFID, 500 reconstructions
  against the same reference, on 3 random subsets) is in every record's ``metrics``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from bench_core.data import load_dataset, to_uint8
from bench_core.denoiser import DiscreteVPEpsDenoiser
from bench_core.nets.autoencoder import Autoencoder, AutoencoderConfig, LatentDecoder, autoencoder_loss
from bench_core.nets.unet import UNet, count_parameters
from bench_core.report.plots import new_figure, save_figure
from bench_core.schedules import alphas_cumprod
from bench_core.train import TrainConfig, config_hash, train
from bench_core import stats
from reproductions import (
    Claim, ClaimResult, LoadedModel, Reproduction, combine, largest_group, ok_rows, register, seed_values,
    train_seed_of, unet_config_hash,
)
from reproductions.ddpm import MODELS as DDPM_MODELS, DDPMConfig, config_dict, l_simple

RESOLUTION = 32
RFID_SUBSETS = 3  # rFID on 3 random subsets: replicates for the rFID claim
RFID_N = 500  # reconstructions in the rFID: as many as the suite's samples, the same subset as the real-data floor


@dataclass
class LDMConfig:
    """A latent (or, with autoencoder.f = 1, pixel-space) diffusion model on 32x32 digits."""

    diffusion: DDPMConfig = field(default_factory=DDPMConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ae_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=500, batch_size=32, lr=2e-3, warmup=50, grad_clip=1.0, ema_decay=0.0, seed=0))


# The diffusion half of every preset: a U-Net sized for its input (``unet_for``): levels down to 4x4 (2x2 for
# inputs of 4x4 and smaller), 8 channels at 32x32, 16 at 16x16 and 8x8, 32 below -- at 8x8 it is the DDPM digits
# network (ch 16, ch_mult (1, 2)).  The pixel model (f = 1) at 32x32 therefore sees the whole image (the DDPM
# digits design at 32x32, two levels, saw 16x16 at most and produced noise).  Every latent model trains 800
# steps of batch 32 after its autoencoder (500 steps of batch 32).  The pixel model gets the same training
# compute as the f = 4 model, autoencoder included: its steps are set so that its training FLOPs
# (``train_flops``: forward FLOPs x 3 for the backward, x batch x steps) equal f = 4's (tests check it).
_DIFF_TRAIN = TrainConfig(steps=800, batch_size=32, lr=3e-3, warmup=100, grad_clip=1.0, ema_decay=0.995, seed=0)
_AE_TRAIN = TrainConfig(steps=500, batch_size=32, lr=2e-3, warmup=50, grad_clip=1.0, ema_decay=0.0, seed=0)
PIXEL_STEPS = 467  # = train_flops(f4) / (3 x batch x pixel forward FLOPs), rounded; tests/test_ldm.py checks it
# The pixel design at a larger budget: ``pixel-4x`` trains 4 x PIXEL_STEPS (4x f = 4's training FLOPs).  At equal
# compute the pixel model is undertrained (the paper's point: LDM-1 trains slowest), so whether the pixel design
# works at all is checked on this larger budget (ldm-pixel-baseline-works) before the equal-compute comparison.
PIXEL_COMPUTE = 4
# GroupNorm groups of the pixel U-Net: it has 8 channels at 32x32, so the latent nets' 8 groups would make every
# group one channel (an instance norm, which normalises away each channel's mean: at 2000 steps such a model drew
# blobs, recall 0.77 / precision 0.07); 2 groups keep 4 channels per group, as the latent U-Nets keep >= 2.
PIXEL_NORM_GROUPS = 2
_CHANNELS = {32: 8, 16: 16, 8: 16, 4: 32, 2: 32, 1: 32}


def unet_for(channels: int, resolution: int):
    """The diffusion U-Net of a (channels, resolution, resolution) input: one level per resolution from the input
    down to 4x4 (2x2 below 8x8), ``_CHANNELS`` channels at each, one residual block per level, no attention."""
    res = [resolution]
    while res[-1] > (4 if resolution >= 8 else 2):
        res.append(res[-1] // 2)
    ch = _CHANNELS[resolution]
    mult = tuple(_CHANNELS[r] // ch for r in res)
    return DDPM_MODELS["digits"].unet.replace(in_channels=channels, out_channels=channels, resolution=resolution,
                                              ch=ch, ch_mult=mult)


def _preset(f: int, compute: int = 1) -> LDMConfig:
    """Latent preset of factor f; for f = 1 the pixel model at ``compute`` x f = 4's training FLOPs."""
    ae = AutoencoderConfig(in_channels=1, resolution=RESOLUTION, f=f, z_channels=2)
    c, r = (1, RESOLUTION) if f == 1 else (ae.z_channels, RESOLUTION // f)
    unet = unet_for(c, r) if f > 1 else unet_for(c, r).replace(norm_groups=PIXEL_NORM_GROUPS)
    train = _DIFF_TRAIN if f > 1 else replace(_DIFF_TRAIN, steps=compute * PIXEL_STEPS)
    diff = DDPMConfig(dataset="digits", dataset_opts={"resolution": RESOLUTION}, unet=unet, train=train)
    return LDMConfig(diffusion=diff, autoencoder=ae, ae_train=_AE_TRAIN)


# Paper (≈): CelebA-HQ 256 LDM-4 FID 5.11; LSUN Churches LDM-8 FID 4.02; LDM-4..16 far faster than pixel
# space (LDM-1) at similar or better FID, LDM-32 worse (Fig. 6, 7).  Our largest f is 16 (a 2 x 2 x 2 latent).
FACTORS = (1, 2, 4, 8, 16)
MODELS: dict[str, LDMConfig] = {("pixel" if f == 1 else f"f{f}"): _preset(f) for f in FACTORS}
MODELS[f"pixel-{PIXEL_COMPUTE}x"] = _preset(1, PIXEL_COMPUTE)


def forward_flops(module: torch.nn.Module, *inputs) -> int:
    """FLOPs of one forward pass (``torch.utils.flop_counter``: matmuls and convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415 - imports triton (~0.2 s); only for FLOP counts

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*inputs)
    return int(fc.get_total_flops())


def train_flops(cfg: LDMConfig) -> dict:
    """Training FLOPs of a preset: (forward FLOPs per sample) x 3 (forward + backward) x batch x steps, for the
    autoencoder (encoder + decoder) and the diffusion U-Net; the total is what "equal compute" compares."""
    d, ae = cfg.diffusion, cfg.autoencoder
    u = unet_flops = forward_flops(UNet(d.unet).eval(), torch.zeros(1, d.unet.in_channels, d.unet.resolution,
                                                                      d.unet.resolution), torch.tensor([10]))
    out = {"diffusion_flops": 3 * u * d.train.batch_size * d.train.steps, "ae_flops": 0}
    if ae.f > 1:
        net = Autoencoder(ae).eval()
        a = forward_flops(lambda x: net.decode(net.encode(x).mean), torch.zeros(1, ae.in_channels, ae.resolution,
                                                                                ae.resolution))
        out["ae_flops"] = 3 * a * cfg.ae_train.batch_size * cfg.ae_train.steps
    out["train_flops"] = out["diffusion_flops"] + out["ae_flops"]
    out["unet_forward_flops"] = unet_flops
    return out


class LDM(Reproduction):
    name = "ldm"
    title = "Rombach et al. 2022 — High-Resolution Image Synthesis with Latent Diffusion Models"
    paper_url = "https://arxiv.org/abs/2112.10752"
    models = MODELS

    def timesteps(self, model, cfg: LDMConfig) -> int:
        """The latent DDPM's T (its denoiser is discrete-time)."""
        return cfg.diffusion.T

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
        """The KL autoencoder (cached by config hash) as a LatentDecoder, its meta (the scale factor, rFID) and the
        seconds its training took now (None from the cache)."""
        d = cfg.diffusion

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

        ae, meta, spent = self.cached_net(self.ae_hash(cfg), lambda: Autoencoder(cfg.autoencoder), cfg.ae_train.seed,
                                          train_fn, cache_dir=cache_dir)
        ae = ae.to(device).eval().requires_grad_(False)
        return LatentDecoder(ae, meta["scale_factor"]).to(device), meta, spent

    def load_model(self, model, overrides, *, device, cache_dir, progress=True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        d, f = cfg.diffusion, cfg.autoencoder.f
        h = self.hash_config(cfg)
        train_sec = 0.0
        decoder, mm = None, {"f": f, "resolution": cfg.autoencoder.resolution, **train_flops(cfg),
                             "diffusion_train_steps": d.train.steps, "diffusion_batch_size": d.train.batch_size}
        cost_sec = 0.0  # training seconds of everything the model needs, read from the checkpoints (cached or not)
        if f > 1:
            decoder, ae_meta, ae_spent = self.load_autoencoder(cfg, device=device, cache_dir=cache_dir, progress=progress)
            train_sec += ae_spent or 0.0
            cost_sec += float(ae_meta.get("train_sec") or 0.0)
            mm.update(rfid=ae_meta.get("rfid"), rfid_n=ae_meta.get("rfid_n"), rfid_subsets=ae_meta.get("rfid_subsets"),
                      ae_scale_factor=ae_meta["scale_factor"], ae_params=count_parameters(decoder),
                      ae_train_sec=ae_meta.get("train_sec"))
        abar = alphas_cumprod(d.betas())

        def train_fn(net):
            data = load_dataset(d.dataset, **d.dataset_opts)
            x = data.x if decoder is None else decoder.encode(data.x.to(device)).cpu()
            stats = train(net, l_simple(abar), x, d.train, progress=progress, desc=f"train ldm/{model}", device=device)
            return {"config": config_dict(cfg), **stats}

        net, meta, spent = self.cached_net(h, lambda: UNet(d.unet), d.train.seed, train_fn, cache_dir=cache_dir)
        train_sec += spent or 0.0
        mm["train_cost_sec"] = cost_sec + float(meta.get("train_sec") or 0.0)
        mm["diffusion_final_loss"] = meta.get("final_loss")
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
        for c, fmt in (("rfid", "{:.2f}"), ("precision", "{:.3f}"), ("recall", "{:.3f}"), ("samples_per_sec", "{:.3g}"),
                       ("train_tflops", "{:.2f}"), ("train_cost_sec", "{:.0f}")):
            show[c] = show[c].map(lambda v, fmt=fmt: "—" if v is None or pd.isna(v) else fmt.format(v))
        show["fid"] = [stats.summarize(v).text() for v in t["fid_values"]]
        show["compute_x"] = show["compute_x"].map(lambda v: "—" if pd.isna(v) else f"{v:.2f}")
        show = show.drop(columns=["fid_values", "fid_lo", "fid_hi", "equal_compute"])
        return {"LDM on 32x32 digits (resized 8x8; metrics at 8x8): pixel space (f = 1 at f = 4's training FLOPs, "
                "and at a larger budget: compute_x = training FLOPs / f = 4's) vs latent f = 2..16; FID mean ± 95% "
                "interval over training x sampling seeds "
                "(paper ≈: LDM-4..16 far faster than pixel at similar FID, too large f hurts)": show}

    def plots(self, df, outdir):
        """Fig. 7-style: FID (mean and 95% interval over seeds) against samples/s (end to end, decoder included),
        one point per factor f, one series per sampler and step count."""
        t = ldm_table(df)
        if len(t) < 2:
            return []
        fig = new_figure(5.6, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        for (sampler, steps), g in t.groupby(["sampler", "steps"]):
            g = g.sort_values("f")
            err = lambda g: [(g["fid"] - g["fid_lo"]).fillna(0).clip(lower=0),
                             (g["fid_hi"] - g["fid"]).fillna(0).clip(lower=0)]
            eq, big = g[g["equal_compute"]], g[~g["equal_compute"]]
            ax.errorbar(eq["samples_per_sec"], eq["fid"], yerr=err(eq), marker="o", ls="-", capsize=3,
                        label=f"{sampler}, {steps} steps (pixel at f = 4's compute)")
            if len(big):  # the pixel model at a larger budget: a point off the line (save_figure styles the series)
                ax.errorbar(big["samples_per_sec"], big["fid"], yerr=err(big), marker="s", ls="none", capsize=3,
                            label=f"{sampler}, {steps} steps, pixel, more compute")
            for _, r in g.iterrows():
                name = f"f={int(r['f'])}"
                if r["f"] == 1:
                    name = "pixel" + (f" ({r['compute_x']:.1f}x compute)" if pd.notna(r["compute_x"]) else "")
                ax.annotate(name, (r["samples_per_sec"], r["fid"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("samples / s (end to end, decoder included)")
        ax.set_ylabel("FID (digits CNN, at 8x8), mean ± 95% interval")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("LDM: throughput vs quality for every f, 32x32 digits", fontsize=9)
        return [save_figure(fig, Path(outdir) / "ldm_speed_vs_fid.png")]

    def claims(self):
        return [
            Claim("ldm-latent-faster",
                  "At equal training compute (FLOPs, autoencoder included: the pixel model's steps are set to f = 4's "
                  f"total, within {FLOPS_TOLERANCE:.0%}), the f = 4 latent model samples faster than the pixel model "
                  "(samples/s, decoder included) and at a lower FID, same sampler and steps (one-sided tests over "
                  "training x sampling seeds, margin 0)",
                  "LDM-4..16 far higher throughput than LDM-1 at similar or better FID; LDM-1 trains slowest "
                  "(Fig. 6, 7, ≈)", _check_faster),
            Claim("ldm-pixel-baseline-works",
                  "The pixel-space design (f = 1, a U-Net sized for 32x32) draws digits given compute: at the largest "
                  f"pixel budget in the records (the default suite: pixel-{PIXEL_COMPUTE}x, {PIXEL_COMPUTE}x f = 4's "
                  f"training FLOPs) recall significantly above {PIXEL_MIN_RECALL} (one-sided, 95%, over sampling "
                  "seeds). Noise scores ~0; any generator of recognisable digits far more. At f = 4's compute the "
                  "pixel model may still be undertrained (the paper: LDM-1 trains slowest); without this check, "
                  "ldm-latent-faster is not run.", "LDM-1 is a working baseline that trains slowly (Fig. 6)",
                  _pixel_works, kind="sanity"),
            Claim("ldm-larger-f-rfid",
                  "Larger f costs reconstruction quality: the largest factor's rFID is above the smallest latent "
                  f"factor's (Welch test over {RFID_SUBSETS} reconstruction subsets and the training seeds)",
                  "rFID grows with f (Tab. 8, ≈); LDM-32 worse than LDM-4..16 (Fig. 6, ≈)", _check_rfid),
            Claim("ldm-intermediate-f-best",
                  "Sample quality is best at an intermediate f and worst at the largest: the f with the lowest mean "
                  "FID is neither f = 1 (pixel, equal compute to f = 4) nor the largest f and beats both, and every "
                  "smaller f beats the largest (same sampler and steps; one-sided tests over training x sampling "
                  "seeds, margin 0; the default suite trains f = 2, 8, 16 once to stay in budget, so their intervals "
                  "cover sampling noise only: the lowest-mean choice of f is not corrected for selection)",
                  "f = 4..16 best quality/throughput, f = 1 trains slowly, f = 32 loses quality (Fig. 6-7, ≈)",
                  _check_sweet_spot),
        ]


# --------------------------------------------------------------------------------------------------------
def reconstruction_metrics(ae: Autoencoder, data, device) -> dict:
    """rFID etc. of RFID_N reconstructions (posterior means) against the full reference, digits CNN at 8x8.
    The subset is the one the harness uses for the real-data floor (randperm with seed 0)."""
    from bench_core.metrics.extractors import get_extractor  # noqa: PLC0415 - pulls in torch_fidelity (heavy); only for rFID
    from bench_core.metrics.fidelity import image_metrics  # noqa: PLC0415 - pulls in torch_fidelity (heavy); only for rFID

    ref = data.reference_uint8()
    n = min(RFID_N, len(ref))
    out = {}
    for seed in range(RFID_SUBSETS):  # subset 0 is the real-data floor's; the others give rFID's spread over subsets
        idx = torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))[:n]
        with torch.no_grad():
            rec = ae.decode(ae.encode(data.x[idx].to(device)).mean).cpu()
        m = image_metrics(to_uint8(rec), ref, extractor=get_extractor(data.name), reference_name="ldm-rfid")
        out.setdefault("rfid_subsets", []).append(float(m["fid"]))
        if seed == 0:
            out.update({"rfid": m["fid"], "rfid_n": n, "rfid_precision": m["precision"], "rfid_recall": m["recall"],
                        "recon_l1": float((rec - data.x[idx]).abs().mean())})
    return out


FLOPS_TOLERANCE = 0.1  # "equal compute": training FLOPs within 10%


def _ldm_records(df):
    if df is None or len(df) == 0 or "status" not in df:
        return None
    d = ok_rows(df, "fid", reproduction="ldm")
    if d is None or len(d) == 0:
        return None
    d = largest_group(d, "fid_extractor", "num_samples", "fid_reference").copy()
    d["f"] = d["metrics"].map(lambda m: (m or {}).get("f"))
    d = d[d["f"].notna()].copy()
    d["sampler"] = d["sampler"].astype(str) + d["sampler_opts"].map(
        lambda o: "(" + ",".join(f"{k}={v}" for k, v in sorted(o.items())) + ")" if isinstance(o, dict) and o else "")
    # training compute relative to f = 4's (NaN where unknown); "equal compute" within FLOPS_TOLERANCE
    d["train_flops"] = d["metrics"].map(lambda m: float((m or {}).get("train_flops") or float("nan")))
    f4 = d.loc[d["f"] == 4, "train_flops"].median()
    d["compute_x"] = d["train_flops"] / f4 if pd.notna(f4) and f4 > 0 else float("nan")
    d["equal_compute"] = (d["f"] > 1) | d["compute_x"].isna() | ((d["compute_x"] - 1).abs() <= FLOPS_TOLERANCE)
    return d


def ldm_table(df) -> pd.DataFrame:
    """One row per (f, model, sampler, steps) -- the pixel model once per training budget: FID values over seeds
    (mean and 95% interval), rFID, throughput, training compute (``compute_x``: FLOPs / f = 4's)."""
    cols = ["model", "f", "latent_shape", "sampler", "steps", "nfe", "fid", "fid_lo", "fid_hi", "fid_values", "rfid",
            "precision", "recall", "samples_per_sec", "train_tflops", "compute_x", "equal_compute", "train_cost_sec"]
    d = _ldm_records(df)
    if d is None or len(d) == 0:
        return pd.DataFrame(columns=cols)
    rows = []
    for (f, _, sampler, steps), g in d.groupby(["f", "model", "sampler", "steps"]):
        m = g["metrics"]
        vals = seed_values(g, "fid")
        s = stats.summarize(vals.values())
        get = lambda k: [float(x[k]) for x in m if isinstance(x, dict) and x.get(k) is not None]
        mean = lambda v: sum(v) / len(v) if v else float("nan")
        rows.append({"model": g["model"].iloc[0], "f": int(f), "latent_shape": (m.iloc[0] or {}).get("latent_shape"),
                     "sampler": sampler, "steps": steps, "nfe": float(g["nfe"].mean()), "fid": s.mean, "fid_lo": s.lo,
                     "fid_hi": s.hi, "fid_values": vals, "rfid": mean(get("rfid")),
                     "precision": float(g["precision"].mean()) if "precision" in g else float("nan"),
                     "recall": float(g["recall"].mean()) if "recall" in g else float("nan"),
                     "samples_per_sec": float(g["samples_per_sec"].mean()),
                     "train_tflops": float(g["train_flops"].mean()) / 1e12, "compute_x": float(g["compute_x"].mean()),
                     "equal_compute": bool(g["equal_compute"].all()), "train_cost_sec": mean(get("train_cost_sec"))})
    return pd.DataFrame(rows, columns=cols).sort_values(["sampler", "steps", "f", "train_tflops"]).reset_index(drop=True)


def _values(d, f: int, col: str) -> dict:
    return seed_values(d[d["f"] == f], col)


def _groups(df):
    """(sampler, steps) -> records at equal training compute (a pixel model at a larger budget left out), for every
    group with the pixel model and at least one latent factor."""
    d = _ldm_records(df)
    if d is None or len(d) == 0:
        return {}
    d = d[d["equal_compute"]]
    return {k: g for k, g in d.groupby(["sampler", "steps"]) if (g["f"] == 1).any() and (g["f"] > 1).any()}


def _check_faster(df) -> ClaimResult:
    try:
        groups = {k: g for k, g in _groups(df).items() if (g["f"] == 4).any()}
        if not groups:
            return ClaimResult("not run", "", "need pixel (f = 1) records at f = 4's training compute (within "
                               f"{FLOPS_TOLERANCE:.0%}) and f = 4 records with the same sampler and steps")
        (sampler, steps), g = next(iter(sorted(groups.items(), key=lambda kv: str(kv[0]))))
        fl = g.groupby("f")["train_flops"].max()  # the pixel rows here are those at f = 4's compute (_groups)
        if not (pd.notna(fl.get(1)) and pd.notna(fl.get(4))):
            return ClaimResult("not run", "", "records lack train_flops")
        cost = f"training {fl[1] / 1e12:.2f} TFLOP (pixel) vs {fl[4] / 1e12:.2f} TFLOP (f = 4)"
        works = _pixel_works(df)
        if works.status != "pass":
            return ClaimResult("not run", f"{cost}; pixel baseline: {works.ours}",
                               "the pixel design does not draw digits even at its largest budget "
                               "(ldm-pixel-baseline-works): a comparison with a broken side would pass for the wrong "
                               "reason")
        speed = stats.beats(_values(g, 4, "samples_per_sec"), _values(g, 1, "samples_per_sec"), lower_is_better=False,
                            what="samples/s", names=("f=4", "pixel"), fmt=".3g")
        fid = stats.beats(_values(g, 4, "fid"), _values(g, 1, "fid"), names=("f=4", "pixel"))
        r = combine([("speed", ClaimResult.of(speed)), ("FID", ClaimResult.of(fid))])
        return ClaimResult(r.status, f"{sampler} {steps} steps: {r.ours}; {cost}; pixel design at its largest "
                                     f"budget: {works.ours}", r.why)
    except Exception as e:  # a check never crashes the report
        return ClaimResult("not run", "", f"check failed: {type(e).__name__}: {e}")


PIXEL_MIN_RECALL = 0.1


def _pixel_works(df) -> ClaimResult:
    """Sanity: the pixel design's samples cover the digits at its largest training budget in the records: recall
    (the share of real digits inside the samples' k-NN manifold) significantly above 0.1; noise scores ~0, any
    generator of recognisable digits far more.  One (sampler, steps) group: the one with the most records."""
    d = _ldm_records(df)
    if d is None or len(d) == 0 or not (d["f"] == 1).any():
        return ClaimResult("not run", "", "no pixel (f = 1) records")
    d = d[d["f"] == 1]
    top = d["train_flops"].max()
    if pd.notna(top):  # the largest budget (and any record of unknown compute is left out)
        d = d[d["train_flops"] >= (1 - FLOPS_TOLERANCE) * top]
    d = max((g for _, g in d.groupby(["sampler", "steps"])), key=len)
    rec = seed_values(d, "recall")
    if not rec:
        return ClaimResult("not run", "", "pixel records lack recall")
    x = d["compute_x"].mean()
    budget = f"{x:.1f}x f = 4's training FLOPs, " if pd.notna(x) else ""
    r = ClaimResult.of(stats.at_least(rec, PIXEL_MIN_RECALL, what="pixel recall", fmt=".3f"))
    fid = stats.summarize(seed_values(d, "fid").values()).text()
    return ClaimResult(r.status, f"{d['model'].iloc[0]} ({budget}{d['sampler'].iloc[0]} {d['steps'].iloc[0]} steps): "
                                 f"{r.ours}; FID {fid}", r.why)


def _check_rfid(df) -> ClaimResult:
    try:
        d = _ldm_records(df)
        if d is None or len(d) == 0:
            return ClaimResult("not run", "", "no ldm records")
        vals = {}
        for ts, f, m in zip(d["train_seed"] if "train_seed" in d else [0] * len(d), d["f"], d["metrics"]):
            for i, v in enumerate((m or {}).get("rfid_subsets") or [(m or {}).get("rfid")]):
                if f > 1 and v is not None:
                    vals.setdefault(int(f), {})[(train_seed_of(ts), i)] = float(v)
        if len(vals) < 2:
            return ClaimResult("not run", "", "need latent records with at least two factors f")
        lo, hi = min(vals), max(vals)
        v = stats.beats(vals[lo], vals[hi], what="rFID", names=(f"f={lo}", f"f={hi}"), paired=False)
        series = ", ".join(f"f={f} {stats.summarize(vals[f].values()).text()}" for f in sorted(vals))
        return ClaimResult(v.status, f"rFID {series}; {v.text}", v.why)
    except Exception as e:
        return ClaimResult("not run", "", f"check failed: {type(e).__name__}: {e}")


def _check_sweet_spot(df) -> ClaimResult:
    try:
        groups = _groups(df)
        if not groups:
            return ClaimResult("not run", "", "need pixel and latent records with the same sampler and steps")
        (sampler, steps), g = next(iter(sorted(groups.items(), key=lambda kv: str(kv[0]))))
        fs = sorted(int(f) for f in g["f"].unique())
        if len(fs) < 3:
            return ClaimResult("not run", "", f"need at least three factors (have f = {fs})")
        vals = {f: _values(g, f, "fid") for f in fs}
        means = {f: sum(v.values()) / len(v) for f, v in vals.items()}
        series = ", ".join(f"f={f} {stats.summarize(vals[f].values()).text()}" for f in fs)
        best, top = min(means, key=means.get), fs[-1]
        head = f"{sampler} {steps} steps, FID {series}"
        if best in (1, top):
            return ClaimResult("fail", head, f"the lowest mean FID is at the end f = {best}, not an intermediate f")
        parts = [(f"f={best} vs pixel", ClaimResult.of(stats.beats(vals[best], vals[1], names=(f"f={best}", "f=1"))))]
        parts += [(f"f={f} vs f={top}", ClaimResult.of(stats.beats(vals[f], vals[top], names=(f"f={f}", f"f={top}"))))
                  for f in fs[:-1]]
        r = combine(parts)
        return ClaimResult(r.status, f"{head}; best f = {best}; " + r.ours, r.why)
    except Exception as e:
        return ClaimResult("not run", "", f"check failed: {type(e).__name__}: {e}")


LDM_REPRO = register(LDM())
