"""Flash attention, forward and backward, in Triton, without padding the head dim.

FlashAttention: Dao, Fu, Ermon, Rudra & Re, "FlashAttention: Fast and Memory-Efficient Exact
Attention with IO-Awareness" (NeurIPS 2022); FlashAttention-2: Dao, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning" (2023). Structure after FA2 and the
Triton "fused attention" tutorial (separate dK/dV and dQ passes, no atomics).

Math, per (batch, head); q: [Tq, D], k, v: [Tk, D], scale = 1/sqrt(D):

    S   = q k^T * scale                                  # [Tq, Tk], never stored
          (causal: S[i, j] = -inf for j > i, top-left aligned as SDPA's is_causal)
    L   = logsumexp(S, -1)                               # [Tq] fp32: saved (natural log)
    P   = exp(S - L)                                     # softmax(S)
    O   = P v                                            # [Tq, D]

Forward: one program per BLOCK_M query rows walks the keys in BLOCK_N blocks with the online
softmax (running max m, running sum l, the accumulator rescaled by exp(m_old - m_new)), in base
2: S2 = q k^T * (scale * log2 e), exp2 instead of exp (log2 e folded into the scale, one
multiply per score). Scores and sums are fp32; P is rounded to the input dtype for the P v dot
(fp32 accumulation), as FA2 does.

Backward (dO: [Tq, D]); saved: q, k, v, O, L (fp32 [B, H, Tq]); P is recomputed from L:

    delta = rowsum(dO * O)                               # [Tq] fp32 (= rowsum(P * dP))
    dP    = dO v^T                                       # [Tq, Tk]
    dS    = P * (dP - delta[:, None])
    dV    = P^T dO ;  dK = dS^T q * scale ;  dQ = dS k * scale

Three kernels: (1) delta; (2) one program per BLOCK_N keys accumulates dK, dV over the query
blocks (optionally split over several programs, fp32 partials summed afterwards: cross-attention
has only 77 keys, one or two key blocks per head, too few programs to fill the GPU); (3) one
program per BLOCK_M queries accumulates dQ over the key blocks. Deterministic, no atomics.

Head dim split. tl.arange needs power-of-two lengths and tl.dot dims >= 16, so a head dim D is
two column tiles: D0 = the largest power of two <= D (at least 16) and, when D > D0, a remainder
tile D1 = next_power_of_two(D - D0) (at least 16) whose columns past D are masked:

    D = 40 -> 32 + 16,  80 -> 64 + 16,  160 -> 128 + 32,  64 -> 64,  128 -> 128,  8 -> 16 (masked)

Every product over D is two dots (S = q0 k0^T + q1 k1^T, dP likewise) and every [*, D] result two
accumulators (O0 = P v0, O1 = P v1; dV, dK, dQ likewise). SD1.5's dominant head dim 40 then
costs 48 columns instead of the 64 of a padded power-of-two tile (cuDNN / flash in SDPA).
Any D that is a multiple of 8, up to 256, compiles from the one source (D0, D1 constexpr).

Layouts. q, k, v: [B, H, T, D] with any strides as long as the last dim is contiguous (the UNet
passes `x.view(b, n, h, d).transpose(1, 2)` of a linear's output; nothing is copied). O, dQ,
dK, dV are allocated [B, T, H, D]-contiguous and returned transposed to [B, H, T, D], so the
caller's `o.transpose(1, 2).reshape(b, n, h * d)` is a free view.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# fp32 inputs: dot precision ("ieee" = true fp32, matches torch's fp32 matmul; "tf32x3" is
# near-fp32 and faster on tensor cores; "tf32" loses ~3 digits).
FP32_PRECISION = "ieee"
# Per-pass overrides of the heuristic config, merged over it: {"fwd": {"BLOCK_M": 64, ...},
# "dkdv": {..., "SPLITS": 2}, "dq": {...}}. The bench's --sweep sets it; also accepted per call.
CONFIG_OVERRIDE: dict = {}
PROGRAMS_PER_SM = 2  # dK/dV: split the query loop until the grid holds about this many per SM
CPU_SMS = 8  # what the interpreter pretends to have (so that tests exercise the split)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load(
    base,  # pointer to row 0, column 0 of a [T, D] slice (one batch and head)
    rows,  # [R] row indices
    stride_row,  # elements between rows
    cols,  # [C] column indices (a power-of-two tile of the head dim)
    T,  # rows that exist
    HEAD_DIM: tl.constexpr,  # columns that exist
    EVEN_R: tl.constexpr,  # every row of the tile exists: no row mask
    MASK_C: tl.constexpr,  # the tile runs past HEAD_DIM: mask columns
):
    # -> [R, C] tile, zeros where masked
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if EVEN_R:
        if MASK_C:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=(rows[:, None] < T) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
    return x


@triton.jit
def _store(base, rows, stride_row, cols, x, T, HEAD_DIM: tl.constexpr, EVEN_R: tl.constexpr,
           MASK_C: tl.constexpr):
    # store an [R, C] tile (same arguments as _load)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    x = x.to(base.dtype.element_ty)
    if EVEN_R:
        if MASK_C:
            tl.store(ptrs, x, mask=cols[None, :] < HEAD_DIM)
        else:
            tl.store(ptrs, x)
    else:
        if MASK_C:
            tl.store(ptrs, x, mask=(rows[:, None] < T) & (cols[None, :] < HEAD_DIM))
        else:
            tl.store(ptrs, x, mask=rows[:, None] < T)


@triton.jit
def _load_rows(base, rows, T, other, EVEN_R: tl.constexpr):
    # [R] fp32 per-row values (LSE, delta), `other` past T
    if EVEN_R:
        x = tl.load(base + rows)
    else:
        x = tl.load(base + rows, mask=rows < T, other=other)
    return x


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # *T  [B, H, TQ|TK, HEAD_DIM], last dim contiguous
    O,  # *T  out [B, H, TQ, HEAD_DIM] (memory [B, TQ, H, HEAD_DIM])
    LSE,  # *fp32 out [B, H, TQ] contiguous: logsumexp of each row of S (natural log)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H, TQ, TK,
    qk_scale,  # scale * log2(e)
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,  # D1 == 0: no remainder tile
    MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,  # tile 0 / 1 runs past HEAD_DIM
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,  # TQ % BLOCK_M == 0, TK % BLOCK_N == 0
    PRECISION: tl.constexpr,  # tl.dot input_precision (matters for fp32 only)
    SU: tl.constexpr,  # strides come in units of SU elements (see _strides)
):
    stride_qb, stride_qh, stride_qm = stride_qb * SU, stride_qh * SU, stride_qm * SU
    stride_kb, stride_kh, stride_kn = stride_kb * SU, stride_kh * SU, stride_kn * SU
    stride_vb, stride_vh, stride_vn = stride_vb * SU, stride_vh * SU, stride_vn * SU
    stride_ob, stride_oh, stride_om = stride_ob * SU, stride_oh * SU, stride_om * SU
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * TQ

    offs_m = start_m + tl.arange(0, BLOCK_M)
    arange_n = tl.arange(0, BLOCK_N)
    c0 = tl.arange(0, D0)
    q0 = _load(Q, offs_m, stride_qm, c0, TQ, HEAD_DIM, EVEN_M, MASK_D0)  # [BLOCK_M, D0]
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        q1 = _load(Q, offs_m, stride_qm, c1, TQ, HEAD_DIM, EVEN_M, MASK_D1)  # [BLOCK_M, D1]
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max of S2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(S2 - m_i)

    hi = TK
    if CAUSAL:  # keys past the block's last query are all masked
        hi = tl.minimum(TK, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k0 = _load(K, offs_n, stride_kn, c0, TK, HEAD_DIM, EVEN_N, MASK_D0)  # [BLOCK_N, D0]
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if D1 > 0:
            k1 = _load(K, offs_n, stride_kn, c1, TK, HEAD_DIM, EVEN_N, MASK_D1)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(offs_n[None, :] < TK, s, float("-inf"))
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        # key 0 is in the first block and visible to every row, so m_new is finite from then on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load(V, offs_n, stride_vn, c0, TK, HEAD_DIM, EVEN_N, MASK_D0)  # [BLOCK_N, D0]
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            v1 = _load(V, offs_n, stride_vn, c1, TK, HEAD_DIM, EVEN_N, MASK_D1)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    _store(O, offs_m, stride_om, c0, acc0 * inv_l[:, None], TQ, HEAD_DIM, EVEN_M, MASK_D0)
    if D1 > 0:
        _store(O, offs_m, stride_om, c1, acc1 * inv_l[:, None], TQ, HEAD_DIM, EVEN_M, MASK_D1)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # base 2 -> natural log
    if EVEN_M:
        tl.store(LSE + offs_m, lse)
    else:
        tl.store(LSE + offs_m, lse, mask=offs_m < TQ)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,  # *T  [B, H, TQ, HEAD_DIM], last dim contiguous
    DELTA,  # *fp32 out [B, H, TQ] contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, TQ,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM (memory-bound: masked lanes are free)
    SU: tl.constexpr,
):
    stride_ob, stride_oh, stride_om = stride_ob * SU, stride_oh * SU, stride_om * SU
    stride_dob, stride_doh, stride_dom = stride_dob * SU, stride_doh * SU, stride_dom * SU
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < TQ) & (cols[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + cols[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * TQ + offs_m, tl.sum(o * do, 1), mask=offs_m < TQ)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # *T  [B, H, TQ|TK, HEAD_DIM], last dim contiguous
    LSE, DELTA,  # *fp32 [B, H, TQ] contiguous
    DK, DV,  # out [SPLITS, B, H, TK, HEAD_DIM] (any strides; fp32 partials when SPLITS > 1)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,  # shared by DK and DV
    H, TQ, TK,
    sm_scale,  # 1/sqrt(D)
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SU: tl.constexpr,
):
    stride_qb, stride_qh, stride_qm = stride_qb * SU, stride_qh * SU, stride_qm * SU
    stride_kb, stride_kh, stride_kn = stride_kb * SU, stride_kh * SU, stride_kn * SU
    stride_vb, stride_vh, stride_vn = stride_vb * SU, stride_vh * SU, stride_vn * SU
    stride_dob, stride_doh, stride_dom = stride_dob * SU, stride_doh * SU, stride_dom * SU
    stride_dks, stride_dkb, stride_dkh, stride_dkn = (stride_dks * SU, stride_dkb * SU,
                                                      stride_dkh * SU, stride_dkn * SU)
    # grid (TK blocks, B*H, SPLITS): this program's BLOCK_N keys, over its share of the queries.
    # Computed transposed (keys as rows) so that P^T and dS^T feed the dots without a transpose.
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += bh.to(tl.int64) * TQ
    DELTA += bh.to(tl.int64) * TQ
    out_off = split.to(tl.int64) * stride_dks + b * stride_dkb + h * stride_dkh
    DK += out_off
    DV += out_off

    offs_n = start_n + tl.arange(0, BLOCK_N)
    arange_m = tl.arange(0, BLOCK_M)
    c0 = tl.arange(0, D0)
    # rows past TK load as zeros: their dK, dV are garbage-free zeros-in and never stored
    k0 = _load(K, offs_n, stride_kn, c0, TK, HEAD_DIM, EVEN_N, MASK_D0)  # [BLOCK_N, D0]
    v0 = _load(V, offs_n, stride_vn, c0, TK, HEAD_DIM, EVEN_N, MASK_D0)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        k1 = _load(K, offs_n, stride_kn, c1, TK, HEAD_DIM, EVEN_N, MASK_D1)  # [BLOCK_N, D1]
        v1 = _load(V, offs_n, stride_vn, c1, TK, HEAD_DIM, EVEN_N, MASK_D1)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)

    per = tl.cdiv(tl.cdiv(TQ, BLOCK_M), n_splits) * BLOCK_M  # query rows per split
    lo = split * per
    hi = tl.minimum(TQ, lo + per)
    if CAUSAL:  # queries before this key block see none of it
        lo = tl.maximum(lo, (start_n // BLOCK_M) * BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + arange_m
        q0 = _load(Q, offs_m, stride_qm, c0, TQ, HEAD_DIM, EVEN_M, MASK_D0)  # [BLOCK_M, D0]
        do0 = _load(DO, offs_m, stride_dom, c0, TQ, HEAD_DIM, EVEN_M, MASK_D0)
        # rows past TQ: LSE = +inf makes their P exactly 0
        lse2 = _load_rows(LSE, offs_m, TQ, float("inf"), EVEN_M) * 1.4426950408889634
        delta = _load_rows(DELTA, offs_m, TQ, 0.0, EVEN_M)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
        if D1 > 0:
            q1 = _load(Q, offs_m, stride_qm, c1, TQ, HEAD_DIM, EVEN_M, MASK_D1)
            do1 = _load(DO, offs_m, stride_dom, c1, TQ, HEAD_DIM, EVEN_M, MASK_D1)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])  # P^T
        if CAUSAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)  # dS^T, rounded like P for the dots
        p_t = p_t.to(do0.dtype)
        dv0 = tl.dot(p_t, do0, dv0, input_precision=PRECISION)
        dk0 = tl.dot(ds_t, q0, dk0, input_precision=PRECISION)
        if D1 > 0:
            dv1 = tl.dot(p_t, do1, dv1, input_precision=PRECISION)
            dk1 = tl.dot(ds_t, q1, dk1, input_precision=PRECISION)

    _store(DV, offs_n, stride_dkn, c0, dv0, TK, HEAD_DIM, EVEN_N, MASK_D0)
    _store(DK, offs_n, stride_dkn, c0, dk0 * sm_scale, TK, HEAD_DIM, EVEN_N, MASK_D0)
    if D1 > 0:
        _store(DV, offs_n, stride_dkn, c1, dv1, TK, HEAD_DIM, EVEN_N, MASK_D1)
        _store(DK, offs_n, stride_dkn, c1, dk1 * sm_scale, TK, HEAD_DIM, EVEN_N, MASK_D1)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # *T  [B, H, TQ|TK, HEAD_DIM], last dim contiguous
    LSE, DELTA,  # *fp32 [B, H, TQ] contiguous
    DQ,  # *T  out [B, H, TQ, HEAD_DIM] (memory [B, TQ, H, HEAD_DIM])
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, TQ, TK,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SU: tl.constexpr,
):
    stride_qb, stride_qh, stride_qm = stride_qb * SU, stride_qh * SU, stride_qm * SU
    stride_kb, stride_kh, stride_kn = stride_kb * SU, stride_kh * SU, stride_kn * SU
    stride_vb, stride_vh, stride_vn = stride_vb * SU, stride_vh * SU, stride_vn * SU
    stride_dob, stride_doh, stride_dom = stride_dob * SU, stride_doh * SU, stride_dom * SU
    stride_dqb, stride_dqh, stride_dqm = stride_dqb * SU, stride_dqh * SU, stride_dqm * SU
    # grid (TQ blocks, B*H): this program's BLOCK_M queries, over all (visible) keys.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += bh.to(tl.int64) * TQ
    DELTA += bh.to(tl.int64) * TQ

    offs_m = start_m + tl.arange(0, BLOCK_M)
    arange_n = tl.arange(0, BLOCK_N)
    c0 = tl.arange(0, D0)
    q0 = _load(Q, offs_m, stride_qm, c0, TQ, HEAD_DIM, EVEN_M, MASK_D0)  # [BLOCK_M, D0]
    do0 = _load(DO, offs_m, stride_dom, c0, TQ, HEAD_DIM, EVEN_M, MASK_D0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        q1 = _load(Q, offs_m, stride_qm, c1, TQ, HEAD_DIM, EVEN_M, MASK_D1)  # [BLOCK_M, D1]
        do1 = _load(DO, offs_m, stride_dom, c1, TQ, HEAD_DIM, EVEN_M, MASK_D1)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    lse2 = _load_rows(LSE, offs_m, TQ, float("inf"), EVEN_M) * 1.4426950408889634
    delta = _load_rows(DELTA, offs_m, TQ, 0.0, EVEN_M)

    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + arange_n
        k0 = _load(K, offs_n, stride_kn, c0, TK, HEAD_DIM, EVEN_N, MASK_D0)  # [BLOCK_N, D0]
        v0 = _load(V, offs_n, stride_vn, c0, TK, HEAD_DIM, EVEN_N, MASK_D0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
        if D1 > 0:
            k1 = _load(K, offs_n, stride_kn, c1, TK, HEAD_DIM, EVEN_N, MASK_D1)
            v1 = _load(V, offs_n, stride_vn, c1, TK, HEAD_DIM, EVEN_N, MASK_D1)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if not EVEN_N:
            p = tl.where(offs_n[None, :] < TK, p, 0.0)
        if CAUSAL:
            p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)

    _store(DQ, offs_m, stride_dqm, c0, dq0 * sm_scale, TQ, HEAD_DIM, EVEN_M, MASK_D0)
    if D1 > 0:
        _store(DQ, offs_m, stride_dqm, c1, dq1 * sm_scale, TQ, HEAD_DIM, EVEN_M, MASK_D1)


# ----------------------------------------------------------------------------- configuration


def head_dim_split(D: int) -> tuple[int, int]:
    """(D0, D1): the power-of-two main tile and remainder tile (0 = none) covering D."""
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    d1 = max(16, triton.next_power_of_2(rest)) if rest > 0 else 0
    return d0, d1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def default_config(D: int, TQ: int, TK: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes and launch options of the three passes, from (D, TQ, TK, dtype); Hopper-minded.

    fwd   BLOCK_M queries x BLOCK_N keys; 128 x 64 with 4 warps up to 64 padded columns (SD's
          D=40 is 48), 8 warps above (the fp32 [128, D] accumulator needs the registers).
    dkdv  BLOCK_N keys x BLOCK_M queries per iteration; dq  BLOCK_M queries x BLOCK_N keys.
          64 x 64, 4 or 8 warps: the backward holds ~4 [BLOCK, D] fp32 accumulators.
    Short query sequences (the 8x8 mid block: 64 tokens) take BLOCK_M = 64 in the forward
    (a 128-row block would be half masked). fp32 at wide D takes 64-row (and, past 128
    columns, 32-key) blocks: twice the bytes a tile. Under the interpreter (CPU tensors)
    every block is 32: tiny test shapes, fewer steps. Sweep on the GPU: bench --sweep.
    """
    d0, d1 = head_dim_split(D)
    width = d0 + d1
    if device.type != "cuda":
        blk = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return {"fwd": dict(blk), "dkdv": dict(blk, SPLITS=None), "dq": dict(blk)}
    wide = width > 64
    big = dtype == torch.float32
    bm = 64 if (TQ <= 64 or big and wide) else 128
    fwd = dict(BLOCK_M=bm, BLOCK_N=64 if not (big and width > 128) else 32,
               num_warps=8 if wide or bm == 128 and big else 4,
               num_stages=3 if width <= 64 else 2)
    bwd_n = 32 if big and width > 128 else 64
    dkdv = dict(BLOCK_M=bwd_n, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=2, SPLITS=None)
    dq = dict(BLOCK_M=64, BLOCK_N=bwd_n, num_warps=8 if wide else 4, num_stages=2)
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def get_config(D: int, TQ: int, TK: int, dtype: torch.dtype, device: torch.device,
               override: dict | None = None) -> dict:
    """default_config with CONFIG_OVERRIDE, then `override`, merged over each pass."""
    cfg = default_config(D, TQ, TK, dtype, device)
    for extra in (CONFIG_OVERRIDE, override or {}):
        for k, v in extra.items():
            cfg[k] = {**cfg[k], **v}
    return cfg


def _splits(cfg: dict, B: int, H: int, TQ: int, TK: int, device: torch.device) -> int:
    """How many programs share one key block's query loop. 1 when the key blocks alone fill
    every SM once (splitting costs an fp32 partial per split, written and summed); otherwise
    enough for ~PROGRAMS_PER_SM programs per SM, never more than there are query blocks.
    SD1.5 batch 8 on 132 SMs: only cross-attention at 4096 queries splits (2 x 64 -> 3 x 128)."""
    if cfg.get("SPLITS"):
        return max(1, min(int(cfg["SPLITS"]), triton.cdiv(TQ, cfg["BLOCK_M"])))
    programs = triton.cdiv(TK, cfg["BLOCK_N"]) * B * H
    if programs >= _sms(device):
        return 1
    target = PROGRAMS_PER_SM * _sms(device)
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(TQ, cfg["BLOCK_M"])))


# ----------------------------------------------------------------------------- launchers


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> bool:
    """True when attention(q, k, v, causal) runs here; otherwise it raises ValueError (the
    dispatch then uses SDPA)."""
    return _unsupported(q, k, v) is None


def _unsupported(q, k, v) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k, v must be tensors"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be [B, H, T, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        return f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"dtypes must be one of fp16/bf16/fp32 and equal, got {q.dtype}, {k.dtype}, {v.dtype}"
    if D % 8 or not 8 <= D <= MAX_HEAD_DIM:
        return f"head dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {D}"
    if k.shape[2] == 0:
        return "no keys (Tk = 0)"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "the last dim of q, k, v must be contiguous (stride 1)"
    if not (q.device == k.device == v.device):
        return "q, k, v must be on one device"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    return None


def _check(q, k, v) -> None:
    why = _unsupported(q, k, v)
    if why is not None:
        raise ValueError(f"ti_fast.kernels.attention: {why}")


def _precision(dtype: torch.dtype) -> str:
    return FP32_PRECISION if dtype == torch.float32 else "ieee"  # ignored for fp16/bf16


def _out_like(t: torch.Tensor, T: int, dtype=None) -> torch.Tensor:
    """[B, H, T, D] view of a new [B, T, H, D]-contiguous tensor."""
    B, H, _, D = t.shape
    return torch.empty(B, T, H, D, dtype=dtype or t.dtype, device=t.device).transpose(1, 2)


def _strides(*tensors, extra=()) -> tuple[list[int], int]:
    """The [b, h, t] strides of each [B, H, T, D] tensor (plus `extra` ints), in units of SU
    elements, and SU. SU = 8 when every stride is a multiple of 8 and every base 16-byte
    aligned (always, for the UNet's views with D % 8 == 0): the kernels multiply the strides
    back by the constexpr SU, which tells the compiler that rows start 16-byte aligned, so
    loads vectorise (D = 40: a head starts 80 bytes after the previous one, and a plain int
    stride of 40 would only be known to be a multiple of 1)."""
    strides = [s for t in tensors for s in t.stride()[-4:-1]] + list(extra)
    aligned = all(s % 8 == 0 for s in strides) and all(
        t.data_ptr() % 16 == 0 for t in tensors)
    su = 8 if aligned else 1
    return [s // su for s in strides], su


def _dims(q, k, cfg_pass: dict, causal: bool, su: int) -> dict:
    D = q.shape[-1]
    d0, d1 = head_dim_split(D)
    bm, bn = cfg_pass["BLOCK_M"], cfg_pass["BLOCK_N"]
    return dict(HEAD_DIM=D, D0=d0, D1=d1, MASK_D0=D < d0, MASK_D1=d1 > 0 and d0 + d1 > D,
                BLOCK_M=bm, BLOCK_N=bn, CAUSAL=bool(causal),
                EVEN_M=q.shape[2] % bm == 0, EVEN_N=k.shape[2] % bn == 0,
                PRECISION=_precision(q.dtype), SU=su, num_warps=cfg_pass["num_warps"],
                num_stages=cfg_pass["num_stages"])


def attention_forward(q, k, v, causal: bool = False, config: dict | None = None):
    """q: [B, H, Tq, D], k, v: [B, H, Tk, D] -> (o [B, H, Tq, D] in [B, Tq, H, D] memory,
    lse [B, H, Tq] fp32, natural log)."""
    _check(q, k, v)
    B, H, TQ, D = q.shape
    TK = k.shape[2]
    o = _out_like(q, TQ)
    lse = torch.empty(B, H, TQ, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    cfg = get_config(D, TQ, TK, q.dtype, q.device, config)["fwd"]
    scale = 1.0 / math.sqrt(D)
    strides, su = _strides(q, k, v, o)
    grid = (triton.cdiv(TQ, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](q, k, v, o, lse, *strides, H, TQ, TK, scale * LOG2E,
                           **_dims(q, k, cfg, causal, su))
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal: bool = False, config: dict | None = None,
                       need_dq: bool = True, need_dkdv: bool = True):
    """-> (dq like q or None, dk, dv like k or None), each [B, H, T, D] in [B, T, H, D] memory."""
    B, H, TQ, D = q.shape
    TK = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = _out_like(q, TQ) if need_dq else None
    dk = dv = None
    if q.numel() == 0:  # no queries: zero gradients
        return (dq, torch.zeros_like(k) if need_dkdv else None,
                torch.zeros_like(v) if need_dkdv else None)
    cfgs = get_config(D, TQ, TK, q.dtype, q.device, config)
    scale = 1.0 / math.sqrt(D)
    delta = torch.empty(B, H, TQ, dtype=torch.float32, device=q.device)
    strides, su = _strides(o, do)
    bm = 64
    _attn_bwd_delta_kernel[(triton.cdiv(TQ, bm), B * H)](
        o, do, delta, *strides, H, TQ, HEAD_DIM=D, BLOCK_M=bm, BLOCK_D=triton.next_power_of_2(D),
        SU=su, num_warps=4)
    if need_dkdv:
        cfg = cfgs["dkdv"]
        splits = _splits(cfg, B, H, TQ, TK, q.device)
        if splits == 1:  # straight into [B, TK, H, D] of the input dtype
            dk, dv = _out_like(k, TK), _out_like(v, TK)
            dk_buf, dv_buf, s_stride = dk, dv, 0
        else:  # fp32 partials [S, B, TK, H, D], summed below
            part = torch.empty(2, splits, B, TK, H, D, dtype=torch.float32, device=q.device)
            dk_buf, dv_buf = part[0].transpose(2, 3), part[1].transpose(2, 3)
            s_stride = dk_buf.stride(0)
        # dk_buf and dv_buf share strides: the kernel takes one set
        strides, su = _strides(q, k, v, do, dk_buf, extra=(s_stride,))
        strides = strides[:12] + strides[15:] + strides[12:15]  # ..., s, b, h, n
        _attn_bwd_dkdv_kernel[(triton.cdiv(TK, cfg["BLOCK_N"]), B * H, splits)](
            q, k, v, do, lse, delta, dk_buf, dv_buf, *strides, H, TQ, TK, scale, scale * LOG2E,
            **_dims(q, k, cfg, causal, su))
        if splits > 1:
            dk, dv = part.sum(1).to(k.dtype).transpose(2, 3).unbind(0)
    if need_dq:
        cfg = cfgs["dq"]
        strides, su = _strides(q, k, v, do, dq)
        _attn_bwd_dq_kernel[(triton.cdiv(TQ, cfg["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, *strides, H, TQ, TK, scale, scale * LOG2E,
            **_dims(q, k, cfg, causal, su))
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, config: dict | None):
        o, lse = attention_forward(q, k, v, causal, config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.config = causal, config
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need_dq = ctx.needs_input_grad[0]
        need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.config,
                                        need_dq=need_dq, need_dkdv=need_dkdv)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              config: dict | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, flash-style (nothing of size Tq x Tk in memory).

    q: [B, H, Tq, D], k, v: [B, H, Tk, D], fp16/bf16/fp32, any strides with a contiguous last
    dim; D a multiple of 8 up to 256 (else ValueError: see supports). causal: key j visible to
    query i iff j <= i (SDPA's is_causal). Returns [B, H, Tq, D] in q's dtype, stored as
    [B, Tq, H, D] (so `.transpose(1, 2).reshape(B, Tq, H * D)` is a view). Differentiable in
    q, k and v. config: per-pass overrides of default_config (see CONFIG_OVERRIDE).
    """
    _check(q, k, v)
    return AttentionFunction.apply(q, k, v, bool(causal), config)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  causal: bool = False) -> torch.Tensor:
    """Plain PyTorch reference in the inputs' dtype (float64 inputs: a high-precision truth):
    softmax(q k^T * scale) v with the Tq x Tk scores materialised, as the math path."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return s.softmax(-1) @ v
