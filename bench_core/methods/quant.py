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
CPU with our calibrated steps and zero points: uint8 activations and int8 weights (4-bit weights in int8
storage) through PyTorch's maintained oneDNN int8 kernels (``torch.ops.onednn.qconv_pointwise`` /
``qlinear_pointwise``, the ops Inductor's x86 int8 lowering calls; zero-point compensation, the float32 output
scales and the bias inside the kernel, weights prepacked once), scaled back to float between layers (GroupNorm,
SiLU, the residual adds, attention's softmax and the time embedding's sinusoid stay in float).  On CPUs whose int8
dot product saturates (AVX2 without VNNI, found by a probe) 8-bit weights run as two exact passes ``16 hi + lo``.
The hand-written ``torch._int_mm`` path (im2col in Python, slower than float32) is kept only as the fallback where
oneDNN's kernels are missing or not exact; :func:`to_int8` warns when it is used.  Either computes the same
function as the fake-quant network up to float summation order (a value within float rounding of a quantizer's
rounding boundary may land one step away).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets.unet import Block, UNet
from ..samplers import get_sampler
from ..schedules import make_grid
from ..seeding import SampleNoise, sample_seed

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
INT8_BACKENDS = ("onednn", "int_mm")
INT8_EXECUTION = {  # the records' ``quant_execution`` for each backend
    "onednn": "real-int8 (oneDNN u8 x s8 qconv/qlinear -> fp32, CPU)",
    "int_mm": "real-int8 (hand-written torch._int_mm fallback, CPU)",
}


class _Int8Base(nn.Module):
    """A calibrated :class:`QuantLayer` executed in integer arithmetic (the backends' common part).

    Per input-channel group g (one group unless the shortcut is split): the activation step ``s_g`` (float32, as the
    simulated quantizer uses it) and zero point ``z_g`` in [0, 255], the input's integers
    ``q_g = clamp(round(x_g / s_g) + z_g, 0, 255)`` (uint8), the quantizer's integer weights ``W_g`` (int8; 4-bit
    values stored in int8) and their per-output-channel steps ``s_w[:, g]``.  The layer computes
    ``y = sum_g s_g s_w[:, g] * (W_g (q_g - z_g)) + bias``, the integer products accumulated exactly in int32: the
    simulated layer's function up to float summation order (and a tie of round(x / s) resolved the other way).
    """

    backend = ""

    def __init__(self, q: QuantLayer):
        super().__init__()
        if q.a_bits != 8 or q.w_bits == FLOAT_BITS or q.w_bits > 8:
            raise ValueError(f"real int8 execution needs 8-bit activations and <= 8-bit weights, got W{q.w_bits}A{q.a_bits}")
        self.kind, self.groups, self.w_bits = q.kind, list(q.groups), q.w_bits
        self.conv_args = dict(q.conv_args) if q.kind == "conv" else {}
        self.k = tuple(q.weight.shape[2:]) if q.kind == "conv" else ()
        self.bias = None if q.bias is None else q.bias.detach().float().clone()
        w_int = q.w_int.round().to(torch.int8)
        self._dtype_probe = torch.empty(0)
        # per group: (first input channel, channels, s_g, z_g, W_g int8 (out, n, kh, kw) or (out, n), s_w[:, g])
        self.parts_q = []
        for g, (sl, (lo, hi)) in enumerate(zip(_group_slices(self.groups), q.a_lohi.tolist())):
            s, z = act_qparams(lo, hi, 8)
            s32 = float(torch.tensor(s, dtype=torch.float32))          # the simulated quantizer's float32 step
            self.parts_q.append((sl.start, sl.stop - sl.start, s32, int(z), w_int[:, sl].contiguous(),
                                 q.w_scale[:, g].float().contiguous()))
        self.out_features = int(w_int.shape[0])

    @property
    def weight(self) -> Tensor:
        """An empty float32 tensor: callers read ``layer.weight.dtype`` for the dtype of float inputs (the U-Net's
        time embedding does); the integer weights are the backend's."""
        return self._dtype_probe

    def stored_bytes(self) -> int:
        """Bytes of the weights this layer executes with: int8 weights, float32 steps and bias."""
        n = sum(w.numel() + 4 * ws.numel() for *_, w, ws in self.parts_q)
        return n + (0 if self.bias is None else 4 * self.bias.numel())

    def _group_input(self, x: Tensor, c0: int, n: int) -> Tensor:
        return x if len(self.parts_q) == 1 else x.narrow(1, c0, n)

    def extra_repr(self) -> str:
        return f"{self.kind}, W{self.w_bits}A8 in int8, groups={self.groups}, backend={self.backend}"


class _Packed:
    """Prepacked oneDNN weights: an opaque tensor that deepcopy cannot read; immutable, so copies share it."""

    __slots__ = ("t",)

    def __init__(self, t: Tensor):
        self.t = t

    def __deepcopy__(self, memo):
        return self


def _quantize_u8_qtensor(x: Tensor, s: float, z: int) -> Tensor:
    """q = clamp(round(x / s) + z, 0, 255) as uint8 in one pass: ATen's quantizer (it multiplies by 1 / s, so a
    value within an ulp of a rounding tie may land one step away from the simulated quantizer's), its quint8
    storage read as a plain uint8 tensor (no copy; ``.view(torch.uint8)`` would keep the quantized flag and
    crash on printing).  Quantized tensors are deprecated in PyTorch (pytorch#184982): where this stops
    working the probe switches to :func:`_quantize_u8_exact`."""
    q = torch.quantize_per_tensor(x.float(), s, z, torch.quint8)
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def _quantize_u8_exact(x: Tensor, s: float, z: int) -> Tensor:
    """The simulated quantizer's integers, exactly: clamp(round(x / s) + z, 0, 255) as uint8 (four passes)."""
    y = x.float() / s
    return y.round_().add_(z).clamp_(0, 255).to(torch.uint8)


_QUANTIZE = {"fn": _quantize_u8_exact}


def _quantize_u8(x: Tensor, s: float, z: int) -> Tensor:
    return _QUANTIZE["fn"](x, s, z)


# oneDNN's u8 x s8 products: with VNNI (vpdpbusd) or AMX they accumulate in int32 for any weight; on AVX2 without
# VNNI the kernel adds adjacent product pairs in int16 with saturation (vpmaddubsw), exact only while
# 255 * (|w1| + |w2|) <= 32767, i.e. for |w| <= 64.  The probe finds which holds on this CPU.
_ONEDNN_WMAX = {"max": 128, "note": ""}
_SPLIT_BASE = 16   # a weight beyond the safe range runs as 16 * hi + lo, hi in [-8, 8], lo in [-8, 7]: two exact passes


def _split_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """int8 W -> (hi, lo) int8 with W = 16 hi + lo, lo in [-8, 7], hi in [-8, 8] (both exact for oneDNN on AVX2)."""
    wi = w.to(torch.int16)
    hi = torch.div(wi + 8, _SPLIT_BASE, rounding_mode="floor")
    lo = wi - _SPLIT_BASE * hi
    return hi.to(torch.int8), lo.to(torch.int8)


class OneDNNInt8Layer(_Int8Base):
    """The int8 layer on PyTorch's oneDNN int8 kernels (``torch.ops.onednn.qconv_pointwise`` /
    ``qlinear_pointwise``: the kernels Inductor's x86 int8 lowering (PT2E + X86InductorQuantizer) calls, here fed
    our calibrated steps and zero points directly): the input quantized to uint8 (``torch.quantize_per_tensor``,
    one pass), the convolution / GEMM u8 x s8 -> s32 with the zero-point compensation, scaled to float32 with the
    bias in the same kernel, weights prepacked once.  Several passes accumulate into the first one's output
    (oneDNN's ``sum`` post-op for convolutions): a split layer's second channel group, and, on CPUs whose int8
    dot product saturates (AVX2 without VNNI, see ``_ONEDNN_WMAX``), the two halves ``16 hi + lo`` of 8-bit
    weights (4-bit weights always run in one pass).  Activations run channels-last."""

    backend = "onednn"

    def __init__(self, q: QuantLayer):
        super().__init__(q)
        ops = torch.ops.onednn
        wmax = _ONEDNN_WMAX["max"]
        # passes: (group index, packed weights, per-output-channel steps of this pass)
        self.passes, self.n_packed = [], 0
        for gi, (_, _, s, z, w, ws) in enumerate(self.parts_q):
            halves = [(w, ws)]
            if int(w.abs().max()) > wmax:
                hi, lo = _split_weight(w)
                halves = [(hi, ws * _SPLIT_BASE), (lo, ws)]
            for wh, wsh in halves:
                wsh = wsh.float().contiguous()
                if self.kind == "conv":
                    a = self.conv_args
                    p = ops.qconv_prepack(wh.contiguous(), wsh, s, z, list(a["stride"]), list(a["padding"]),
                                          list(a["dilation"]), 1, None)
                else:
                    p = ops.qlinear_prepack(wh.contiguous(), None)
                self.passes.append((gi, _Packed(p), wsh))
                self.n_packed += wh.numel()
        self.split_weights = len(self.passes) > len(self.parts_q)
        self.w_zero = torch.zeros(self.out_features, dtype=torch.int64)   # symmetric weights
        self.w_stored = sum(w.numel() for *_, w, _ in self.parts_q)        # int8 bytes of the quantized weights
        self.parts_q = [(c0, n, s, z, None, ws) for c0, n, s, z, _, ws in self.parts_q]  # the packed copies run

    def stored_bytes(self) -> int:
        """The int8 weights (one byte each; a split layer's two halves are a run-time layout of the same bytes),
        the float32 steps and the bias."""
        n = self.w_stored + sum(4 * ws.numel() for *_, ws in self.parts_q)
        return n + (0 if self.bias is None else 4 * self.bias.numel())

    def forward(self, x: Tensor) -> Tensor:
        ops = torch.ops.onednn
        y, qs = None, {}
        conv = self.kind == "conv"
        for gi, p, ws in self.passes:
            c0, n, s, z, _, _ = self.parts_q[gi]
            if gi not in qs:
                q = _quantize_u8(self._group_input(x, c0, n), s, z)
                qs[gi] = q.contiguous(memory_format=torch.channels_last) if conv else q
            q = qs[gi]
            if not conv:
                yg = ops.qlinear_pointwise(q, s, z, p.t, ws, self.w_zero, self.bias if y is None else None,
                                           1.0, 0, torch.float32, "none", [], "")
                y = yg if y is None else y.add_(yg)
                continue
            a = self.conv_args
            if y is None:
                y = ops.qconv_pointwise(q, s, z, p.t, ws, self.w_zero, self.bias, a["stride"], a["padding"],
                                        a["dilation"], 1, 1.0, 0, torch.float32, "none", [], "")
            else:  # y += this pass (oneDNN's sum post-op)
                y = ops.qconv2d_pointwise.binary(q, s, z, p.t, ws, self.w_zero, y, None, a["stride"], a["padding"],
                                                 a["dilation"], 1, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0,
                                                 "none", [], "")
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", 8-bit weights as 16 hi + lo (two passes)" if self.split_weights else "")


class IntMMInt8Layer(_Int8Base):
    """The hand-written fallback (slower than float32; kept for builds without oneDNN's int8 kernels).

    Input ``q - 128`` as int8 (zero point ``z' = z - 128``); per group ``acc_g = W_g q_g`` in int32 through
    ``torch._int_mm`` (convolutions through im2col on the int8 tensor, padded with z' so a pad is real 0), then
    ``y = sum_g s_g s_w[:, g] (acc_g - z'_g sum_k W_g[:, k]) + bias`` in float.
    """

    backend = "int_mm"

    def __init__(self, q: QuantLayer):
        super().__init__(q)
        self.w_mats, self.zp_rowsum, self.out_scale = [], [], []
        for _, _, s, z, w, ws in self.parts_q:
            wg = w.to(torch.int32)
            if wg.ndim == 4:                                           # K order (kh, kw, c), as the columns
                wg = wg.permute(0, 2, 3, 1)
            wg = wg.reshape(wg.shape[0], -1)                           # (out, K_g)
            self.w_mats.append(wg.to(torch.int8).t().contiguous())     # (K_g, out)
            self.zp_rowsum.append((z - 128) * wg.sum(1))               # (out,) int32: zero point x weight row sums
            self.out_scale.append((s * ws.double()).float())           # (out,)  s_g * s_w[:, g]

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
        for (c0, n, s, z, _, _), W, zrs, osc in zip(self.parts_q, self.w_mats, self.zp_rowsum, self.out_scale):
            zp = z - 128
            q = (torch.clamp(torch.round(self._group_input(x, c0, n) / s) + z, 0, 255) - 128).to(torch.int8)
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


INT8_LAYERS = {"onednn": OneDNNInt8Layer, "int_mm": IntMMInt8Layer}
_PROBED: dict[str, str] = {}   # backend -> "" (works) or why not


def _probe_onednn() -> str:
    """'' when oneDNN's int8 convolution and linear kernels run here and compute exactly, else why not.

    Checks the kernels on the worst case for int16 pair sums (``_onednn_error``): exact in one pass (VNNI / AMX),
    or, where one pass saturates (AVX2 without VNNI), exact with 8-bit weights split into two passes and with
    |w| <= 64 in one pass; sets ``_ONEDNN_WMAX`` accordingly.  Also picks the input quantizer: the one-pass ATen
    quantizer where it gives the simulated quantizer's integers, else the exact one."""
    _QUANTIZE["fn"] = _quantize_u8_exact
    try:
        with warnings.catch_warnings():  # quantized tensors' deprecation notice (once per process): see the fallback
            warnings.simplefilter("ignore")
            s, z = 0.0625, 100                                    # every integer, the clamps, no ties: x / s = k + 0.3
            x = (torch.arange(-120.0, 170.0) + 0.3) * s
            if torch.equal(_quantize_u8_qtensor(x, s, z), _quantize_u8_exact(x, s, z)):
                _QUANTIZE["fn"] = _quantize_u8_qtensor
    except Exception:  # noqa: BLE001 - quantized tensors gone from this build: the exact quantizer stays
        pass
    try:
        _ONEDNN_WMAX.update(max=128, note="one pass (the int8 dot product accumulates in int32)")
        err = _onednn_error(128)
        if err > 0.5:     # AVX2 without VNNI: int16 pair sums saturate; |w| <= 64 is exact, 8-bit weights are split
            _ONEDNN_WMAX.update(max=64, note=f"8-bit weights in two passes 16 hi + lo (one pass saturates here: max "
                                             f"error {err:.3g}; no VNNI)")
            err = max(_onednn_error(128), _onednn_error(64))
            if err > 0.5:
                return f"oneDNN's int8 kernels are not exact on this CPU even for |w| <= 64 (max error {err:.3g})"
        return ""
    except Exception as e:  # noqa: BLE001 - an op missing from this build, or a kernel that refuses this CPU
        return f"oneDNN int8 kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"


def _onednn_error(w_end: int) -> float:
    """Max |oneDNN - exact| of a 3x3 convolution (padding 1, stride 2, two channel groups summed) and a linear layer
    whose weights are all -w_end or w_end - 1 (127 for 128) against inputs 200..255 (and the zero point's 0): the
    worst case for int16 pair sums."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for layer, shape, groups in ((nn.Conv2d(16, 4, 3, stride=2, padding=1), (2, 16, 6, 6), [10, 6]),
                                 (nn.Linear(16, 4), (3, 16), None)):
        m = QuantLayer(layer, 8, 8, groups)
        m.w_int.copy_(torch.where(torch.rand(m.w_int.shape, generator=g) < 0.5, -float(w_end), w_end - 1.0))
        m.w_scale.fill_(1.0)
        m.set_act_range(torch.tensor([[-5.0, 250.0]] * len(m.groups)))   # s = 1, z = 5: integers 0..255
        x = torch.randint(200, 256, shape, generator=g).double() - 5
        x.view(-1)[::7] = -5.0                                               # the zero point's integer, 0
        with torch.no_grad():
            got = OneDNNInt8Layer(m)(x.float()).double()
            m.double()
            want = m(x)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def onednn_weight_passes() -> str:
    """How oneDNN runs 8-bit weights on this CPU (after the probe): one pass, or two (16 hi + lo) and why."""
    int8_backend_problem("onednn")
    return _ONEDNN_WMAX.get("note", "")


def _probe_int_mm() -> str:
    try:
        a = torch.ones(32, 16, dtype=torch.int8)
        return "" if torch._int_mm(a, a.t().contiguous()).dtype == torch.int32 else "torch._int_mm returned no int32"
    except Exception as e:  # noqa: BLE001
        return f"torch._int_mm unavailable on the CPU ({type(e).__name__})"


def int8_backend_problem(backend: str) -> str:
    """'' when ``backend`` runs (and, for oneDNN, computes exactly) on this machine, else why not; probed once."""
    if backend not in INT8_BACKENDS:
        raise ValueError(f"int8 backend must be one of {INT8_BACKENDS}, got {backend!r}")
    if backend not in _PROBED:
        _PROBED[backend] = _probe_onednn() if backend == "onednn" else _probe_int_mm()
    return _PROBED[backend]


def int8_backend() -> str | None:
    """The int8 backend this machine runs: "onednn", else the hand-written "int_mm" fallback, else None."""
    for b in INT8_BACKENDS:
        if not int8_backend_problem(b):
            return b
    return None


def int8_quantizer() -> str:
    """Which input quantizer the oneDNN layers use: "aten-quantize_per_tensor" (one pass) or "exact-eager"."""
    int8_backend_problem("onednn")
    return "aten-quantize_per_tensor" if _QUANTIZE["fn"] is _quantize_u8_qtensor else "exact-eager"


def int8_available() -> bool:
    """True when some int8 backend runs on this CPU."""
    return int8_backend() is not None


def to_int8(qnet: nn.Module, backend: str | None = None, fused_norm: bool = False) -> nn.Module:
    """A copy of a calibrated fake-quant network with every quantized layer run in int8 arithmetic.

    ``backend``: "onednn" (PyTorch's maintained oneDNN int8 kernels), "int_mm" (the hand-written fallback) or None:
    oneDNN where it works, else the fallback with a warning saying why.  The copy's ``int8_backend`` says which ran.
    ``fused_norm``: a U-Net's GroupNorm + SiLU (float32, between the int8 layers) as one torch.compile kernel
    specialised to each shape (``norm_act`` "compile_static"; compiled at the first call of each shape).  oneDNN's
    int8 convolutions return channels-last activations, on which ATen's GroupNorm is several times slower than on
    NCHW (it vectorises over a group's channels: 2 of them in the digits U-Net); the fused kernel is what makes
    int8 pay off on a network that small.  The copy's ``int8_fused_norm`` says whether it is on.
    """
    if backend is None:
        why = int8_backend_problem("onednn")
        backend = "onednn"
        if why:
            backend = "int_mm"
            warnings.warn(f"real int8: {why}; using the hand-written torch._int_mm fallback, slower than float32")
    why = int8_backend_problem(backend)
    if why:
        raise RuntimeError(f"real int8 execution with backend {backend!r} is not possible here: {why}")
    layer = INT8_LAYERS[backend]
    out = copy.deepcopy(qnet)
    for n, m in quant_layers(out):
        _set_module(out, n, layer(m))
    out.int8_backend = backend
    out.int8_fused_norm = False
    if fused_norm:
        fuse_norm_act(out)
    return out


def fuse_norm_act(inet: nn.Module) -> bool:
    """Run an int8 network's GroupNorm + SiLU as one compiled kernel per shape (``norm_act`` "compile_static"), in
    place; its ``int8_fused_norm`` says whether that happened (False for a network without the switch)."""
    inet.int8_fused_norm = hasattr(inet, "set_fused_norm_act")
    if inet.int8_fused_norm:
        inet.set_fused_norm_act("compile_static")
    return inet.int8_fused_norm


def executed_weight_bytes(net: nn.Module) -> int:
    """Bytes of the weights the network's forward pass reads, in the dtype it reads them: an int8 layer's int8
    weights (4-bit weights in int8 storage) with float32 steps and bias; every other parameter (float layers,
    GroupNorm, a simulated layer's float32 weights) at its own dtype."""
    total = 0
    for m in net.modules():
        if isinstance(m, _Int8Base):
            total += m.stored_bytes()
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


# --------------------------------------------------------------------------------------------
# The denoiser wrapper
# --------------------------------------------------------------------------------------------
class CallTimer:
    """Wall time of a denoiser's calls (CPU: the calls are synchronous), for the records' latency per call."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sec, self.n, self.rows = 0.0, 0, 0

    def time(self, rows: int):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.sec += time.perf_counter() - self.t0
                timer.n += 1
                timer.rows += int(rows)
                return False

        return _Ctx()

    def metrics(self, reset: bool = True) -> dict:
        """{"sec_per_call", "sec_per_call_per_sample", "denoiser_calls"} over the calls since the last reset (the
        mean over every call of a run, its warm-up included; per sample = per call / the call's batch rows)."""
        out = {"denoiser_calls": self.n}
        if self.n:
            out["sec_per_call"] = self.sec / self.n
            out["sec_per_call_per_sample"] = self.sec / self.rows if self.rows else float("nan")
        if reset:
            self.reset()
        return out


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
        self.calls = CallTimer()

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        with self.calls.time(x.shape[0] if x.ndim else 1):
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
