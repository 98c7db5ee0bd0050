"""Flash-attention kernel (ti_fast/kernels/attention.py) vs the plain-PyTorch reference: output and the
gradients of q, k and v.

CPU: the Triton kernels run in Triton's interpreter at tiny, awkward shapes (fp32, fp16; bf16
arithmetic is wrong in the interpreter): head dims that need the remainder tile (40, 80, 160,
24) or none (16, 64) or a masked main tile (8), sequence lengths that are not multiples of the
blocks, cross-attention with 77 keys, causal, non-contiguous inputs as the UNet passes them,
B*H > 1 and the split dK/dV pass. GPU (`gpu` marker): all dtypes at SD1.5 shapes.

TRITON_INTERPRET must be set before `import triton`, so, as in tests/test_geglu.py, the
interpreted tests run in one child pytest started by `test_interpreted_in_subprocess`.
Directly:
    TRITON_INTERPRET=1 python -m pytest tests/test_attention_kernel.py -m "not gpu"

Tolerance: against a float64 truth computed from the same (rounded) inputs, the kernel's max
error must be <= 2x the reference's own error in the test dtype, plus a small floor.
"""
from __future__ import annotations

import pytest
import torch

from kernel_testing import FLOOR, INTERPRET, interpreted, kernel_module, run_interpreted

SMALL = {"fwd": dict(BLOCK_M=16, BLOCK_N=16), "dkdv": dict(BLOCK_M=16, BLOCK_N=16),
         "dq": dict(BLOCK_M=16, BLOCK_N=16)}  # several blocks (and tails) at tiny shapes


@pytest.fixture
def fa():
    return kernel_module("attention")


@pytest.fixture
def fa_cuda():
    return kernel_module("attention", cuda=True)


@pytest.mark.skipif(INTERPRET, reason="already interpreting in this process")
def test_interpreted_in_subprocess():
    run_interpreted(__file__)


def heads(B, T, H, D, dtype, device="cpu", pad=0, scale=1.0):
    """[B, H, T, D] as the UNet builds it: a [B, T, H*D (+pad)] tensor viewed and transposed
    (pad > 0: rows further apart than H*D, a column slice of a wider tensor)."""
    x = (torch.randn(B, T, H * D + pad, device=device) * scale).to(dtype)
    return x[..., :H * D].view(B, T, H, D).transpose(1, 2)


def _run(mod, q, k, v, causal=False, config=None):
    """Forward + backward of kernel, same-dtype reference and float64 truth; compare o, dq,
    dk, dv with the tolerance rule of the module docstring."""
    dtype = q.dtype
    do = torch.randn(q.shape, device=q.device).to(dtype)

    def fwd_bwd(fn, *inputs):
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        o = fn(*inputs)
        return (o, *torch.autograd.grad(o, inputs, do.to(o.dtype)))

    got = fwd_bwd(lambda q, k, v: mod.attention(q, k, v, causal, config=config), q, k, v)
    ref = fwd_bwd(lambda q, k, v: mod.attention_ref(q, k, v, causal), q, k, v)
    truth = fwd_bwd(lambda q, k, v: mod.attention_ref(q, k, v, causal),
                    q.double(), k.double(), v.double())
    lines, bad = [], False
    for name, g, r, t, like in zip(("o", "dq", "dk", "dv"), got, ref, truth, (q, q, k, v)):
        assert g.shape == like.shape and g.dtype == dtype, (name, g.shape, g.dtype)
        assert torch.isfinite(g).all(), name
        err = (g.double() - t).abs().max().item() if t.numel() else 0.0
        base = (r.double() - t).abs().max().item() if t.numel() else 0.0
        floor = FLOOR[dtype] * max(1.0, t.abs().max().item() if t.numel() else 0.0)
        ok = err <= 2 * base + floor
        bad |= not ok
        lines.append(f"  {name:>2}: kernel err {err:.3e}  torch {str(dtype)[6:]} err {base:.3e}"
                     f"  floor {floor:.1e}  {'ok' if ok else 'FAIL'}")
    assert not bad, (f"attention q={tuple(q.shape)} k={tuple(k.shape)} causal={causal} {dtype}\n"
                     + "\n".join(lines))
    return got


# ----------------------------------------------------------------------------- CPU, interpreted

CASES = [  # B, H, Tq, Tk, D, causal, config
    (1, 2, 40, 40, 40, False, SMALL),  # SD's dominant head dim: 32 + 16, row tails
    (2, 1, 70, 77, 40, False, None),  # cross-attention: 77 keys, dK/dV split in 3 (CPU_SMS)
    (1, 2, 33, 33, 64, True, SMALL),  # text encoder: causal, one tile
    (1, 1, 24, 19, 80, False, SMALL),  # 64 + 16
    (1, 1, 16, 16, 16, False, None),  # smallest tile, everything even
    (1, 1, 9, 13, 8, False, None),  # main tile masked (8 of 16)
    (1, 1, 18, 20, 160, False, SMALL),  # 128 + 32, 16 masked
    (1, 1, 10, 30, 24, True, SMALL),  # causal with Tq < Tk (top-left), 16 + 16, 8 masked
    (1, 1, 37, 5, 40, True, SMALL),  # causal with Tq > Tk: late rows see every key
]


def _ids(case):
    B, H, tq, tk, d, causal, cfg = case
    return f"{B}x{H}-q{tq}-k{tk}-D{d}{'-causal' if causal else ''}{'-b16' if cfg else ''}"


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_interpreted(fa, case, dtype):
    B, H, tq, tk, d, causal, cfg = case
    torch.manual_seed(0)
    q, k, v = heads(B, tq, H, d, dtype), heads(B, tk, H, d, dtype), heads(B, tk, H, d, dtype)
    assert H == 1 or not q.is_contiguous()
    _run(fa, q, k, v, causal, cfg)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreted_strides(fa, dtype):
    """Padded rows with strides that are multiples of 8 (16-byte aligned path), odd strides
    (unaligned path), and plain contiguous [B, H, T, D] inputs; larger logits."""
    torch.manual_seed(1)
    for pad in (8, 3):
        q = heads(2, 21, 2, 40, dtype, pad=pad, scale=2.0)
        k, v = heads(2, 27, 2, 40, dtype, pad=pad, scale=2.0), heads(2, 27, 2, 40, dtype, pad=pad)
        strides, su = fa._strides(q, k, v)
        assert su == (8 if pad == 8 else 1), (pad, strides)
        _run(fa, q, k, v, False, SMALL)
    q, k, v = (torch.randn(1, 2, 19, 24).to(dtype) for _ in range(3))
    _run(fa, q, k, v, True, SMALL)


@interpreted
def test_interpreted_layout_lse_and_partial_grads(fa):
    """Outputs and gradients are [B, T, H, D] in memory; LSE is logsumexp(q k^T * scale);
    only the gradients asked for are computed; the dK/dV split gives what no split gives."""
    torch.manual_seed(2)
    q, k, v = heads(2, 23, 3, 40, torch.float32), heads(2, 30, 3, 40, torch.float32), \
        heads(2, 30, 3, 40, torch.float32)
    o, lse = fa.attention_forward(q, k, v, config=SMALL)
    assert o.transpose(1, 2).is_contiguous()
    s = (q.double() @ k.double().transpose(-1, -2)) / 40 ** 0.5
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), rtol=0, atol=1e-5)
    do = torch.randn_like(o)
    full = fa.attention_backward(do, q, k, v, o, lse, config=SMALL)
    for g in full:
        assert g.transpose(1, 2).is_contiguous()
    split = fa.attention_backward(do, q, k, v, o, lse,
                                  config={**SMALL, "dkdv": {**SMALL["dkdv"], "SPLITS": 2}})
    nosplit = fa.attention_backward(do, q, k, v, o, lse,
                                    config={**SMALL, "dkdv": {**SMALL["dkdv"], "SPLITS": 1}})
    for a, b in zip(split[1:], nosplit[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # q frozen: no dq; k, v frozen: no dk, dv
    kk, vv = k.detach().requires_grad_(True), v.detach().requires_grad_(True)
    dk, dv = torch.autograd.grad(fa.attention(q, kk, vv, config=SMALL), (kk, vv), do)
    torch.testing.assert_close(dk, full[1]), torch.testing.assert_close(dv, full[2])
    qq = q.detach().requires_grad_(True)
    (dq,) = torch.autograd.grad(fa.attention(qq, k, v, config=SMALL), (qq,), do)
    torch.testing.assert_close(dq, full[0])


@interpreted
def test_interpreted_empty_queries(fa):
    q, k, v = heads(1, 0, 2, 40, torch.float32), heads(1, 5, 2, 40, torch.float32), \
        heads(1, 5, 2, 40, torch.float32)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o = fa.attention(q, k, v)
    assert o.shape == (1, 2, 0, 40)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()


@interpreted
def test_interpreted_bench_harness(fa):
    from bench.bench_attention import COLUMNS, run
    from bench.common import format_kernel_table
    rows = run(shapes=[("self", 1, 2, 20, 20, 40)], dtypes=["fp32"], iters=1, warmup=0,
               device="cpu")
    tri = [r for r in rows if r["impl"] == "triton"]
    assert len(tri) == 1 and tri[0]["status"] == "ok", rows
    assert tri[0]["max_abs_diff_vs_fp32"] < 1e-5, rows
    assert any(r["impl"] == "sdpa" and r["status"] == "ok" for r in rows), rows
    assert format_kernel_table(rows, COLUMNS, n_text=4).count("\n") == len(rows) + 1


def test_supports_and_errors(fa):
    """What the kernel refuses (ValueError; the dispatch falls back to SDPA). Needs no GPU."""
    f32 = torch.float32
    ok = heads(1, 4, 2, 40, f32)
    assert fa.supports(ok, ok, ok) == (torch.cuda.is_available() and ok.is_cuda or INTERPRET)
    bad = [
        (heads(1, 4, 2, 12, f32),) * 3,  # D not a multiple of 8
        (heads(1, 4, 1, 264, f32),) * 3,  # D > 256
        (torch.randn(1, 1, 40, 4).transpose(-1, -2),) * 3,  # last dim not contiguous (VAE)
        (ok, ok.half(), ok),  # mixed dtypes
        (ok, heads(1, 0, 2, 40, f32), heads(1, 0, 2, 40, f32)),  # no keys
        (ok, heads(1, 4, 2, 48, f32), heads(1, 4, 2, 48, f32)),  # head dims differ
        (heads(1, 4, 2, 40, torch.float64),) * 3,
    ]
    for q, k, v in bad:
        assert not fa.supports(q, k, v)
        with pytest.raises(ValueError, match="ti_fast.kernels.attention"):
            fa.attention(q, k, v)


def test_head_dim_split(fa):
    split = {d: fa.head_dim_split(d) for d in range(8, 257, 8)}
    assert split[40] == (32, 16) and split[80] == (64, 16) and split[160] == (128, 32)
    assert split[64] == (64, 0) and split[128] == (128, 0) and split[8] == (16, 0)
    for d, (d0, d1) in split.items():  # powers of two >= 16 covering d, never past 2x
        assert d0 >= 16 and d0 & (d0 - 1) == 0 and (d1 == 0 or d1 >= 16 and d1 & (d1 - 1) == 0)
        assert d <= d0 + d1 <= max(2 * d, 16)


def test_dkdv_split_heuristic(fa):
    cpu, blocks = torch.device("cpu"), {"BLOCK_M": 32, "BLOCK_N": 32}
    assert fa.CPU_SMS == 8
    assert fa._splits(blocks, 2, 1, 70, 77, cpu) == 3  # 6 key-block programs < 8 "SMs"
    assert fa._splits(blocks, 8, 8, 4096, 4096, cpu) == 1
    assert fa._splits({**blocks, "SPLITS": 5}, 1, 1, 40, 40, cpu) == 2  # <= query blocks


# ----------------------------------------------------------------------------- CPU, sm_90 compile

# sm_90 compile of the kernels as the launchers call them (CUDA configs): see
# tests/kernel_testing.py. The launchers' input check is switched off (it refuses CPU tensors
# outside the interpreter); the harness's fake driver compiles for sm_90 without launching.

AOT_CALLS = """
from ti_fast.kernels import attention as fa
fa._check = lambda q, k, v: None
fa.CPU_SMS = 132
cuda = torch.device("cuda")
def heads(B, T, H, D, dt):
    return torch.zeros(B, T, H * D, dtype=dt).view(B, T, H, D).transpose(1, 2)
for D, tq, tk, causal in [(40, 4096, 4096, False), (40, 4096, 77, False), (80, 1024, 1024, False),
                          (160, 256, 77, False), (160, 64, 64, False), (64, 77, 77, True)]:
    for dt in ((torch.bfloat16, torch.float16, torch.float32) if D == 40 and tk == 4096
               else (torch.bfloat16,)):
        TAG = f"D={D} q{tq} k{tk} causal={causal} {dt}"
        q, k, v = heads(2, tq, 8, D, dt), heads(2, tk, 8, D, dt), heads(2, tk, 8, D, dt)
        cfg = fa.default_config(D, tq, tk, dt, cuda)
        o, lse = fa.attention_forward(q, k, v, causal, config=cfg)
        fa.attention_backward(torch.zeros_like(o), q, k, v, o, lse, causal, config=cfg)
"""


def test_compiles_for_sm90():
    from kernel_testing import compile_for_sm90
    found = compile_for_sm90(AOT_CALLS)
    assert {f["kernel"] for f in found} == {"_attn_fwd_kernel", "_attn_bwd_delta_kernel",
                                           "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}, found
    assert len(found) == 4 * 8, found
    for f in found:  # 16-byte vector loads of q/k/v/dO rows (strides are multiples of 8)
        assert "ld.global.v4.b32" in f["loads"], f


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [  # B, H, Tq, Tk, D, causal: SD1.5 at 512 px and the text encoder
    (2, 8, 4096, 4096, 40, False),
    (2, 8, 4096, 77, 40, False),
    (2, 8, 1024, 1024, 80, False),
    (2, 8, 1024, 77, 80, False),
    (2, 8, 256, 256, 160, False),
    (2, 8, 256, 77, 160, False),
    (2, 8, 64, 64, 160, False),
    (2, 8, 64, 77, 160, False),
    (2, 12, 77, 77, 64, True),
    (3, 5, 333, 111, 72, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[_ids((*c, None)) for c in GPU_CASES])
def test_gpu_sd_shapes(fa_cuda, case, dtype):
    B, H, tq, tk, d, causal = case
    torch.manual_seed(0)
    q, k, v = (heads(B, t, H, d, dtype, device="cuda") for t in (tq, tk, tk))
    _run(fa_cuda, q, k, v, causal)


@pytest.mark.gpu
def test_gpu_matches_sdpa_bf16(fa_cuda):
    """Same answer as the backend it replaces, at batch 8 (within bf16 rounding)."""
    torch.manual_seed(0)
    q, k, v = (heads(8, 4096, 8, 40, torch.bfloat16, device="cuda") for _ in range(3))
    o = fa_cuda.attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (o.float() - ref.float()).abs().max().item() < 2e-2
