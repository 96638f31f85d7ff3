"""Song, Dhariwal, Chen & Sutskever 2023 — Consistency Models.

The consistency function f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise) with
f(x, eps) = x exactly (``bench_core.denoiser.ConsistencyPrecond``), trained two ways:

- consistency distillation (CD, Alg. 2): from the EDM digits model (``reproductions.edm``) with one
  Heun step of its probability-flow ODE between neighbours of the Karras grid (N = 18, rho = 7), a
  target network theta^- that is an EMA (mu) of the online one, and the online model initialised
  from the teacher;
- consistency training (CT, Alg. 3): no teacher, x_{t_n} and x_{t_{n+1}} share the noise, N(k) and
  mu(k) schedules of App. C, random initialisation.

The paper's distance is LPIPS, which needs downloaded weights: we use pseudo-Huber (Song & Dhariwal
2023, c = 0.00054 sqrt(d)) or L2, recorded as ``cm_loss`` in every record's metrics.  Sampling is the
shared ``consistency`` sampler (Alg. 1): 1 NFE, or 2 NFE with the intermediate sigma ``sigma_mid``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from bench_core.denoiser import ConsistencyPrecond
from bench_core.nets.unet import UNet, UNetConfig
from bench_core.schedules import karras_grid
from bench_core.train import CheckpointCache, TrainConfig, config_hash, seeded_init, train
from reproductions import Claim, ClaimResult, LoadedModel, Reproduction, largest_group, ok_rows, register
from reproductions.ddpm import config_dict
from reproductions.edm import EDM_REPRO, MODELS as EDM_MODELS, EDMConfig

MODES = ("cd", "ct")
LOSSES = ("pseudo-huber", "l2")


@dataclass
class ConsistencyConfig:
    """A consistency model: CD (with its EDM teacher) or CT, the parametrisation, the schedules, the loss."""

    mode: str = "cd"                 # "cd" (distillation, Alg. 2) | "ct" (training, Alg. 3)
    dataset: str = "digits"          # CT's data; CD uses its teacher's
    dataset_opts: dict = field(default_factory=dict)
    teacher: EDMConfig = field(default_factory=lambda: EDM_MODELS["digits"])  # CD only
    init_from_teacher: bool = True   # CD: online network starts as the teacher's F (ignored by CT)
    sigma_data: float = 0.5
    eps: float = 0.002               # the boundary sigma: f(x, eps) = x
    sigma_max: float = 80.0
    rho: float = 7.0
    t_scale: float = 250.0           # network time input = t_scale * ln(sigma) / 4, as the EDM model
    N: int = 18                      # CD: Karras grid size (CIFAR-10: 18)
    mu: float = 0.95                 # CD: target EMA rate (CIFAR-10: 0.95)
    s0: int = 2                      # CT: N(k) from s0 + 1 ... (App. C, CIFAR-10: s0 = 2, s1 = 150, mu0 = 0.9)
    s1: int = 150
    mu0: float = 0.9
    loss: str = "pseudo-huber"       # "pseudo-huber" | "l2" (the paper: LPIPS, not available offline)
    huber_c: float = 0.0             # 0: c = 0.00054 sqrt(d)
    unet: UNetConfig | None = None   # None: the teacher's network (CD must match it to initialise from it)
    train: TrainConfig = field(default_factory=TrainConfig)

    def net_config(self) -> UNetConfig:
        return self.unet if self.unet is not None else self.teacher.unet


# CPU scale: CD and CT at an equal budget (same steps, batch and lr), the teacher is the EDM digits model.
# Paper scale (CIFAR-10, App. C): batch 512, lr 4e-4 (CD) / 4e-4 (CT), 800k steps, EMA 0.9999 for evaluation;
# CD 1-step FID 3.55, 2-step 2.93; CT 8.70 / 5.83 (≈ except 3.55).
_DIGITS_TRAIN = TrainConfig(steps=400, batch_size=64, lr=1e-3, warmup=50, grad_clip=1.0, ema_decay=0.99, seed=0)
_CIFAR_TRAIN = TrainConfig(steps=800_000, batch_size=512, lr=4e-4, warmup=0, grad_clip=0.0, ema_decay=0.9999, seed=0)
MODELS: dict[str, ConsistencyConfig] = {
    "cd-digits": ConsistencyConfig(mode="cd", train=_DIGITS_TRAIN),
    "ct-digits": ConsistencyConfig(mode="ct", train=_DIGITS_TRAIN),
    "cd-cifar10": ConsistencyConfig(mode="cd", dataset="cifar10", teacher=EDM_MODELS["cifar10"], train=_CIFAR_TRAIN),
    "ct-cifar10": ConsistencyConfig(mode="ct", dataset="cifar10", teacher=EDM_MODELS["cifar10"], train=_CIFAR_TRAIN),
}


# --------------------------------------------------------------------------------------------
# Schedules and losses
# --------------------------------------------------------------------------------------------
def cm_grid(N: int, eps: float, T: float, rho: float) -> torch.Tensor:
    """t_1 = eps < ... < t_N = T: the Karras grid increasing (Song et al. 2023, Sec. 5 / App. C)."""
    return karras_grid(N, eps, T, rho)[:-1].flip(0).double()


def ct_N(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, Song et al. 2023, App. C."""
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_mu(k: int, K: int, s0: int, s1: int, mu0: float) -> float:
    """mu(k) = exp(s0 log(mu0) / N(k)), Song et al. 2023, App. C."""
    return math.exp(s0 * math.log(mu0) / ct_N(k, K, s0, s1))


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float = 0.0) -> torch.Tensor:
    """d(x, y) per sample: squared L2 (mean over dimensions) or pseudo-Huber sqrt(||x - y||^2 + c^2) - c."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return (diff**2).mean(1)
    if kind == "pseudo-huber":
        c = c or 0.00054 * math.sqrt(diff.shape[1])
        return ((diff**2).sum(1) + c**2).sqrt() - c
    raise ValueError(f"unknown consistency loss {kind!r}; use one of {LOSSES}")


@torch.no_grad()
def _ema_(target: torch.nn.Module, online: torch.nn.Module, mu: float) -> None:
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta)."""
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.lerp_(po.detach(), 1.0 - mu)


def _heun_teacher(teacher, x, t_cur, t_next):
    """One Heun step of the teacher's probability-flow ODE from t_cur to t_next > 0 (Karras et al. 2022, Alg. 1)."""
    b = lambda v: v.reshape(-1, *([1] * (x.ndim - 1)))
    d = (x - teacher(x, t_cur)) / b(t_cur)
    x_e = x + b(t_next - t_cur) * d
    d_prime = (x_e - teacher(x_e, t_next)) / b(t_next)
    return x + b(t_next - t_cur) * (0.5 * d + 0.5 * d_prime)


def cm_loss(cfg: ConsistencyConfig, teacher=None):
    """CD (Alg. 2) or CT (Alg. 3) loss d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta^-(x_hat_{t_n}, t_n)), lambda = 1.

    The closure holds the target network theta^- (a copy of the online model at the first call) and the
    step counter k; theta^- is updated with the online weights at the start of each call, i.e. after the
    previous optimiser step, as in the last line of Alg. 2 / 3."""
    K = cfg.train.steps
    state = {"k": 0, "target": None}
    cd_grid = cm_grid(cfg.N, cfg.eps, cfg.sigma_max, cfg.rho)

    def loss_fn(model, x0, y, generator):
        k = state["k"]
        if state["target"] is None:
            state["target"] = copy.deepcopy(model).eval().requires_grad_(False)
        target = state["target"]
        if cfg.mode == "cd":
            grid, mu = cd_grid, cfg.mu
        else:
            N_k = ct_N(k, K, cfg.s0, cfg.s1)
            grid, mu = cm_grid(N_k, cfg.eps, cfg.sigma_max, cfg.rho), ct_mu(k, K, cfg.s0, cfg.s1, cfg.mu0)
        if k > 0:
            _ema_(target, model, mu)
        state["k"] = k + 1
        B = x0.shape[0]
        n = torch.randint(0, len(grid) - 1, (B,), generator=generator)
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        t_n = grid[n].to(x0.device, x0.dtype)
        t_n1 = grid[n + 1].to(x0.device, x0.dtype)
        b = lambda v: v.reshape(-1, *([1] * (x0.ndim - 1)))
        x_n1 = x0 + b(t_n1) * z
        with torch.no_grad():
            if cfg.mode == "cd":
                x_n = _heun_teacher(teacher, x_n1, t_n1, t_n)
            else:
                x_n = x0 + b(t_n) * z
            f_target = target(x_n, t_n)
        f_online = model(x_n1, t_n1)
        return distance(f_online, f_target, cfg.loss, cfg.huber_c).mean()

    return loss_fn


# --------------------------------------------------------------------------------------------
class Consistency(Reproduction):
    name = "consistency"
    title = "Song et al. 2023 — Consistency Models"
    paper_url = "https://arxiv.org/abs/2303.01469"
    models = MODELS

    def check_config(self, model: str, cfg: ConsistencyConfig) -> ConsistencyConfig:
        if isinstance(cfg.unet, dict):  # an override of a None network: fields over the teacher's
            cfg.unet = UNetConfig(**{**asdict(cfg.teacher.unet), **cfg.unet})
        if cfg.mode not in MODES:
            raise ValueError(f"{self.name}/{model}: mode must be one of {MODES}, got {cfg.mode!r}")
        if cfg.loss not in LOSSES:
            raise ValueError(f"{self.name}/{model}: loss must be one of {LOSSES}, got {cfg.loss!r}")
        return cfg

    def hash_config(self, cfg: ConsistencyConfig) -> str:
        d = asdict(cfg)
        d["unet"] = cfg.net_config().arch_dict()
        if cfg.mode == "cd":
            d["teacher"] = EDM_REPRO.hash_config(cfg.teacher)
            for k in ("s0", "s1", "mu0"):
                d.pop(k)
        else:
            for k in ("teacher", "init_from_teacher", "N", "mu"):
                d.pop(k)
        return config_hash({"family": "consistency"}, d)

    def build(self, cfg: ConsistencyConfig) -> ConsistencyPrecond:
        return ConsistencyPrecond(UNet(cfg.net_config()), cfg.sigma_data, cfg.eps, cfg.sigma_max, cfg.t_scale)

    def required_datasets(self, cfg: ConsistencyConfig) -> list[tuple[str, dict]]:
        return [(cfg.teacher.dataset, dict(cfg.teacher.dataset_opts)) if cfg.mode == "cd" else (
            cfg.dataset, dict(cfg.dataset_opts))]

    def cached_modules(self, model, overrides, cfg):
        mods = [(self.hash_config(cfg), lambda: self.build(cfg))]
        if cfg.mode == "cd":
            mods.append((EDM_REPRO.hash_config(cfg.teacher), lambda: EDM_REPRO.build(cfg.teacher)))
        return mods

    def load_model(self, model: str, overrides: dict, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        from bench_core.data import load_dataset

        cfg = self.model_config(model, overrides)
        h = self.hash_config(cfg)
        f = seeded_init(lambda: self.build(cfg), cfg.train.seed)
        cache = CheckpointCache(cache_dir)
        teacher_sec = 0.0

        def train_fn(net):
            nonlocal teacher_sec
            teacher = None
            if cfg.mode == "cd":
                teacher, _, tmeta, t_now = EDM_REPRO.load_config(cfg.teacher, device=device, cache_dir=cache_dir,
                                                                  progress=progress, desc=f"train edm teacher of {model}")
                teacher_sec = float(tmeta.get("train_sec") or 0.0) if t_now else 0.0
                teacher.requires_grad_(False)
                if cfg.init_from_teacher:
                    net.model.load_state_dict(teacher.model.state_dict())
            (name, opts), = self.required_datasets(cfg)
            data = load_dataset(name, **opts)
            stats = train(net, cm_loss(cfg, teacher), data.x, cfg.train, labels=data.labels, progress=progress,
                          desc=f"train {self.name}/{model}", device=device)
            return {"config": config_dict(cfg), **stats}

        meta, trained_now = cache.load_or_train(h, f, train_fn)
        f = f.to(device).eval()
        (name, opts), = self.required_datasets(cfg)
        shape = (cfg.net_config().in_channels, cfg.net_config().resolution, cfg.net_config().resolution)
        train_sec = (float(meta.get("train_sec") or 0.0) + teacher_sec) if trained_now else None
        return LoadedModel(f, h, name, shape, train_sec=train_sec, dataset_opts=opts,
                           model_metrics={"cm_loss": cfg.loss, "cm_mode": cfg.mode, "cm_train_steps": cfg.train.steps,
                                          "cm_batch_size": cfg.train.batch_size, "cm_final_loss": meta.get("final_loss"),
                                          "cm_train_sec": meta.get("train_sec"),
                                          "cm_teacher_hash": EDM_REPRO.hash_config(cfg.teacher) if cfg.mode == "cd" else None},
                           extra={"train_sec_cached": meta.get("train_sec")})

    # ---------------------------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return [
            Claim("cm-2step-beats-1step", "Two-step consistency sampling beats one step (CD and CT)",
                  "CIFAR-10 CD 3.55 -> 2.93, CT 8.70 -> 5.83 (≈ except 3.55)", _check_two_step),
            Claim("cm-cd-beats-ct", "Distillation beats consistency training at an equal budget (same steps and batch), "
                  "1 and 2 steps", "CIFAR-10 1-step CD 3.55 vs CT 8.70 (≈ for 8.70)", _check_cd_ct),
            Claim("cm-beats-euler-1", "One consistency step (CD) beats one Euler step of the EDM teacher by a wide "
                  "margin (FID at least 2x lower)", "qualitative (one Euler step from sigma_max gives the data mean)",
                  _check_vs_euler),
        ]

    def tables(self, df):
        cells = cm_cells(df)
        if not cells:
            return {}
        paper = {("cd", 1): "3.55", ("cd", 2): "2.93 (≈)", ("ct", 1): "8.70 (≈)", ("ct", 2): "5.83 (≈)"}
        rows = []
        for mode in MODES:
            line = {"model": mode.upper()}
            for s in (1, 2):
                v = cells.get((mode, s))
                line[f"{s} step"] = (f"{v:.2f}" if v is not None else "—") + f" ({paper[(mode, s)]})"
            rows.append(line)
        return {"Consistency models — digits FID by NFE: ours (paper CIFAR-10)": pd.DataFrame(rows)}


# --------------------------------------------------------------------------------------------
def _cm_records(df):
    if df is None or len(df) == 0 or "status" not in df:
        return None
    d = ok_rows(df, "fid", reproduction="consistency", sampler="consistency")
    if len(d) == 0:
        return None
    return largest_group(d, "fid_extractor", "num_samples")


def _mode(metrics) -> str | None:
    return metrics.get("cm_mode") if isinstance(metrics, dict) else None


def cm_cells(df) -> dict:
    """(mode, nfe) -> mean FID of the consistency-sampler records of the digits-scale models."""
    d = _cm_records(df)
    if d is None:
        return {}
    d = d[d["model"].isin(("cd-digits", "ct-digits"))]
    out = {}
    for (mode, nfe), g in d.groupby([d["metrics"].map(_mode), d["nfe"]]):
        if mode in MODES:
            out[(mode, int(round(nfe)))] = float(g["fid"].mean())
    return out


def _check_two_step(df) -> ClaimResult:
    try:
        cells = cm_cells(df)
        have = [m for m in MODES if (m, 1) in cells and (m, 2) in cells]
        if not have:
            return ClaimResult("not run", "need 1- and 2-step consistency records")
        ok = all(cells[(m, 2)] < cells[(m, 1)] for m in have)
        return ClaimResult("pass" if ok else "fail",
                           ", ".join(f"{m.upper()} 1-step {cells[(m, 1)]:.2f} -> 2-step {cells[(m, 2)]:.2f}" for m in have))
    except Exception as e:
        return ClaimResult("not run", f"check failed: {type(e).__name__}: {e}")


def _check_cd_ct(df) -> ClaimResult:
    try:
        d = _cm_records(df)
        if d is None:
            return ClaimResult("not run", "no consistency records")
        budgets = {m: {(r.get("cm_train_steps"), r.get("cm_batch_size")) for r in d["metrics"] if _mode(r) == m}
                   for m in MODES}
        if not budgets["cd"] or not budgets["ct"]:
            return ClaimResult("not run", "need both CD and CT records")
        if budgets["cd"] != budgets["ct"]:
            return ClaimResult("not run", f"budgets differ: CD {budgets['cd']}, CT {budgets['ct']}")
        cells = cm_cells(df)
        steps = [s for s in (1, 2) if ("cd", s) in cells and ("ct", s) in cells]
        if not steps:
            return ClaimResult("not run", "need CD and CT records at the same NFE")
        ok = all(cells[("cd", s)] < cells[("ct", s)] for s in steps)
        return ClaimResult("pass" if ok else "fail", ", ".join(
            f"{s}-step CD {cells[('cd', s)]:.2f} vs CT {cells[('ct', s)]:.2f}" for s in steps)
            + f" (budget {sorted(budgets['cd'])[0][0]} steps x batch {sorted(budgets['cd'])[0][1]})")
    except Exception as e:
        return ClaimResult("not run", f"check failed: {type(e).__name__}: {e}")


def _check_vs_euler(df) -> ClaimResult:
    try:
        cells = cm_cells(df)
        if ("cd", 1) not in cells:
            return ClaimResult("not run", "no 1-step CD record")
        e = ok_rows(df, "fid", reproduction="edm", model="digits", sampler="euler", nfe=1)
        if len(e) == 0:
            return ClaimResult("not run", "no 1-step Euler record of the EDM teacher (reproduction edm, model digits)")
        fe, fc = float(e["fid"].mean()), cells[("cd", 1)]
        return ClaimResult("pass" if fc * 2 <= fe else "fail", f"1 NFE: CD {fc:.2f} vs teacher Euler {fe:.2f} "
                           f"({fe / max(fc, 1e-9):.1f}x)")
    except Exception as e:
        return ClaimResult("not run", f"check failed: {type(e).__name__}: {e}")


CONSISTENCY_REPRO = register(Consistency())
