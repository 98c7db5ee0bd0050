"""Benchmark: fused GEGLU (ti_fast/kernels/geglu.py) against the PyTorch path it replaces, at the
feed-forward shapes of SD1.5's transformer blocks, bf16 and fp16. GPU only.

    python -m bench.bench_geglu [--dtypes bf16,fp16] [--iters 50]

Implementations (backward = gradient w.r.t. h only, as in TI):
  triton  ti_fast.kernels.geglu.geglu
  torch   the ti_fast/models/ops.py torch path (= geglu_ref): a, g = h.chunk(2, -1);
          a * F.gelu(g) in h's dtype
Timed forward and forward+backward, eagerly and replayed from a CUDA graph (see
bench/bench_group_norm_silu.py). GB/s counts reading h (2F) and writing y (F) per token
(forward). Prints a table, then one JSON line; `run()` returns the rows.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.common import (TIMING_COLUMNS, add_speedups, environment, format_kernel_table, kernel_device,
                          kernel_dtypes, kernel_row, num, per_s, time_kernel)

OP = "geglu"
SHAPES = [(4, 4096, 1280), (4, 1024, 2560), (4, 256, 5120)]  # [B, tokens, F]: h is [B, T, 2F]

COLUMNS = (
    ("B x tokens x F", 16, lambda r: "x".join(map(str, r["shape"]))),
    ("dtype", 8, lambda r: r["dtype"]),
    ("impl", 6, lambda r: r["impl"]),
) + TIMING_COLUMNS + (
    ("vs torch", 8, lambda r: num(r.get("speedup_fwd_bwd_graph_ms")
                                  or r.get("speedup_fwd_bwd_ms"), ".2f")),
    ("max diff", 8, lambda r: num(r.get("max_abs_diff_vs_fp32"), ".1e")),
)


def run(shapes=None, dtypes=None, iters: int = 50, warmup: int = 10, device=None) -> list[dict]:
    """One row per (shape, dtype, implementation). dtypes: names ('bf16', 'fp16', 'fp32') or
    torch dtypes. max_abs_diff_vs_fp32: output vs the reference computed in fp32. device: CUDA
    by default; 'cpu' (with TRITON_INTERPRET=1 and tiny shapes) only checks the harness."""
    device = kernel_device(device, OP)
    from ti_fast.kernels.geglu import geglu, geglu_ref
    impls = {"triton": geglu, "torch": geglu_ref}
    dtypes = kernel_dtypes(dtypes, ("bf16", "fp16"))
    rows = []
    for shape in shapes or SHAPES:
        B, T, f = shape
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            h = torch.randn(B, T, 2 * f, device=device, generator=g).to(dtype)
            dy = torch.randn(B, T, f, device=device, generator=g).to(dtype)
            hg = h.detach().requires_grad_(True)
            ref = geglu_ref(h.float())
            for name, fn in impls.items():
                def measure(r, fn=fn):
                    r["max_abs_diff_vs_fp32"] = (fn(h).float() - ref).abs().max().item()
                    time_kernel(r, lambda: fn(h), lambda: torch.autograd.grad(fn(hg), hg, dy),
                                device, warmup, iters, tag=OP)
                    r["fwd_GBps"] = per_s(r, "fwd", 3 * B * T * f * h.element_size(), 1e9)
                rows.append(kernel_row({"op": OP, "impl": name, "shape": list(shape),
                                        "dtype": str(dtype)[6:]}, measure))
            base = rows[-len(impls):]
            add_speedups(base, next(r for r in base if r["impl"] == "torch"))
            del h, dy, hg, ref
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16, fp32")
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_{OP}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing run.",
              file=sys.stderr)
        return 2
    rows = run(dtypes=a.dtypes.split(","), iters=a.iters)
    print(format_kernel_table(rows, COLUMNS, n_text=3))
    print(json.dumps({"bench": OP, "env": environment(torch.device("cuda")), "rows": rows}))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
