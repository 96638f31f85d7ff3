"""Song & Ermon 2019 — Generative Modeling by Estimating Gradients of the Data Distribution (NCSN).

A noise-conditional score network s_theta(x, sigma) trained by denoising score matching over a geometric
sequence sigma_1 > ... > sigma_L, weighted by lambda(sigma) = sigma^2 (Eq. 5-6), sampled by annealed Langevin
dynamics (Alg. 1; the ``annealed_langevin`` sampler in bench_core.samplers, usable on every denoiser).

Models:
- ``digits``: the shared U-Net conditioned on sigma (its real-valued time input is
  c(sigma) = 1000 log(sigma / sigma_L) / log(sigma_1 / sigma_L)), output n_theta with
  s_theta = -n_theta / sigma (the 1/sigma output scaling of NCSNv2, Song & Ermon 2020; with the sigma^2
  weight the loss is then 1/2 ||n_theta(x + sigma n) - n||^2).  As a denoiser D = x + sigma^2 s = x - sigma n_theta.
  Our digits are in [-1, 1], twice the paper's [0, 1] range, so the sigmas are doubled (2 -> 0.02, L = 10).
  Langevin dynamics is equivariant under x -> 2x, sigma -> 2 sigma, alpha -> 4 alpha, so the paper's
  eps = 2e-5 corresponds to eps = 8e-5 here.
- ``toy``: no training; the exact denoiser of 0.8 N((5,5), I) + 0.2 N((-5,-5), I) (Sec. 3.2), sigmas 20 -> 1.
  Plain Langevin gets the mixture weights wrong, annealed Langevin recovers them; each record holds the
  measured ``mode_weights`` (nearest-mean fractions, order (5,5), (-5,-5)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn

from bench_core.data import load_dataset
from bench_core.denoiser import GMMDenoiser, bcast, expand_sigma
from bench_core.metrics.twod import mode_weights
from bench_core.nets.unet import DDPM_CIFAR10, DIGITS_SMALL, UNet, UNetConfig
from bench_core.stats import beats
from bench_core.train import TrainConfig, config_hash, train
from reproductions import (Claim, ClaimResult, LoadedModel, Reproduction, ok_rows, register, seed_values,
                           unet_config_hash)
from bench_core.measure import cpu_threads

PAPER_FID, PAPER_IS = 25.32, 8.87  # CIFAR-10 (≈)
TRUE_WEIGHTS = (0.8, 0.2)
WEIGHT_TOL = 0.05  # a quarter of the minority weight 0.2


@dataclass
class NCSNConfig:
    """A noise-conditional score network: sigma sequence, U-Net, training and dataset."""

    dataset: str = "digits"
    dataset_opts: dict = field(default_factory=dict)
    sigma_1: float = 2.0    # paper: 1 for data in [0, 1]; doubled for data in [-1, 1]
    sigma_L: float = 0.02   # paper: 0.01
    L: int = 10             # paper: 10 levels, geometric
    unet: UNetConfig = field(default_factory=lambda: DIGITS_SMALL)
    train: TrainConfig = field(default_factory=TrainConfig)

    def sigmas(self) -> Tensor:
        """sigma_1 > ... > sigma_L, geometric (Song & Ermon 2019, Sec. 4.2)."""
        return torch.exp(torch.linspace(math.log(self.sigma_1), math.log(self.sigma_L), self.L, dtype=torch.float64))


@dataclass
class ToyConfig:
    """The exact-score toy (Sec. 3.2): a 2-D mixture from bench_core.data and its sigma range."""

    preset: str = "ncsn_toy"
    sigma_1: float = 20.0
    sigma_L: float = 1.0
    reference_n: int = 4000  # data points the 2-D metrics compare with (MMD costs O(n^2))


# "digits" is our CPU scale (deviations: the shared DIGITS_SMALL U-Net instead of RefineNet, Adam at 3e-3 with
# a warm-up and EMA, batch 64, a few thousand steps instead of 200k, chosen for the default suite's budget).
# "cifar10" is the paper's setting with the DDPM U-Net standing in for RefineNet (CIFAR-10 FID 25.32 (≈)):
# batch 128, Adam 1e-3, 200k steps; data in [-1, 1] so sigmas doubled.
MODELS: dict = {
    "digits": NCSNConfig(unet=DIGITS_SMALL.replace(dropout=0.0),
                         train=TrainConfig(steps=2000, batch_size=64, lr=3e-3, warmup=200, grad_clip=1.0,
                                           ema_decay=0.995, seed=0)),
    "cifar10": NCSNConfig(dataset="cifar10", unet=DDPM_CIFAR10,
                          train=TrainConfig(steps=200_000, batch_size=128, lr=1e-3, warmup=0, grad_clip=0.0,
                                            ema_decay=0.999, seed=0)),
    "toy": ToyConfig(),
}


class NCSNDenoiser(nn.Module):
    """s_theta(x, sigma) = -n_theta(x, c(sigma)) / sigma as a denoiser: D = x + sigma^2 s_theta (Tweedie)."""

    def __init__(self, net: nn.Module, sigma_1: float, sigma_L: float):
        super().__init__()
        self.net = net
        self.sigma_min, self.sigma_max = float(sigma_L), float(sigma_1)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The U-Net's time input: 0 at sigma_L, 1000 at sigma_1, linear in log sigma."""
        return 1000.0 * torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def n_theta(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return self.net(x, self.c_noise(sigma.float()), **cond)

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = expand_sigma(sigma, x)
        return x - bcast(sigma, x) * self.n_theta(x, sigma, **cond)


def dsm_loss(sigmas: Tensor):
    """Denoising score matching with lambda(sigma) = sigma^2, Song & Ermon 2019, Eq. 5-6: with
    s = -n_theta / sigma, sigma^2 * 1/2 ||s(x0 + sigma n) + n / sigma||^2 = 1/2 ||n_theta - n||^2, sigma_i uniform."""

    def loss_fn(den, x0, y, generator):
        i = torch.randint(0, len(sigmas), (x0.shape[0],), generator=generator)
        sigma = sigmas.float()[i].to(x0.device)
        n = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_tilde = x0 + bcast(sigma, x0) * n
        return 0.5 * ((den.n_theta(x_tilde, sigma) - n) ** 2).flatten(1).sum(1).mean()

    return loss_fn


class SingleThreadDenoiser:
    """A denoiser evaluated on one CPU thread: for 2-D toys each call is microseconds of work, and a second
    thread only adds synchronisation (20x slower on busy cores).  Attributes fall through."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        if x.device.type != "cpu":
            return self.denoiser(x, sigma, **cond)
        with cpu_threads(1):
            return self.denoiser(x, sigma, **cond)

    def __getattr__(self, name):
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def toy_oracle(cfg: ToyConfig) -> GMMDenoiser:
    """The exact denoiser of the toy mixture, with the toy's sigma range."""
    o = load_dataset("gmm2d", preset=cfg.preset, n=16).oracle
    return GMMDenoiser(o.weights, o.means, o.stds, sigma_min=cfg.sigma_L, sigma_max=cfg.sigma_1)


class NCSN(Reproduction):
    name = "ncsn"
    title = "Song & Ermon 2019 — Generative Modeling by Estimating Gradients of the Data Distribution (NCSN)"
    paper_url = "https://arxiv.org/abs/1907.05600"
    models = MODELS

    def hash_config(self, cfg):
        if isinstance(cfg, ToyConfig):
            default = ToyConfig()
            return f"exact-{cfg.preset}" + ("" if cfg == default else "-" + config_hash(asdict(cfg))[:8])
        return unet_config_hash("ncsn-dsm", cfg)

    def required_datasets(self, cfg):
        return [("gmm2d", {"preset": cfg.preset, "n": 16})] if isinstance(cfg, ToyConfig) else super().required_datasets(cfg)

    def cached_modules(self, model, overrides, cfg):
        return [] if isinstance(cfg, ToyConfig) else [(self.hash_config(cfg), lambda: UNet(cfg.unet))]

    def load_model(self, model, overrides, *, device, cache_dir, progress=True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        h = self.hash_config(cfg)
        if isinstance(cfg, ToyConfig):
            oracle = toy_oracle(cfg)
            centers = oracle.means.float()

            def sample_metrics(samples):
                w = mode_weights(samples, centers)
                return {"mode_weights": [float(v) for v in w], "true_weights": oracle.weights.tolist()}

            return LoadedModel(SingleThreadDenoiser(oracle), h, "gmm2d", (2,),
                               dataset_opts={"preset": cfg.preset, "n": cfg.reference_n}, sample_metrics=sample_metrics)

        def train_fn(net):  # the loss takes the denoiser; the checkpoint holds its network
            data = load_dataset(cfg.dataset, **cfg.dataset_opts)
            stats = train(NCSNDenoiser(net, cfg.sigma_1, cfg.sigma_L), dsm_loss(cfg.sigmas()), data.x, cfg.train,
                          labels=data.labels, progress=progress, desc=f"train {self.name}/{model}", device=device)
            return {"config": asdict(cfg), **stats}

        net, _, spent = self.cached_net(h, lambda: UNet(cfg.unet), cfg.train.seed, train_fn, cache_dir=cache_dir)
        den = NCSNDenoiser(net, cfg.sigma_1, cfg.sigma_L).to(device).eval()
        shape = (cfg.unet.in_channels, cfg.unet.resolution, cfg.unet.resolution)
        return LoadedModel(den, h, cfg.dataset, shape, train_sec=spent, dataset_opts=dict(cfg.dataset_opts),
                           model_metrics={"sigma_1": cfg.sigma_1, "sigma_L": cfg.sigma_L, "L": cfg.L})

    # ---------------------------------------------------------------------------------------
    def claims(self):
        rule = (f"Weights: the fraction of samples nearest (5,5), pooled over every seed's samples, with its binomial "
                f"standard error sqrt(w(1-w)/n) (independent chains); tolerance ±{WEIGHT_TOL} = a quarter of the "
                f"minority weight 0.2 (an error that moves a quarter of the minority mode's mass)")
        return [
            Claim("ncsn-toy-plain-langevin-wrong-weights",
                  "Exact score of 0.8 N((5,5), I) + 0.2 N((-5,-5), I): plain Langevin (lr 0.1, 1000 steps) gets the "
                  f"weights wrong: the weight of (5,5) is off 0.8 by more than ±{WEIGHT_TOL} (one-sided 95% test).  "
                  + rule,
                  "qualitative (Fig. 3b: about equal weights)", _check_toy("langevin", wrong=True)),
            Claim("ncsn-toy-annealed-langevin-right-weights",
                  "Annealed Langevin (10 sigmas 20 -> 1, 100 steps each) recovers the weights: the weight of (5,5) is "
                  f"0.8 within ±{WEIGHT_TOL} (two one-sided tests, 90% interval inside).  " + rule,
                  "qualitative (Fig. 3c)", _check_toy("annealed_langevin", wrong=False)),
            Claim("ncsn-digits-annealing-helps",
                  "On the digits NCSN, annealed Langevin beats plain Langevin at the smallest sigma at equal NFE "
                  "(lower FID, paired one-sided 95% test over sampling seeds)",
                  f"CIFAR-10 FID {PAPER_FID}, IS {PAPER_IS} (≈) with annealed Langevin; "
                  "plain Langevin fails on image data (Sec. 3)", _check_digits),
        ]

    def tables(self, df):
        out = {}
        toy = _toy_rows(df)
        if toy is not None:
            rows = []
            for sampler, g in toy.groupby("sampler"):
                res = _check_toy(sampler, wrong=sampler == "langevin")(df)
                rows.append({"sampler": sampler, "nfe": int(g["nfe"].iloc[0]), "seeds": len(g),
                             "w(5,5), pooled ± 95%": res.ours.split(": weight of (5,5) ")[-1].split(" (n=")[0],
                             "true": "0.800 / 0.200", "paper": "plain: wrong; annealed: right (Fig. 3)"})
            out["NCSN toy (exact score): measured mixture weights"] = pd.DataFrame(rows)
        dg = ok_rows(df, reproduction="ncsn", model="digits")
        if dg is not None and len(dg) and "fid" in dg:
            dg = dg[dg["fid"].notna()]
            rows = [{"sampler": r.get("sampler_label", r["sampler"]), "nfe": int(r["nfe"]), "FID (digits)": f"{r['fid']:.2f}",
                     "paper (CIFAR-10)": f"FID {PAPER_FID} (≈)" if r["sampler"] == "annealed_langevin" else "—"}
                    for _, r in dg.iterrows()]
            if rows:
                out["NCSN digits: FID by sampler (ours) vs paper"] = pd.DataFrame(rows)
        return out


def _toy_rows(df, sampler: str | None = None):
    if df is None or len(df) == 0 or "reproduction" not in df:
        return None
    d = ok_rows(df, reproduction="ncsn", model="toy")
    if len(d) == 0:  # an empty frame's boolean mask would select columns, not rows
        return None
    d = d[d["metrics"].map(lambda m: isinstance(m, dict) and "mode_weights" in m).astype(bool)]
    if sampler is not None:
        d = d[d["sampler"] == sampler]
    return d if len(d) else None


def _check_toy(sampler: str, wrong: bool):
    def check(df) -> ClaimResult:
        d = _toy_rows(df, sampler)
        if d is None:
            return ClaimResult("not run", "", f"no ncsn toy records with sampler {sampler}")
        ns = [int(n) for n in d["num_samples"]]
        ws = [float(m["mode_weights"][0]) for m in d["metrics"]]
        n = sum(ns)
        w = sum(wi * ni for wi, ni in zip(ws, ns)) / n        # pooled fraction nearest (5,5)
        se = math.sqrt(max(w * (1 - w), 1e-12) / n)
        per = ", ".join(f"{v:.3f}" for v in ws)
        off = w - TRUE_WEIGHTS[0]
        if wrong:  # |w - 0.8| > tol, one-sided 95%: the nearer bound of the interval is past the tolerance
            lo, hi = off - 1.645 * se, off + 1.645 * se
            near = min(abs(lo), abs(hi)) if lo * hi > 0 else 0.0
            far = max(abs(lo), abs(hi))
            text = (f"{sampler}: weight of (5,5) {w:.3f} ± {1.96 * se:.3f} (n={n}; per seed {per}; true 0.8); "
                    f"95% one-sided bounds of the error [{lo:+.3f}, {hi:+.3f}]")
            if near > WEIGHT_TOL:
                return ClaimResult("pass", text)
            if far < WEIGHT_TOL:
                return ClaimResult("fail", text, f"the weight is significantly within ±{WEIGHT_TOL} of 0.8: not wrong")
            return ClaimResult("inconclusive", text, f"the tolerance ±{WEIGHT_TOL} is inside the sampling noise")
        lo, hi = off - 1.645 * se, off + 1.645 * se  # the 90% interval of the two one-sided tests
        text = (f"{sampler}: weight of (5,5) {w:.3f} ± {1.96 * se:.3f} (n={n}; per seed {per}; true 0.8); "
                f"90% interval of the error [{lo:+.3f}, {hi:+.3f}], tolerance ±{WEIGHT_TOL}")
        if -WEIGHT_TOL < lo and hi < WEIGHT_TOL:
            return ClaimResult("pass", text)
        if lo > WEIGHT_TOL or hi < -WEIGHT_TOL:
            return ClaimResult("fail", text, f"the weight is significantly off 0.8 by more than ±{WEIGHT_TOL}")
        return ClaimResult("inconclusive", text, f"the 90% interval reaches past ±{WEIGHT_TOL}")

    return check


def _check_digits(df) -> ClaimResult:
    if df is None or len(df) == 0 or "reproduction" not in df:
        return ClaimResult("not run", "", "no records")
    d = ok_rows(df, "fid", reproduction="ncsn", model="digits")
    if d is None or len(d) == 0:
        return ClaimResult("not run", "", "no ncsn digits records")
    a, p = d[d["sampler"] == "annealed_langevin"], d[d["sampler"] == "langevin"]
    common = sorted(set(a["nfe"]) & set(p["nfe"]))
    if not common:
        return ClaimResult("not run", "", "need annealed_langevin and langevin records of the digits model at equal NFE")
    nfe = common[-1]
    return ClaimResult.of(beats(seed_values(a[a["nfe"] == nfe], "fid"), seed_values(p[p["nfe"] == nfe], "fid"),
                                what=f"FID at NFE {nfe:.0f}", names=("annealed", "plain")))


NCSN_REPRO = register(NCSN())
