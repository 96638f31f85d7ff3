"""Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole 2021 — Score-Based Generative Modeling through SDEs.

VE, VP and sub-VP SDEs as typed configs; continuous-time denoising score matching on the digits
with the shared U-Net; the adapter ``bench_core.denoiser.SDEEpsDenoiser`` turns the score model
into a denoiser, so the paper's samplers (``reverse_diffusion``, ``ancestral``,
``langevin_corrector``, ``pc``, ``prob_flow`` in bench_core.samplers) run on it and on every other
model (e.g. DDPM's, through its VP adapter).  Likelihood (bits/dim) through the probability-flow
ODE lives in ``bench_core.methods.likelihood``; the digits model's bits/dim (per image too, beside a full-covariance
Gaussian fitted to the digits and dequantized the same way) and the exact 2-D mixture's ODE-likelihood gap go
into the records' ``metrics``.
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from bench_core.atomic import atomic_write_text
from bench_core.data import load_dataset, load_gmm2d, to_uint8
from bench_core.denoiser import SDEEpsDenoiser
from bench_core.methods.likelihood import bits_per_dim, gaussian_bits_per_dim, ode_log_likelihood
from bench_core.metrics.twod import mode_weights
from bench_core.nets.unet import DDPM_CIFAR10, DIGITS_SMALL, UNet, UNetConfig
from bench_core.train import TrainConfig, config_hash, train
from bench_core.stats import all_of, at_most, beats, summarize
from reproductions import Claim, ClaimResult, LoadedModel, Reproduction, fid_seeds, ok_rows, register, seed_values


# --------------------------------------------------------------------------------------------
# The SDEs (Song et al. 2021, Sec. 3.4 and App. B)
# --------------------------------------------------------------------------------------------
@dataclass
class SDEConfig:
    """An SDE of the paper: ``kind`` "ve" (Eq. 30: sigma(t) = smin (smax/smin)^t), "vp" (Eq. 32:
    beta(t) = bmin + t (bmax - bmin)) or "subvp" (Eq. 34); ``eps`` is the sampling end time."""

    kind: str = "vp"
    beta_min: float = 0.1     # VP / sub-VP (CIFAR-10)
    beta_max: float = 20.0
    sigma_min: float = 0.01   # VE (CIFAR-10)
    sigma_max: float = 50.0
    eps: float = 1e-3         # 1e-5 (VE) / 1e-3 (VP, sub-VP)

    def __post_init__(self):
        if self.kind not in ("ve", "vp", "subvp"):
            raise ValueError(f"SDE kind must be 've', 'vp' or 'subvp', got {self.kind!r}")

    def int_beta(self, t: Tensor) -> Tensor:
        """int_0^t beta(s) ds = bmin t + (bmax - bmin) t^2 / 2."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t: Tensor) -> Tensor:
        """Mean coefficient of the perturbation kernel: 1 (VE), exp(-int beta / 2) (VP, sub-VP; Eq. 33, 35)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.ones_like(t) if self.kind == "ve" else torch.exp(-0.5 * self.int_beta(t))

    def std(self, t: Tensor) -> Tensor:
        """Std of the kernel: sigma(t) (VE), sqrt(1 - e^{-int beta}) (VP), 1 - e^{-int beta} (sub-VP)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "ve":
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        a2 = torch.exp(-self.int_beta(t))
        return (1 - a2).sqrt() if self.kind == "vp" else 1 - a2

    def sigma(self, t: Tensor) -> Tensor:
        """Noise level in the denoiser's coordinates x = x_sde / alpha: sigma(t) = std(t) / alpha(t)."""
        return self.std(t) / self.alpha(t)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of sigma(t) in closed form."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.kind == "ve":
            return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        if self.kind == "vp":
            L = torch.log1p(sigma**2)                              # int beta = log(1 + sigma^2)
        else:
            a = 0.5 * (-sigma + (sigma**2 + 4).sqrt())             # sigma a = 1 - a^2
            L = -2 * torch.log(a)
        db = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 2 * db * L).sqrt()) / db


@dataclass
class LikelihoodConfig:
    """Bits/dim through the probability-flow ODE on a test subset (not part of the model hash)."""

    n_images: int = 64          # the last n images of the dataset
    trace: str = "hutchinson"   # "hutchinson" or "exact"
    probe: str = "rademacher"
    rtol: float = 1e-4          # the paper uses 1e-5; 1e-4 keeps it cheap on CPU
    atol: float = 1e-4
    seed: int = 0


@dataclass
class ScoreSDEConfig:
    """A continuous-time score model: SDE, network (noise prediction, time input t_scale * t), training, data."""

    dataset: str = "digits"
    dataset_opts: dict = field(default_factory=dict)
    sde: SDEConfig = field(default_factory=SDEConfig)
    unet: UNetConfig = field(default_factory=lambda: DIGITS_SMALL)
    t_scale: float = 999.0      # t in [eps, 1] fed to the sinusoidal embedding as 999 t
    train: TrainConfig = field(default_factory=TrainConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)


@dataclass
class ExactGMMConfig:
    """No training: the exact denoiser of a 2-D Gaussian mixture (``gmm2d`` preset), for the likelihood check."""

    preset: str = "ring8"
    n: int = 2000               # reference points for the 2-D sample metrics (MMD costs O(n * samples))
    sigma_min: float = 0.01     # the ODE starts here: compared with the true log p_{sigma_min}
    sigma_max: float = 200.0    # prior N(0, sigma_max^2 I)
    n_eval: int = 256           # points whose ODE log-likelihood is compared
    rtol: float = 1e-5
    atol: float = 1e-5


# Presets.  The digits models are our CPU scale: DIGITS_SMALL without dropout, trained ~1 minute each
# (1500 steps, batch 64, the DDPM digits preset's optimiser).  VE uses sigma_max = 10, the largest
# pairwise distance of the digits in [-1, 1] (9.6; the paper's Technique 1), and eps = 1e-5.
# The CIFAR-10 presets are the paper's SDEs (NCSN++ cont. deep VE: FID 2.20, IS 9.89; DDPM++ cont.
# deep sub-VP: 2.99 bits/dim) on the shared DDPM U-Net (we do not build NCSN++/DDPM++).
_DIGITS_TRAIN = TrainConfig(steps=1500, batch_size=64, lr=3e-3, warmup=100, grad_clip=1.0, ema_decay=0.995, seed=0)
_CIFAR_TRAIN = TrainConfig(steps=1_300_000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0, ema_decay=0.9999, seed=0)
MODELS: dict[str, object] = {
    "digits_vp": ScoreSDEConfig(sde=SDEConfig("vp"), unet=DIGITS_SMALL.replace(dropout=0.0), train=_DIGITS_TRAIN),
    "digits_subvp": ScoreSDEConfig(sde=SDEConfig("subvp"), unet=DIGITS_SMALL.replace(dropout=0.0), train=_DIGITS_TRAIN),
    "digits_ve": ScoreSDEConfig(sde=SDEConfig("ve", sigma_min=0.01, sigma_max=10.0, eps=1e-5),
                                unet=DIGITS_SMALL.replace(dropout=0.0), train=_DIGITS_TRAIN),
    "cifar10_ve": ScoreSDEConfig(dataset="cifar10", sde=SDEConfig("ve", sigma_min=0.01, sigma_max=50.0, eps=1e-5),
                                 unet=DDPM_CIFAR10, train=_CIFAR_TRAIN),
    "cifar10_subvp": ScoreSDEConfig(dataset="cifar10", sde=SDEConfig("subvp"), unet=DDPM_CIFAR10, train=_CIFAR_TRAIN),
    "gmm_exact": ExactGMMConfig(),
}


def dsm_loss(sde: SDEConfig, t_scale: float):
    """Continuous-time denoising score matching, Song et al. 2021, Eq. 7 with lambda(t) = std(t)^2:
    E_t E_{x0, n} || F(alpha(t) x0 + std(t) n, t_scale t) - n ||^2 with t ~ U(eps, 1) and s = -F / std."""

    def loss_fn(model, x0, y, generator):
        B = x0.shape[0]
        t = sde.eps + (1 - sde.eps) * torch.rand(B, generator=generator, dtype=torch.float64)
        n = torch.randn(x0.shape, generator=generator).to(x0.device)
        shape = (-1, *([1] * (x0.ndim - 1)))
        a = sde.alpha(t).float().to(x0.device).reshape(shape)
        s = sde.std(t).float().to(x0.device).reshape(shape)
        F = model(a * x0 + s * n, (t_scale * t).float().to(x0.device))
        return ((F - n) ** 2).mean()

    return loss_fn


def _arch_hash_dict(cfg: ScoreSDEConfig) -> dict:
    d = asdict(cfg)
    d.pop("likelihood")
    d["unet"] = cfg.unet.arch_dict()
    return d


class ScoreSDE(Reproduction):
    name = "score_sde"
    title = "Song et al. 2021 — Score-Based Generative Modeling through Stochastic Differential Equations"
    paper_url = "https://arxiv.org/abs/2011.13456"
    models = MODELS

    def timesteps(self, model, cfg) -> int | None:
        """The SDE models' uniform-in-t table (``SDEEpsDenoiser``'s ``n_grid`` times, which the ``uniform`` grid
        takes a subset of); the exact mixture denoiser is continuous."""
        if isinstance(cfg, ExactGMMConfig):
            return None
        return int(inspect.signature(SDEEpsDenoiser).parameters["n_grid"].default)

    def hash_config(self, cfg) -> str:
        if isinstance(cfg, ExactGMMConfig):
            return config_hash({"family": "exact-gmm"}, asdict(cfg))
        return config_hash({"family": "score-sde-eps"}, _arch_hash_dict(cfg))

    def required_datasets(self, cfg):
        if isinstance(cfg, ExactGMMConfig):
            return [("gmm2d", {"preset": cfg.preset, "n": cfg.n})]
        return super().required_datasets(cfg)

    def cached_modules(self, model, overrides, cfg):
        return [] if isinstance(cfg, ExactGMMConfig) else [(self.hash_config(cfg), lambda: UNet(cfg.unet))]

    def load_model(self, model: str, overrides: dict, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        h = self.hash_config(cfg)
        if isinstance(cfg, ExactGMMConfig):
            return self._load_gmm(cfg, h, device)
        data = load_dataset(cfg.dataset, **cfg.dataset_opts)

        def train_fn(net):
            stats = train(net, dsm_loss(cfg.sde, cfg.t_scale), data.x, cfg.train, progress=progress,
                          desc=f"train {self.name}/{model}", device=device)
            return {"config": asdict(cfg), **stats}

        net, meta, spent = self.cached_net(h, lambda: UNet(cfg.unet), cfg.train.seed, train_fn, cache_dir=cache_dir)
        net = net.to(device).eval()
        net.requires_grad_(False)
        den = SDEEpsDenoiser(net, cfg.sde, cfg.t_scale).to(device)
        mm = {"sde": cfg.sde.kind, **_cached_bits_per_dim(den, data, cfg.likelihood, h, cache_dir)}
        return LoadedModel(den, h, cfg.dataset, tuple(data.sample_shape), dataset_opts=dict(cfg.dataset_opts),
                           train_sec=spent, model_metrics=mm)

    def _load_gmm(self, cfg: ExactGMMConfig, h: str, device) -> LoadedModel:
        """The exact mixture denoiser, with its ODE log-likelihood gap (exact trace and Hutchinson) as model metrics."""
        ds = load_gmm2d(cfg.preset, n=cfg.n)
        oracle = ds.oracle
        oracle.sigma_min, oracle.sigma_max = cfg.sigma_min, cfg.sigma_max
        x = ds.x[: cfg.n_eval].double()
        true = oracle.log_prob(x, cfg.sigma_min)
        ll_exact = ode_log_likelihood(oracle, x, trace="exact", rtol=cfg.rtol, atol=cfg.atol)
        ll_hutch = ode_log_likelihood(oracle, x, trace="hutchinson", rtol=cfg.rtol, atol=cfg.atol,
                                      generator=torch.Generator().manual_seed(0))
        gap_e, gap_h = ll_exact - true, ll_hutch - true
        mm = {
            "ll_true_nats": float(true.mean()),
            "ll_ode_exact_nats": float(ll_exact.mean()),
            "ll_gap_exact_mean_abs": float(gap_e.abs().mean()),
            "ll_gap_exact_max_abs": float(gap_e.abs().max()),
            "ll_gap_hutchinson_mean": float(gap_h.mean()),
            "ll_gap_hutchinson_stderr": float(gap_h.std() / math.sqrt(len(gap_h))),
        }
        means = oracle.means.float()
        weights = oracle.weights.tolist()

        def sample_metrics(samples):
            w = mode_weights(samples.reshape(len(samples), -1), means)
            return {"mode_weights": [float(v) for v in w],
                    "mode_weight_error": float(sum(abs(a - b) for a, b in zip(w, weights)) / 2)}

        return LoadedModel(oracle, h, "gmm2d", (2,), dataset_opts={"preset": cfg.preset, "n": cfg.n},
                           model_metrics=mm, sample_metrics=sample_metrics)

    # ---------------------------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return [
            Claim("sde-pc-beats-predictor",
                  "At equal compute, PC (one Langevin corrector step per level, N levels: 2N evaluations) beats the "
                  "reverse-diffusion predictor alone with 2N steps (lower FID; paired one-sided 95% test over sampling "
                  "seeds).  Decided on the VE digits model (the paper's VE column, where PC wins clearly); the VP "
                  "model (where the paper shows no gain) is shown beside it",
                  "Table 1, CIFAR-10 FID, VE: PC1000 3.21 vs P2000 4.74; VP: PC1000 3.18 vs P2000 3.19 (≈)",
                  _check_pc_beats_p),
            Claim("sde-corrector-poor",
                  "Corrector-only sampling (N Langevin levels) is worse than the predictor alone at equal compute "
                  "(N steps): higher FID, paired one-sided 95% test over sampling seeds, on every model that ran both",
                  "Table 1, CIFAR-10 FID: C2000 20.43 vs P2000 4.74 (VE); 19.06 vs 3.19 (VP) (≈)",
                  _check_corrector_poor),
            Claim("sde-ode-likelihood",
                  "On data with a known density (2-D mixture, exact score), the probability-flow ODE log-likelihood "
                  f"(exact trace) matches the true log-density within {LL_TOL} nats per point on average.  Tolerance: "
                  "a tenth of the smallest likelihood gap the paper ranks models by (sub-VP vs VP, 3.21 - 3.05 = 0.16 "
                  "bits/dim), over 2 dimensions: 0.016 * 2 * ln 2 = 0.022 nats.  The exact-trace ODE is deterministic "
                  "(no seed noise): the gap is compared directly",
                  "exact likelihood via the ODE (Sec. 4.3)", _check_ode_likelihood),
            Claim("sde-bits-per-dim",
                  "The probability-flow ODE likelihood of each digits model beats a full-covariance Gaussian fitted to "
                  "the digits and dequantized the same way (uniform, same scaling, the same noise per image): lower "
                  "bits/dim, one-sided 95% test over training seeds when >= 2 ran, else paired over the evaluated "
                  "images (each with its own Hutchinson probe and dequantization draw)",
                  "CIFAR-10 bits/dim: sub-VP (DDPM++ cont. deep) 2.99, VP 3.16 (≈); no Gaussian baseline reported",
                  _check_bpd, kind="sanity"),
            Claim("sde-subvp-likelihood",
                  "The sub-VP SDE gives a better likelihood than the VP SDE with the same network and training: lower "
                  "bits/dim, one-sided 95% test over training seeds (>= 2 per SDE: retraining moves a model's "
                  "bits/dim, so one model per SDE cannot decide it; with one, the per-image paired test is shown and "
                  "the verdict is inconclusive)",
                  "Table 2, CIFAR-10 bits/dim: DDPM++ cont. VP 3.21 vs sub-VP 3.05; deep VP 3.16 vs deep sub-VP 2.99 (≈)",
                  _check_subvp_likelihood),
            Claim("sde-cross-model",
                  "PC and the probability-flow ODE run on the DDPM digits model through its VP adapter with mean FID "
                  "over seeds at most 3x the real-data floor (one-sided 95% test): a sanity bar any working sampler "
                  "on a working model clears; a broken one (noise, a wrong scaling) scores tens of times the floor",
                  "ODE FID 2.92 (sub-VP, CIFAR-10)", _check_cross_model, kind="sanity"),
        ]

    def tables(self, df):
        out = {}
        rows = sampler_table(df)
        if rows:
            out["Score SDE sampler comparison — digits FID (paper: CIFAR-10 VE, ≈), predictor steps N"] = pd.DataFrame(rows)
        rows = likelihood_table(df)
        if rows:
            out["Score SDE likelihood — digits bits/dim through the ODE vs a full-covariance Gaussian (paper: CIFAR-10)"] = \
                pd.DataFrame(rows)
        return out


LL_TOL = 0.02
# Song et al. 2021, Table 1 (VE, CIFAR-10 FID, reverse-diffusion predictor), approximate (≈).
PAPER_SAMPLERS = {"P": "4.79 (P1000)", "C": "20.43 (C2000)", "PC": "3.21 (PC1000)", "ODE": "15.41 (prob. flow)"}
FAMILY = {"reverse_diffusion": "P", "langevin_corrector": "C", "pc": "PC", "prob_flow": "ODE"}


def _sampler_rows(df):
    """ok records of the Score SDE samplers with an FID, any reproduction."""
    if df is None or len(df) == 0 or "sampler" not in df:
        return None
    d = ok_rows(df, "fid")
    d = d[d["sampler"].isin(list(FAMILY))]
    return d if len(d) else None


def sampler_table(df) -> list[dict]:
    """Rows (model, N): FID and NFE of P, C, PC and the ODE, with the paper's values as a last row."""
    d = _sampler_rows(df)
    if d is None:
        return []
    out = []
    for (rep, model, steps), g in d.groupby(["reproduction", "model", "steps"], sort=True):
        line = {"model": f"{rep}/{model}", "N": int(steps)}
        for samp, fam in FAMILY.items():
            r = g[g["sampler"] == samp]
            line[fam] = f"{r['fid'].mean():.2f} (NFE {r['nfe'].mean():.0f})" if len(r) else "—"
        out.append(line)
    out.append({"model": "paper (CIFAR-10 VE, ≈)", "N": 1000, **PAPER_SAMPLERS})
    return out


PAPER_BPD = {"digits_vp": "3.21 (DDPM++ cont. VP) (≈)", "digits_subvp": "3.05 (DDPM++ cont. sub-VP) (≈)",
             "digits_ve": "— (VE: not reported)"}


def likelihood_table(df) -> list[dict]:
    """Rows per digits model: bits/dim (mean over training seeds), the Gaussian baseline's, the paper's."""
    out = []
    for model in ("digits_vp", "digits_subvp", "digits_ve"):
        per_ts, g_ts, _, _ = _bpd(df, model)
        if per_ts:
            out.append({"model": model, "bits/dim (ours)": summarize(per_ts.values()).text(3),
                        "Gaussian fit": summarize(g_ts.values()).text(3) if g_ts else "—",
                        "training seeds": len(per_ts), "paper (CIFAR-10)": PAPER_BPD[model]})
    return out


def _fid_seeds(d, sampler: str, nfe=None, steps=None, **eq) -> dict:
    """{(train_seed, seed): FID} of one sampler configuration in the frame ``d`` (``eq``: e.g. opt_n_corrector=1)."""
    sizes = {k: v for k, v in (("nfe", nfe), ("steps", steps)) if v is not None}
    return fid_seeds(d, sampler=sampler, **sizes, **eq)


def _score_rows(df, model: str):
    d = _sampler_rows(df)
    if d is None:
        return None
    d = d[(d["reproduction"] == "score_sde") & (d["model"] == model)]
    return d if len(d) else None


def _pc_vs_p(df, model: str):
    """The verdict PC (N levels) vs P (2N steps) at the largest NFE both ran at on ``model``, or None."""
    d = _score_rows(df, model)
    if d is None:
        return None
    pc = ok_rows(d[d["sampler"] == "pc"], opt_n_corrector=1, opt_predictor="reverse_diffusion")
    p = d[d["sampler"] == "reverse_diffusion"]
    common = sorted(set(pc["nfe"]) & set(p["nfe"]))
    if not common:
        return None
    nfe = common[-1]
    n_pc = int(pc[pc["nfe"] == nfe]["steps"].iloc[0])
    n_p = int(p[p["nfe"] == nfe]["steps"].iloc[0])
    return beats(_fid_seeds(pc, "pc", nfe=nfe), _fid_seeds(p, "reverse_diffusion", nfe=nfe),
                 names=(f"PC{n_pc}", f"P{n_p}"), what=f"{model} NFE {nfe:.0f} FID")


def _check_pc_beats_p(df) -> ClaimResult:
    ve, vp = _pc_vs_p(df, "digits_ve"), _pc_vs_p(df, "digits_vp")
    extra = f" | VP (shown, not decisive): {vp.text}" if vp is not None and vp.text else ""
    if ve is None:
        return ClaimResult("not run", extra.strip(" |"),
                           "no VE digits model with PC (N levels) and P (2N steps) at the same NFE")
    return ClaimResult(ve.status, ve.text + extra, ve.why)


def _check_corrector_poor(df) -> ClaimResult:
    out = []
    for model in ("digits_vp", "digits_ve", "digits_subvp"):
        d = _score_rows(df, model)
        if d is None:
            continue
        c, p = d[d["sampler"] == "langevin_corrector"], d[d["sampler"] == "reverse_diffusion"]
        common = sorted(set(c["steps"]) & set(p["steps"]))
        if not common:
            continue
        n = common[-1]
        out.append(beats(_fid_seeds(p, "reverse_diffusion", steps=n), _fid_seeds(c, "langevin_corrector", steps=n),
                         names=(f"P{n}", f"C{n}"), what=f"{model} FID"))
    if not out:
        return ClaimResult("not run", "", "no score_sde digits model with both C and P at the same number of levels")
    return ClaimResult.of(all_of(out))


def _model_metric(df, model: str) -> list:
    """(train_seed, metrics) of a score_sde model's ok records."""
    if df is None or len(df) == 0 or "metrics" not in df or "reproduction" not in df:
        return []
    d = ok_rows(df, reproduction="score_sde", model=model)
    if d is None or len(d) == 0:
        return []
    ts = d["train_seed"] if "train_seed" in d else [0] * len(d)
    return [(_int(t), m) for t, m in zip(ts, d["metrics"]) if isinstance(m, dict)]


def _int(t) -> int:
    return int(t) if t is not None and t == t else 0


def _check_ode_likelihood(df) -> ClaimResult:
    ms = [m for _, m in _model_metric(df, "gmm_exact") if m.get("ll_gap_exact_mean_abs") is not None]
    if not ms:
        return ClaimResult("not run", "", "no score_sde/gmm_exact record")
    m = ms[-1]
    g = float(m["ll_gap_exact_mean_abs"])
    txt = (f"mean |log p_ODE - log p_true| = {g:.4f} nats (max {m.get('ll_gap_exact_max_abs', float('nan')):.4f}) vs "
           f"tolerance {LL_TOL}; Hutchinson mean gap {m.get('ll_gap_hutchinson_mean', float('nan')):+.3f} ± "
           f"{m.get('ll_gap_hutchinson_stderr', float('nan')):.3f}")
    if g < LL_TOL:
        return ClaimResult("pass", txt)
    return ClaimResult("fail", txt, f"the exact-trace ODE likelihood is off by {g:.4f} nats > {LL_TOL}")


def _bpd(df, model: str) -> tuple[dict, dict, dict, dict]:
    """Per training seed: model and Gaussian bits/dim; per image (one trained model's): both."""
    per_ts, g_ts, img, g_img = {}, {}, {}, {}
    for t, m in _model_metric(df, model):
        if m.get("bits_per_dim") is None:
            continue
        per_ts[(t, 0)] = float(m["bits_per_dim"])
        if m.get("gauss_bits_per_dim") is not None:
            g_ts[(t, 0)] = float(m["gauss_bits_per_dim"])
        if m.get("bits_per_dim_images") and m.get("gauss_bits_per_dim_images"):
            img = dict(enumerate(m["bits_per_dim_images"]))
            g_img = dict(enumerate(m["gauss_bits_per_dim_images"]))
    return per_ts, g_ts, img, g_img


def _check_bpd(df) -> ClaimResult:
    out = []
    for model in ("digits_vp", "digits_subvp", "digits_ve"):
        per_ts, g_ts, img, g_img = _bpd(df, model)
        if not per_ts:
            continue
        if len(per_ts) >= 2 and len(g_ts) >= 2:
            out.append(beats(per_ts, g_ts, what=f"{model} bits/dim over training seeds", names=("model", "Gaussian"),
                             fmt=".3f"))
        elif img:
            out.append(beats(img, g_img, what=f"{model} bits/dim over {len(img)} images", names=("model", "Gaussian"),
                             fmt=".3f"))
        else:
            return ClaimResult("not run", "", f"{model}: records lack the Gaussian baseline (older run)")
    if not out:
        return ClaimResult("not run", "", "no bits/dim in the score_sde records")
    return ClaimResult.of(all_of(out))


def _check_subvp_likelihood(df) -> ClaimResult:
    vp, _, vp_img, _ = _bpd(df, "digits_vp")
    sub, _, sub_img, _ = _bpd(df, "digits_subvp")
    if not vp or not sub:
        return ClaimResult("not run", "", f"no bits/dim for {'digits_vp' if not vp else 'digits_subvp'}")
    if len(vp) >= 2 and len(sub) >= 2:
        return ClaimResult.of(beats(sub, vp, what="bits/dim over training seeds", names=("sub-VP", "VP"), fmt=".3f"))
    if sub_img and vp_img:
        text = beats(sub_img, vp_img, what="bits/dim over images (1 training seed)", names=("sub-VP", "VP"),
                     fmt=".3f").text
    else:
        text = f"bits/dim sub-VP {list(sub.values())[-1]:.3f} vs VP {list(vp.values())[-1]:.3f}"
    return ClaimResult("inconclusive", text,
                       f"{min(len(vp), len(sub))} training seed per SDE: retraining noise unmeasured "
                       "(needs train_seeds [0, 1] for digits_vp and digits_subvp)")


def _check_cross_model(df) -> ClaimResult:
    if df is None or len(df) == 0 or "sampler" not in df:
        return ClaimResult("not run", "", "no records")
    r = ok_rows(df, "fid", reproduction="ddpm")
    r = r[r["sampler"].isin(["pc", "prob_flow"])]
    got = {s: g for s, g in r.groupby("sampler")}
    if set(got) != {"pc", "prob_flow"}:
        return ClaimResult("not run", "", f"DDPM-model records with {sorted(got) or 'neither'} of pc, prob_flow")
    out = []
    for s, g in sorted(got.items()):
        g = g[g["steps"] == g["steps"].max()]
        floors = [m.get("fid_real_data") for m in g["metrics"] if isinstance(m, dict) and m.get("fid_real_data")]
        if not floors:
            return ClaimResult("not run", "", "records lack the real-data FID")
        floor = sum(floors) / len(floors)
        out.append(at_most(seed_values(g, "fid"), 3 * floor,
                           what=f"{s} N={int(g['steps'].iloc[0])} (NFE {g['nfe'].mean():.0f}) FID, 3x floor {floor:.2f}:"))
    return ClaimResult.of(all_of(out))


BPD_VERSION = 2  # 2: per-image values and the Gaussian baseline


def _cached_bits_per_dim(den, data, lcfg: LikelihoodConfig, model_hash: str, cache_dir) -> dict:
    """Bits/dim of the last ``n_images`` images through the ODE, cached next to the checkpoint by (model, settings),
    beside the full-covariance Gaussian baseline (``bench_core.methods.likelihood.gaussian_bits_per_dim``): fitted to every
    image of the dataset (the model's training set; the evaluated images are in both), dequantized the same way,
    image i with the same dequantization noise as under the model.  Per-image values of both are kept: a paired
    test over images compares them."""
    if lcfg.n_images <= 0 or data.kind != "image":
        return {}
    key = config_hash({"bpd": model_hash, "version": BPD_VERSION}, asdict(lcfg))
    path = Path(cache_dir) / f"bpd-{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, dict) and "bits_per_dim" in cached:
                return cached
        except (OSError, ValueError):
            pass  # a garbage cache file: recomputed and overwritten
    u8_all = to_uint8(data.x)
    u8 = u8_all[-lcfg.n_images:]
    bpd = bits_per_dim(den, u8, seed=lcfg.seed, trace=lcfg.trace, probe=lcfg.probe, rtol=lcfg.rtol, atol=lcfg.atol)
    gauss = gaussian_bits_per_dim(u8_all, u8, seed=lcfg.seed)
    n = len(bpd)
    out = {"bits_per_dim": float(bpd.mean()), "bits_per_dim_stderr": float(bpd.std() / math.sqrt(n)),
           "bits_per_dim_n": int(n), "bits_per_dim_rtol": lcfg.rtol,
           "gauss_bits_per_dim": float(gauss.mean()), "gauss_bits_per_dim_stderr": float(gauss.std() / math.sqrt(n)),
           "bits_per_dim_images": [round(float(v), 5) for v in bpd],
           "gauss_bits_per_dim_images": [round(float(v), 5) for v in gauss]}
    atomic_write_text(path, json.dumps(out), what="likelihood cache")  # whole or not at all
    return out


SCORE_SDE_REPRO = register(ScoreSDE())
