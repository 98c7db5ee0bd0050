"""The one dispatch point for fused elementwise/normalisation ops (GroupNorm+SiLU, GEGLU).

The implementation is chosen PER MODEL, like attention: `set_kernels(model, "auto" | "triton" |
"torch")` stores the choice on every GroupNorm and GEGLU module of that model (attribute
`fused_ops`: None = PyTorch ops, else the Triton kernels of ti_fast.kernels). Nothing here is
process-wide, so two models in one process can run different implementations and nothing stays
changed after a run. CUDA tensors go through the chosen kernels; CPU tensors take the PyTorch
path unless the Triton interpreter is on (TRITON_INTERPRET=1, tests). "auto" uses Triton when it
imports and falls back with one printed line; an explicit "triton" that cannot run fails loudly.
"""
from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F

from ..errors import ConfigError

CHOICES = ("auto", "triton", "torch")
_recording = threading.local()   # .calls: inside record_calls() on this thread, see there


class KernelError(ConfigError, RuntimeError):
    """Explicitly requested kernels cannot run here."""


class FusedOps:
    """The Triton implementation: the two kernel modules of ti_fast.kernels."""

    def __init__(self, group_norm_silu, geglu):
        self.group_norm_silu, self.geglu = group_norm_silu, geglu


@functools.lru_cache(maxsize=1)
def _load_triton():
    """FusedOps, or the exception that stopped it (triton missing or broken). Cached: an import
    either works or not for the life of the process."""
    try:
        from ti_fast.kernels import group_norm_silu as gn, geglu as gg
        return FusedOps(gn, gg)
    except Exception as e:
        return e


def fused_ops(name: str = "auto", verbose: bool = True) -> FusedOps | None:
    """The implementation for a choice: FusedOps (Triton) or None (PyTorch ops)."""
    if name not in CHOICES:
        raise KernelError(f"--kernels {name!r}: choose {', '.join(CHOICES)}")
    if name == "torch":
        return None
    impl = _load_triton()
    if isinstance(impl, Exception):
        if name == "triton":
            raise KernelError(f"--kernels triton: the Triton kernels are unavailable ({impl}); use --kernels auto or torch")
        if verbose and torch.cuda.is_available():
            print(f"ti-fast: Triton kernels unavailable ({impl}); using PyTorch ops")
        return None
    return impl


def set_kernels(model: torch.nn.Module, name: str = "auto", verbose: bool = True) -> str:
    """Point every GroupNorm and GEGLU of `model` at one implementation; returns what runs on
    CUDA: "triton" or "torch"."""
    impl = fused_ops(name, verbose)
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm) or hasattr(m, "fused_ops"):
            m.fused_ops = impl
    return "torch" if impl is None else "triton"


def kernels_of(model: torch.nn.Module) -> str:
    """What `model`'s fused ops run on CUDA: "triton" or "torch"."""
    return "triton" if any(getattr(m, "fused_ops", None) is not None for m in model.modules()) else "torch"


def _on_device(x: torch.Tensor) -> bool:
    """Does x go to the Triton kernels (when a model chose them)? CUDA tensors, or any tensor
    under the Triton interpreter."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


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
    """GroupNorm (statistics and affine in fp32, as the original GroupNorm32), optional SiLU,
    through the implementation `norm` was given by set_kernels. x: [B, C, H, W] -> same shape
    and dtype."""
    if (rec := getattr(_recording, "calls", None)) is not None:
        rec.append(("group_norm", tuple(x.shape), x.dtype, norm.weight.dtype, norm.num_groups, silu,
                          x.requires_grad))
    impl = getattr(norm, "fused_ops", None)
    if impl is not None and _on_device(x):
        return impl.group_norm_silu.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
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


def geglu(h: torch.Tensor, impl: FusedOps | None = None) -> torch.Tensor:
    """h: [..., 2F] -> value * gelu(gate): [..., F]; first half is the value (exact erf GELU).
    impl: the calling GEGLU module's `fused_ops` (None: PyTorch ops)."""
    if (rec := getattr(_recording, "calls", None)) is not None:
        rec.append(("geglu", tuple(h.shape), h.dtype, h.requires_grad))
    if impl is not None and _on_device(h):
        return impl.geglu.geglu(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)
