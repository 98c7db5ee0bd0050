"""Where one training step's GPU time goes: torch.profiler over ti-fast's step as the trainer
runs it on CUDA (channels_last, Triton kernels), eager and then replayed from a CUDA graph,
kernels grouped by kind, and how much of the step the GPU is busy (busy < wall: launch-bound).

    python -m bench.profile_step            # SD1.5 at 512 px, batch 8 and 1, on the GPU
    python -m bench.profile_step --tiny     # tiny models on the CPU: checks the script

Prints a table per batch, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from . import common as C
from .train_throughput import Plan, TiFastModels, make_plan, ti_step

# first match wins; names are cuDNN/cuBLAS/CUTLASS/flash/Triton kernel names
KINDS = [("attention", r"flash|fmha|attention|sdpa|efficient"),
         ("norm", r"norm"),
         ("conv", r"conv|implicit_convolve|fprop|dgrad|wgrad|xmma_fprop|cudnn"),
         ("gemm", r"gemm|nvjet|cutlass|matmul|sm90_xmma|cublas"),
         ("triton", r"^triton_"),
         ("copy/fill", r"memcpy|memset|copy|fill")]


def kind(name: str) -> str:
    low = name.lower()
    for k, pat in KINDS:
        if re.search(pat, low):
            return k
    return "elementwise/other"


def profile_batch(plan: Plan, models: TiFastModels, b: int, mode: str = "eager", steps: int = 3) -> dict:
    fn, finish = ti_step(models, plan, b, mode, channels_last=plan.device.type == "cuda")
    try:
        for _ in range(3):
            fn()
        C.sync(plan.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device.type == "cuda" else [])
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                fn()
            C.sync(plan.device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    finally:
        finish()
    gpu = plan.device.type == "cuda"
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if gpu != on_device or (not gpu and e.cpu_parent is not None):
            continue                        # GPU: kernels only; CPU: top-level ops only
        us = e.time_range.elapsed_us()
        per_kernel[e.name][0] += us / 1e3 / steps
        per_kernel[e.name][1] += 1
    by_kind = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_kind[kind(name)] += ms
    busy = sum(by_kind.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:20]
    return {"batch": b, "mode": mode, "wall_ms_per_step": wall_ms, "busy_ms_per_step": busy,
            "kernels_per_step": sum(n for _, n in per_kernel.values()) / steps,
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:120], "ms": ms, "calls_per_step": c / steps} for n, (ms, c) in top]}


def format_profile(r: dict) -> str:
    lines = [f"{r['mode']} batch {r['batch']}: wall {r['wall_ms_per_step']:.2f} ms/step (under the profiler), "
             f"GPU busy {r['busy_ms_per_step']:.2f} ms, {r['kernels_per_step']:.0f} kernels/step"]
    for k, ms in r["by_kind_ms"].items():
        lines.append(f"  {k:<18} {ms:8.2f} ms  {100 * ms / max(r['busy_ms_per_step'], 1e-9):5.1f}%")
    lines.append("  top kernels:")
    for t in r["top"][:12]:
        lines.append(f"    {t['ms']:8.3f} ms  x{t['calls_per_step']:<5.0f} {t['name'][:90]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    plan = make_plan(argparse.Namespace(tiny=args.tiny, device=args.device, full=False, compile=False,
                                        compile_only=False, batches=None, quiet=True))
    models = TiFastModels(plan)
    out = {"env": C.environment(plan.device), "kernels": models.kernels, "attention": models.attention, "profiles": []}
    modes = ("eager", "cuda-graph") if plan.device.type == "cuda" else ("eager",)
    for mode in modes:
        for b in sorted(plan.batches, reverse=True):
            try:
                r = profile_batch(plan, models, b, mode)
                print(format_profile(r), flush=True)
            except Exception as e:
                r = {"batch": b, "mode": mode, "status": f"error: {type(e).__name__}: {str(e)[:300]}"}
                print(f"{mode} batch {b}: {r['status']}", flush=True)
            out["profiles"].append(r)
    print(json.dumps(C.clean(out), default=C.jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
