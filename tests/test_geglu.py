"""Fused GEGLU kernel vs the plain-PyTorch reference, forward and input gradient.

CPU: the Triton kernels run in Triton's interpreter at tiny, awkward shapes (fp32, fp16; bf16
arithmetic is wrong in the interpreter). GPU (`gpu` marker): all dtypes at SD1.5 shapes.

TRITON_INTERPRET must be set before `import triton` (triton 3.6 reads it when @triton.jit
decorates, and triton.language's own helpers are @triton.jit functions), so, as in
tests/test_group_norm_silu.py, the interpreted tests run only in a process started with it;
in a normal run `test_interpreted_in_subprocess` runs them in one child pytest. Directly:
    TRITON_INTERPRET=1 python -m pytest tests/test_geglu.py -m "not gpu"

Tolerance: against a float64 truth computed from the same (rounded) inputs, the kernel's max
error must be <= 2x the reference's own error in the test dtype, plus a small floor.
"""
from __future__ import annotations


import pytest
import torch

from kernel_testing import FLOOR, INTERPRET, interpreted, kernel_module, run_interpreted


@pytest.fixture
def gg():
    return kernel_module("geglu")


@pytest.fixture
def gg_cuda():
    return kernel_module("geglu", cuda=True)


@pytest.mark.skipif(INTERPRET, reason="already interpreting in this process")
def test_interpreted_in_subprocess():
    run_interpreted(__file__)


def _run(mod, lead, f, dtype, device="cpu", h=None):
    """Forward + backward of kernel, same-dtype reference and float64 truth; compare y, dh."""
    if h is None:
        h = (torch.randn(*lead, 2 * f, device=device) * 2).to(dtype)
    dy = torch.randn(*lead, f, device=device).to(dtype)

    def fwd_bwd(fn, h):
        h = h.detach().requires_grad_(True)
        y = fn(h)
        (dh,) = torch.autograd.grad(y, (h,), dy.to(y.dtype))
        return y, dh

    y, dh = fwd_bwd(mod.geglu, h)
    y_ref, dh_ref = fwd_bwd(mod.geglu_ref, h)
    y_64, dh_64 = fwd_bwd(mod.geglu_ref, h.double())
    assert y.shape == (*h.shape[:-1], f) and y.dtype == dtype
    assert dh.shape == h.shape and dh.dtype == dtype
    lines, bad = [], False
    for name, got, ref, truth in [("y", y, y_ref, y_64), ("dh", dh, dh_ref, dh_64)]:
        err = (got.double() - truth).abs().max().item() if truth.numel() else 0.0
        base = (ref.double() - truth).abs().max().item() if truth.numel() else 0.0
        floor = FLOOR[dtype] * max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
        ok = err <= 2 * base + floor
        bad |= not ok
        lines.append(f"  {name:>2}: kernel err {err:.3e}  torch {str(dtype)[6:]} err {base:.3e}"
                     f"  floor {floor:.1e}  {'ok' if ok else 'FAIL'}")
    assert not bad, f"geglu h={tuple(h.shape)} {dtype}\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- CPU, interpreted

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,f", [((3, 7), 5), ((1,), 24), ((2, 3, 5), 37), ((1, 1), 1),
                                    ((13,), 64), ((0, 3), 8)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"F{v}")
def test_interpreted(gg, lead, f, dtype):
    torch.manual_seed(0)
    _run(gg, lead, f, dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreted_strided_rows_and_tiles(gg, monkeypatch, dtype):
    """Rows of h further apart than 2F (a column slice of a wider tensor), and tiles narrower
    than F so that a row spans several programs."""
    monkeypatch.setattr(gg, "MAX_BLOCK_F", 8)
    monkeypatch.setattr(gg, "TILE", 16)
    torch.manual_seed(1)
    wide = (torch.randn(5, 3, 2 * 19 + 6) * 2).to(dtype)
    h = wide[..., 3:3 + 2 * 19]
    assert not h.is_contiguous()
    _run(gg, (5, 3), 19, dtype, h=h)


@interpreted
def test_interpreted_bench_harness(gg):
    from bench.bench_geglu import COLUMNS, run
    from bench.bench_group_norm_silu import format_table
    rows = run(shapes=[(1, 3, 8)], dtypes=["fp32"], iters=1, warmup=0, device="cpu")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["max_abs_diff_vs_fp32"] < 1e-5 for r in rows), rows
    assert format_table(rows, COLUMNS, n_text=3).count("\n") == 3


@interpreted
def test_interpreted_through_ops_dispatch(gg):
    from ti_fast.models import ops
    h = torch.randn(2, 3, 2 * 24)
    results = []
    for mode in ("triton", "torch"):
        hi = h.detach().requires_grad_(True)
        y = ops.geglu(hi, ops.fused_ops(mode, verbose=False))
        results.append((y, *torch.autograd.grad(y, hi, torch.ones_like(y))))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CPU, sm_90 compile

# sm_90 compile of the kernels as the launchers call them: see tests/kernel_testing.py.


AOT_CALLS = """
from ti_fast.kernels import geglu as gg
for lead, f in [((2, 4096), 1280), ((2, 1024), 2560), ((2, 256), 5120), ((3, 7), 37)]:
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        TAG = f"{lead} F={f} {dt}"
        h = torch.zeros(*lead, 2 * f, dtype=dt)
        gg.geglu_forward(h)
        gg.geglu_backward(torch.zeros(*lead, f, dtype=dt), h)
"""


def test_compiles_for_sm90():
    from kernel_testing import compile_for_sm90
    found = compile_for_sm90(AOT_CALLS)
    assert {f["kernel"] for f in found} == {"_geglu_fwd_kernel", "_geglu_bwd_kernel"}, found
    for f in found:  # SD shapes: 16-byte vector loads (8 bf16/fp16 or 4 fp32 a thread)
        if "F=37" not in f["tag"]:
            assert f["loads"] == ["ld.global.v4.b32"], f


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lead,f", [((2, 4096), 1280), ((2, 1024), 2560), ((2, 256), 5120),
                                    ((8, 4096), 1280), ((3, 7), 37)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"F{v}")
def test_gpu_sd_shapes(gg_cuda, lead, f, dtype):
    torch.manual_seed(0)
    _run(gg_cuda, lead, f, dtype, device="cuda")
