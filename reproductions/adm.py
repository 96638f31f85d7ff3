"""Dhariwal & Nichol 2021 — Diffusion Models Beat GANs on Image Synthesis (ADM).

Three parts, all on the 8x8 digits:

- Architecture ablation (Sec. 3): the DDPM-layout U-Net (``unet-ddpm``: the DDPM digits model itself, same
  config hash, so its cached checkpoint is reused) against the same network with the ADM options of the
  shared U-Net (``unet-adm``: adaptive group norm / scale-shift, BigGAN-style up/down residual blocks,
  attention at two resolutions with 8 channels per head), trained identically.
- Classifier guidance (Sec. 4, Alg. 2): a noise-aware classifier (``bench_core.nets.classifier``) trained
  on noisy digits at the DDPM noise levels, guiding the DDPM digits model (``guided``) through the
  ``ClassifierGuidance`` denoiser wrapper, so every registered sampler runs guided.  The scale is a model
  field (``model_overrides: {scale: 2.0}``): a guided model is (base model, classifier, scale).
- Classifier-free guidance (Ho & Salimans 2022, the users' expectation beside it; ``cfg``): a
  class-conditional U-Net trained with label dropout, sampled through ``ClassifierFreeGuidance``.

The requested class of sample i is i mod 10 (``LoadedModel.batch_cond``), independent of batching.
Class accuracy = fraction of samples the digits CNN (the FID extractor, not the guiding classifier)
classifies as the requested class.  Guidance scale / weight, the classifier's held-out accuracy and
the U-Net variant are written into every record's ``metrics`` (``model_metrics``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from bench_core.denoiser import DiscreteVPEpsDenoiser
from bench_core.guidance import ClassifierFreeGuidance, ClassifierGuidance, balanced_labels
from bench_core.nets.classifier import ClassifierConfig, NoisyClassifier, noisy_classifier_loss
from bench_core.nets.unet import UNet, count_parameters
from bench_core.schedules import alphas_cumprod
from bench_core.train import CheckpointCache, TrainConfig, config_hash, seeded_init, train
from reproductions import (
    Claim, ClaimResult, LoadedModel, Reproduction, largest_group, ok_rows, register, unet_config_hash,
)
from reproductions.ddpm import DDPM, MODELS as DDPM_MODELS, DDPMConfig, BuiltOnDDPM, config_dict, l_simple


@dataclass
class GuidedConfig:
    """A DDPM model guided by a noise-aware classifier (Dhariwal & Nichol 2021, Alg. 2)."""

    base_model: str = "digits"                           # a reproductions.ddpm preset (checkpoint reused)
    base_overrides: dict = field(default_factory=dict)   # its overrides, as in a ddpm suite entry
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    classifier_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1000, batch_size=128, lr=2e-3, warmup=100, grad_clip=1.0, ema_decay=0.995, seed=0))
    scale: float = 1.0          # ImageNet 256 ADM-G: scale 1.0 -> FID 4.59, precision 0.82, recall 0.52
    heldout: int = 297          # the last digits are held out of the classifier's training (accuracy check)


@dataclass
class CFGConfig:
    """A class-conditional DDPM trained with label dropout, sampled with classifier-free guidance."""

    ddpm: DDPMConfig = field(default_factory=lambda: DDPMConfig(
        dataset="digits", unet=DDPM_MODELS["digits"].unet.replace(num_classes=10),
        train=replace(DDPM_MODELS["digits"].train, steps=2000)))  # half the DDPM digits model's steps (time budget)
    p_uncond: float = 0.1          # Ho & Salimans 2022: label dropped to the null label with probability 0.1
    guidance_weight: float = 1.0   # w in (1 + w) D(x|y) - w D(x|null)


_DIGITS = DDPM_MODELS["digits"]
# ADM options at digits scale: AdaGN, BigGAN up/down, attention at 8x8 and 4x4 with 8 channels per head
# (ADM: 64 channels per head at 32, 16 and 8).  Same training as the DDPM digits model.
_ADM_UNET = _DIGITS.unet.replace(scale_shift_norm=True, resblock_updown=True, num_head_channels=8,
                                 attn_resolutions=(8, 4))
ABLATION: dict[str, DDPMConfig] = {
    "unet-ddpm": _DIGITS,
    "unet-adm": DDPMConfig(dataset=_DIGITS.dataset, unet=_ADM_UNET, train=_DIGITS.train),
}
MODELS = {"guided": GuidedConfig(), "cfg": CFGConfig(), **ABLATION}


def _ablation_repro() -> DDPM:
    """The DDPM machinery over the ablation presets (hash family ddpm-eps: ``unet-ddpm`` is ddpm/digits)."""
    rep = DDPM()
    rep.name, rep.models = "adm", ABLATION
    return rep


_ABL = _ablation_repro()


def class_accuracy_metric(num_classes: int = 10):
    """sample_metrics hook: fraction of samples the digits CNN assigns to the requested class (index mod K)."""

    def fn(samples: torch.Tensor) -> dict:
        from bench_core.data import to_uint8
        from bench_core.metrics.extractors import classify

        want = balanced_labels(torch.arange(len(samples)), num_classes)
        pred = classify(to_uint8(samples)).argmax(1)
        return {"class_accuracy": float((pred == want).float().mean())}

    return fn


def _labels_cond(num_classes: int):
    return lambda idx: {"y": balanced_labels(idx, num_classes)}


class ADM(BuiltOnDDPM, Reproduction):
    name = "adm"
    title = "Dhariwal & Nichol 2021 — Diffusion Models Beat GANs on Image Synthesis"
    paper_url = "https://arxiv.org/abs/2105.05233"
    models = MODELS

    # --- configs, hashes, validation --------------------------------------------------------------
    def check_config(self, model, cfg):
        if isinstance(cfg, GuidedConfig):
            if cfg.scale < 0:
                raise ValueError(f"scale: the guidance scale must be >= 0, got {cfg.scale}")
            self.check_base(cfg)
            base = self.base_config(cfg)
            if base.unet.resolution != cfg.classifier.resolution or base.unet.in_channels != cfg.classifier.in_channels:
                raise ValueError("classifier: its resolution and channels must match the base model's U-Net")
        elif isinstance(cfg, CFGConfig):
            if not 0.0 < cfg.p_uncond < 1.0:
                raise ValueError(f"p_uncond must be in (0, 1), got {cfg.p_uncond}")
            if cfg.guidance_weight < 0:
                raise ValueError(f"guidance_weight must be >= 0, got {cfg.guidance_weight}")
            if not cfg.ddpm.unet.num_classes:
                raise ValueError("ddpm.unet.num_classes must be set for classifier-free guidance")
        return cfg

    def classifier_hash(self, cfg: GuidedConfig) -> str:
        base = self.base_config(cfg)
        return config_hash({"family": "noisy-classifier"}, asdict(cfg.classifier), cfg.classifier_train,
                           {"dataset": base.dataset, "dataset_opts": base.dataset_opts, "T": base.T,
                            "beta_schedule": base.beta_schedule, "beta_1": base.beta_1, "beta_T": base.beta_T,
                            "heldout": cfg.heldout})

    def _cfg_ckpt_hash(self, cfg: CFGConfig) -> str:
        return config_hash({"family": "ddpm-eps-cfg", "p_uncond": cfg.p_uncond},
                           unet_config_hash("ddpm-eps", cfg.ddpm))

    def hash_config(self, cfg):
        if isinstance(cfg, GuidedConfig):
            return config_hash({"family": "adm-guided"}, self.base_hash(cfg), self.classifier_hash(cfg), float(cfg.scale))
        if isinstance(cfg, CFGConfig):
            return config_hash({"family": "cfg"}, self._cfg_ckpt_hash(cfg), float(cfg.guidance_weight))
        return _ABL.hash_config(cfg)

    # preflight: a guided model's base model (its dataset, which the classifier trains on too, and its
    # checkpoint) is checked by BuiltOnDDPM.preflight; these are the other models' and the classifier's
    def required_datasets(self, cfg):
        if isinstance(cfg, GuidedConfig):
            return []
        if isinstance(cfg, CFGConfig):
            return [(cfg.ddpm.dataset, dict(cfg.ddpm.dataset_opts))]
        return [(cfg.dataset, dict(cfg.dataset_opts))]

    def cached_modules(self, model, overrides, cfg):
        if isinstance(cfg, GuidedConfig):
            return [(self.classifier_hash(cfg), lambda: NoisyClassifier(cfg.classifier))]
        if isinstance(cfg, CFGConfig):
            return [(self._cfg_ckpt_hash(cfg), lambda: UNet(cfg.ddpm.unet))]
        return _ABL.cached_modules(model, overrides, cfg)

    # --- models ----------------------------------------------------------------------------------------
    def load_classifier(self, cfg: GuidedConfig, *, device, cache_dir, progress=True):
        """The noise-aware classifier (trained once, cached by config hash); returns (net, meta, trained_now)."""
        from bench_core.data import load_dataset

        base = self.base_config(cfg)
        abar = alphas_cumprod(base.betas()).double()
        sigmas = ((1 - abar) / abar).sqrt().float()  # the DDPM training grid's noise levels
        net = seeded_init(lambda: NoisyClassifier(cfg.classifier), cfg.classifier_train.seed)

        def train_fn(net):
            data = load_dataset(base.dataset, **base.dataset_opts)
            n_train = len(data) - cfg.heldout
            stats = train(net, noisy_classifier_loss(sigmas), data.x[:n_train], cfg.classifier_train,
                          labels=data.labels[:n_train], progress=progress, desc="train adm/classifier", device=device)
            stats.update(heldout_accuracy(net, data.x[n_train:], data.labels[n_train:], sigmas, device))
            return {"config": {"classifier": asdict(cfg.classifier), "train": asdict(cfg.classifier_train)}, **stats}

        meta, trained_now = CheckpointCache(cache_dir).load_or_train(self.classifier_hash(cfg), net, train_fn)
        return net.to(device).eval().requires_grad_(False), meta, trained_now

    def load_model(self, model, overrides, *, device, cache_dir, progress=True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        h = self.hash_config(cfg)
        if isinstance(cfg, GuidedConfig):
            base = self.load_base(cfg, device=device, cache_dir=cache_dir, progress=progress)
            clf, meta, trained_now = self.load_classifier(cfg, device=device, cache_dir=cache_dir, progress=progress)
            den = ClassifierGuidance(base.denoiser, clf, cfg.scale)
            train_sec = (base.train_sec or 0.0) + (meta.get("train_sec", 0.0) if trained_now else 0.0)
            mm = {"guidance_scale": float(cfg.scale), "model_label": f"scale={cfg.scale:g}",
                  "classifier_heldout_accuracy": meta.get("heldout_accuracy"),
                  "classifier_heldout_accuracy_low_noise": meta.get("heldout_accuracy_low_noise")}
            return LoadedModel(den, h, base.dataset, base.sample_shape,
                               train_sec=train_sec if (trained_now or base.train_sec) else None,
                               dataset_opts=base.dataset_opts, model_metrics=mm,
                               sample_metrics=class_accuracy_metric(cfg.classifier.num_classes),
                               batch_cond=_labels_cond(cfg.classifier.num_classes))
        if isinstance(cfg, CFGConfig):
            return self._load_cfg(cfg, h, device=device, cache_dir=cache_dir, progress=progress)
        lm = _ABL.load_model(model, overrides, device=device, cache_dir=cache_dir, progress=progress)
        lm.model_metrics = {"unet_variant": "adm" if cfg.unet.scale_shift_norm else "ddpm",
                            "params": count_parameters(lm.denoiser.model)}
        return lm

    def _load_cfg(self, cfg: CFGConfig, h: str, *, device, cache_dir, progress) -> LoadedModel:
        from bench_core.data import load_dataset

        d = cfg.ddpm
        K = d.unet.num_classes
        abar = alphas_cumprod(d.betas())
        net = seeded_init(lambda: UNet(d.unet), d.train.seed)

        def train_fn(net):
            data = load_dataset(d.dataset, **d.dataset_opts)
            stats = train(net, l_simple(abar, cfg.p_uncond, K), data.x, d.train, labels=data.labels,
                          progress=progress, desc="train adm/cfg", device=device)
            return {"config": config_dict(cfg), **stats}

        meta, trained_now = CheckpointCache(cache_dir).load_or_train(self._cfg_ckpt_hash(cfg), net, train_fn)
        net = net.to(device).eval()
        den = ClassifierFreeGuidance(DiscreteVPEpsDenoiser(net, abar).to(device), cfg.guidance_weight, null_label=K)
        shape = (d.unet.in_channels, d.unet.resolution, d.unet.resolution)
        mm = {"guidance_weight": float(cfg.guidance_weight), "model_label": f"w={cfg.guidance_weight:g}"}
        return LoadedModel(den, h, d.dataset, shape, train_sec=meta.get("train_sec") if trained_now else None,
                           dataset_opts=dict(d.dataset_opts), model_metrics=mm,
                           sample_metrics=class_accuracy_metric(K), batch_cond=_labels_cond(K))

    # --- tables, plots, claims -------------------------------------------------------------------------
    def tables(self, df):
        out = {}
        sweep = guidance_sweep(df, "guided", "guidance_scale")
        if len(sweep):
            out["ADM classifier guidance on the DDPM digits model: scale sweep (paper, ImageNet 256 ADM-G at "
                "scale 1.0: FID 4.59, precision 0.82, recall 0.52; scale 0, conditional: FID 10.94, 0.69, 0.63 ≈)"] = sweep
        cfg = guidance_sweep(df, "cfg", "guidance_weight")
        if len(cfg):
            out["Classifier-free guidance (conditional digits U-Net, p_uncond 0.1): weight sweep"] = cfg
        abl = ablation_table(df)
        if len(abl):
            out["ADM architecture ablation (same data, training and sampler)"] = abl
        return out

    def plots(self, df, outdir):
        """Fig. 4-style trade-off: precision, recall, class accuracy and FID against the guidance scale."""
        from pathlib import Path

        from bench_core.report.plots import new_figure, save_figure

        paths = []
        for model, col, title in (("guided", "guidance_scale", "classifier guidance scale s"),
                                  ("cfg", "guidance_weight", "classifier-free guidance weight w")):
            t = guidance_sweep(df, model, col, numeric=True)
            if len(t) < 2:
                continue
            fig = new_figure(9.0, 3.6)
            ax = fig.add_subplot(1, 2, 1)
            for k, lab in (("precision", "precision"), ("recall", "recall"), ("class_accuracy", "class accuracy")):
                ax.plot(t[col], t[k], marker="o", ms=3, label=lab)
            ax.set_xlabel(title)
            ax.set_ylim(0, 1.02)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.plot(t[col], t["fid"], marker="o", ms=3, color="k")
            ax2.set_xlabel(title)
            ax2.set_ylabel("FID (digits CNN)")
            ax2.grid(True, alpha=0.3)
            fig.suptitle(f"ADM: guidance trade-off on the digits ({model}, {t['sampler'].iloc[0]}, "
                         f"{int(t['steps'].iloc[0])} steps, n={int(t['num_samples'].iloc[0])})", fontsize=9)
            paths.append(save_figure(fig, Path(outdir) / f"adm_{model}_tradeoff.png"))
        return paths

    def claims(self):
        return [
            Claim("adm-guidance-precision",
                  "Classifier guidance: precision rises with the scale (largest scale above scale 0; rank "
                  "correlation with the scale > 0)",
                  "ImageNet 256: precision 0.69 unguided (cond.) -> 0.82 at scale 1 (≈)",
                  lambda df: _check_trend(df, "precision", +1)),
            Claim("adm-guidance-class-accuracy",
                  "Classifier guidance: the fraction of samples classified as the requested class rises with the scale",
                  "qualitative (Fig. 3, 4: guided samples are more class-consistent)",
                  lambda df: _check_trend(df, "class_accuracy", +1)),
            Claim("adm-guidance-recall",
                  "Classifier guidance: recall falls with the scale (largest scale below scale 0; rank correlation < 0)",
                  "ImageNet 256: recall 0.63 unguided (cond.) -> 0.52 at scale 1 (≈)",
                  lambda df: _check_trend(df, "recall", -1)),
            Claim("adm-architecture",
                  "The ADM options (AdaGN, BigGAN up/down, multi-resolution multi-head attention) do not hurt: FID at "
                  "most that of the DDPM-layout U-Net with the same data, training and sampler",
                  "Tables 1-2 (ImageNet 128, ≈): each change lowers FID", _check_ablation),
        ]


# --------------------------------------------------------------------------------------------------------
def heldout_accuracy(net, x, y, sigmas, device) -> dict:
    """Accuracy of the noise-aware classifier on held-out digits: clean-ish (t < T/10) and over all t."""
    g = torch.Generator().manual_seed(123)
    net = net.to(device).eval()
    with torch.no_grad():
        t_all = torch.randint(0, len(sigmas), (len(x),), generator=g)
        t_low = torch.randint(0, len(sigmas) // 10, (len(x),), generator=g)
        out = {}
        for key, t in (("heldout_accuracy", t_all), ("heldout_accuracy_low_noise", t_low)):
            s = sigmas[t]
            xn = x + s.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
            pred = net(xn.to(device), s.to(device)).argmax(1).cpu()
            out[key] = float((pred == y).float().mean())
    return out


def _metric(df, name):
    return df["metrics"].map(lambda m: (m or {}).get(name) if isinstance(m, dict) else None)


def guidance_sweep(df, model: str, col: str, numeric: bool = False) -> pd.DataFrame:
    """One row per guidance value of the largest comparable group (sampler, steps, grid, n, extractor)."""
    if df is None or len(df) == 0:
        return pd.DataFrame()
    d = ok_rows(df, reproduction="adm", model=model).copy()
    if len(d) == 0:
        return pd.DataFrame()
    d[col] = _metric(d, col)
    d["class_accuracy"] = _metric(d, "class_accuracy")
    d = d[d[col].notna()]
    if len(d) == 0:
        return pd.DataFrame()
    d = largest_group(d, "sampler", "sampler_opts", "steps", "grid", "num_samples", "fid_extractor")
    cols = ["fid", "precision", "recall", "class_accuracy", "nfe", "grad_evals", "samples_per_sec"]
    t = d.groupby(col, as_index=False).agg({**{c: "mean" for c in cols}, "sampler": "first", "steps": "first",
                                            "num_samples": "first"}).sort_values(col)
    if numeric:
        return t.reset_index(drop=True)
    show = pd.DataFrame({col: t[col].map(lambda v: f"{v:g}"), "sampler": t["sampler"], "steps": t["steps"],
                         "NFE": t["nfe"].map(lambda v: f"{v:g}"),
                         "classifier grads": t["grad_evals"].map(lambda v: f"{v:g}"),
                         "FID": t["fid"].map(lambda v: f"{v:.2f}"), "precision": t["precision"].map(lambda v: f"{v:.3f}"),
                         "recall": t["recall"].map(lambda v: f"{v:.3f}"),
                         "class accuracy": t["class_accuracy"].map(lambda v: f"{v:.3f}"),
                         "samples/s": t["samples_per_sec"].map(lambda v: f"{v:.3g}")})
    return show.reset_index(drop=True)


def _ablation_rows(df):
    d = ok_rows(df, reproduction="adm")
    return d[d["model"].isin(list(ABLATION))]


def ablation_table(df) -> pd.DataFrame:
    if df is None or len(df) == 0:
        return pd.DataFrame()
    d = _ablation_rows(df)
    if len(d) == 0:
        return pd.DataFrame()
    rows = []
    for (model, sampler, steps), g in d.groupby(["model", "sampler", "steps"]):
        m = g["metrics"].iloc[0] or {}
        rows.append({"U-Net": model, "params": m.get("params"), "sampler": sampler, "steps": int(steps),
                     "FID": f"{g['fid'].mean():.2f}", "precision": f"{g['precision'].mean():.3f}",
                     "recall": f"{g['recall'].mean():.3f}", "samples/s": f"{g['samples_per_sec'].mean():.3g}"})
    return pd.DataFrame(rows)


def _check_ablation(df) -> ClaimResult:
    if df is None or len(df) == 0:
        return ClaimResult("not run", "no ablation records")
    d = _ablation_rows(df)
    pairs = []
    for (sampler, steps, n), g in d.groupby(["sampler", "steps", "num_samples"]):
        fid = g.groupby("model")["fid"].mean()
        if {"unet-ddpm", "unet-adm"} <= set(fid.index):
            pairs.append((sampler, steps, fid["unet-ddpm"], fid["unet-adm"]))
    if not pairs:
        return ClaimResult("not run", "need unet-ddpm and unet-adm records with the same sampler and steps")
    ok = all(a <= b for _, _, b, a in pairs)
    return ClaimResult("pass" if ok else "fail", "; ".join(f"{s} {k} steps: DDPM layout FID {b:.2f}, ADM options {a:.2f}"
                                                          for s, k, b, a in pairs))


def _spearman(a, b) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if np.std(ra) == 0 or np.std(rb) == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _check_trend(df, metric: str, sign: int) -> ClaimResult:
    t = guidance_sweep(df, "guided", "guidance_scale", numeric=True)
    if len(t) < 3 or t[metric].isna().any():
        return ClaimResult("not run", f"need guided records at >= 3 scales with {metric} (have {len(t)})")
    lo, hi = t.iloc[0], t.iloc[-1]
    rho = _spearman(t["guidance_scale"], t[metric])
    ok = sign * (hi[metric] - lo[metric]) > 0 and sign * rho > 0
    series = ", ".join(f"s={s:g}: {v:.3f}" for s, v in zip(t["guidance_scale"], t[metric]))
    return ClaimResult("pass" if ok else "fail", f"{series} (rank corr. {rho:+.2f})")


ADM_REPRO = register(ADM())
