"""The one dispatch point for attention.

Every attention layer in the UNet, VAE and text encoder calls `attention(q, k, v)` through
the callable stored on it by `set_attention_backend`. Backends:
  math     plain softmax(q k^T / sqrt(d)) v — the reference
  sdpa     torch.nn.functional.scaled_dot_product_attention
  xformers xformers.ops.memory_efficient_attention (CUDA only)
  triton   ti_fast.kernels.attention (CUDA only): flash attention without padding the head dim
           (40 -> 32+16 rather than 64); shapes it does not take go to sdpa
  auto     the first of AUTO_ORDER that can run on the device
q, k, v: [B, H, T, D] (k, v may have another T). Returns [B, H, Tq, D].
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

BACKENDS = ("auto", "triton", "xformers", "sdpa", "math")
# What auto prefers, fastest first where measured. triton is not in it: on an H200 (bf16, batch
# 8, forward + backward, graphed) it beats SDPA's flash kernel 1.45x at the dominant SD1.5 shape
# (4096 tokens, head dim 40: 2.70 vs 3.91 ms) but not SDPA's choice there, cuDNN (2.19 ms); it
# wins only the small cross-attention shapes (4096x77: 0.14 vs 0.20 ms). bench/bench_attention.py.
AUTO_ORDER = ("xformers", "sdpa", "math")


class AttentionBackendError(ConfigError, RuntimeError):
    """An explicitly requested attention backend cannot run here."""


def attention_math(q, k, v, causal: bool = False):
    scale = 1.0 / math.sqrt(q.shape[-1])
    w = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B,H,Tq,Tk] in fp32
    if causal:
        tq, tk = w.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=w.device).triu(1)
        w = w.masked_fill(mask, float("-inf"))
    return (w.softmax(-1) @ v.float()).to(q.dtype)


def attention_sdpa(q, k, v, causal: bool = False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_xformers(q, k, v, causal: bool = False):
    import xformers.ops as xops
    # xformers wants [B, T, H, D]
    bias = xops.LowerTriangularMask() if causal else None
    o = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        attn_bias=bias)
    return o.transpose(1, 2)


def _triton_attention():
    """The triton backend's callable, or None when the kernel cannot be imported."""
    try:
        from ti_fast.kernels import attention as kattn
    except Exception:
        return None

    def attention_triton(q, k, v, causal: bool = False):
        if kattn.supports(q, k, v, causal):
            return kattn.attention(q, k, v, causal)
        return attention_sdpa(q, k, v, causal)    # e.g. the VAE's head dim 512
    return attention_triton


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`."""
    dev = torch.device(device)
    out = []
    if dev.type == "cuda":
        if importlib.util.find_spec("triton") is not None and _triton_attention() is not None:
            out.append("triton")
        if importlib.util.find_spec("xformers") is not None:
            out.append("xformers")
    out += ["sdpa", "math"]
    return out


def resolve_backend(name: str, device: torch.device | str, verbose: bool = True):
    """Return (name, fn) for a requested backend; explicit requests that cannot run fail."""
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    avail = available_backends(device)
    if name == "auto":
        name = next(n for n in AUTO_ORDER if n in avail)
        if verbose:
            print(f"ti-fast: attention backend auto -> {name} (available on {torch.device(device).type}: {', '.join(avail)})")
    elif name not in avail:
        why = {"xformers": "xformers is not installed or the device is not CUDA (pip install xformers)",
               "triton": "the Triton attention kernel needs triton and a CUDA device"}.get(name, "")
        raise AttentionBackendError(f"attention backend {name!r} cannot run on {torch.device(device).type}: {why}")
    fn = {"math": attention_math, "sdpa": attention_sdpa, "xformers": attention_xformers}.get(name)
    if name == "triton":
        fn = _triton_attention()
    return name, fn


def set_attention_backend(model: torch.nn.Module, name: str = "auto", device=None, verbose: bool = True) -> str:
    """Point every attention layer of `model` at one backend; returns the backend's name."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    resolved, fn = resolve_backend(name, device, verbose)
    for m in model.modules():
        if hasattr(m, "attn_fn"):
            m.attn_fn = fn
    return resolved
