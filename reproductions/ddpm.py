"""Ho, Jain & Abbeel 2020 — Denoising Diffusion Probabilistic Models (DDPM).

T=1000, linear betas 1e-4 -> 0.02, epsilon prediction trained with L_simple, ancestral sampling
with sigma_t^2 = beta_t or beta-tilde_t.  The sampler ``ddpm`` lives in bench_core.samplers
(it is shared: DDIM's sigma-hat row is the same update on a skipped grid).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from bench_core.denoiser import DiscreteVPEpsDenoiser
from bench_core.nets.unet import DDPM_CIFAR10, DIGITS_SMALL, UNet, UNetConfig
from bench_core.schedules import BETA_SCHEDULES, alphas_cumprod
from bench_core.train import CheckpointCache, TrainConfig, seeded_init, train
from reproductions import Claim, ClaimResult, LoadedModel, Reproduction, ok_rows, register, unet_config_hash


@dataclass
class DDPMConfig:
    """A DDPM model: network, noise schedule, training and dataset."""

    dataset: str = "digits"
    dataset_opts: dict = field(default_factory=dict)
    T: int = 1000                 # Ho et al. 2020, Sec. 4
    beta_schedule: str = "linear"  # beta_1 = 1e-4 -> beta_T = 0.02
    beta_1: float = 1e-4
    beta_T: float = 0.02
    unet: UNetConfig = field(default_factory=lambda: DIGITS_SMALL)
    train: TrainConfig = field(default_factory=TrainConfig)

    def betas(self) -> torch.Tensor:
        fn = BETA_SCHEDULES[self.beta_schedule]
        return fn(self.T, self.beta_1, self.beta_T) if self.beta_schedule == "linear" else fn(self.T)


# Presets.  "digits" is our CPU scale.  Deviations from the paper, chosen by a sweep on this data
# (FID of DDIM-50 / DDPM-100 after 4000 steps): batch 64, lr 3e-3 with a 200-step warm-up, EMA 0.998 and
# no dropout, because 1797 8x8 images and ~2.5 CPU-minutes of training are not CIFAR-10 and 800k steps.
# "cifar10" is the paper's configuration (CIFAR-10 FID 3.17, IS 9.46; 35.7M parameters).
MODELS: dict[str, DDPMConfig] = {
    "digits": DDPMConfig(
        dataset="digits", unet=DIGITS_SMALL.replace(dropout=0.0),
        train=TrainConfig(steps=4000, batch_size=64, lr=3e-3, warmup=200, grad_clip=1.0, ema_decay=0.998, seed=0),
    ),
    "cifar10": DDPMConfig(
        dataset="cifar10", unet=DDPM_CIFAR10,
        train=TrainConfig(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0, ema_decay=0.9999, seed=0),
    ),
}


def l_simple(abar: torch.Tensor, p_uncond: float | None = None, null_label: int | None = None):
    """L_simple, Ho et al. 2020, Eq. 14: || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2.

    With ``p_uncond``: a class-conditional model whose label is replaced by ``null_label`` with that probability
    (classifier-free guidance training, Ho & Salimans 2022, Alg. 1)."""

    def loss_fn(model, x0, y, generator):
        T = abar.shape[0]
        t = torch.randint(0, T, (x0.shape[0],), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        args = ()
        if p_uncond is not None:
            drop = (torch.rand(x0.shape[0], generator=generator) < p_uncond).to(x0.device)
            args = (torch.where(drop, torch.full_like(y, null_label), y),)
        a = abar.to(x0.device, torch.float32)[t].reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return ((eps - model(x_t, t.float(), *args)) ** 2).mean()

    return loss_fn


def config_dict(cfg) -> dict:
    return asdict(cfg)


class DDPM(Reproduction):
    name = "ddpm"
    title = "Ho et al. 2020 — Denoising Diffusion Probabilistic Models"
    paper_url = "https://arxiv.org/abs/2006.11239"
    models = MODELS

    def hash_config(self, cfg: DDPMConfig) -> str:
        """Hash of what determines the trained weights (the U-Net's architecture, not its kernels' choice)."""
        return unet_config_hash("ddpm-eps", cfg)

    def cached_modules(self, model, overrides, cfg):
        return [(self.hash_config(cfg), lambda: UNet(cfg.unet))]

    def load_model(self, model: str, overrides: dict, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        from bench_core.data import load_dataset

        cfg = self.model_config(model, overrides)
        h = self.hash_config(cfg)
        net = seeded_init(lambda: UNet(cfg.unet), cfg.train.seed)
        abar = alphas_cumprod(cfg.betas())
        cache = CheckpointCache(cache_dir)

        def train_fn(net):
            data = load_dataset(cfg.dataset, **cfg.dataset_opts)
            stats = train(net, l_simple(abar), data.x, cfg.train, labels=data.labels, progress=progress,
                          desc=f"train {self.name}/{model}", device=device)
            return {"config": config_dict(cfg), **stats}

        meta, trained_now = cache.load_or_train(h, net, train_fn)
        net = net.to(device).eval()
        den = DiscreteVPEpsDenoiser(net, abar).to(device)
        shape = (cfg.unet.in_channels, cfg.unet.resolution, cfg.unet.resolution)
        return LoadedModel(den, h, cfg.dataset, shape, train_sec=meta.get("train_sec") if trained_now else None,
                           dataset_opts=dict(cfg.dataset_opts), extra={"train_sec_cached": meta.get("train_sec")})

    # ---------------------------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return [
            Claim("ddpm-quality",
                  "Ancestral sampling with T=1000 gives samples close to the data: FID within 3x of the FID of as "
                  "many real images against the same reference",
                  "CIFAR-10 FID 3.17, IS 9.46", _check_quality),
            Claim("ddpm-variance",
                  "sigma^2 = beta and sigma^2 = beta-tilde give similar sample quality at T=1000 (Ho et al. 2020, Sec. 3.2)",
                  "CIFAR-10 FID 3.17 (1000 steps)", _check_variances),
        ]

    def tables(self, df):
        return {}


def _check_quality(df) -> ClaimResult:
    r = ok_rows(df, "fid", sampler="ddpm", steps=1000, grid_kind="uniform", model="digits")
    if r is None or len(r) == 0:
        return ClaimResult("not run", "no DDPM 1000-step records with a FID")
    best = r.loc[r["fid"].idxmin()]
    floor = (best["metrics"] or {}).get("fid_real_data")
    if floor is None:
        return ClaimResult("not run", "records lack the real-data FID")
    ok = best["fid"] <= 3 * floor
    return ClaimResult("pass" if ok else "fail",
                       f"FID {best['fid']:.2f} ({best['sampler_opts'].get('variance')}) vs {floor:.2f} for "
                       f"{int(best['num_samples'])} real digits")


def _check_variances(df) -> ClaimResult:
    r = ok_rows(df, sampler="ddpm", steps=1000, grid_kind="uniform", model="digits")
    if r is None or len(r) == 0:
        return ClaimResult("not run", "no DDPM 1000-step records")
    by = {o.get("variance"): f for o, f in zip(r["sampler_opts"], r["fid"])}
    if "beta" not in by or "beta_tilde" not in by:
        return ClaimResult("not run", f"have {sorted(by)}")
    a, b = by["beta"], by["beta_tilde"]
    rel = abs(a - b) / max(min(a, b), 1e-9)
    return ClaimResult("pass" if rel < 0.5 else "fail", f"FID beta {a:.2f}, beta-tilde {b:.2f} (relative gap {rel:.0%})")


DDPM_REPRO = register(DDPM())


# --- reproductions built on a trained ddpm model ----------------------------------------------------------
def base_model_errors(base_model, base_overrides) -> list[str]:
    """Every problem with a ddpm preset name and its overrides, each naming its field, the value given and what
    is allowed."""
    if not isinstance(base_model, str) or base_model not in DDPM_REPRO.models:
        return [f"base_model: unknown ddpm preset {base_model!r} (known: {', '.join(DDPM_REPRO.models)})"]
    if not isinstance(base_overrides, dict):
        return [f"base_overrides: expected a mapping of ddpm config fields, got {type(base_overrides).__name__} "
                f"{base_overrides!r}"]
    return [f"base_overrides.{e}" for e in DDPM_REPRO.override_errors(base_model, base_overrides)]


class BuiltOnDDPM:
    """Mixed in before ``Reproduction`` by a reproduction whose config (any config with a ``base_model`` field)
    builds on a trained ddpm model: ``base_model`` names a ddpm preset, ``base_overrides`` its overrides as in a
    ddpm suite entry, so that model's checkpoint is reused.  One validation (``check_base``, for
    ``check_config``), and the base model's config, hash, preflight and loaded model."""

    def check_base(self, cfg) -> None:
        """Raise ValueError for an unknown base preset or bad base overrides (every problem, one message)."""
        errs = base_model_errors(cfg.base_model, cfg.base_overrides)
        if errs:
            raise ValueError("; ".join(errs))

    def base_config(self, cfg) -> DDPMConfig:
        return DDPM_REPRO.model_config(cfg.base_model, cfg.base_overrides)

    def base_hash(self, cfg) -> str:
        return DDPM_REPRO.model_hash(cfg.base_model, cfg.base_overrides)

    def load_base(self, cfg, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        """The base model from the ddpm checkpoint cache (trained there when missing)."""
        return DDPM_REPRO.load_model(cfg.base_model, cfg.base_overrides, device=device, cache_dir=cache_dir,
                                     progress=progress)

    def base_checkpoints(self, cfg) -> list[str]:
        """The checkpoints the base model loads (none for a config without ``base_model``)."""
        if not hasattr(cfg, "base_model"):
            return []
        return DDPM_REPRO.needed_checkpoints(cfg.base_model, cfg.base_overrides, self.base_config(cfg))

    def needed_checkpoints(self, model: str, overrides: dict, cfg) -> list[str]:
        """The base model's checkpoints, then this reproduction's own."""
        return self.base_checkpoints(cfg) + super().needed_checkpoints(model, overrides, cfg)

    def preflight(self, model: str, overrides: dict, *, cache_dir) -> list[str]:
        """The base model's problems (its dataset, its cached checkpoint), then this reproduction's own."""
        cfg = self.model_config(model, overrides)
        base = DDPM_REPRO.preflight(cfg.base_model, cfg.base_overrides, cache_dir=cache_dir) \
            if hasattr(cfg, "base_model") else []
        return base + super().preflight(model, overrides, cache_dir=cache_dir)
