"""GroupNorm followed by SiLU (with ADM's optional scale and shift) as one hand-written Triton kernel.

The "Speed is all you need" option "fused group norm + activation" (Chen et al. 2023, Sec. 3.2), as
the paper did it: a specialised kernel instead of a compiler's.  One program normalises one
(sample, group) of x:

1. mean:     mu = sum(x) / n over the group's n = (C / G) * H * W elements,
2. variance: var = sum((x - mu)^2) / n (a second pass keeps fp32 accurate for large groups),
3. output:   y = silu(((x - mu) / sqrt(var + eps)) * gamma_c + beta_c [* (1 + scale_bc) + shift_bc]).

Statistics are fp32 whatever x's dtype; y has x's dtype and memory format (NCHW or channels-last,
read through the strides).  It runs on CUDA tensors, and on CPU tensors through Triton's interpreter
when the process starts with ``TRITON_INTERPRET=1`` (Triton reads it when the kernels are defined, at import;
that is how the tests check the kernel here, in a subprocess: slow, exact same code).  Inference only: with autograd
recording, :func:`group_norm_silu`
runs the unfused torch ops so that training is unaffected.
"""
import os

import torch
from torch import Tensor


try:  # Triton ships with torch's CUDA wheels on Linux; elsewhere the option says it is unavailable
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None
constexpr = tl.constexpr if tl is not None else int  # the kernel's compile-time parameters

BLOCK = 1024  # elements per loop iteration of one program


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _block(X, base, start, n, Cg, HW, stride_c, stride_p, CHANNEL_FAST: constexpr, BLOCK: constexpr):
    """Elements start .. start + BLOCK of one group: (x in fp32, their offsets, channel within the group, mask).
    Channel-fastest order for channels-last x (coalesced), position-fastest for NCHW."""
    i = start + tl.arange(0, BLOCK)
    m = i < n
    if CHANNEL_FAST:
        c = i % Cg
        p = i // Cg
    else:
        c = i // HW
        p = i % HW
    off = base + c * stride_c + p * stride_p
    return tl.load(X + off, mask=m, other=0.0).to(tl.float32), off, c, m


@_jit
def _gn_silu(X, Y, W, Bias, Scale, Shift, C, HW, Cg, stride_b, stride_c, stride_p, eps,
             HAS_MOD: constexpr, CHANNEL_FAST: constexpr, BLOCK: constexpr):
    """One (sample, group): mean, variance, then the normalised, modulated and activated output."""
    pid = tl.program_id(0)
    groups = C // Cg
    b = pid // groups
    g = pid % groups
    n = Cg * HW
    base = b * stride_b + g * Cg * stride_c
    # pass 1: mean
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        x, off, c, m = _block(X, base, start, n, Cg, HW, stride_c, stride_p, CHANNEL_FAST, BLOCK)
        acc += x
    mu = tl.sum(acc, axis=0) / n
    # pass 2: variance about the mean
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        x, off, c, m = _block(X, base, start, n, Cg, HW, stride_c, stride_p, CHANNEL_FAST, BLOCK)
        dev = tl.where(m, x - mu, 0.0)
        acc += dev * dev
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n + eps)
    # pass 3: y = silu(norm(x) * gamma + beta [* (1 + scale) + shift])
    for start in range(0, n, BLOCK):
        x, off, c, m = _block(X, base, start, n, Cg, HW, stride_c, stride_p, CHANNEL_FAST, BLOCK)
        ch = g * Cg + c
        gamma = tl.load(W + ch, mask=m, other=1.0).to(tl.float32)
        beta = tl.load(Bias + ch, mask=m, other=0.0).to(tl.float32)
        h = (x - mu) * rstd * gamma + beta
        if HAS_MOD:
            s = tl.load(Scale + b * C + ch, mask=m, other=0.0).to(tl.float32)
            t = tl.load(Shift + b * C + ch, mask=m, other=0.0).to(tl.float32)
            h = h * (1.0 + s) + t
        y = h * tl.sigmoid(h)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 when the process started)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INTERPRETING = interpreting()  # Triton read it at import too


def available(device: torch.device | str) -> str | None:
    """None when the kernel can run on ``device``, else the reason it cannot."""
    if triton is None:
        return "Triton is not installed (it comes with torch's CUDA wheels on Linux: pip install triton)"
    if torch.device(device).type != "cuda" and not interpreting():
        return ("the Triton GroupNorm+SiLU kernel needs a CUDA device (on CPU use norm_act_kernel='compile', "
                "or TRITON_INTERPRET=1 to run Triton's slow interpreter)")
    return None


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                    scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """silu(GroupNorm(x) [* (1 + scale) + shift]) for x of shape (B, C, H, W); scale/shift (B, C[, 1, 1])."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        raise RuntimeError("the Triton GroupNorm+SiLU kernel has no backward pass: call it under torch.no_grad() "
                           "(bench_core.nets.norm_act.norm_act runs the eager ops when gradients are needed)")
    if triton is None or not (x.is_cuda or _INTERPRETING):  # (cheap: this runs for every norm of every call)
        raise RuntimeError(available(x.device))
    if x.ndim != 4:
        raise ValueError(f"group_norm_silu expects (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if C % groups:
        raise ValueError(f"{C} channels do not split into {groups} groups")
    if x.numel() >= 2**31:
        raise ValueError("tensor too large for the kernel's 32-bit offsets; split the batch")
    if x.stride(2) != W * x.stride(3) or not (x.stride(1) == 1 or x.stride(3) == 1):
        x = x.contiguous()  # positions must be one stride apart (NCHW or channels-last)
    y = torch.empty_like(x)  # same memory format, hence the same strides
    has_mod = scale is not None
    if has_mod:
        scale = scale.reshape(B, C).to(x.dtype).contiguous()
        shift = shift.reshape(B, C).to(x.dtype).contiguous()
    else:
        scale = shift = weight  # unused pointers
    channel_fast = x.stride(1) == 1 and C > 1
    stride_p = x.stride(3)
    _gn_silu[(B * groups,)](
        x, y, weight, bias, scale, shift, C, H * W, C // groups, x.stride(0), x.stride(1), stride_p, float(eps),
        HAS_MOD=has_mod, CHANNEL_FAST=channel_fast, BLOCK=BLOCK,
    )
    return y
