"""Triton kernels for ti-fast (importable as ti_fast.kernels; imports nothing else of ti_fast).

One kernel per file, each with its forward/backward Triton kernels, launchers, the
autograd.Function, the public op and a plain-PyTorch `<op>_ref`:
  group_norm_silu  GroupNorm (fp32 statistics and affine) + optional SiLU, NCHW or channels_last
  geglu            h[..., :F] * gelu(h[..., F:]) with exact erf GELU
  attention        flash attention (FA2, saved LSE), head dim split in power-of-two tiles, causal

ti_fast.models.ops is the one dispatch point that decides whether they run. Importing this
package does not import triton; importing a kernel module does (and fails without it).
"""
from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """True when the kernels can run here: triton importable, and a CUDA GPU or the Triton
    interpreter (TRITON_INTERPRET=1, CPU tensors, set before triton is imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import torch
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
