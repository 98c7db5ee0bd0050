"""Fused GEGLU, forward and backward, in Triton.

GEGLU: Shazeer, "GLU Variants Improve Transformer" (2020); used by the feed-forward of SD's
BasicTransformerBlock (ldm.modules.attention.GEGLU). Exact (erf) GELU: Hendrycks & Gimpel 2016.
Layout after Liger-Kernel's geglu, with 2-D tiles so that narrow and wide F both fill a block.

Eager math (h: [..., 2F], computed in fp32, one cast on store):

    a, g  = h[..., :F], h[..., F:]                       # value, gate
    cdf   = 0.5 * (1 + erf(g / sqrt(2)))
    y     = a * g * cdf                                  # a * gelu(g)

Backward (dy: [..., F]):

    pdf   = exp(-g^2 / 2) / sqrt(2 pi)
    da    = dy * g * cdf
    dg    = dy * a * (cdf + g * pdf)                     # gelu'(g) = cdf + g * pdf
    dh    = cat([da, dg], -1)

Only h is saved (2F per token; the eager a * F.gelu(g) keeps a, g and gelu(g): 3F).
The op is purely memory-bound (3F elements moved forward, 5F backward per token): one
program per [BLOCK_M, BLOCK_F] tile, no reductions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .precompile import launch

MAX_BLOCK_F = 1024  # widest tile along F
TILE = 2048  # elements per [BLOCK_M, BLOCK_F] tile (per half)


@triton.jit
def _geglu_fwd_kernel(
    H,  # *T  input [M, 2F], rows `stride_h` apart, last dim contiguous
    Y,  # *T  out: [M, F] contiguous
    M,  # rows (tokens)
    F,  # output features (half of h's last dim)
    stride_h,  # elements between rows of H
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_F: tl.constexpr,  # tile columns
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    h_offs = rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    a = tl.load(H + h_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(H + h_offs + F, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
    y = a * g * cdf
    y_offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    H,  # *T  forward input [M, 2F], rows `stride_h` apart, last dim contiguous
    DY,  # *T  upstream gradient [M, F] contiguous
    DH,  # *T  out: gradient w.r.t. H, [M, 2F] contiguous
    M,  # rows (tokens)
    F,  # output features
    stride_h,  # elements between rows of H
    BLOCK_M: tl.constexpr,  # tile rows
    BLOCK_F: tl.constexpr,  # tile columns
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    r64 = rows.to(tl.int64)[:, None]
    h_offs = r64 * stride_h + cols[None, :]
    a = tl.load(H + h_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(H + h_offs + F, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
    da = dy * g * cdf
    dg = dy * a * (cdf + g * pdf)
    dh_offs = r64 * (2 * F) + cols[None, :]
    tl.store(DH + dh_offs, da.to(DH.dtype.element_ty), mask=mask)
    tl.store(DH + dh_offs + F, dg.to(DH.dtype.element_ty), mask=mask)


def _tiles(M: int, F: int) -> tuple[tuple[int, int], dict]:
    # The widest power-of-two column block that wastes the fewest masked lanes: F = 1280 takes
    # 256 (5 full blocks) rather than 1024 (a second block 3/4 empty).
    widest = min(triton.next_power_of_2(F), MAX_BLOCK_F)
    candidates = [widest >> k for k in range(4) if widest >> k >= 1]
    block_f = min(candidates, key=lambda bf: (triton.cdiv(F, bf) * bf - F, -bf))
    block_m = max(1, min(triton.next_power_of_2(M), TILE // block_f))
    grid = (triton.cdiv(M, block_m), triton.cdiv(F, block_f))
    return grid, dict(BLOCK_M=block_m, BLOCK_F=block_f,
                      num_warps=4 if block_m * block_f <= 1024 else 8)


def _rows(h: torch.Tensor) -> torch.Tensor:
    """h as a [M, 2F] matrix with a contiguous last dim (a view when possible)."""
    h2 = h.reshape(-1, h.shape[-1])
    return h2 if h2.stride(-1) == 1 else h2.contiguous()


def geglu_forward(h: torch.Tensor) -> torch.Tensor:
    """h: [..., 2F] -> y: [..., F] (contiguous)."""
    two_f = h.shape[-1]
    assert two_f % 2 == 0, f"GEGLU needs an even last dim, got {two_f}"
    f = two_f // 2
    h2 = _rows(h)
    M = h2.shape[0]
    y = torch.empty(M, f, dtype=h.dtype, device=h.device)
    if M:
        grid, meta = _tiles(M, f)
        launch(_geglu_fwd_kernel, grid, h2, y, M, f, h2.stride(0), **meta)
    return y.view(*h.shape[:-1], f)


def geglu_backward(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dy: [..., F], h: [..., 2F] -> dh: [..., 2F] (contiguous)."""
    f = h.shape[-1] // 2
    h2 = _rows(h)
    M = h2.shape[0]
    dy2 = dy.reshape(M, f).contiguous()
    dh = torch.empty(M, 2 * f, dtype=h.dtype, device=h.device)
    if M:
        grid, meta = _tiles(M, f)
        launch(_geglu_bwd_kernel, grid, h2, dy2, dh, M, f, h2.stride(0), **meta)
    return dh.view(h.shape)


class GEGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return geglu_forward(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return geglu_backward(dy, h)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """h: [..., 2F] (fp32/fp16/bf16) -> h[..., :F] * gelu(h[..., F:]) : [..., F], exact GELU,
    computed in fp32 with one rounding to h's dtype."""
    return GEGLUFunction.apply(h)


def precompile_task(shape, dtype: torch.dtype, backward: bool = True):
    """A callable that makes this op's launches for h of `shape` [..., 2F] (forward; with
    `backward`, the backward too) on meta tensors, for kernels.precompile.compile_only()."""
    def task():
        h = torch.empty(shape, dtype=dtype, device="meta")
        y = geglu_forward(h)
        if backward:
            geglu_backward(torch.empty_like(y), h)
    return task


def geglu_ref(h: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference, the ti_fast/models/ops.py torch path (in h's own dtype)."""
    value, gate = h.chunk(2, dim=-1)
    return value * torch.nn.functional.gelu(gate)
