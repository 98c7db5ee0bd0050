"""Benchmark: K training runs co-batched in one step (ti_fast.training.group's GroupStep) against
the same K runs one after another, in one process on one model (`python -m bench.train_throughput
--runs`).

Each run trains its own 1-vector embedding at batch 1 with its own AdamW and generator, through
the trainer's own step builder (build_step: on CUDA the CUDA-graph replay, NHWC, the Triton ops
— the trainer's defaults). Rows `co-batched K=k` and `sequential K=k` (field `runs` = k):
  ms_per_step      steady state: one co-batched step (all K runs advance) / one single-run step
  samples/s        K / co-batched step time; 1 / single-run step time (the runs alternate, so the
                   sequential rate is the single-run rate, whatever K)
  wall_s           STEPS steps for every run, captures included: the co-batched group once, the
                   sequential runs one after another (each captured on its own)
  peak_gib         max_memory_allocated while the row ran
"""
from __future__ import annotations

import time

import torch

from ti_fast.training.accel import ChannelsLast
from ti_fast.training.step import build_step, new_member
from ti_fast.training.trainable import EmbeddingTrainable

from . import common as C

LR = 5e-3


def _members(plan, models, k: int):
    width = models.te.config.width
    out = []
    for i in range(k):
        g = torch.Generator(device=plan.device).manual_seed(i)
        vec = torch.randn(1, width, generator=g, device=plan.device) * 0.02
        out.append(new_member(EmbeddingTrainable(vec, name=f"run{i}"), lr=LR,
                              generator=torch.Generator(device=plan.device).manual_seed(100 + i)))
    return out


def _timed(plan, fn, steps: int) -> tuple[float, float]:
    """(wall s of `steps` calls from the first — capture included, steady ms per call)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    C.sync(plan.device)
    wall = time.perf_counter() - t0
    ms, _ = C.time_steps(fn, plan.device, warmup=0, iters=plan.iters)
    return wall, ms


def _row(plan, name: str, k: int, make, steps: int) -> dict:
    r = C.row(name, "ti-fast", "co-batched" if name.startswith("co") else "sequential", k, runs=k)
    try:
        C.free_memory(plan.device)
        C.reset_peak(plan.device)
        wall, ms = make(steps)
        r.update(ms_per_step=ms, wall_s=wall, peak_gib=C.peak_gib(plan.device))
    except Exception as e:
        r["status"] = "oom" if C.is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
    plan.say(f"bench: {name}: {r['status']}" + (f", {r['ms_per_step']:.1f} ms/step, wall {r['wall_s']:.1f} s"
                                                if r["ms_per_step"] else ""))
    return r


def runs_rows(plan, models, micro_batch, ks=None) -> list[dict]:
    """`co-batched K=k` and `sequential K=k` rows for k in ks (1, 2, 4, 8; 1, 2 at --tiny)."""
    ks = ks or ((1, 2) if plan.tiny else (1, 2, 4, 8))
    steps = 3 if plan.tiny else 30
    cuda = plan.device.type == "cuda"
    nhwc = ChannelsLast(models.unet).attach() if cuda else None
    rows = []
    try:
        for k in ks:
            mbs = [[micro_batch(plan, models.te, 1, seed=i)] for i in range(k)]

            def cobatched(n, k=k, mbs=mbs):
                built = build_step(models.unet, models.te, _members(plan, models, k), cuda_graph=cuda, say=plan.say)
                try:
                    return _timed(plan, lambda: built.fn(mbs), n)
                finally:
                    built.reset()

            def sequential(n, k=k, mbs=mbs):
                wall, ms = 0.0, []
                for i, m in enumerate(_members(plan, models, k)):
                    built = build_step(models.unet, models.te, [m], cuda_graph=cuda, say=plan.say)
                    try:
                        w, t = _timed(plan, lambda: built.fn([mbs[i]]), n)
                    finally:
                        built.reset()
                    wall, ms = wall + w, ms + [t]
                return wall, sum(ms) / len(ms)

            rows.append(_row(plan, f"co-batched K={k}", k, cobatched, steps))
            rows.append(_row(plan, f"sequential K={k}", k, sequential, steps))
            rows[-1]["batch"] = 1            # one sample per (single-run) step
    finally:
        if nhwc is not None:
            nhwc.detach()
    return rows
