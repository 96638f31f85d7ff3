"""GPU-aware speed options for the shared U-Net (Chen et al. 2023, "Speed is all you need").

The paper speeds up Stable Diffusion's U-Net on phone GPUs with specialised kernels: attention as a
partially fused softmax or FlashAttention, fused GroupNorm + activation, Winograd convolution and
half precision.  Here each is a switch of :class:`AccelOptions`, and :func:`apply` returns the
network running with them:

- ``attn``: "naive" (materialised softmax, the reference), "chunked" (query chunks with a partially
  fused softmax: the (HW x HW) weights are never held at once) or "sdpa" (torch's fused
  scaled_dot_product_attention: FlashAttention / memory-efficient kernels on CUDA).
- ``fused_norm_act``: every GroupNorm followed by SiLU as one kernel.  ``norm_act_kernel`` says whose:
  "compile" (default) has torch.compile generate it (a Triton kernel on CUDA, C++ on CPU; without a
  compiler backend it falls back, with a warning, to the unfused ops --
  ``bench_core.nets.norm_act.fused_norm_act_backend()`` says which ran); "triton" runs the hand-written
  Triton kernel of ``bench_core.nets.triton_norm`` (CUDA; on CPU only under TRITON_INTERPRET=1).
- ``compile``: torch.compile the whole network (beyond the paper: every elementwise chain fused, not
  just norm + activation; the network's own fused_norm_act switch is then left to the compiler).
- ``conv_benchmark``: cuDNN's autotuner picks each convolution's algorithm (implicit GEMM, FFT or
  Winograd) by timing them on the first call; CUDA only (on CPU oneDNN chooses by itself).
- ``channels_last``: NHWC memory format for activations and weights (tensor cores on CUDA, oneDNN's
  direct convolution on CPU).
- ``dtype``: "float32", "bfloat16" or "float16" weights and activations (the input is cast in and
  the output cast back to the caller's dtype).
- ``cuda_graph``: capture one denoiser call with static input buffers into a CUDA graph and replay
  it on every call of the sampling loop (no per-kernel launch cost).  CUDA only: on CPU it raises.
  :class:`CUDAGraphSampler` goes further and captures a whole sampling run, every step's sampler
  arithmetic included, as one graph (a benchmark tool: the harness's NFE counter cannot see inside it).

Options never change the network's parameters or state_dict keys: :func:`apply` works on a copy
unless ``inplace=True``, so cached checkpoints load into an accelerated network unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench_core.denoiser import DenoiserWrapper, DiscreteVPEpsDenoiser, GaussianDenoiser, expand_sigma
from bench_core.nets import triton_norm
from bench_core.nets.norm_act import NORM_ACT_KERNELS, fused_norm_act_backend
from bench_core.nets.unet import ATTN_IMPLS, DDPM_CIFAR10, DEFAULT_ATTN_CHUNK, DIGITS_SMALL, UNet, UNetConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Stable Diffusion 1.5's U-Net shape at a 64x64x4 latent (512x512 images): channels 320/640/1280/1280,
# two residual blocks per level, attention (8 heads) at the three highest resolutions, 32 groups.
# SD's blocks are spatial transformers with cross-attention to text and GEGLU feed-forwards; ours has
# plain self-attention blocks only, so this is SD-*shaped* (same convolutions and attention sizes,
# 642M parameters against SD's 860M), a stand-in for latency, not a text-to-image model.
SD15_SHAPED = UNetConfig(
    in_channels=4, resolution=64, ch=320, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
    attn_resolutions=(64, 32, 16), dropout=0.0, num_heads=8, norm_groups=32,
)

NETWORKS: dict[str, UNetConfig] = {
    "digits_small": DIGITS_SMALL, "ddpm_cifar10": DDPM_CIFAR10, "sd15_shaped": SD15_SHAPED,
}


@dataclass(frozen=True)
class AccelOptions:
    """Speed options; the defaults are the unoptimised reference (naive attention, fp32, eager)."""

    attn: str = "naive"                 # "naive" | "chunked" | "sdpa"
    attn_chunk: int = DEFAULT_ATTN_CHUNK  # queries per chunk for attn="chunked"
    fused_norm_act: bool = False        # GroupNorm + SiLU as one kernel
    norm_act_kernel: str = "compile"    # whose fused kernel: "compile" (torch.compile) | "triton" (hand-written)
    compile: bool = False               # torch.compile the whole network
    conv_benchmark: bool = False        # cuDNN autotuned convolution algorithms (Winograd where faster); CUDA only
    channels_last: bool = False         # NHWC memory format
    dtype: str = "float32"              # "float32" | "bfloat16" | "float16"
    cuda_graph: bool = False            # replay a captured denoiser call; CUDA only

    def __post_init__(self):
        if self.attn not in ATTN_IMPLS:
            raise ValueError(f"attn must be one of {ATTN_IMPLS}, got {self.attn!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if int(self.attn_chunk) < 1:
            raise ValueError(f"attn_chunk must be >= 1, got {self.attn_chunk}")
        if self.norm_act_kernel not in NORM_ACT_KERNELS:
            raise ValueError(f"norm_act_kernel must be one of {NORM_ACT_KERNELS}, got {self.norm_act_kernel!r}")

    def replace(self, **kw) -> "AccelOptions":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def changes(self) -> dict[str, Any]:
        """The fields that differ from the reference ``AccelOptions()`` (attn_chunk only with chunked
        attention, norm_act_kernel only with fused_norm_act)."""
        base = AccelOptions()
        d = {k: v for k, v in self.to_dict().items() if v != getattr(base, k)}
        if self.attn != "chunked":
            d.pop("attn_chunk", None)
        if not self.fused_norm_act:
            d.pop("norm_act_kernel", None)
        return d

    def label(self) -> str:
        """``"baseline"`` or the changed options, e.g. ``"attn=sdpa+fused_norm_act+dtype=bfloat16"``."""
        parts = []
        for k, v in self.changes().items():
            parts.append(k if v is True else f"{k}={v}")
        return "+".join(parts) or "baseline"

    def cuda_only(self) -> list[str]:
        """The options set here that need a CUDA device."""
        return [k for k in ("conv_benchmark", "cuda_graph") if getattr(self, k)]

    def check_device(self, device: str | torch.device) -> None:
        """Raise a clear error for options the device cannot run."""
        device = torch.device(device)
        bad = self.cuda_only()
        if device.type != "cuda" and bad:
            raise RuntimeError(f"speed option(s) {', '.join(bad)} need a CUDA device (got {device}); "
                               "run without them on CPU")
        if self.fused_norm_act and self.norm_act_kernel == "triton" and not self.compile:
            reason = triton_norm.available(device)
            if reason:
                raise RuntimeError(f"speed option norm_act_kernel=triton: {reason}")


def tolerance(opts: AccelOptions, device: str | torch.device = "cpu") -> float:
    """Allowed relative deviation (max |out - ref| / max |ref|) of a network output under ``opts``
    from the fp32 naive reference on the same device.

    fp32: 1e-5 on CPU (reordered sums only); on CUDA 1e-4 (cuDNN's FFT and Winograd algorithms,
    which the autotuner may pick, round differently from direct convolution), or 5e-3 when TF32
    convolutions/matmuls are allowed (torch's default for cuDNN).  bfloat16 (8-bit mantissa, ~4e-3
    per rounding, accumulated over the network's depth): 5e-2.  float16 (11-bit mantissa): 1e-2.
    """
    device = torch.device(device)
    if opts.dtype == "bfloat16":
        return 5e-2
    if opts.dtype == "float16":
        return 1e-2
    if device.type == "cuda":
        return 5e-3 if (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32) else 1e-4
    return 1e-5


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref| (in float64)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().item()
    return float((out - ref).abs().max().item() / (scale if scale > 0 else 1.0))


def random_weights_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values that keep activations O(1): weights
    N(0, 1/fan_in), biases N(0, 0.01^2), norm scales 1 + N(0, 0.1^2) and shifts N(0, 0.1^2).

    The DDPM init zeroes each residual branch's last conv and the output conv (so the output
    would be identically zero); latency does not depend on the values, and equality checks need
    every branch to contribute.
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return net


# --------------------------------------------------------------------------------------------
# The accelerated network
# --------------------------------------------------------------------------------------------
class AcceleratedUNet(nn.Module):
    """A U-Net running under :class:`AccelOptions`: ``forward(x, t, y=None)`` -> epsilon in x's dtype.

    Its ``net`` has the original's state_dict keys and shapes (only dtype and memory format may differ).
    """

    def __init__(self, net: UNet, opts: AccelOptions):
        super().__init__()
        self.net, self.opts = net, opts
        # the compiled forward is kept out of the module tree, so state_dict keys stay the network's
        self.__dict__["_run"] = torch.compile(net) if opts.compile else net

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        o = self.opts
        in_dtype = x.dtype
        fmt = torch.channels_last if o.channels_last else torch.contiguous_format
        h = x.to(dtype=o.torch_dtype, memory_format=fmt)
        if x.device.type == "cuda":  # cuDNN's autotuner for this call only
            prev = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = o.conv_benchmark
            try:
                out = self._call(h, t, y)
            finally:
                torch.backends.cudnn.benchmark = prev
        else:
            out = self._call(h, t, y)
        return out.to(dtype=in_dtype, memory_format=torch.contiguous_format)

    def _call(self, h, t, y):
        if not self.opts.compile:
            return self._run(h, t, y)
        try:
            return self._run(h, t, y)
        except Exception as e:  # torch.compile's errors are long; say what to do first
            raise RuntimeError(f"torch.compile of the network failed ({type(e).__name__}: {str(e)[:300]}); "
                               "run without the compile option") from e


def apply(unet: UNet, opts: AccelOptions, *, device: str | torch.device | None = None,
          inplace: bool = False) -> AcceleratedUNet:
    """``unet`` running under ``opts`` (on ``device`` if given).  Works on a deep copy unless
    ``inplace``: the given network's parameters, dtype and runtime switches stay as they were.

    ``opts.cuda_graph`` is honoured by :func:`accelerated_denoiser` (the graph holds a whole
    denoiser call); here it only checks the device.
    """
    if device is not None:
        opts.check_device(device)
    net = unet if inplace else copy.deepcopy(unet)
    if device is not None:
        net = net.to(device)
    net.set_attn_impl(opts.attn, opts.attn_chunk)
    # under compile the compiler fuses norm + activation (and the rest) itself
    net.set_fused_norm_act(opts.norm_act_kernel if opts.fused_norm_act and not opts.compile else False)
    if opts.fused_norm_act and opts.norm_act_kernel == "compile" and not opts.compile:
        fused_norm_act_backend()  # build (or fall back) now, with its warning, not mid-measurement
    net = net.to(dtype=opts.torch_dtype)
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return AcceleratedUNet(net, opts)


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------
class CUDAGraphed:
    """``fn(*tensors)`` captured into a CUDA graph per input signature and replayed.

    On the first call with a new (shape, dtype, device) signature the inputs are copied into static
    buffers, ``fn`` runs ``warmup`` times on a side stream (lazy initialisation, cuDNN autotuning,
    compilation) and is then captured.  Every call copies its inputs into the static buffers,
    replays the graph and returns a copy of the static output.  Inference only (runs under no_grad);
    ``fn`` must not synchronise with the host (no ``.item()``) nor depend on values other than its
    tensor arguments.
    """

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device, and CUDA is not available here; "
                               "run without the cuda_graph option on CPU")
        self.fn, self.warmup = fn, int(warmup)
        self._graphs: dict[tuple, tuple] = {}

    def _capture(self, args: tuple[Tensor, ...]):
        static_in = tuple(a.clone() for a in args)
        stream = torch.cuda.Stream(device=args[0].device)
        stream.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static_in)
        torch.cuda.current_stream(args[0].device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out

    def __call__(self, *args: Tensor) -> Tensor:
        if any(a.device.type != "cuda" for a in args):
            raise RuntimeError("CUDA graphs need CUDA tensors; run without the cuda_graph option on CPU")
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        with torch.no_grad():
            if key not in self._graphs:
                self._graphs[key] = self._capture(args)
            graph, static_in, static_out = self._graphs[key]
            for s, a in zip(static_in, args):
                s.copy_(a)
            graph.replay()
            return static_out.clone()


class CUDAGraphDenoiser(DenoiserWrapper):
    """A denoiser whose every call replays a captured CUDA graph of one call of ``denoiser``
    (unconditional: no ``cond``).  ``sigma_min``, ``sigma_max``, ``sigmas``... pass through."""

    def __init__(self, denoiser, warmup: int = 3):
        super().__init__(denoiser)
        self._graphed = CUDAGraphed(lambda x, s: denoiser(x, s), warmup=warmup)

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        if cond:
            raise NotImplementedError("CUDAGraphDenoiser captures unconditional calls only")
        return self._graphed(x, expand_sigma(sigma, x).contiguous())


def host_sync_check(sampler: Callable, denoiser, sigmas: Tensor, x_shape: tuple[int, ...], **opts) -> str | None:
    """None when ``sampler`` runs a whole sampling loop without reading a device value on the host -- so
    that a CUDA graph can capture it --, else what stopped it.

    Checked on the meta device, where tensors have shapes but no values: ``if sigma_next > 0``,
    ``.item()`` or ``float(t)`` on a grid tensor raise there as a host read of a GPU tensor breaks a
    capture.  The network is replaced by the exact N(0, I) denoiser with the real one's sigma range (only
    the sampler's control flow is checked).
    """
    x = torch.empty(x_shape, device="meta")
    stand_in = GaussianDenoiser(0.0, 1.0, getattr(denoiser, "sigma_min", 0.002), getattr(denoiser, "sigma_max", 80.0))
    try:
        with torch.no_grad():
            sampler(stand_in, x, sigmas.to("meta"), **opts)
    except Exception as e:  # noqa: BLE001 - any failure means "not capturable"; say which
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


class CUDAGraphSampler:
    """A whole sampling run -- every step's denoiser call and sampler arithmetic --, captured as one CUDA
    graph per input shape and replayed: ``CUDAGraphSampler(sampler, denoiser, sigmas)(x_T) -> x_0``.

    One replay launches the whole run, so the loop adds no host work per step ("CUDA graphs for the
    sampling loop").  The sampler must not read device values on the host (:func:`host_sync_check`
    runs first and says what stops it: on a GPU grid, Euler and DDIM are capturable; Heun's and the
    ancestral samplers' ``if sigma_next > 0`` are not).  Noise inside the graph comes from the device's
    default generator (``generator=None``; replays draw fresh noise), not from per-sample seeds.  NFE
    cannot be counted inside a graph: count an eager run of the same sampler and grid.
    """

    def __init__(self, sampler: Callable, denoiser, sigmas: Tensor, *, warmup: int = 2, **opts):
        self.sampler, self.denoiser, self.opts = sampler, denoiser, opts
        self.sigmas = sigmas
        self._checked: set[tuple] = set()
        self._graphed = CUDAGraphed(self._run, warmup=warmup)

    def _run(self, x: Tensor) -> Tensor:
        return self.sampler(self.denoiser, x, self.sigmas, **self.opts)  # sigmas on x's device (__call__)

    def __call__(self, x: Tensor) -> Tensor:
        key = tuple(x.shape)
        if key not in self._checked:
            problem = host_sync_check(self.sampler, self.denoiser, self.sigmas, key, **self.opts)
            if problem:
                name = getattr(self.sampler, "__name__", repr(self.sampler))
                raise RuntimeError(f"{name} cannot be captured in a CUDA graph: it reads a device value on the "
                                   f"host ({problem}); use a per-call graph (cuda_graph option) instead")
            self._checked.add(key)
            self.sigmas = self.sigmas.to(x.device)
        return self._graphed(x)


def accelerated_denoiser(unet: UNet, opts: AccelOptions, alphas_cumprod: Tensor, *,
                         device: str | torch.device = "cpu", inplace: bool = False):
    """A discrete-VP epsilon denoiser (DDPM parametrisation) of ``unet`` under ``opts``, on
    ``device``; with ``opts.cuda_graph`` every call replays a captured CUDA graph."""
    device = torch.device(device)
    opts.check_device(device)
    den = DiscreteVPEpsDenoiser(apply(unet, opts, device=device, inplace=inplace), alphas_cumprod).to(device)
    return CUDAGraphDenoiser(den) if opts.cuda_graph else den


# --------------------------------------------------------------------------------------------
# The ablation's option sets
# --------------------------------------------------------------------------------------------
def ablation_options(device: str | torch.device, *, attn_chunk: int = DEFAULT_ATTN_CHUNK) -> dict[str, AccelOptions]:
    """name -> options: the baseline, each option alone, and every option together, for a device.

    CUDA: half precision alone is float16 and bfloat16; the fused norm + activation also as the
    hand-written Triton kernel; "all" uses bfloat16 (the issue's target) and torch.compile's fused kernel.
    CPU: conv_benchmark, cuda_graph and the Triton kernel do not apply; half precision is bfloat16.
    Whole-network torch.compile (``compile``) is not part of the ablation (it is beyond the paper, and
    compiling every network would not fit the GPU script's time); speed_ablation.py's diffusers
    comparison measures it.
    """
    device = torch.device(device)
    base = AccelOptions()
    sets = {
        "baseline": base,
        "attn_chunked": base.replace(attn="chunked", attn_chunk=attn_chunk),
        "attn_sdpa": base.replace(attn="sdpa"),
        "fused_norm_act": base.replace(fused_norm_act=True),
        "channels_last": base.replace(channels_last=True),
        "bf16": base.replace(dtype="bfloat16"),
    }
    all_opts = base.replace(attn="sdpa", fused_norm_act=True, channels_last=True, dtype="bfloat16")
    if device.type == "cuda":
        sets["fused_norm_act_triton"] = base.replace(fused_norm_act=True, norm_act_kernel="triton")
        sets["conv_benchmark"] = base.replace(conv_benchmark=True)
        sets["fp16"] = base.replace(dtype="float16")
        sets["cuda_graph"] = base.replace(cuda_graph=True)
        all_opts = all_opts.replace(conv_benchmark=True, cuda_graph=True)
    sets["all"] = all_opts
    return sets
