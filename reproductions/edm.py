"""Karras, Aittala, Aila & Laine 2022 — Elucidating the Design Space of Diffusion-Based Generative Models (EDM).

The preconditioned denoiser (``EDMPrecond``: c_skip, c_out, c_in, c_noise, sigma_data = 0.5) and its
training loss (ln sigma ~ N(P_mean, P_std^2), weight lambda = (sigma^2 + sd^2) / (sigma sd)^2) live here;
the samplers ``euler``, ``heun`` and ``edm_stochastic`` and the Karras rho grid are shared
(bench_core.samplers / schedules) and run on every model, the DDPM-trained one included (through its
VP adapter).  Figure 2 (FID against NFE for DDPM ancestral, DDIM, Euler and Heun on a VP model and on
the EDM model) is regenerated from records by :meth:`EDM.plots`.

Time input: the shared U-Net embeds a real t sinusoidally (made for DDPM's t in [0, 1000]); the
network sees t = 250 c_noise = 62.5 ln(sigma), about [-388, 274] for sigma in [0.002, 80].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from bench_core.denoiser import EDMPrecond
from bench_core.nets.unet import DDPM_CIFAR10, DIGITS_SMALL, UNet, UNetConfig
from bench_core.train import CheckpointCache, TrainConfig, seeded_init, train
from reproductions import Claim, ClaimResult, LoadedModel, Reproduction, largest_group, ok_rows, register, unet_config_hash
from reproductions.ddpm import config_dict


@dataclass
class EDMConfig:
    """An EDM model: network, preconditioning, training noise distribution, optimisation and dataset."""

    dataset: str = "digits"
    dataset_opts: dict = field(default_factory=dict)
    sigma_data: float = 0.5   # Karras et al. 2022, Table 1
    P_mean: float = -1.2      # ln sigma ~ N(P_mean, P_std^2) in training
    P_std: float = 1.2
    sigma_min: float = 0.002  # sampling range (the Karras grid's ends)
    sigma_max: float = 80.0
    t_scale: float = 250.0    # network time input = t_scale * c_noise (ours; see the module docstring)
    unet: UNetConfig = field(default_factory=lambda: DIGITS_SMALL)
    train: TrainConfig = field(default_factory=TrainConfig)


# "digits": our CPU scale, the DDPM digits model's network and optimiser (4000 steps there) cut to
# 3000 steps to fit the suite's time budget.  "cifar10": the paper's unconditional CIFAR-10 run as
# closely as our U-Net allows (DDPM++ there; FID 1.97 at 35 NFE): batch 512, lr 1e-3, 200 Mimg
# (390k steps), lr warm-up over 10 Mimg, EMA half-life 0.5 Mimg (0.5^(512/5e5) = 0.99929), dropout 0.13.
MODELS: dict[str, EDMConfig] = {
    "digits": EDMConfig(
        dataset="digits", unet=DIGITS_SMALL.replace(dropout=0.0),
        train=TrainConfig(steps=3000, batch_size=64, lr=3e-3, warmup=200, grad_clip=1.0, ema_decay=0.998, seed=0),
    ),
    "cifar10": EDMConfig(
        dataset="cifar10", unet=DDPM_CIFAR10.replace(dropout=0.13),
        train=TrainConfig(steps=390_625, batch_size=512, lr=1e-3, warmup=19_531, grad_clip=0.0, ema_decay=0.99929,
                          seed=0),
    ),
}


def edm_loss(sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2):
    """EDM training loss, Karras et al. 2022, Eq. 8 with Table 1: lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2,
    ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2."""

    def loss_fn(model, x0, y, generator):
        B = x0.shape[0]
        rnd = torch.randn(B, generator=generator).to(x0.device)
        sigma = (P_mean + P_std * rnd).exp()
        n = torch.randn(x0.shape, generator=generator).to(x0.device)
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        D = model(x0 + s * n, sigma)
        per_sample = ((D - x0) ** 2).flatten(1).mean(1)
        return (weight * per_sample).mean()

    return loss_fn


class EDM(Reproduction):
    name = "edm"
    title = "Karras et al. 2022 — Elucidating the Design Space of Diffusion-Based Generative Models (EDM)"
    paper_url = "https://arxiv.org/abs/2206.00364"
    models = MODELS

    @staticmethod
    def hash_config(cfg: EDMConfig) -> str:
        """Checkpoint key of an EDM config (the U-Net's architecture, not its kernels' choice)."""
        return unet_config_hash("edm-precond", cfg)

    def build(self, cfg: EDMConfig) -> EDMPrecond:
        return EDMPrecond(UNet(cfg.unet), cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.t_scale)

    def cached_modules(self, model, overrides, cfg):
        return [(self.hash_config(cfg), lambda: self.build(cfg))]

    def load_model(self, model: str, overrides: dict, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        den, h, meta, trained_now = self.load_config(cfg, device=device, cache_dir=cache_dir, progress=progress,
                                                     desc=f"train {self.name}/{model}")
        shape = (cfg.unet.in_channels, cfg.unet.resolution, cfg.unet.resolution)
        return LoadedModel(den, h, cfg.dataset, shape, train_sec=meta.get("train_sec") if trained_now else None,
                           dataset_opts=dict(cfg.dataset_opts),
                           model_metrics={"edm_final_loss": meta.get("final_loss"),
                                          "edm_train_sec": meta.get("train_sec")},
                           extra={"train_sec_cached": meta.get("train_sec")})

    def load_config(self, cfg: EDMConfig, *, device, cache_dir, progress: bool = True, desc: str = "train edm"):
        """(denoiser, hash, meta, trained_now) of an EDM config: the cached checkpoint or a fresh training."""
        from bench_core.data import load_dataset

        h = self.hash_config(cfg)
        den = seeded_init(lambda: self.build(cfg), cfg.train.seed)

        def train_fn(net):
            data = load_dataset(cfg.dataset, **cfg.dataset_opts)
            stats = train(net, edm_loss(cfg.sigma_data, cfg.P_mean, cfg.P_std), data.x, cfg.train,
                          labels=data.labels, progress=progress, desc=desc, device=device)
            return {"config": config_dict(cfg), **stats}

        meta, trained_now = CheckpointCache(cache_dir).load_or_train(h, den, train_fn)
        return den.to(device).eval(), h, meta, trained_now

    # ---------------------------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return [
            Claim("edm-heun-beats-euler",
                  "Heun (2nd order) beats Euler at equal NFE on the Karras rho=7 grid (every matched NFE in [8, 40], "
                  "each model; below 8 NFE, i.e. 3 Heun steps, neither is usable)", "Fig. 2: Heun reaches a given FID with far fewer NFE than Euler", _check_heun_euler),
            Claim("edm-rho7-beats-uniform",
                  "The rho=7 grid beats uniform sigma spacing (rho=1) for Heun at equal steps",
                  "Fig. 13 (≈): rho = 7 near the optimum; uniform spacing far worse at low NFE", _check_rho),
            Claim("edm-nfe-reduction-ddpm",
                  "On the DDPM-trained model, the EDM sampler (Heun or stochastic, rho=7) reaches DDPM-1000 quality "
                  "(FID <= 1.1x the best DDPM 1000-step FID) with several (>= 2) times fewer NFE",
                  "VP 7.3x, VE 300x, DDIM 3.2x fewer NFE (≈)", _check_nfe_reduction),
        ]

    def tables(self, df):
        out = {}
        for panel, series in fig2_series(df).items():
            rows = [{"sampler": lab, **{f"NFE={int(n)}": f"{f:.2f}" for n, f in pts}} for lab, pts in series.items()]
            if rows:
                t = pd.DataFrame(rows)
                cols = ["sampler"] + sorted((c for c in t.columns if c != "sampler"), key=lambda c: int(c[4:]))
                out[f"EDM Fig. 2 — FID by NFE, {panel}"] = t[cols].fillna("—")
        return out

    def plots(self, df, outdir):
        """Figure 2 at our scale: FID against NFE, one panel per model, one line per sampler."""
        from pathlib import Path

        from bench_core.report.plots import new_figure, save_figure

        panels = fig2_series(df)
        if not panels:
            return []
        from matplotlib import colormaps

        labels = sorted({lab for series in panels.values() for lab in series})
        color = {lab: colormaps["tab10"](i % 10) for i, lab in enumerate(labels)}  # one colour per line in every panel
        fig = new_figure(5.2 * len(panels), 4.2)
        for i, (panel, series) in enumerate(panels.items()):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for lab, pts in series.items():
                nfe, fid = zip(*pts)
                ax.plot(nfe, fid, marker="o", ms=3, label=lab, color=color[lab])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE (counted)")
            ax.set_ylabel("FID")
            ax.set_title(panel, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle("EDM Fig. 2 at our scale (digits): FID vs NFE", fontsize=10)
        return [save_figure(fig, Path(outdir) / "edm_fig2_fid_vs_nfe.png")]


# --------------------------------------------------------------------------------------------
# Records -> Figure 2 series and claims (every function tolerates empty or partial records)
# --------------------------------------------------------------------------------------------
PANELS = {"DDPM model (VP, eps-prediction)": ("ddpm", "ddim"), "EDM model": ("edm",)}


def _grid_label(g) -> str:
    if not isinstance(g, dict):
        return "?"
    kind = g.get("kind", "uniform")
    if kind == "karras":
        return f"karras rho={float(g.get('rho', 7.0)):g}"
    return kind


def series_label(sampler: str, opts: dict, grid: dict) -> str:
    """A readable name of a (sampler, options, grid) combination for the Figure-2 legend."""
    opts = opts if isinstance(opts, dict) else {}
    name = {"ddpm": "DDPM ancestral", "ddim": "DDIM", "euler": "Euler", "heun": "Heun",
            "edm_stochastic": "EDM stochastic"}.get(sampler, sampler)
    if sampler == "ddpm":
        name += f" ({opts.get('variance')})"
    elif sampler == "ddim":
        name += f" (eta={float(opts.get('eta', 0)):g})"
    elif sampler == "edm_stochastic":
        name += f" (S_churn={float(opts.get('S_churn', 0)):g})"
    return f"{name}, {_grid_label(grid)}"


def _ok(df):
    if df is None or len(df) == 0 or "status" not in df:
        return None
    d = ok_rows(df, "fid")
    return d if len(d) else None


def panel_records(df, panel: str):
    """Ok records with an FID of one Figure-2 panel, reduced to the largest comparable group."""
    d = _ok(df)
    if d is None:
        return None
    d = d[d["reproduction"].isin(PANELS[panel]) & (d["model"] == "digits")]
    if len(d) == 0:
        return None
    return largest_group(d, "fid_extractor", "num_samples", "model_hash")


FIG2_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "edm_stochastic")


def fig2_series(df) -> dict:
    """{panel: {label: [(nfe, mean FID), ...] sorted by NFE}} for the Figure-2 samplers (NFE <= 1000)."""
    out = {}
    for panel in PANELS:
        d = panel_records(df, panel)
        if d is None:
            continue
        d = d[d["sampler"].isin(FIG2_SAMPLERS)]
        series: dict[str, dict] = {}
        for _, r in d.iterrows():
            lab = series_label(r["sampler"], r["sampler_opts"], r["grid"])
            series.setdefault(lab, {}).setdefault(float(r["nfe"]), []).append(float(r["fid"]))
        if series:
            out[panel] = {lab: sorted((n, float(np.mean(f))) for n, f in pts.items())
                          for lab, pts in sorted(series.items())}
    return out


def _fid_by(d, sampler: str, grid_kind: str, rho=None, key: str = "nfe") -> dict:
    """{nfe or steps: mean FID} of one sampler on one grid kind (rho matched when given)."""
    if d is None or len(d) == 0:
        return {}
    m = (d["sampler"] == sampler) & d["grid"].map(lambda g: isinstance(g, dict) and g.get("kind") == grid_kind)
    if rho is not None:
        m &= d["grid"].map(lambda g: abs(float(g.get("rho", 7.0)) - rho) < 1e-9)
    if sampler == "edm_stochastic":
        m &= d["sampler_opts"].map(lambda o: float(o.get("S_churn", 0)) > 0)
    r = d[m]
    return {float(k): float(v) for k, v in r.groupby(key)["fid"].mean().items()} if len(r) else {}


def _check_heun_euler(df) -> ClaimResult:
    try:
        parts, ok_all, any_pair = [], True, False
        for panel in PANELS:
            d = panel_records(df, panel)
            heun, euler = _fid_by(d, "heun", "karras", 7.0), _fid_by(d, "euler", "karras", 7.0)
            pairs = sorted(n for n in heun if n in euler and 8 <= n <= 40)
            if not pairs:
                continue
            any_pair = True
            wins = [heun[n] < euler[n] for n in pairs]
            ok_all &= all(wins)
            parts.append(f"{panel.split(' (')[0]}: " + ", ".join(
                f"NFE {int(n)} Heun {heun[n]:.2f} vs Euler {euler[n]:.2f}" for n in pairs))
        if not any_pair:
            return ClaimResult("not run", "need Heun and Euler records (karras rho=7) at equal NFE in [8, 40]")
        return ClaimResult("pass" if ok_all else "fail", "; ".join(parts))
    except Exception as e:  # a check never raises
        return ClaimResult("not run", f"check failed: {type(e).__name__}: {e}")


def _check_rho(df) -> ClaimResult:
    try:
        parts, ok_all, any_pair = [], True, False
        for panel in PANELS:
            d = panel_records(df, panel)
            r7 = _fid_by(d, "heun", "karras", 7.0, key="steps")
            uni = {**_fid_by(d, "heun", "linear", key="steps"), **_fid_by(d, "heun", "karras", 1.0, key="steps")}
            pairs = sorted(s for s in r7 if s in uni)
            if not pairs:
                continue
            any_pair = True
            ok_all &= all(r7[s] < uni[s] for s in pairs)
            parts.append(f"{panel.split(' (')[0]}: " + ", ".join(
                f"{int(s)} steps rho=7 {r7[s]:.2f} vs uniform {uni[s]:.2f}" for s in pairs))
        if not any_pair:
            return ClaimResult("not run", "need Heun records on karras rho=7 and on a uniform-in-sigma grid at equal steps")
        return ClaimResult("pass" if ok_all else "fail", "; ".join(parts))
    except Exception as e:
        return ClaimResult("not run", f"check failed: {type(e).__name__}: {e}")


def _check_nfe_reduction(df) -> ClaimResult:
    try:
        d = panel_records(df, "DDPM model (VP, eps-prediction)")
        if d is None:
            return ClaimResult("not run", "no records of the DDPM digits model")
        ref = d[(d["sampler"] == "ddpm") & (d["steps"] == 1000)
                & d["grid"].map(lambda g: isinstance(g, dict) and g.get("kind") == "uniform")]
        if len(ref) == 0:
            return ClaimResult("not run", "no DDPM 1000-step records (default suite, entry ddpm-ancestral)")
        target = float(ref["fid"].min())
        ref_nfe = float(ref.loc[ref["fid"].idxmin(), "nfe"])
        cand = {}
        for s in ("heun", "edm_stochastic"):
            for n, f in _fid_by(d, s, "karras", 7.0).items():
                if f <= 1.1 * target:
                    cand[n] = min(cand.get(n, math.inf), f)
        if not cand:
            best = {**_fid_by(d, "heun", "karras", 7.0), **_fid_by(d, "edm_stochastic", "karras", 7.0)}
            if not best:
                return ClaimResult("not run", "no Heun / stochastic EDM records on the DDPM model")
            n, f = min(best.items(), key=lambda kv: kv[1])
            return ClaimResult("fail", f"DDPM-1000 FID {target:.2f}; the EDM sampler's best is {f:.2f} at NFE {int(n)}")
        n = min(cand)
        ratio = ref_nfe / n
        return ClaimResult("pass" if ratio >= 2 else "fail",
                           f"DDPM-1000 FID {target:.2f}; the EDM sampler reaches {cand[n]:.2f} at NFE {int(n)}: "
                           f"{ratio:.1f}x fewer NFE")
    except Exception as e:
        return ClaimResult("not run", f"check failed: {type(e).__name__}: {e}")


EDM_REPRO = register(EDM())
