"""Post-training quantization of a noise-prediction network (Li et al. 2023, Q-Diffusion).

Simulated ("fake") quantization, as the paper does: every Conv2d / Linear of the network gets

- a **weight quantizer**: symmetric, signed, per output channel, ``w_bits`` bits,
  ``w_hat = s_c * clamp(round(w / s_c), -2^(b-1), 2^(b-1) - 1)`` with ``s_c = max|w_c| / (2^(b-1) - 1)``
  ("minmax") or the clipping ratio that minimises the channel's squared error ("mse");
- an **activation quantizer** on its input: asymmetric, per tensor, ``a_bits`` bits,
  ``x_hat = s (clamp(round(x / s) + z, 0, 2^b - 1) - z)``, range calibrated on the layer's inputs
  over the calibration set (min/max or the squared-error-optimal shrink of it).

Q-Diffusion's three ingredients, each switchable in :class:`QuantConfig`:

- **time-step-aware calibration** (``calib="timestep"``): the calibration inputs ``(x_t, t)`` are
  what the full-precision network sees while the full-precision DDIM sampler runs, taken uniformly
  across its steps; the naive baseline (``calib="naive"``) takes all of them from one step;
- **shortcut splitting** (``split_shortcut``): where the decoder concatenates deep features ``h``
  with an encoder skip, the layers reading the concatenation (the up-blocks' ``conv1`` and their
  1x1 ``skip`` conv) quantize the two channel groups with separate activation ranges and separate
  per-(output channel, group) weight scales.  Found from the U-Net's structure, unet.py untouched;
- **weight rounding** (``rounding="adaround"``): AdaRound (Nagel et al. 2020), layer by layer in
  forward order -- learn whether each weight rounds up or down, minimising the layer's output
  error against the full-precision layer on the calibration inputs, where the inputs come from the
  network whose earlier layers are already quantized.  The paper uses BRECQ block reconstruction
  (and learns activation step sizes too); this is the cheaper layer-wise variant.

The quantized network runs behind :class:`QuantizedDenoiser`, a denoiser wrapper, so every sampler
runs on it.  :func:`to_int8` converts a calibrated W<=8 A8 network to **real int8 execution** on the
CPU: int8 activations and weights, ``torch._int_mm`` int8 x int8 -> int32 GEMMs (im2col for
convolutions) with the zero-point correction, scaled back to float between layers (GroupNorm, SiLU, the residual
adds, attention's softmax and the time embedding's sinusoid stay in float).  It computes the
same function as the fake-quant network up to float summation order.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CALIB_VERSION = 3              # bump when calibration changes its result for the same config (cache key)
FLOAT_BITS = 32                 # "32 bits": that tensor stays in float
INT_BITS = (2, 3, 4, 5, 6, 7, 8)
CALIBS = ("naive", "timestep")
RANGES = ("minmax", "mse")
ROUNDINGS = ("nearest", "adaround")


@dataclass
class QuantConfig:
    """Which tensors are quantized to how many bits, and how the quantizers are calibrated.

    Defaults are the paper's method (Li et al. 2023): time-step-aware calibration, shortcut
    splitting, learned rounding, first and last layer at 8 bits.
    """

    w_bits: int = 4                  # 2..8, or 32 (weights stay float)
    a_bits: int = 8                  # 2..8, or 32 (activations stay float)
    calib: str = "timestep"          # "timestep" (uniform over the sampler's steps) | "naive" (one step)
    naive_step: int = 0              # naive: index of the sampler step whose x_t is used (0 = x_T, pure noise)
    calib_sampler_steps: int = 50    # the full-precision DDIM (eta=0) run that produces the calibration x_t
    n_calib: int = 256               # calibration inputs in total (timestep: spread evenly over the steps)
    split_shortcut: bool = True
    w_range: str = "mse"             # "minmax" | "mse"
    a_range: str = "mse"             # "minmax" | "mse"
    rounding: str = "adaround"       # "nearest" | "adaround"
    adaround_iters: int = 500        # Adam steps per layer (full-batch: each sees every calibration input)
    adaround_lr: float = 3e-2
    first_last_8bit: bool = True     # the network's first and last layer: 8-bit weights (as the paper's code)
    seed: int = 0

    def __post_init__(self):
        errs = self.errors()
        if errs:
            raise ValueError("; ".join(errs))

    def errors(self) -> list[str]:
        e = []
        for k in ("w_bits", "a_bits"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or (v not in INT_BITS and v != FLOAT_BITS):
                e.append(f"{k} must be one of {', '.join(map(str, INT_BITS))} or {FLOAT_BITS} (float), got {v!r}")
        for k, allowed in (("calib", CALIBS), ("w_range", RANGES), ("a_range", RANGES), ("rounding", ROUNDINGS)):
            if getattr(self, k) not in allowed:
                e.append(f"{k} must be one of {allowed}, got {getattr(self, k)!r}")
        for k in ("calib_sampler_steps", "n_calib"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                e.append(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        if not isinstance(self.naive_step, int) or not 0 <= self.naive_step < max(1, int(self.calib_sampler_steps)):
            e.append(f"naive_step must be in [0, calib_sampler_steps={self.calib_sampler_steps}), got {self.naive_step!r}")
        if not isinstance(self.adaround_iters, int) or self.adaround_iters < 0:
            e.append(f"adaround_iters must be a non-negative integer, got {self.adaround_iters!r}")
        return e

    @property
    def is_float(self) -> bool:
        return self.w_bits == FLOAT_BITS and self.a_bits == FLOAT_BITS

    @property
    def method(self) -> str:
        """'fp32', 'naive', 'qdiffusion' (all three ingredients) or 'custom'."""
        if self.is_float:
            return "fp32"
        rnd = self.rounding == "adaround" or self.w_bits == FLOAT_BITS
        if self.calib == "timestep" and self.split_shortcut and rnd:
            return "qdiffusion"
        if self.calib == "naive" and not self.split_shortcut and self.rounding == "nearest":
            return "naive"
        return "custom"

    @property
    def label(self) -> str:
        if self.is_float:
            return "FP32"
        return f"W{self.w_bits}A{self.a_bits}"

    def to_dict(self) -> dict:
        return asdict(self)


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in INT_BITS:
        raise ValueError(f"{what}: unsupported bit width {bits!r}; quantizers take {', '.join(map(str, INT_BITS))} "
                         f"bits ({FLOAT_BITS} means no quantization)")
    return bits


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------
def weight_qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a b-bit weight: [-2^(b-1), 2^(b-1) - 1]."""
    check_bits(bits, "weight quantizer")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_scale(w: Tensor, bits: int, method: str = "minmax", groups: list[int] | None = None,
                 n_grid: int = 80) -> Tensor:
    """Per-output-channel (and per input-channel group) step sizes, shape (out, n_groups).

    ``minmax``: s = max|w| / (2^(b-1) - 1).  ``mse``: s = r max|w| / (2^(b-1) - 1) with the clip ratio
    r in [0.2, 1] that minimises the squared rounding error of that channel (group).
    """
    qmin, qmax = weight_qrange(bits)
    groups = groups or [w.shape[1]]
    w2 = w.detach().reshape(w.shape[0], w.shape[1], -1)
    scales = []
    for g in _group_slices(groups):
        wg = w2[:, g].reshape(w.shape[0], -1)
        amax = wg.abs().amax(1).clamp_min(1e-12)
        s = amax / qmax
        if method == "mse":
            best_err = torch.full_like(amax, float("inf"))
            best = s.clone()
            for r in torch.linspace(0.2, 1.0, n_grid):
                sr = (r * amax / qmax)[:, None]
                err = ((torch.clamp(torch.round(wg / sr), qmin, qmax) * sr - wg) ** 2).sum(1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, sr[:, 0], best)
            s = best
        elif method != "minmax":
            raise ValueError(f"weight range method must be one of {RANGES}, got {method!r}")
        scales.append(s)
    return torch.stack(scales, 1)


def _group_slices(groups: list[int]) -> list[slice]:
    out, start = [], 0
    for n in groups:
        out.append(slice(start, start + n))
        start += n
    return out


def expand_group_scale(scale: Tensor, groups: list[int], w_shape) -> Tensor:
    """(out, n_groups) step sizes -> a tensor broadcasting against a weight of shape ``w_shape``."""
    per_in = torch.repeat_interleave(scale, torch.tensor(groups, device=scale.device), dim=1)  # (out, in)
    return per_in.reshape(*per_in.shape, *([1] * (len(w_shape) - 2)))


def fake_quant_weight(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """w_hat = s * clamp(round(w / s), -2^(b-1), 2^(b-1) - 1); ``scale`` broadcasts against w."""
    qmin, qmax = weight_qrange(bits)
    return torch.clamp(torch.round(w / scale), qmin, qmax) * scale


def act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Asymmetric b-bit step size and zero point of the range [lo, hi] (widened to contain 0)."""
    check_bits(bits, "activation quantizer")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    n = 2**bits - 1
    s = max(hi - lo, 1e-8) / n
    z = int(min(max(round(-lo / s), 0), n))
    return s, z


def fake_quant_act(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """x_hat = s (clamp(round(x / s) + z, 0, 2^b - 1) - z); scale / zero broadcast against x."""
    n = 2**bits - 1
    return (torch.clamp(torch.round(x / scale) + zero, 0, n) - zero) * scale


def act_range(x: Tensor, bits: int, method: str = "mse", n_grid: int = 60) -> tuple[float, float]:
    """Calibrated [lo, hi] of a sample of activations: min/max, or the shrink of it (lo, hi scaled by the
    same ratio in [0.25, 1]) that minimises the squared quantization error of the sample."""
    x = x.detach().float().reshape(-1)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if method == "minmax":
        return lo, hi
    if method != "mse":
        raise ValueError(f"activation range method must be one of {RANGES}, got {method!r}")
    best, best_err = (lo, hi), float("inf")
    for r in torch.linspace(0.25, 1.0, n_grid).tolist():
        s, z = act_qparams(lo * r, hi * r, bits)
        err = float(((fake_quant_act(x, torch.tensor(s), torch.tensor(float(z)), bits) - x) ** 2).mean())
        if err < best_err:
            best, best_err = (lo * r, hi * r), err
    return best


# --------------------------------------------------------------------------------------------
# Quantized layers
# --------------------------------------------------------------------------------------------
class QuantLayer(nn.Module):
    """A Conv2d or Linear with a per-channel weight quantizer and a per-tensor activation quantizer on its
    input (per channel group when ``groups`` splits the input channels: shortcut splitting)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, w_bits: int, a_bits: int, groups: list[int] | None = None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        for b, what in ((w_bits, "w_bits"), (a_bits, "a_bits")):
            if b != FLOAT_BITS:
                check_bits(b, what)
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        if self.kind == "conv":
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise NotImplementedError("QuantLayer supports ungrouped, zero-padded convolutions")
        in_ch = layer.weight.shape[1]
        self.groups = list(groups) if groups else [in_ch]
        if sum(self.groups) != in_ch:
            raise ValueError(f"channel groups {self.groups} do not add up to the {in_ch} input channels")
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False) if layer.bias is not None else None
        G = len(self.groups)
        self.register_buffer("w_scale", torch.ones(self.weight.shape[0], G))
        self.register_buffer("w_int", torch.zeros_like(self.weight))   # the integer weights (after rounding)
        self.register_buffer("a_lohi", torch.zeros(G, 2))               # calibrated activation range per group
        self.quant_w = self.w_bits != FLOAT_BITS
        self.quant_a = self.a_bits != FLOAT_BITS
        self.record: list | None = None                                 # calibration: inputs seen
        self.record_limit = 200_000
        self._w_hat: Tensor | None = None

    # -- weights -------------------------------------------------------------------------------
    def init_weight_quant(self, method: str) -> None:
        """Step sizes from the weights, nearest rounding."""
        if not self.quant_w:
            return
        self.w_scale.copy_(weight_scale(self.weight, self.w_bits, method, self.groups))
        qmin, qmax = weight_qrange(self.w_bits)
        self.w_int.copy_(torch.clamp(torch.round(self.weight / self.scale_full()), qmin, qmax))
        self._w_hat = None

    def scale_full(self) -> Tensor:
        return expand_group_scale(self.w_scale, self.groups, self.weight.shape)

    def weight_hat(self) -> Tensor:
        if not self.quant_w:
            return self.weight
        if self._w_hat is None or self._w_hat.device != self.w_int.device:
            self._w_hat = self.w_int * self.scale_full()
        return self._w_hat

    # -- activations ---------------------------------------------------------------------------
    def set_act_range(self, lohi: Tensor) -> None:
        self.a_lohi.copy_(lohi)

    def act_params(self) -> tuple[Tensor, Tensor]:
        """Per-channel (broadcast) step size and zero point of the input quantizer."""
        s, z = [], []
        for (lo, hi), n in zip(self.a_lohi.tolist(), self.groups):
            sg, zg = act_qparams(lo, hi, self.a_bits)
            s += [sg] * n
            z += [float(zg)] * n
        shape = (1, -1, 1, 1) if self.kind == "conv" else (1, -1)
        return torch.tensor(s).reshape(shape), torch.tensor(z).reshape(shape)

    def quant_input(self, x: Tensor) -> Tensor:
        if not self.quant_a:
            return x
        if getattr(self, "_aq", None) is None or self._aq[0].device != x.device:
            self._aq = tuple(t.to(x) for t in self.act_params())
        s, z = self._aq
        return fake_quant_act(x, s, z, self.a_bits)

    def refresh(self) -> None:
        """Drop cached derived tensors (after changing scales, ranges or rounding)."""
        self._w_hat, self._aq = None, None

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, weight: Tensor | None = None, act: bool = True) -> Tensor:
        if self.record is not None:
            self._record(x)
        if act:
            x = self.quant_input(x)
        w = self.weight_hat() if weight is None else weight
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)

    def _record(self, x: Tensor) -> None:
        self.record.append(x.detach().cpu())

    def extra_repr(self) -> str:
        return f"{self.kind}, W{self.w_bits}A{self.a_bits}, groups={self.groups}"


def quant_layers(net: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, QuantLayer)]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def shortcut_splits(net: nn.Module) -> dict[str, list[int]]:
    """Layers that read the decoder's skip concatenation ``cat([h, skip])`` and its channel split.

    In the shared U-Net each decoder ``Block`` gets ``cat([h, hs.pop()], dim=1)``: its ResBlock's
    ``conv1`` (after GroupNorm + SiLU) and ``skip`` (a 1x1 conv on the concatenation itself) read
    ``h``'s channels first, then the skip's.  Returns {module name: [channels of h, channels of skip]}.
    """
    from .nets.unet import Block, UNet

    if not isinstance(net, UNet):
        return {}
    cur = net.mid[-1].conv2.out_channels
    out = {}
    for i, m in enumerate(net.up):
        if isinstance(m, Block):
            res = m.res
            skip_ch = res.conv1.in_channels - cur
            if skip_ch > 0:
                out[f"up.{i}.res.conv1"] = [cur, skip_ch]
                if isinstance(res.skip, nn.Conv2d):
                    out[f"up.{i}.res.skip"] = [cur, skip_ch]
            cur = res.conv1.out_channels
    return out


def wrap_layers(net: nn.Module, cfg: QuantConfig) -> nn.Module:
    """A copy of ``net`` with every Conv2d / Linear replaced by a :class:`QuantLayer` (not yet calibrated)."""
    qnet = copy.deepcopy(net).eval()
    splits = shortcut_splits(qnet) if cfg.split_shortcut else {}
    names = [n for n, m in qnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first_last = {names[0], names[-1]} if names and cfg.first_last_8bit else set()
    from .nets.unet import UNet

    if isinstance(qnet, UNet) and cfg.first_last_8bit:
        first_last = {"conv_in", "conv_out"}
    for n in names:
        layer = qnet.get_submodule(n)
        wb = cfg.w_bits
        if n in first_last and wb != FLOAT_BITS:
            wb = max(wb, 8)
        _set_module(qnet, n, QuantLayer(layer, wb, cfg.a_bits, splits.get(n)))
    for p in qnet.parameters():
        p.requires_grad_(False)
    return qnet


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------
@dataclass
class CalibSet:
    """Network inputs (x, t) gathered from the full-precision sampler, and the step each came from."""

    x: Tensor
    t: Tensor
    step: Tensor           # index of the sampler step (0 = first, x_T)
    steps_total: int


def gather_calibration(denoiser, net: nn.Module, sample_shape: tuple, cfg: QuantConfig,
                       generator_seed: int | None = None) -> CalibSet:
    """Run the full-precision DDIM sampler (eta = 0, ``calib_sampler_steps`` uniform steps) and record what
    the network sees at each step (a forward pre-hook on ``net``).

    ``timestep``: the n_calib inputs are spread evenly over every step (n_calib // S per step, the remainder
    on the first steps; with n_calib < S, n_calib steps uniformly spaced).  ``naive``: all from step
    ``naive_step``.  Trajectories run only as far as needed.
    """
    from .samplers import get_sampler
    from .schedules import make_grid
    from .seeding import SampleNoise, sample_seed

    S = cfg.calib_sampler_steps
    seed = cfg.seed if generator_seed is None else generator_seed
    if cfg.calib == "naive":
        per_step = {cfg.naive_step: cfg.n_calib}
    else:
        if cfg.n_calib >= S:
            per_step = {i: cfg.n_calib // S + (1 if i < cfg.n_calib % S else 0) for i in range(S)}
        else:
            idx = torch.linspace(0, S - 1, cfg.n_calib).round().long().tolist()
            per_step = {i: idx.count(i) for i in sorted(set(idx))}
    # enough trajectories that each step's inputs come from different ones (rotating through them)
    n_traj = max(max(per_step.values()), min(cfg.n_calib, 128))
    last = max(per_step)
    seen: list[tuple[Tensor, Tensor]] = []

    def hook(_mod, args, kwargs):
        seen.append((args[0].detach().clone(), torch.as_tensor(args[1]).detach().clone().expand(args[0].shape[0])))
        if len(seen) > last:
            raise _StopSampling

    device = next(net.parameters()).device
    sigmas = make_grid("uniform", S, denoiser).to(device)
    noise = SampleNoise([sample_seed(seed, i) for i in range(n_traj)], device)
    x = noise.randn(sample_shape) * sigmas[0]
    h = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            get_sampler("ddim").fn(denoiser, x, sigmas, generator=noise, eta=0.0)
    except _StopSampling:
        pass
    finally:
        h.remove()
    xs, ts, steps = [], [], []
    offset = 0
    for i, k in sorted(per_step.items()):
        xi, ti = seen[i]
        rows = (offset + torch.arange(k)) % n_traj
        offset += k
        xs.append(xi[rows])
        ts.append(ti[rows])
        steps.append(torch.full((k,), i))
    return CalibSet(torch.cat(xs).cpu(), torch.cat(ts).float().cpu(), torch.cat(steps), S)


class _StopSampling(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
def _run(net: nn.Module, calib: CalibSet, batch: int = 256) -> None:
    with torch.no_grad():
        for i in range(0, len(calib.x), batch):
            net(calib.x[i:i + batch], calib.t[i:i + batch])


def _capture(net: nn.Module, layers: list[QuantLayer], calib: CalibSet) -> list[Tensor]:
    """The inputs each of ``layers`` receives when ``net`` runs once on the calibration set."""
    for m in layers:
        m.record = []
    try:
        _run(net, calib)
        return [torch.cat(m.record) for m in layers]
    finally:
        for m in layers:
            m.record = None


def _set_quant(net: nn.Module, weights: bool | None = None, acts: bool | None = None) -> None:
    for _, m in quant_layers(net):
        if weights is not None:
            m.quant_w = weights and m.w_bits != FLOAT_BITS
        if acts is not None:
            m.quant_a = acts and m.a_bits != FLOAT_BITS
        m.refresh()


def calibrate_activations(qnet: nn.Module, calib: CalibSet, method: str) -> None:
    """Per-tensor (per-group when split) input ranges of every layer from the calibration inputs,
    with the (already quantized) weights in place and activation quantization off."""
    layers = [m for _, m in quant_layers(qnet) if m.a_bits != FLOAT_BITS]
    if not layers:
        return
    _set_quant(qnet, acts=False)
    g = torch.Generator().manual_seed(0)
    for m, x in zip(layers, _capture(qnet, layers, calib)):
        lohi = []
        for sl in _group_slices(m.groups):
            xg = x[:, sl].reshape(-1)
            if xg.numel() > m.record_limit:  # a random subsample keeps the search cheap (min/max kept)
                keep = torch.randint(0, xg.numel(), (m.record_limit,), generator=g)
                xg = torch.cat([xg[keep], xg.min()[None], xg.max()[None]])
            lohi.append(act_range(xg, m.a_bits, method))
        m.set_act_range(torch.tensor(lohi))
    _set_quant(qnet, acts=True)


ZETA, GAMMA = 1.1, -0.1   # AdaRound's stretched sigmoid, Nagel et al. 2020, Eq. 23


def _h(V: Tensor) -> Tensor:
    """Rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), Nagel et al. 2020, Eq. 23."""
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _columns(m: QuantLayer, x: Tensor) -> Tensor:
    """The layer's input as a (K, M) matrix: im2col columns of a convolution (K = C kh kw, the weight's
    flattening order), or the transposed batch of a linear layer."""
    if m.kind == "linear":
        return x.reshape(-1, x.shape[-1]).t()
    k = m.weight.shape[2:]
    a = m.conv_args
    cols = F.unfold(x, k, dilation=a["dilation"], padding=a["padding"], stride=a["stride"])  # (N, K, L)
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


def adaround_layer(m: QuantLayer, x_q: Tensor, x_fp: Tensor, cfg: QuantConfig) -> dict:
    """Learn the rounding of one layer: minimise ||W_tilde X_q - W X_fp||^2 / (M out) + lambda f_reg(V),
    Nagel et al. 2020, Eq. 25, with the annealed regulariser sum 1 - |2 h(V) - 1|^beta (beta 20 -> 2).

    The layer is linear in its weights, so the reconstruction error over the whole calibration set is the
    quadratic form tr(W_tilde A W_tilde^T) - 2 tr(W_tilde B) + c with A = X_q X_q^T and B = X_q X_fp^T W^T
    (the bias cancels): computed once, every step then costs O(out K^2) and sees every calibration input
    (full-batch, where AdaRound samples mini-batches).
    """
    scale = m.scale_full()
    qmin, qmax = weight_qrange(m.w_bits)
    out = m.weight.shape[0]
    W = m.weight.reshape(out, -1)
    Xq, Xf = _columns(m, x_q), _columns(m, x_fp)
    M = Xq.shape[1] * out
    A = Xq @ Xq.t() / M                                # (K, K), symmetric
    Bt = (W @ (Xf @ Xq.t())) / M                       # B^T: (out, K)
    c = float(((W.double() @ Xf.double()) ** 2).sum() / M)
    del Xq, Xf

    def rec_err(w_t: Tensor) -> float:
        w_t = w_t.reshape(out, -1).double()
        return float(((w_t @ A.double()) * w_t).sum() - 2 * (w_t * Bt.double()).sum() + c)

    s2 = scale.expand_as(m.weight).reshape(out, -1)
    w_floor = torch.floor(m.weight / scale).reshape(out, -1)
    rest = (m.weight.reshape(out, -1) / s2 - w_floor).clamp(1e-4, 1 - 1e-4)
    V = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)  # h(V) = rest at the start
    # Adam on V with the gradient by hand (the chain rule through the rectified sigmoid and the clamps;
    # autograd's overhead dominated on these small tensors)
    m1, m2 = torch.zeros_like(V), torch.zeros_like(V)
    b1, b2, lr, eps = 0.9, 0.999, cfg.adaround_lr, 1e-8
    iters, warm, lam = cfg.adaround_iters, 0.2, 0.01 / out
    err0 = rec_err(m.weight_hat())
    for it in range(iters):
        sig = torch.sigmoid(V)
        pre = sig * (ZETA - GAMMA) + GAMMA
        h = pre.clamp(0, 1)
        dh_dV = sig * (1 - sig) * (ZETA - GAMMA) * ((pre > 0) & (pre < 1))
        q = w_floor + h
        w_soft = q.clamp(qmin, qmax) * s2
        g_h = 2 * (w_soft @ A - Bt) * s2 * ((q > qmin) & (q < qmax))   # d rec / d h
        frac = it / max(iters, 1)
        if frac >= warm:
            beta = 2 + (20 - 2) * (1 - (frac - warm) / (1 - warm))
            u = 2 * h - 1
            g_h = g_h - lam * beta * u.abs().pow(beta - 1) * u.sign() * 2   # d/dh of lam (1 - |2h - 1|^beta)
        g = g_h * dh_dV
        m1.mul_(b1).add_(g, alpha=1 - b1)
        m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        V -= lr * (m1 / (1 - b1 ** (it + 1))) / ((m2 / (1 - b2 ** (it + 1))).sqrt() + eps)
    with torch.no_grad():
        w_int = torch.clamp(w_floor + (V >= 0).float(), qmin, qmax).reshape(m.weight.shape)  # up where h(V) >= 1/2
        err1 = rec_err(w_int * scale)
        if err1 < err0:  # never worse than nearest rounding on the calibration data
            m.w_int.copy_(w_int)
        else:
            err1 = err0
        m.refresh()
    return {"err_nearest": err0, "err_adaround": err1}


def adaround(qnet: nn.Module, fp_net: nn.Module, calib: CalibSet, cfg: QuantConfig) -> list[dict]:
    """AdaRound every weight-quantized layer in forward order.  The layer's inputs come from ``qnet``
    (earlier layers quantized, activation quantization off), its target from the full-precision net."""
    _set_quant(qnet, acts=False)
    stats = []
    fp_q = wrap_layers(fp_net, QuantConfig(w_bits=FLOAT_BITS, a_bits=FLOAT_BITS, split_shortcut=False,
                                           rounding="nearest", calib="naive"))
    order = _forward_order(qnet, calib)
    # the full-precision layers' inputs (for the targets), all in one pass
    inputs = dict(zip(order, _capture(fp_q, [fp_q.get_submodule(name) for name in order], calib)))
    for name in order:
        m = qnet.get_submodule(name)
        if not m.quant_w or cfg.adaround_iters == 0:
            continue
        (x_q,) = _capture(qnet, [m], calib)
        st = adaround_layer(m, x_q, inputs.pop(name), cfg)
        stats.append({"layer": name, **st})
    _set_quant(qnet, acts=True)
    return stats


def _forward_order(qnet: nn.Module, calib: CalibSet) -> list[str]:
    """Names of the quantized layers in the order the forward pass calls them."""
    order, hooks = [], []
    for n, m in quant_layers(qnet):
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None))
    try:
        with torch.no_grad():
            qnet(calib.x[:2], calib.t[:2])
    finally:
        for h in hooks:
            h.remove()
    return order


def quantize_net(net: nn.Module, cfg: QuantConfig, calib: CalibSet | None) -> tuple[nn.Module, dict]:
    """A calibrated fake-quant copy of ``net`` (left unchanged) and a summary of the calibration."""
    qnet = wrap_layers(net, cfg)
    info: dict = {"layers": len(quant_layers(qnet)), "split_layers": sorted(shortcut_splits(net)) if cfg.split_shortcut else []}
    for _, m in quant_layers(qnet):
        m.init_weight_quant(cfg.w_range)
    needs_data = cfg.a_bits != FLOAT_BITS or (cfg.rounding == "adaround" and cfg.w_bits != FLOAT_BITS)
    if needs_data and calib is None:
        raise ValueError("this quantization needs calibration data (activation ranges or AdaRound)")
    if cfg.rounding == "adaround" and cfg.w_bits != FLOAT_BITS:
        st = adaround(qnet, net, calib, cfg)
        info["adaround_err_nearest"] = sum(s["err_nearest"] for s in st)
        info["adaround_err"] = sum(s["err_adaround"] for s in st)
    calibrate_activations(qnet, calib, cfg.a_range) if cfg.a_bits != FLOAT_BITS else None
    _set_quant(qnet, weights=True, acts=True)
    return qnet, info




# --------------------------------------------------------------------------------------------
# Real int8 execution (CPU)
# --------------------------------------------------------------------------------------------
def int8_available() -> bool:
    """True when torch._int_mm (int8 x int8 -> int32 GEMM) runs on the CPU."""
    try:
        a = torch.ones(32, 16, dtype=torch.int8)
        return bool(torch._int_mm(a, a.t().contiguous()).dtype == torch.int32)
    except Exception:
        return False


class Int8Layer(nn.Module):
    """A calibrated :class:`QuantLayer` executed in integer arithmetic.

    Input: ``q = clamp(round(x / s) + z, 0, 255) - 128`` (int8, zero point ``z' = z - 128``); weights: the
    quantizer's integers (int8, |w| <= 127 for 8 bits, 4-bit values stored in int8).  Per channel group g:
    ``acc_g = W_g q_g`` in int32 (``torch._int_mm``; convolutions through im2col on the int8 tensor, padded
    with z' so a pad is real 0), ``y = sum_g s_g s_w[:, g] (acc_g - z'_g sum_k W_g[:, k]) + bias``.
    """

    def __init__(self, q: QuantLayer):
        super().__init__()
        if q.a_bits != 8 or q.w_bits == FLOAT_BITS or q.w_bits > 8:
            raise ValueError(f"real int8 execution needs 8-bit activations and <= 8-bit weights, got W{q.w_bits}A{q.a_bits}")
        self.kind, self.groups = q.kind, list(q.groups)
        self.conv_args = dict(q.conv_args) if q.kind == "conv" else {}
        self.k = tuple(q.weight.shape[2:]) if q.kind == "conv" else ()
        self.bias = None if q.bias is None else q.bias.detach().clone()
        self.w_mats, self.zp_rowsum, self.out_scale, self.s_in, self.z_in = [], [], [], [], []
        w_int = q.w_int.round().to(torch.int32)
        c0 = 0
        for g, (n, (lo, hi)) in enumerate(zip(self.groups, q.a_lohi.tolist())):
            s, z = act_qparams(lo, hi, 8)
            wg = w_int[:, c0:c0 + n]
            if wg.ndim == 4:                                           # K order (kh, kw, c), as the columns
                wg = wg.permute(0, 2, 3, 1)
            wg = wg.reshape(w_int.shape[0], -1)                        # (out, K_g)
            self.w_mats.append(wg.to(torch.int8).t().contiguous())     # (K_g, out)
            self.zp_rowsum.append((z - 128) * wg.sum(1))               # (out,) int32: zero point x weight row sums
            self.out_scale.append((s * q.w_scale[:, g].double()).float())  # (out,)  s_g * s_w[:, g]
            self.s_in.append(s)
            self.z_in.append(z - 128)
            c0 += n

    @property
    def weight(self) -> Tensor:
        """An empty float32 tensor: callers read ``layer.weight.dtype`` for the dtype of float inputs (the
        U-Net's time embedding does); the integer weights are in ``w_mats``."""
        return torch.empty(0)

    def _im2col(self, q: Tensor, zp: int) -> tuple[Tensor, int, int]:
        """(B, C, H, W) int8 -> (B * Ho * Wo, kh * kw * C) int8 columns, padded with the zero point.

        Built channels-last from kh * kw shifted views concatenated on the channel axis (contiguous
        copies; a permute of the 6-d unfold view is ~5x slower for int8)."""
        (ph, pw), (sh, sw), (dh, dw) = self.conv_args["padding"], self.conv_args["stride"], self.conv_args["dilation"]
        kh, kw = self.k
        B, C, H, W = q.shape
        q = q.permute(0, 2, 3, 1)
        p = torch.full((B, H + 2 * ph, W + 2 * pw, C), zp, dtype=torch.int8)
        p[:, ph:ph + H, pw:pw + W] = q
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        views = [p[:, i * dh:i * dh + (Ho - 1) * sh + 1:sh, j * dw:j * dw + (Wo - 1) * sw + 1:sw]
                 for i in range(kh) for j in range(kw)]
        cols = views[0] if len(views) == 1 else torch.cat(views, dim=3)
        return cols.reshape(B * Ho * Wo, kh * kw * C), Ho, Wo

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        B = x.shape[0]
        y = None
        c0 = 0
        for n, W, zrs, osc, s, zp in zip(self.groups, self.w_mats, self.zp_rowsum, self.out_scale, self.s_in, self.z_in):
            xg = x[:, c0:c0 + n]
            c0 += n
            q = (torch.clamp(torch.round(xg / s) + (zp + 128), 0, 255) - 128).to(torch.int8)
            if self.kind == "conv":
                cols, Ho, Wo = self._im2col(q, zp)
            else:
                cols = q
            acc = torch._int_mm(cols, W) - zrs                      # (M, out) int32
            part = acc.float() * osc
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias
        if self.kind == "conv":
            y = y.reshape(B, Ho, Wo, -1).permute(0, 3, 1, 2).contiguous()
        return y

    def extra_repr(self) -> str:
        return f"{self.kind}, int8 x int8 -> int32 (torch._int_mm), groups={self.groups}"


def to_int8(qnet: nn.Module) -> nn.Module:
    """A copy of a calibrated fake-quant network with every quantized layer run in int8 arithmetic."""
    if not int8_available():
        raise RuntimeError("real int8 execution needs torch._int_mm on the CPU, not available in this torch build")
    out = copy.deepcopy(qnet)
    for n, m in quant_layers(out):
        _set_module(out, n, Int8Layer(m))
    return out


# --------------------------------------------------------------------------------------------
# The denoiser wrapper
# --------------------------------------------------------------------------------------------
class QuantizedDenoiser(nn.Module):
    """A denoiser whose network is quantized (house rule: a wrapper, not a sampler flag).

    ``base`` is an adapter with a ``model`` attribute (e.g. DiscreteVPEpsDenoiser); the wrapper keeps a
    shallow copy of it that calls ``qnet`` instead, so sigma_min / sigma_max, the sigma grid and the
    parametrisation are the base's.  ``execution`` says what runs: "simulated" (fake-quant in float32)
    or "int8" (integer GEMMs).
    """

    def __init__(self, base: nn.Module, qnet: nn.Module, cfg: QuantConfig, execution: str = "simulated"):
        super().__init__()
        if not hasattr(base, "model"):
            raise TypeError("QuantizedDenoiser wraps a denoiser adapter with a .model network")
        inner = copy.copy(base)  # the adapter's own state, with its own registries (moving it leaves base alone)
        inner._parameters, inner._buffers = dict(base._parameters), dict(base._buffers)
        inner._modules = {**base._modules, "model": qnet}
        self.inner = inner
        self.cfg, self.execution = cfg, execution
        self.sigma_min, self.sigma_max = base.sigma_min, base.sigma_max

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return self.inner(x, sigma, **cond)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)


def weight_bytes(qnet: nn.Module) -> int:
    """Storage of the network's weights at their bit widths (biases and float layers at 32 bits)."""
    total = 0.0
    for m in qnet.modules():
        if isinstance(m, QuantLayer):
            total += m.weight.numel() * (m.w_bits if m.quant_w else 32) / 8 + m.w_scale.numel() * 4
            total += 0 if m.bias is None else m.bias.numel() * 4
        elif isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)):
            total += sum(p.numel() for p in m.parameters(recurse=False)) * 4
    return int(math.ceil(total))
