"""The one dispatch point for fused elementwise/normalisation ops (GroupNorm+SiLU, GEGLU).

`set_kernels("auto" | "triton" | "torch")` picks, once per process, whether CUDA tensors go
through the Triton kernels in ti_fast.kernels; CPU tensors take the PyTorch path (unless the
Triton interpreter is on). "auto" uses Triton when it imports and falls back with one printed
line; an explicit "triton" that cannot run fails loudly. The default is "torch" (env
TI_FAST_KERNELS overrides) until a GPU run of the tests and bench has verified the kernels and
shown that they win at SD1.5 shapes.
"""
from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F

from ..errors import UserError

_mode = {"name": os.environ.get("TI_FAST_KERNELS", "torch"), "triton": None}
_recording = threading.local()   # .calls: inside record_calls() on this thread, see there


class KernelError(UserError, RuntimeError):
    """Explicitly requested kernels cannot run here."""


def _load_triton():
    try:
        from ti_fast.kernels import group_norm_silu as gn, geglu as gg
        return gn, gg
    except Exception as e:  # triton missing or broken
        return e


def set_kernels(name: str = "auto", verbose: bool = True) -> str:
    """Choose the implementation of the fused ops; returns what will run on CUDA."""
    if name not in ("auto", "triton", "torch"):
        raise KernelError(f"unknown kernels choice {name!r}: use auto, triton or torch")
    _mode["name"], _mode["triton"] = name, None
    if name == "torch":
        return "torch"
    mods = _load_triton()
    if isinstance(mods, Exception):
        if name == "triton":
            raise KernelError(f"Triton kernels requested but unavailable: {mods}")
        if verbose and torch.cuda.is_available():
            print(f"ti-fast: Triton kernels unavailable ({mods}); using PyTorch ops")
        return "torch"
    _mode["triton"] = mods
    return "triton"


def _triton_for(x: torch.Tensor):
    if _mode["name"] == "torch":
        return None
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    if _mode["triton"] is None:
        set_kernels(_mode["name"], verbose=False)
    return _mode["triton"]


class record_calls:
    """Context manager collecting the fused-op calls made inside it on this thread, e.g. by a
    forward on the meta device, as tuples: ("group_norm", shape, dtype, weight dtype, groups,
    silu, x.requires_grad) and ("geglu", shape, dtype, h.requires_grad). What
    ti_fast.training.prewarm compiles ahead of the first step."""

    def __enter__(self) -> list:
        _recording.calls = []
        return _recording.calls

    def __exit__(self, *exc):
        _recording.calls = None
        return False


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """GroupNorm (statistics and affine in fp32, as the original GroupNorm32), optional SiLU.
    x: [B, C, H, W] -> same shape and dtype."""
    if (rec := getattr(_recording, "calls", None)) is not None:
        rec.append(("group_norm", tuple(x.shape), x.dtype, norm.weight.dtype, norm.num_groups, silu,
                          x.requires_grad))
    k = _triton_for(x)
    if k is not None:
        return k[0].group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        # CUDA's GroupNorm already accumulates statistics and the affine in fp32 for half inputs;
        # an explicit x.float() would add two casts and make autograd keep an fp32 copy of x
        # (twice the activation memory of every GroupNorm input).
        y = F.group_norm(x, norm.num_groups, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
        return F.silu(y) if silu else y
    y = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """h: [..., 2F] -> value * gelu(gate): [..., F]; first half is the value (exact erf GELU)."""
    if (rec := getattr(_recording, "calls", None)) is not None:
        rec.append(("geglu", tuple(h.shape), h.dtype, h.requires_grad))
    k = _triton_for(h)
    if k is not None:
        return k[1].geglu(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


def active() -> str:
    """What CUDA tensors go through now: "triton" or "torch"."""
    return "triton" if _mode["name"] != "torch" and _mode["triton"] is not None else "torch"
