"""Benchmark: fused GroupNorm+SiLU (ti_fast/kernels/group_norm_silu.py) against the PyTorch paths it
replaces, at SD1.5 UNet shapes (32 groups), bf16 and fp16, NCHW and channels_last. GPU only.

    python -m bench.bench_group_norm_silu [--dtypes bf16,fp16] [--layouts nchw,nhwc] [--iters 50]

Implementations (weights fp32 and frozen, as GroupNorm32 in TI; backward = input gradient):
  triton        ti_fast.kernels.group_norm_silu.group_norm_silu
  torch_fp32    the ti_fast/models/ops.py torch path (= group_norm_silu_ref): F.group_norm on
                x.float(), F.silu, cast back
  torch_native  F.group_norm in x's dtype, then F.silu
Each is timed forward and forward+backward, eagerly (CUDA events around back-to-back calls:
what an eager training loop sees, launch overhead included) and replayed from a CUDA graph
(GPU time only, what the graph-captured trainer sees). GB/s counts one read of x and one write
of y (forward). Prints a table, then one JSON line; `run()` returns the rows.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench.common import (TIMING_COLUMNS, add_speedups, environment, format_kernel_table, kernel_device,
                          kernel_dtypes, kernel_row, num, per_s, time_kernel)

OP = "group_norm_silu"
GROUPS, EPS = 32, 1e-5
SHAPES = [(4, 320, 64, 64), (4, 640, 32, 32), (4, 1280, 16, 16)]  # [B, C, H, W]
LAYOUTS = ("nchw", "nhwc")


def _impls(C: int, device) -> dict:
    from ti_fast.kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref
    w = torch.rand(C, device=device) + 0.5
    b = torch.randn(C, device=device) * 0.1
    return {
        "triton": lambda x: group_norm_silu(x, w, b, GROUPS, EPS, True),
        "torch_fp32": lambda x: group_norm_silu_ref(x, w, b, GROUPS, EPS, True),
        "torch_native": lambda x: F.silu(F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype),
                                                      EPS)),
    }


def run(shapes=None, dtypes=None, layouts=None, iters: int = 50, warmup: int = 10,
        device=None) -> list[dict]:
    """One row per (shape, dtype, layout, implementation). dtypes: names ('bf16', 'fp16',
    'fp32') or torch dtypes. device: CUDA by default; 'cpu' (with TRITON_INTERPRET=1 and tiny
    shapes) only checks the harness."""
    device = kernel_device(device, OP)
    shapes = shapes or SHAPES
    dtypes = kernel_dtypes(dtypes, ("bf16", "fp16"))
    rows = []
    for shape in shapes:
        impls = _impls(shape[1], device)
        for dtype in dtypes:
            for layout in layouts or LAYOUTS:
                g = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(shape, device=device, generator=g).to(dtype)
                dy = torch.randn(shape, device=device, generator=g).to(dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                    dy = dy.to(memory_format=torch.channels_last)
                xg = x.detach().requires_grad_(True)
                ref = impls["torch_fp32"](x).float()
                for name, f in impls.items():
                    def measure(r, f=f):
                        r["max_abs_diff_vs_torch_fp32"] = (f(x).float() - ref).abs().max().item()
                        time_kernel(r, lambda: f(x), lambda: torch.autograd.grad(f(xg), xg, dy),
                                    device, warmup, iters, tag=OP)
                        r["fwd_GBps"] = per_s(r, "fwd", 2 * x.numel() * x.element_size(), 1e9)
                    rows.append(kernel_row({"op": OP, "impl": name, "shape": list(shape),
                                            "dtype": str(dtype)[6:], "layout": layout}, measure))
                base = rows[-len(impls):]
                add_speedups(base, next(r for r in base if r["impl"] == "torch_fp32"))
                del x, dy, xg, ref
    return rows


COLUMNS = (  # title, width, row -> cell
    ("shape", 16, lambda r: "x".join(map(str, r["shape"]))),
    ("dtype", 8, lambda r: r["dtype"]),
    ("layout", 6, lambda r: r["layout"]),
    ("impl", 12, lambda r: r["impl"]),
) + TIMING_COLUMNS + (
    ("vs fp32 path", 12, lambda r: num(r.get("speedup_fwd_bwd_graph_ms")
                                        or r.get("speedup_fwd_bwd_ms"), ".2f")),
    ("max diff", 8, lambda r: num(r.get("max_abs_diff_vs_torch_fp32"), ".1e")),
)


def format_table(rows: list[dict], columns=COLUMNS, n_text: int = 4) -> str:
    """This bench's table: 'vs fp32 path' = torch_fp32 time / this time, forward+backward, from
    the CUDA-graph replay when captured."""
    return format_kernel_table(rows, columns, n_text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16, fp32")
    p.add_argument("--layouts", default="nchw,nhwc", help="comma list of nchw, nhwc")
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_{OP}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing run.",
              file=sys.stderr)
        return 2
    rows = run(dtypes=a.dtypes.split(","), layouts=a.layouts.split(","), iters=a.iters)
    print(format_table(rows))
    print(json.dumps({"bench": OP, "env": environment(torch.device("cuda")), "rows": rows}))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
