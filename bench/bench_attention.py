"""Benchmark: the Triton flash-attention kernel (ti_fast/kernels/attention.py) against SDPA, at the
attention shapes of SD1.5 at 512 px (UNet self- and cross-attention, text encoder). GPU only.

    python -m bench.bench_attention [--dtypes bf16] [--batch 8] [--iters 30] [--sweep]

Implementations (backward = gradients of q, k and v, as in TI):
  triton          ti_fast.kernels.attention.attention (heuristic config; --sweep: several)
  sdpa            F.scaled_dot_product_attention, PyTorch's own choice (the baseline)
  sdpa_cudnn      ... forced to SDPBackend.CUDNN_ATTENTION
  sdpa_flash      ... forced to SDPBackend.FLASH_ATTENTION
  sdpa_efficient  ... forced to SDPBackend.EFFICIENT_ATTENTION
A backend that cannot run a shape gives a row with status "error: ...". Inputs are built as the
UNet builds them: a [B, T, H*D] tensor viewed [B, T, H, D] and transposed to [B, H, T, D].
Timed forward and forward+backward, eagerly and replayed from a CUDA graph (bench.common.
time_kernel). TFLOP/s counts the useful work at the true head dim (fwd 4*B*H*Tq*Tk*D, f+b
14*B*H*Tq*Tk*D: 2 matmuls forward, 5 backward; halved when causal), so padding shows up as a
lower rate. max diff: the output against attention_ref in fp32 on batch element 0 (the fp32
score matrix of the whole batch at 4096 tokens would be 4 GiB).

--sweep: the triton kernel also with each of SWEEP's configs (block sizes, warps, stages of
the forward, dK/dV and dQ passes), on SWEEP_SHAPES (the costly ones: every config is ~3 new
compiles); the fastest forward+backward per shape is marked "best". Override the heuristic
for a whole run with ti_fast.kernels.attention.CONFIG_OVERRIDE.
Prints a table, then one JSON line; `run()` returns the rows.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench.common import (TIMING_COLUMNS, add_speedups, environment, format_kernel_table, kernel_device,
                          kernel_dtypes, kernel_row, num, per_s, time_kernel)

OP = "attention"
H = 8
# (kind, Tq, Tk, D): SD1.5 UNet at 512 px (latent 64x64 -> 4096 tokens ... 8x8 mid block),
# cross-attention over 77 text tokens; CLIP ViT-L/14: 12 heads, causal (batch and heads below)
UNET = [("self", 4096, 4096, 40), ("cross", 4096, 77, 40), ("self", 1024, 1024, 80),
        ("cross", 1024, 77, 80), ("self", 256, 256, 160), ("cross", 256, 77, 160),
        ("self", 64, 64, 160), ("cross", 64, 77, 160)]
SWEEP_SHAPES = {("self", 4096, 4096, 40), ("cross", 4096, 77, 40), ("self", 1024, 1024, 80)}


def _c(fm, fn, fw, fs, km, kn, kw, qm, qn, qw, bs=2):
    return {"fwd": dict(BLOCK_M=fm, BLOCK_N=fn, num_warps=fw, num_stages=fs),
            "dkdv": dict(BLOCK_M=km, BLOCK_N=kn, num_warps=kw, num_stages=bs),
            "dq": dict(BLOCK_M=qm, BLOCK_N=qn, num_warps=qw, num_stages=bs)}


SWEEP = {  # name -> per-pass config (fwd BLOCK_M x BLOCK_N w warps s stages; dkdv: keys =
    # BLOCK_N, queries per step = BLOCK_M; dq: queries = BLOCK_M, keys per step = BLOCK_N)
    "f128x64w8s3 b64x64w4": _c(128, 64, 8, 3, 64, 64, 4, 64, 64, 4),
    "f128x128w8s2 b64x64w8": _c(128, 128, 8, 2, 64, 64, 8, 64, 64, 8),
    "f64x64w4s3 b32x64w4s3": _c(64, 64, 4, 3, 32, 64, 4, 64, 32, 4, bs=3),
    "f128x32w4s4 b64x128w8": _c(128, 32, 4, 4, 64, 128, 8, 128, 64, 8),
    "f128x64w4s2 b32x128w4": _c(128, 64, 4, 2, 32, 128, 4, 128, 32, 4),
}

COLUMNS = (
    ("B x H x Tq x Tk x D", 24, lambda r: "x".join(map(str, r["shape"])) + (" c" if r.get("causal") else "")),
    ("dtype", 8, lambda r: r["dtype"]),
    ("impl", 14, lambda r: r["impl"]),
    ("config", 24, lambda r: (r.get("config") or "") + (" *best" if r.get("best") else "")),
) + TIMING_COLUMNS[:4] + (
    ("fwd TF/s", 8, lambda r: num(r.get("fwd_TFLOPs"), ".0f")),
    ("f+b TF/s", 8, lambda r: num(r.get("fwd_bwd_TFLOPs"), ".0f")),
    ("vs sdpa", 7, lambda r: num(r.get("speedup_fwd_bwd_graph_ms")
                                 or r.get("speedup_fwd_bwd_ms"), ".2f")),
    ("max diff", 8, lambda r: num(r.get("max_abs_diff_vs_fp32"), ".1e")),
)


def default_shapes(batch: int) -> list[tuple]:
    """(kind, B, H, Tq, Tk, D) at `batch`: the UNet's, then the text encoder's (causal)."""
    return [(kind, batch, H, tq, tk, d) for kind, tq, tk, d in UNET] + [("causal", batch, 12, 77, 77, 64)]


def _heads(B, T, h, D, dtype, device, g):
    return torch.randn(B, T, h * D, device=device, generator=g).to(dtype).view(B, T, h, D).transpose(1, 2)


def _sdpa(backend):
    def fn(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def implementations(sweep: bool) -> list[tuple[str, str | None, object]]:
    """(impl, config name, fn(q, k, v, causal)) in table order; sdpa (the baseline) first."""
    from torch.nn.attention import SDPBackend

    from ti_fast.kernels.attention import attention
    out = [("sdpa", None, _sdpa(None)), ("sdpa_cudnn", None, _sdpa(SDPBackend.CUDNN_ATTENTION)),
           ("sdpa_flash", None, _sdpa(SDPBackend.FLASH_ATTENTION)),
           ("sdpa_efficient", None, _sdpa(SDPBackend.EFFICIENT_ATTENTION)),
           ("triton", "heuristic", lambda q, k, v, causal: attention(q, k, v, causal))]
    if sweep:
        out += [("triton", name, lambda q, k, v, causal, cfg=cfg: attention(q, k, v, causal, config=cfg))
                for name, cfg in SWEEP.items()]
    return out


def _measure(r: dict, fn, qkv, do, causal: bool, ref, flop: float, device, warmup: int,
             iters: int) -> None:
    """Fill row r for fn(q, k, v, causal): max diff on batch element 0, the timings, TFLOP/s."""
    q, k, v = qkv
    qg, kg, vg = (t.detach().requires_grad_(True) for t in qkv)
    out = fn(q[:1], k[:1], v[:1], causal)
    r["max_abs_diff_vs_fp32"] = (out.float() - ref).abs().max().item()
    del out
    fwd = lambda: fn(q, k, v, causal)  # noqa: E731
    fwd_bwd = lambda: torch.autograd.grad(fn(qg, kg, vg, causal), (qg, kg, vg), do)  # noqa: E731
    time_kernel(r, fwd, fwd_bwd, device, warmup, iters, tag=OP)
    for key, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
        r[f"{key}_TFLOPs"] = per_s(r, key, mult * flop, 1e12)


def run(shapes=None, dtypes=None, batch: int = 8, iters: int = 30, warmup: int = 5, device=None,
        sweep: bool = False) -> list[dict]:
    """One row per (shape, dtype, implementation[, config]). shapes: (kind, B, H, Tq, Tk, D)
    tuples (kind 'causal' = causal). dtypes: names ('bf16', 'fp16', 'fp32') or torch dtypes.
    device: CUDA by default; 'cpu' (with TRITON_INTERPRET=1 and tiny shapes) only checks the
    harness."""
    device = kernel_device(device, OP)
    from ti_fast.kernels.attention import attention_ref
    dtypes = kernel_dtypes(dtypes, ("bf16",))
    impls = implementations(sweep)
    rows = []
    for shape in shapes or default_shapes(batch):
        kind, B, h, tq, tk, d = shape
        causal = kind == "causal"
        swept = sweep and (kind, tq, tk, d) in SWEEP_SHAPES
        flop = (4 * B * h * tq * tk * d) * (0.5 if causal else 1.0)
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (_heads(B, t, h, d, dtype, device, g) for t in (tq, tk, tk))
            do = torch.randn(q.shape, device=device, generator=g).to(dtype)
            ref = attention_ref(*(t[:1].float() for t in (q, k, v)), causal=causal)
            start = len(rows)
            for name, cfg_name, fn in impls:
                if cfg_name not in (None, "heuristic") and not swept:
                    continue
                fields = {"op": OP, "impl": name, "kind": kind, "shape": [B, h, tq, tk, d], "causal": causal,
                          "dtype": str(dtype)[6:], "config": cfg_name}
                rows.append(kernel_row(fields, lambda r, fn=fn: _measure(r, fn, (q, k, v), do, causal, ref, flop,
                                                                         device, warmup, iters)))
            group = rows[start:]
            add_speedups(group, next(r for r in group if r["impl"] == "sdpa"))
            tri = [r for r in group if r["impl"] == "triton" and r["status"] == "ok"]
            if len(tri) > 1:
                key = lambda r: r.get("fwd_bwd_graph_ms") or r["fwd_bwd_ms"]  # noqa: E731
                min(tri, key=key)["best"] = True
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    p.add_argument("--batch", type=int, default=8, help="batch size (SD1.5 TI at batch 8: the profiled case)")
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement")
    p.add_argument("--sweep", action="store_true", help="also time the triton kernel with each SWEEP config")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_{OP}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing run.",
              file=sys.stderr)
        return 2
    rows = run(dtypes=a.dtypes.split(","), batch=a.batch, iters=a.iters, sweep=a.sweep)
    print(format_kernel_table(rows, COLUMNS, n_text=4))
    print(json.dumps({"bench": OP, "env": environment(torch.device("cuda")), "rows": rows}))
    return 0 if all(r["status"] == "ok" for r in rows if r["impl"] in ("triton", "sdpa")) else 1


if __name__ == "__main__":
    sys.exit(main())
