"""The GroupNorm + SiLU kernel choice, in one place: the eager reference, torch.compile's fused kernel (built
once, with a loud fallback to the eager ops), and the hand-written Triton kernel (``bench_core.nets.triton_norm``,
imported only when chosen).  ``UNet.set_fused_norm_act`` picks one per network; the state here is the one
compiled function shared by every network."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm_silu_eager(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                     scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """silu(GroupNorm(x) * (1 + scale) + shift): the norm -> (AdaGN modulation) -> activation chain."""
    h = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h)


_FUSED_NORM_ACT = {"fn": None, "backend": "", "static": None}


def fused_norm_act_backend() -> str:
    """How the fused GroupNorm+SiLU runs: "inductor" (torch.compile: a generated Triton kernel on
    CUDA, C++ on CPU) or "eager-fallback" (torch.compile unavailable; same math, unfused)."""
    _fused_norm_act_fn()
    return _FUSED_NORM_ACT["backend"]


def _fused_norm_act_fn():
    """The compiled GroupNorm+SiLU, built once (torch.compile fuses the reduction and activation)."""
    if _FUSED_NORM_ACT["fn"] is None:
        try:
            import torch._dynamo  # noqa: PLC0415 - lazy: slow to import (seconds), only for the compiled kernel

            # one compiled function serves every (shape, dtype) of every network: allow recompiles
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            _FUSED_NORM_ACT["fn"] = torch.compile(group_norm_silu_eager, dynamic=True)
            _FUSED_NORM_ACT["backend"] = "inductor"
        except Exception as e:  # noqa: BLE001 - no compiler backend: say so and run unfused
            _fused_fallback(f"torch.compile unavailable ({type(e).__name__}: {e})")
    return _FUSED_NORM_ACT["fn"]


def _static_norm_act_fn():
    """The compiled GroupNorm+SiLU specialised to each input shape and memory layout (``dynamic=False``; compiled
    once per shape), built after the shared one, whose settings and fallback it uses.  On a channels-last input
    (the int8 network's activations) it reads a group's channels where they lie next to each other; ATen's
    channels-last GroupNorm and the shape-generic kernel are several times slower there than on NCHW."""
    if _FUSED_NORM_ACT.get("static") is None:
        _fused_norm_act_fn()
        if _FUSED_NORM_ACT["backend"] == "inductor":
            _FUSED_NORM_ACT["static"] = torch.compile(group_norm_silu_eager, dynamic=False)
    return _FUSED_NORM_ACT.get("static") or _FUSED_NORM_ACT["fn"]


def _fused_fallback(reason: str) -> None:
    """From now on the 'fused' GroupNorm+SiLU runs the eager ops; warn once with the reason."""
    warnings.warn(f"fused GroupNorm+SiLU: {reason}; running the unfused eager ops instead")
    _FUSED_NORM_ACT.update(fn=group_norm_silu_eager, backend="eager-fallback", static=group_norm_silu_eager)


NORM_ACT_KERNELS = ("compile", "compile_static", "triton")


def norm_act(norm: nn.GroupNorm, x: Tensor, fused: bool | str = False, scale: Tensor | None = None,
             shift: Tensor | None = None) -> Tensor:
    """silu(norm(x) [* (1 + scale) + shift]), as one fused kernel when ``fused``: "compile" (or True) for
    torch.compile's generated kernel (one for every shape), "compile_static" for one specialised to each shape and
    layout, "triton" for the hand-written one (``bench_core.nets.triton_norm``)."""
    if fused == "triton" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, norm.weight, norm.bias, scale, shift))):
        from bench_core.nets.triton_norm import group_norm_silu  # noqa: PLC0415 - lazy: imports Triton, only when asked for

        return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
    if fused == "triton":  # training: the kernel has no backward; autograd through the torch ops
        return group_norm_silu_eager(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
    if fused:
        try:
            fn = _static_norm_act_fn() if fused == "compile_static" else _fused_norm_act_fn()
            return fn(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
        except Exception as e:  # noqa: BLE001 - a compile failure at the first call: fall back, loudly
            if _FUSED_NORM_ACT["backend"] != "inductor":
                raise
            _fused_fallback(f"compiling failed ({type(e).__name__}: {str(e)[:200]})")
            return group_norm_silu_eager(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
    return group_norm_silu_eager(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
