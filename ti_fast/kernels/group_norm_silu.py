"""Fused GroupNorm (+ optional SiLU), forward and backward, in Triton.

GroupNorm: Wu & He, "Group Normalization" (ECCV 2018); SiLU: Hendrycks & Gimpel 2016 /
Elfwing et al. 2017. The kernel layout follows the Triton layer-norm tutorial and
Liger-Kernel's group_norm, with each group split over several programs.

Eager math (x: [B, C, *spatial], G groups, statistics and affine in fp32, one cast on store,
as the original GroupNorm32 of Stable Diffusion):

    xg    = x.float().view(B, G, -1)                     # [B, G, N], N = C/G * HW
    mean  = xg.mean(-1);  rstd = 1 / sqrt(xg.var(-1, unbiased=False) + eps)
    xhat  = ((xg - mean[..., None]) * rstd[..., None]).view_as(x)
    z     = xhat * weight[c] + bias[c]
    y     = (z * sigmoid(z) if silu else z).to(x.dtype)

Backward (dy = upstream gradient, means over the N elements of a group):

    dz     = dy * sigmoid(z) * (1 + z * (1 - sigmoid(z)))  if silu else dy
    dxhat  = dz * weight[c]
    dx     = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dw[c]  = sum_{b, spatial} dz * xhat ;  db[c] = sum_{b, spatial} dz

Only x, mean and rstd (fp32, [B*G]) are saved; z is recomputed in backward.

Grid. A group of SD1.5's 64x64x320 feature map holds 10 * 4096 = 40960 elements, and batch 1
has only 32 groups: one program per (batch, group) would leave most of a 132-SM H100 idle
and make each program loop over 160 KB. So every pass runs on a grid (B*G, S): each group is
cut into S chunks (channel range x spatial range), S chosen so that B*G*S is about four
programs per SM. Two kernels per direction:
  forward   1. stats: per chunk (count, mean, M2) from shifted sums -> [B*G, S] partials
            2. apply: every program combines its group's S partials (Chan et al.'s parallel
               variance formula, S <= ~1024 floats, recomputed per program instead of a third
               launch), normalises its chunk, affine, SiLU, one cast on store.
  backward  1. reduce: per chunk sum(dxhat), sum(dxhat * xhat) -> partials (plus per-channel
               dw, db partials only when weight/bias require grad: frozen in TI, so skipped)
            2. apply: combine, dx from the formula above.
x (and dy) are read twice per direction: a group does not fit in one program's registers,
and the second read is often served by L2 (50 MB on H100).

Blocking. A chunk is walked in [BLOCK_C, BLOCK_P] tiles (channels x spatial positions) whose
contiguous axis is the memory's: spatial for NCHW, channels for channels_last (NHWC), so
both layouts load coalesced without any transpose copy. Tiles hold <= MAX_TILE elements.
Channels per group is a compile-time constant so that the compiler knows how a group's first
channel is aligned: NHWC rows of a group are CG contiguous elements, and loads vectorise to
gcd(CG, 8) half-precision elements (SD: 10 -> 2, 20/60 -> 4, 40/80 -> 8); NCHW loads are
16-byte vectors. One compile per distinct CG (about ten across SD's UNet and VAE).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .precompile import config_device, launch

MAX_TILE = 2048  # elements per [BLOCK_C, BLOCK_P] tile: 8-16 fp32 registers a thread per tensor
PROGRAMS_PER_SM = 4  # target grid size on CUDA, in programs per streaming multiprocessor
CPU_TARGET_PROGRAMS = 8  # target grid size under TRITON_INTERPRET=1 (no SMs to fill)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_offsets(
    c,  # [BLOCK_C] channel indices within the whole tensor (0..C)
    p,  # [BLOCK_P] spatial indices (0..HW)
    C,  # number of channels
    HW,  # number of spatial positions H*W
    CHANNELS_LAST: tl.constexpr,  # memory is [B, HW, C] (NHWC) rather than [B, C, HW]
):
    # Element offsets of a [BLOCK_C, BLOCK_P] tile inside one sample; the literal unit stride
    # tells the compiler which axis is contiguous so that loads vectorise along it.
    if CHANNELS_LAST:
        return c[:, None] + p[None, :] * C
    else:
        return c[:, None] * HW + p[None, :]


@triton.jit
def _gn_fwd_stats_kernel(
    X,  # *T     input, [B, C, H, W], NCHW- or NHWC-contiguous
    PART_CNT,  # *fp32 [B*G, S] out: element count of each chunk
    PART_MEAN,  # *fp32 [B*G, S] out: mean of each chunk
    PART_M2,  # *fp32 [B*G, S] out: sum of squared deviations from the chunk mean
    C,  # channels
    HW,  # spatial positions H*W
    G,  # groups
    CG: tl.constexpr,  # channels per group, C // G (constexpr: alignment of group starts)
    S,  # chunks per group, SC * SP
    SP,  # spatial chunks per group
    C_PER,  # channels per chunk (multiple of BLOCK_C)
    P_PER,  # spatial positions per chunk (multiple of BLOCK_P)
    CHANNELS_LAST: tl.constexpr,  # NHWC memory
    BLOCK_C: tl.constexpr,  # tile rows (channels)
    BLOCK_P: tl.constexpr,  # tile columns (spatial positions)
):
    pid_bg = tl.program_id(0)  # b * G + g
    pid_s = tl.program_id(1)  # sc * SP + sp
    b = pid_bg // G
    g = pid_bg % G
    c_lo = g * CG + (pid_s // SP) * C_PER
    c_hi = tl.minimum(c_lo + C_PER, (g + 1) * CG)
    p_lo = (pid_s % SP) * P_PER
    p_hi = tl.minimum(p_lo + P_PER, HW)
    Xb = X + b.to(tl.int64) * C * HW
    # Shifted sums: sum(x - k) and sum((x - k)^2) with k one element of the chunk, so the
    # variance does not cancel catastrophically when |mean| >> std (E[x^2] - E[x]^2 would).
    if CHANNELS_LAST:
        k = tl.load(Xb + p_lo * C + c_lo).to(tl.float32)
    else:
        k = tl.load(Xb + c_lo * HW + p_lo).to(tl.float32)
    acc_s = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    acc_q = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (c[:, None] < c_hi) & (p[None, :] < p_hi)
            x = tl.load(Xb + _tile_offsets(c, p, C, HW, CHANNELS_LAST), mask=mask, other=0.0)
            d = tl.where(mask, x.to(tl.float32) - k, 0.0)
            acc_s += d
            acc_q += d * d
    n = ((c_hi - c_lo) * (p_hi - p_lo)).to(tl.float32)
    s = tl.sum(tl.sum(acc_s, axis=1), axis=0)
    q = tl.sum(tl.sum(acc_q, axis=1), axis=0)
    out = pid_bg * S + pid_s
    tl.store(PART_CNT + out, n)
    tl.store(PART_MEAN + out, k + s / n)
    tl.store(PART_M2 + out, tl.maximum(q - s * s / n, 0.0))


@triton.jit
def _gn_fwd_apply_kernel(
    X,  # *T     input, [B, C, H, W], NCHW- or NHWC-contiguous
    Y,  # *T     out: output, same shape and memory layout as X
    W,  # *Tw    weight [C]
    Bias,  # *Tw    bias [C]
    PART_CNT,  # *fp32 [B*G, S] chunk counts from the stats kernel
    PART_MEAN,  # *fp32 [B*G, S] chunk means
    PART_M2,  # *fp32 [B*G, S] chunk sums of squared deviations
    MEAN,  # *fp32 [B*G] out: group mean (saved for backward)
    RSTD,  # *fp32 [B*G] out: group 1/sqrt(var + eps) (saved for backward)
    eps,  # variance epsilon
    C,  # channels
    HW,  # spatial positions H*W
    G,  # groups
    CG: tl.constexpr,  # channels per group, C // G
    S,  # chunks per group
    SP,  # spatial chunks per group
    C_PER,  # channels per chunk
    P_PER,  # spatial positions per chunk
    SILU: tl.constexpr,  # apply SiLU after the affine
    CHANNELS_LAST: tl.constexpr,  # NHWC memory
    BLOCK_C: tl.constexpr,  # tile rows (channels)
    BLOCK_P: tl.constexpr,  # tile columns (spatial positions)
    BLOCK_S: tl.constexpr,  # power of two >= S
):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    # Combine the group's S chunk statistics (Chan, Golub & LeVeque's pairwise formula).
    s_offs = tl.arange(0, BLOCK_S)
    s_mask = s_offs < S
    cnt = tl.load(PART_CNT + pid_bg * S + s_offs, mask=s_mask, other=0.0)
    pmean = tl.load(PART_MEAN + pid_bg * S + s_offs, mask=s_mask, other=0.0)
    pm2 = tl.load(PART_M2 + pid_bg * S + s_offs, mask=s_mask, other=0.0)
    n = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * pmean, axis=0) / n
    dev = pmean - mean
    var = tl.sum(pm2 + cnt * dev * dev, axis=0) / n
    rstd = 1.0 / tl.sqrt(var + eps)
    if pid_s == 0:
        tl.store(MEAN + pid_bg, mean)
        tl.store(RSTD + pid_bg, rstd)

    c_lo = g * CG + (pid_s // SP) * C_PER
    c_hi = tl.minimum(c_lo + C_PER, (g + 1) * CG)
    p_lo = (pid_s % SP) * P_PER
    p_hi = tl.minimum(p_lo + P_PER, HW)
    Xb = X + b.to(tl.int64) * C * HW
    Yb = Y + b.to(tl.int64) * C * HW
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_hi
        w = tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32)
        bias = tl.load(Bias + c, mask=c_mask, other=0.0).to(tl.float32)
        scale = (w * rstd)[:, None]  # y = x * scale + shift == (x - mean) * rstd * w + bias
        shift = (bias - mean * w * rstd)[:, None]
        for p0 in range(p_lo, p_hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = c_mask[:, None] & (p[None, :] < p_hi)
            offs = _tile_offsets(c, p, C, HW, CHANNELS_LAST)
            x = tl.load(Xb + offs, mask=mask, other=0.0).to(tl.float32)
            z = x * scale + shift
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(Yb + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_reduce_kernel(
    X,  # *T     forward input, [B, C, H, W], NCHW- or NHWC-contiguous
    DY,  # *T     upstream gradient, same shape and layout as X
    W,  # *Tw    weight [C]
    Bias,  # *Tw    bias [C]
    MEAN,  # *fp32 [B*G] group means from the forward
    RSTD,  # *fp32 [B*G] group 1/std from the forward
    PART_S1,  # *fp32 [B*G, S] out: chunk sum of dxhat
    PART_S2,  # *fp32 [B*G, S] out: chunk sum of dxhat * xhat
    DW_PART,  # *fp32 [B, SP, C] out: per-channel partial sum of dz * xhat (if WEIGHT_GRAD)
    DB_PART,  # *fp32 [B, SP, C] out: per-channel partial sum of dz (if WEIGHT_GRAD)
    C,  # channels
    HW,  # spatial positions H*W
    G,  # groups
    CG: tl.constexpr,  # channels per group, C // G
    S,  # chunks per group
    SP,  # spatial chunks per group
    C_PER,  # channels per chunk
    P_PER,  # spatial positions per chunk
    SILU: tl.constexpr,  # the forward applied SiLU (recompute z and its derivative)
    WEIGHT_GRAD: tl.constexpr,  # also produce dw/db partials
    CHANNELS_LAST: tl.constexpr,  # NHWC memory
    BLOCK_C: tl.constexpr,  # tile rows (channels)
    BLOCK_P: tl.constexpr,  # tile columns (spatial positions)
):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    sp = pid_s % SP
    mean = tl.load(MEAN + pid_bg)
    rstd = tl.load(RSTD + pid_bg)
    c_lo = g * CG + (pid_s // SP) * C_PER
    c_hi = tl.minimum(c_lo + C_PER, (g + 1) * CG)
    p_lo = sp * P_PER
    p_hi = tl.minimum(p_lo + P_PER, HW)
    Xb = X + b.to(tl.int64) * C * HW
    DYb = DY + b.to(tl.int64) * C * HW
    acc1 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_hi
        w = tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        bias = tl.load(Bias + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        if WEIGHT_GRAD:
            acc_dw = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
            acc_db = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = c_mask[:, None] & (p[None, :] < p_hi)
            offs = _tile_offsets(c, p, C, HW, CHANNELS_LAST)
            x = tl.load(Xb + offs, mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(DYb + offs, mask=mask, other=0.0).to(tl.float32)  # 0 where masked
            xhat = (x - mean) * rstd
            if SILU:
                z = xhat * w + bias
                sig = tl.sigmoid(z)
                dz = dz * sig * (1.0 + z * (1.0 - sig))
            dxhat = dz * w
            acc1 += dxhat
            acc2 += dxhat * xhat
            if WEIGHT_GRAD:
                acc_dw += dz * xhat
                acc_db += dz
        if WEIGHT_GRAD:
            part = (b * SP + sp) * C + c
            tl.store(DW_PART + part, tl.sum(acc_dw, axis=1), mask=c_mask)
            tl.store(DB_PART + part, tl.sum(acc_db, axis=1), mask=c_mask)
    out = pid_bg * S + pid_s
    tl.store(PART_S1 + out, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(PART_S2 + out, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _gn_bwd_apply_kernel(
    X,  # *T     forward input, [B, C, H, W], NCHW- or NHWC-contiguous
    DY,  # *T     upstream gradient, same shape and layout as X
    DX,  # *T     out: input gradient, same shape and layout as X
    W,  # *Tw    weight [C]
    Bias,  # *Tw    bias [C]
    MEAN,  # *fp32 [B*G] group means from the forward
    RSTD,  # *fp32 [B*G] group 1/std from the forward
    PART_S1,  # *fp32 [B*G, S] chunk sums of dxhat
    PART_S2,  # *fp32 [B*G, S] chunk sums of dxhat * xhat
    C,  # channels
    HW,  # spatial positions H*W
    G,  # groups
    CG: tl.constexpr,  # channels per group, C // G
    S,  # chunks per group
    SP,  # spatial chunks per group
    C_PER,  # channels per chunk
    P_PER,  # spatial positions per chunk
    SILU: tl.constexpr,  # the forward applied SiLU
    CHANNELS_LAST: tl.constexpr,  # NHWC memory
    BLOCK_C: tl.constexpr,  # tile rows (channels)
    BLOCK_P: tl.constexpr,  # tile columns (spatial positions)
    BLOCK_S: tl.constexpr,  # power of two >= S
):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    mean = tl.load(MEAN + pid_bg)
    rstd = tl.load(RSTD + pid_bg)
    s_offs = tl.arange(0, BLOCK_S)
    s_mask = s_offs < S
    inv_n = 1.0 / (CG * HW)
    m1 = tl.sum(tl.load(PART_S1 + pid_bg * S + s_offs, mask=s_mask, other=0.0), axis=0) * inv_n
    m2 = tl.sum(tl.load(PART_S2 + pid_bg * S + s_offs, mask=s_mask, other=0.0), axis=0) * inv_n
    c_lo = g * CG + (pid_s // SP) * C_PER
    c_hi = tl.minimum(c_lo + C_PER, (g + 1) * CG)
    p_lo = (pid_s % SP) * P_PER
    p_hi = tl.minimum(p_lo + P_PER, HW)
    Xb = X + b.to(tl.int64) * C * HW
    DYb = DY + b.to(tl.int64) * C * HW
    DXb = DX + b.to(tl.int64) * C * HW
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_hi
        w = tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        bias = tl.load(Bias + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        for p0 in range(p_lo, p_hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = c_mask[:, None] & (p[None, :] < p_hi)
            offs = _tile_offsets(c, p, C, HW, CHANNELS_LAST)
            x = tl.load(Xb + offs, mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(DYb + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            if SILU:
                z = xhat * w + bias
                sig = tl.sigmoid(z)
                dz = dz * sig * (1.0 + z * (1.0 - sig))
            dx = (dz * w - m1 - xhat * m2) * rstd
            tl.store(DXb + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device)
    return CPU_TARGET_PROGRAMS


def _config(B: int, C: int, HW: int, G: int, channels_last: bool, device: torch.device) -> dict:
    """Tile shape and chunking of each group (see the module docstring). Chunks per group are
    chosen so that the grid holds ~PROGRAMS_PER_SM programs per SM: with <= 64 registers a
    thread, 4 programs of 8 warps is what an SM keeps resident, and memory-bound kernels need
    that many warps in flight. They are cut along the spatial axis first (the long one at SD
    shapes), then along channels; when the tile is too coarse for that (64x64x320 at batch 1:
    two 2048-wide tiles per channel row), the tile is halved, down to a quarter of MAX_TILE."""
    CG = C // G
    target = _target_programs(device)
    want = triton.cdiv(target, B * G)
    best = None
    for max_tile in (MAX_TILE, MAX_TILE // 2, MAX_TILE // 4):
        cfg = _chunking(CG, HW, max(1, max_tile), want, channels_last)
        if best is None or cfg["S"] > best["S"]:
            best = cfg
        if B * G * best["S"] >= target:
            break
    return best


def _chunking(CG: int, HW: int, max_tile: int, want: int, channels_last: bool) -> dict:
    np2 = triton.next_power_of_2
    if channels_last:  # channels are contiguous: a tile spans the group's channels
        block_c = min(np2(CG), max_tile)
        block_p = max(1, min(np2(HW), max_tile // block_c))
    else:  # spatial positions are contiguous
        block_p = min(np2(HW), max_tile)
        block_c = max(1, min(np2(CG), max_tile // block_p))
    p_blocks, c_blocks = triton.cdiv(HW, block_p), triton.cdiv(CG, block_c)
    sp = min(want, p_blocks)
    sc = min(triton.cdiv(want, sp), c_blocks)
    p_per = triton.cdiv(p_blocks, sp) * block_p
    c_per = triton.cdiv(c_blocks, sc) * block_c
    sp, sc = triton.cdiv(HW, p_per), triton.cdiv(CG, c_per)
    return dict(CG=CG, S=sc * sp, SP=sp, C_PER=c_per, P_PER=p_per, BLOCK_C=block_c,
                BLOCK_P=block_p, num_warps=4 if block_c * block_p <= 1024 else 8)


def _layout(x: torch.Tensor) -> torch.Tensor:
    """x as NCHW- or NHWC-contiguous, copying only other layouts (then to NCHW)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _affine(t: torch.Tensor | None, C: int, fill: float, device) -> torch.Tensor:
    if t is None:  # GroupNorm(affine=False)
        return torch.full((C,), fill, dtype=torch.float32, device=device)
    return t.contiguous()


def group_norm_silu_forward(x, weight, bias, groups: int, eps: float, silu: bool):
    """x: [B, C, *spatial] -> (y like x, mean [B*G], rstd [B*G] fp32)."""
    x = _layout(x)
    channels_last = not x.is_contiguous()
    B, C = x.shape[:2]
    HW = math.prod(x.shape[2:])
    assert C % groups == 0, f"channels {C} not divisible by groups {groups}"
    if x.numel() == 0:
        stat = torch.zeros(B * groups, dtype=torch.float32, device=x.device)
        return torch.empty_like(x), stat, stat.clone()
    cfg = _config(B, C, HW, groups, channels_last, config_device(x))
    S = cfg["S"]
    part = torch.empty(3, B * groups, S, dtype=torch.float32, device=x.device)
    mean = torch.empty(B * groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)  # keeps x's (NCHW or NHWC) strides
    grid = (B * groups, S)
    common = dict(C=C, HW=HW, G=groups, CG=cfg["CG"], S=S, SP=cfg["SP"], C_PER=cfg["C_PER"],
                  P_PER=cfg["P_PER"], CHANNELS_LAST=channels_last, BLOCK_C=cfg["BLOCK_C"],
                  BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["num_warps"])
    launch(_gn_fwd_stats_kernel, grid, x, part[0], part[1], part[2], **common)
    launch(_gn_fwd_apply_kernel, grid, x, y, weight, bias, part[0], part[1], part[2], mean, rstd, eps,
                               SILU=silu, BLOCK_S=triton.next_power_of_2(S), **common)
    return y, mean, rstd


def group_norm_silu_backward(dy, x, weight, bias, mean, rstd, groups: int, silu: bool,
                             need_dx: bool = True, need_dwdb: bool = False):
    """-> (dx like x or None, dw [C] fp32 or None, db [C] fp32 or None)."""
    x = _layout(x)
    channels_last = not x.is_contiguous()
    dy = dy.contiguous(memory_format=torch.channels_last if channels_last else
                       torch.contiguous_format)
    B, C = x.shape[:2]
    HW = math.prod(x.shape[2:])
    if x.numel() == 0:
        zeros = torch.zeros(C, dtype=torch.float32, device=x.device)
        return (torch.zeros_like(x) if need_dx else None,
                zeros if need_dwdb else None, zeros.clone() if need_dwdb else None)
    cfg = _config(B, C, HW, groups, channels_last, config_device(x))
    S, SP = cfg["S"], cfg["SP"]
    part = torch.empty(2, B * groups, S, dtype=torch.float32, device=x.device)
    if need_dwdb:  # every (b, sp, c) entry is written by exactly one program
        wpart = torch.empty(2, B, SP, C, dtype=torch.float32, device=x.device)
    else:
        wpart = part  # never touched: WEIGHT_GRAD=False compiles the stores away
    grid = (B * groups, S)
    common = dict(C=C, HW=HW, G=groups, CG=cfg["CG"], S=S, SP=SP, C_PER=cfg["C_PER"],
                  P_PER=cfg["P_PER"], SILU=silu, CHANNELS_LAST=channels_last,
                  BLOCK_C=cfg["BLOCK_C"], BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["num_warps"])
    launch(_gn_bwd_reduce_kernel, grid, x, dy, weight, bias, mean, rstd, part[0], part[1], wpart[0],
                                wpart[1], WEIGHT_GRAD=need_dwdb, **common)
    dx = dw = db = None
    if need_dx:
        dx = torch.empty_like(x)
        launch(_gn_bwd_apply_kernel, grid, x, dy, dx, weight, bias, mean, rstd, part[0], part[1],
                                   BLOCK_S=triton.next_power_of_2(S), **common)
    if need_dwdb:
        dw, db = wpart.sum(dim=(1, 2))
    return dx, dw, db


class GroupNormSiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, silu: bool):
        x = _layout(x)
        C = x.shape[1]
        w = _affine(weight, C, 1.0, x.device)
        b = _affine(bias, C, 0.0, x.device)
        y, mean, rstd = group_norm_silu_forward(x, w, b, groups, eps, silu)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        ctx.affine = (weight is not None, bias is not None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1] and ctx.affine[0]
        need_b = ctx.needs_input_grad[2] and ctx.affine[1]
        dx, dw, db = group_norm_silu_backward(dy, x, w, b, mean, rstd, ctx.groups, ctx.silu,
                                              need_dx=need_dx, need_dwdb=need_w or need_b)
        dw = dw.to(w.dtype) if need_w else None
        db = db.to(b.dtype) if need_b else None
        return dx, dw, db, None, None, None


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    groups: int, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """Fused GroupNorm (fp32 statistics and affine) + optional SiLU.

    x: [B, C, *spatial] fp32/fp16/bf16, NCHW- or channels_last-contiguous (other layouts are
    copied); weight, bias: [C] of any float dtype, or None. Returns y with x's shape, dtype
    and memory layout.
    """
    return GroupNormSiLUFunction.apply(x, weight, bias, groups, eps, silu)


def precompile_task(shape, dtype: torch.dtype, weight_dtype: torch.dtype, groups: int, silu: bool,
                    channels_last: bool, backward: bool = True):
    """A callable that makes this op's launches for x of `shape` (forward; with `backward`, the
    input-gradient backward too) on meta tensors: run it under kernels.precompile.compile_only()
    to compile them without memory or launches."""
    def task():
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        x = torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)
        w = torch.empty(shape[1], dtype=weight_dtype, device="meta")
        y, mean, rstd = group_norm_silu_forward(x, w, torch.empty_like(w), groups, 1e-5, silu)
        if backward:
            group_norm_silu_backward(torch.empty_like(y), x, w, w, mean, rstd, groups, silu)
    return task


def group_norm_silu_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        groups: int, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """Plain PyTorch reference, the ti_fast/models/ops.py torch path: half inputs computed in
    fp32 with one cast out (float64 inputs stay float64, for a high-precision truth)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = F.group_norm(x.to(acc), groups, None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
