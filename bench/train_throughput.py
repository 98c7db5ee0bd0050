"""Training throughput: ti-fast's real step in each of its modes against the diffusers-TI peer,
in one process on one GPU, at 512 px with SD1.5 shapes (random weights).

    python -m bench.train_throughput            # default run, under 5 minutes on an H100/H200
    python -m bench.train_throughput --full     # + batch 4, torch.compile, 4/6/8 GiB caps
    python -m bench.train_throughput --compile  # + torch.compile rows
    python -m bench.train_throughput --compile-only --batches 8   # only those rows
    python -m bench.train_throughput --tiny --out DIR   # CPU harness check, seconds

Rows (each: ms/step, samples/s, peak GiB = max_memory_allocated since a reset just before the
row's models/optimizer were set up, weights included; MFU = 1.72e12 FLOP x samples/s / the bf16
8192^3 matmul rate measured in this run; ratio to the peer at the same batch):
  ti-fast eager          the trainer's own step builder (ti_fast.training.step.build_step) over an
                         embedding's vectors; UNet + text encoder bf16; cached latents (the VAE is
                         absent, as after the trainer's caching); Triton ops
  ti-fast cuda-graph     the same step, build_step(cuda_graph=True): its CUDA-graph replay
  ... + channels_last    the graphed step with ti_fast.training.accel.ChannelsLast (NHWC convs):
                         the trainer's default on CUDA
  ..., torch ops         the default with PyTorch's GroupNorm/SiLU/GEGLU: what the Triton kernels buy
  ..., SDPA K            (--full) the default with one SDPA kernel forced (flash/efficient/cudnn)
  ..., Triton attention  (--full) the default with ti_fast.kernels.attention
  ti-fast low-vram       checkpoint_blocks (ti_fast.training.lowvram), NHWC, graphed, 3 GiB cap
  ti-fast offload        ti_fast.training.offload.Offloader: the UNet's blocks stream from pinned
                         host memory, under a 2 GiB cap (the UNet alone is 1.72 GB). On CUDA these
                         two run in a fresh child process each (expandable allocator segments, as
                         the trainer sets for them), so the cap sees that row alone; --full adds NCHW
  ti-fast torch.compile  (--full/--compile) ti_fast.training.accel.compile_unet; compile_s = the
                         first step's time less one timed step
  ti-fast best under N   (--full) the fastest of eager/low-vram at batch 8/4/1 that fits N GiB
  diffusers-TI           bench/peer.py; plain, and with gradient checkpointing at batch 1
Also: launch-to-first-step, peak RssAnon while loading, generation (bench/startup.py), the
fused kernels (bench/bench_group_norm_silu.py, bench/bench_geglu.py when present).
Prints the table, then ONE JSON line; writes bench/results/<date>-<gpu>.json (with --tiny only
when --out is given).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ti_fast.models import UNet, UNetConfig, CLIPTextEncoder, CLIPConfig, VAEConfig, set_attention_backend
from ti_fast.models import ops
from ti_fast.training.step import MicroBatch, build_step, new_member
from ti_fast.training.trainable import EmbeddingTrainable
from ti_fast.training.lowvram import checkpoint_blocks
from ti_fast.training.offload import Offloader
from ti_fast.training.accel import ChannelsLast, compile_unet
from ti_fast.loading.tiny import TINY_UNET, TINY_CLIP, TINY_VAE   # the --tiny shapes: make-tiny's

from . import common as C

LOW_VRAM_CAP, OFFLOAD_CAP, FULL_CAPS = 3.0, 2.0, (4.0, 6.0, 8.0)
LR = 5e-3


@dataclass
class Plan:
    device: torch.device
    tiny: bool
    full: bool
    size: int                     # image pixels; latents are size // 8
    batches: tuple                # the "batch 1 and 8" pair (1 and 2 at tiny shapes)
    warmup: int
    iters: int | None             # None: sized to ~2 s per row
    compile: bool = False         # torch.compile rows (implied by --full)
    compile_only: bool = False    # only the torch.compile rows (no startup, peer or kernels)
    runs: bool = False            # only the co-batched vs sequential runs rows (bench/runs.py)
    say: object = print

    @property
    def dtype(self):
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


def make_plan(args) -> Plan:
    dev = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: no CUDA device; the full benchmark needs a GPU (use --tiny to check the harness on CPU)")
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    common = dict(full=args.full, compile=args.compile or args.full or args.compile_only,
                  compile_only=args.compile_only, runs=getattr(args, "runs", False), say=say)
    if args.tiny:
        # tiny shapes gain nothing from threads, and on a shared CI machine spinning OpenMP
        # workers make the harness check several times slower
        torch.set_num_threads(1)
        return Plan(dev, True, size=64, batches=(1, 2), warmup=1, iters=1, **common)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (1, 8)
    return Plan(dev, False, size=512, batches=batches, warmup=3, iters=None, **common)


# ----------------------------------------------------------------------------- ti-fast

class TiFastModels:
    """UNet + text encoder built once on the device (meta -> to_empty -> cheap init)."""

    def __init__(self, plan: Plan):
        ucfg, ccfg = (TINY_UNET, TINY_CLIP) if plan.tiny else (UNetConfig(), CLIPConfig())
        self.unet = C.build(lambda: UNet(ucfg), plan.device, plan.dtype)
        self.te = C.build(lambda: CLIPTextEncoder(ccfg), plan.device, plan.dtype)
        self.attention = set_attention_backend(self.unet, "auto", plan.device, verbose=False)
        set_attention_backend(self.te, "sdpa", plan.device, verbose=False)
        # the trainer's default on CUDA: Triton GroupNorm/GEGLU (ops "auto"), chosen for this model
        self.kernels = ops.set_kernels(self.unet, "auto" if plan.device.type == "cuda" else "torch", verbose=False)


def micro_batch(plan: Plan, te: CLIPTextEncoder, b: int, seed: int = 0) -> MicroBatch:
    """Cached latents [B,4,h,w] in the storage dtype and '<bos> a photo of <vector> <eos>...' ids."""
    g = torch.Generator(device=plan.device).manual_seed(seed)
    h = plan.size // 8
    vocab = te.config.vocab_size
    ids = torch.full((b, 77), vocab - 1, dtype=torch.long, device=plan.device)
    ids[:, 0] = vocab - 2
    ids[:, 1:5] = torch.randint(0, vocab - 2, (b, 4), generator=g, device=plan.device)
    vidx = torch.full((b, 77), -1, dtype=torch.long, device=plan.device)
    vidx[:, 4] = 0
    lat = torch.randn(b, 4, h, h, generator=g, device=plan.device).to(plan.dtype)
    return MicroBatch(latents=lat, input_ids=ids, vector_index=vidx)


def ti_step(models: TiFastModels, plan: Plan, b: int, mode: str, channels_last: bool = False,
            sdpa: str | None = None, graph: bool | None = None, attention: str | None = None):
    """(fn, finish) for one ti-fast row. fn = one optimizer step as the trainer issues it (lr
    written into param_groups, then the step); finish() puts the shared models back as they were
    (measure calls it after a failure too) and returns the last loss and finite flag.
    graph: replay the step from a CUDA graph (default: only in mode "cuda-graph"; the trainer
    also graphs "low-vram").
    sdpa: force one of PyTorch's SDPA kernels ("flash", "efficient", "cudnn") for every call of
    fn — with a CUDA graph the choice made at capture is what replays.
    attention: a backend of ti_fast.models.attention for this row (then the shared default)."""
    unet = models.unet
    unet.set_gradient_checkpointing(mode == "low-vram", checkpoint_blocks(unet) if mode == "low-vram" else None)
    nhwc = ChannelsLast(unet).attach() if channels_last else None
    off = None
    built = None
    if attention is not None:
        set_attention_backend(unet, attention, plan.device, verbose=False)

    def restore():
        if attention is not None:
            set_attention_backend(unet, models.attention, plan.device, verbose=False)
        if built is not None:
            built.reset()                              # free the graphs' pool before the next row
        if off is not None:
            off.detach()                               # the weights return to the device
        if nhwc is not None:
            nhwc.detach()
        unet.set_gradient_checkpointing(False)

    try:
        if mode == "offload":
            # The shared UNet's weights move to pinned host memory, which frees them on the
            # device: the row's peak is reset here, so it counts the offloaded run only.
            off = Offloader(unet, plan.device, prefetch=1).attach()
            C.free_memory(plan.device)
            C.reset_peak(plan.device)
        u = compile_unet(unet) if mode == "compile" else unet
        width = models.te.config.width
        trainable = EmbeddingTrainable(torch.randn(1, width, device=plan.device) * 0.02)
        gen = torch.Generator(device=plan.device).manual_seed(0)
        want_graph = graph if graph is not None else mode == "cuda-graph"
        # the trainer's own step builder: AdamW, the eager step, its CUDA-graph replay
        m = new_member(trainable, lr=LR, generator=gen)
        built = build_step(u, models.te, [m], cuda_graph=want_graph, say=plan.say)
        if want_graph and not built.graphed:
            raise RuntimeError("the step could not be captured in a CUDA graph")
        step, opt = built.fn, m.optimizer
        mb = [micro_batch(plan, models.te, b)]
    except BaseException:
        restore()
        raise
    last = {"steps": 0}

    def run():
        for g in opt.param_groups:
            g["lr"] = LR
        last["out"] = step([mb])
        last["steps"] += 1

    if sdpa is None:
        fn = run
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}[sdpa]

        def fn():
            with sdpa_kernel([backend]):
                run()

    def finish():
        extra = {}
        if off is not None:   # SD1.5: 1.72 GB streamed; every block copied twice per step
            extra = {"streamed_gb": off.streamed_bytes() / 1e9,
                     "copies_per_step": sum(off.loads.values()) / max(1, last["steps"])}
        restore()
        loss, finite = last["out"]
        return {"loss": float(loss), "finite": bool(finite), **extra}

    return fn, finish


def count_flops(models: TiFastModels, plan: Plan) -> float:
    """FLOPs of one eager step per sample, counted by torch's FlopCounterMode (matmul, conv,
    attention; forward and backward). The MFU numerator at tiny shapes; a cross-check of
    performance.md's 1.72e12 at SD1.5 shapes."""
    from torch.utils.flop_counter import FlopCounterMode
    fn, finish = ti_step(models, plan, 1, "eager")      # models already ran: no lazy init counted
    with FlopCounterMode(display=False) as fc:
        fn()
    finish()
    return float(fc.get_total_flops())


# ----------------------------------------------------------------------------- rows

def measure(plan: Plan, name: str, impl: str, mode: str, b: int, make, cap: float | None = None) -> dict:
    """Set up (make() -> (fn, finish)), run the first step alone (first_step_s: compile, graph
    capture, autotuning), warm up, time. OOM and errors become the row's status. finish() runs
    after the cap is lifted (offload's detach brings the whole UNet back to the device) and also
    after a failure, so that no row leaves the shared models changed for the next."""
    r = C.row(name, impl, mode, b, cap_gib=cap)
    C.free_memory(plan.device)
    finish = None
    try:
        with C.MemoryCap(plan.device, cap):
            C.reset_peak(plan.device)
            fn, finish = make()
            t0 = time.perf_counter()
            fn()
            C.sync(plan.device)
            r["first_step_s"] = time.perf_counter() - t0
            ms, n = C.time_steps(fn, plan.device, warmup=max(0, plan.warmup - 1), iters=plan.iters)
            r.update(ms_per_step=ms, steps_timed=n, peak_gib=C.peak_gib(plan.device))
            if plan.device.type == "cuda":   # what the allocator held from the card (<= cap: it fits)
                r["peak_reserved_gib"] = torch.cuda.max_memory_reserved(plan.device) / C.GIB
    except Exception as e:
        r["status"] = "oom" if C.is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
        if C.is_oom(e) and plan.device.type == "cuda":      # how far it got
            r.update(peak_gib=C.peak_gib(plan.device),
                     reserved_gib_at_oom=torch.cuda.memory_reserved(plan.device) / C.GIB)
    if finish is not None:
        try:
            out = finish()
            if r["status"] == "ok":
                r.update(out)
        except Exception as e:
            if r["status"] == "ok":
                r["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    C.free_memory(plan.device)
    plan.say(f"bench: {name} b{b}: {r['status']}"
             + (f", {r['ms_per_step']:.1f} ms/step, peak {r['peak_gib'] or 0:.2f} GiB" if r["ms_per_step"] else ""))
    return r


def ti_rows(plan: Plan) -> tuple[list[dict], float | None, str]:
    """The ti-fast rows, the counted FLOPs per sample, the attention backend used."""
    cuda = plan.device.type == "cuda"
    models = TiFastModels(plan)
    attention = models.attention
    rows = []
    batches = sorted(set(plan.batches) | ({4} if plan.full and not plan.tiny else set()))
    # The trainer's defaults on CUDA: graph + channels_last + Triton kernels (ops "auto", per model).
    kernels = models.kernels
    for b in batches:
        rows.append(measure(plan, "ti-fast eager", "ti-fast", "eager", b, lambda: ti_step(models, plan, b, "eager")))
    for b in batches:
        for nhwc in (False, True):
            name = "ti-fast cuda-graph" + (" + channels_last" if nhwc else "") + (" (default)" if nhwc else "")
            if cuda:
                r = measure(plan, name, "ti-fast", "cuda-graph", b,
                            lambda: ti_step(models, plan, b, "cuda-graph", channels_last=nhwc))
                rows.append(dict(r, channels_last=nhwc, kernels=kernels))
            else:
                rows.append(C.row(name, "ti-fast", "cuda-graph", b, status="skipped: needs CUDA",
                                  channels_last=nhwc))
    if cuda and kernels == "triton":
        # the default with PyTorch's GroupNorm/SiLU/GEGLU instead: does each Triton kernel earn its place?
        ops.set_kernels(models.unet, "torch", verbose=False)
        for b in batches:
            r = measure(plan, "ti-fast cuda-graph + channels_last, torch ops", "ti-fast", "cuda-graph", b,
                        lambda: ti_step(models, plan, b, "cuda-graph", channels_last=True))
            rows.append(dict(r, channels_last=True, kernels="torch"))
        ops.set_kernels(models.unet, "auto", verbose=False)
    if cuda and plan.full:
        # ti_fast.kernels.attention in the default step (auto keeps SDPA: cuDNN wins at head dim 40)
        for b in batches:
            r = measure(plan, "ti-fast cuda-graph + channels_last, Triton attention", "ti-fast", "cuda-graph", b,
                        lambda: ti_step(models, plan, b, "cuda-graph", channels_last=True, attention="triton"))
            rows.append(dict(r, channels_last=True, kernels=kernels, attention="triton"))
    if cuda and plan.full:
        # attention is the largest single kernel family: which SDPA kernel serves head dim 40-160 best
        # (H200, 2026-11-26, batch 8: cuDNN 44.7 ms/step, flash 53.0, efficient 80.3; auto picks cuDNN)
        for sdpa in ("flash", "efficient", "cudnn"):
            b = max(batches)
            r = measure(plan, f"ti-fast cuda-graph + channels_last, SDPA {sdpa}", "ti-fast", "cuda-graph", b,
                        lambda: ti_step(models, plan, b, "cuda-graph", channels_last=True, sdpa=sdpa))
            rows.append(dict(r, channels_last=True, kernels=kernels, sdpa=sdpa))
    # low-VRAM and offload as the trainer runs them on CUDA (NHWC; low-VRAM's step graphed,
    # offload's eager); --full adds NCHW, and low-VRAM eager (what the graph buys at batch 1).
    # On CUDA each in a fresh process (capped_row): the cap must see only that row's memory, as
    # a 3 GiB / 2 GiB card would, not what earlier rows left cached or pinned in this process.
    for mode, cap in (("low-vram", LOW_VRAM_CAP), ("offload", OFFLOAD_CAP)):
        if not cuda:
            rows.append(cap_row(plan, models, mode, False, None, cap, graph=False))
            continue
        graphed = mode == "low-vram"
        variants = [(True, graphed)]                          # (channels_last, cuda graph)
        if plan.full:
            variants.append((False, graphed))
            if graphed:
                variants.append((True, False))
        for nhwc, graph in variants:
            rows.append(capped_row(plan, mode, nhwc, cap, graph))
    if plan.compile:
        rows += compile_rows(plan, models)
    if plan.full:
        for cap in FULL_CAPS:
            rows.append(best_under_cap(plan, models, cap) if cuda else
                        C.row(f"ti-fast best under {cap:g} GiB", "ti-fast", "cap", None, cap_gib=cap,
                              status="skipped: needs CUDA"))
    flops = None
    try:
        flops = count_flops(models, plan)
    except Exception as e:
        plan.say(f"bench: FLOP count failed ({type(e).__name__}: {e})")
    del models
    C.free_memory(plan.device)
    return rows, flops, attention


def compile_rows(plan: Plan, models: TiFastModels) -> list[dict]:
    """torch.compile of the UNet (ti_fast.training.accel.compile_unet, as --compile), the eager
    step around it, one row per batch; compile_s = the first step's time less one timed step."""
    rows = []
    for b in plan.batches:
        r = measure(plan, "ti-fast torch.compile", "ti-fast", "compile", b,
                    lambda: ti_step(models, plan, b, "compile"))
        if r["status"] == "ok":
            r["compile_s"] = r["first_step_s"] - r["ms_per_step"] / 1e3
        rows.append(r)
        torch._dynamo.reset()
    return rows


def cap_row(plan: Plan, models: TiFastModels, mode: str, nhwc: bool, cap: float | None, label_cap: float,
            graph: bool) -> dict:
    """One low-vram/offload row in this process (runs on the CPU too, where nothing is capped:
    the offloader's hooks and copies work there, without streams)."""
    r = measure(plan, _cap_name(mode, nhwc, label_cap, graph), "ti-fast", mode, 1,
                lambda: ti_step(models, plan, 1, mode, channels_last=nhwc, graph=graph), cap=cap)
    return dict(r, channels_last=nhwc, cuda_graph=graph)


def _cap_name(mode: str, nhwc: bool, cap: float, graph: bool) -> str:
    return f"ti-fast {mode}{' + channels_last' if nhwc else ''}{' + cuda-graph' if graph else ''} (cap {cap:g} GiB)"


def capped_row(plan: Plan, mode: str, nhwc: bool, cap: float, graph: bool) -> dict:
    """cap_row in a child process (`--row MODE --cap GIB [--channels-last] [--graph]`), which
    builds its own models, switches the allocator to expandable segments as the trainer does for
    these modes, and prints the row as its last line."""
    cmd = [sys.executable, "-m", "bench.train_throughput", "--row", mode, "--cap", str(cap)]
    cmd += (["--channels-last"] if nhwc else []) + (["--graph"] if graph else [])
    cmd += ["--tiny", "--device", plan.device.type] if plan.tiny else []
    name = _cap_name(mode, nhwc, cap, graph)
    try:
        r = C.json_from_child(cmd, timeout=150)
    except Exception as e:
        r = C.row(name, "ti-fast", mode, 1, cap_gib=cap, channels_last=nhwc, cuda_graph=graph,
                  status=f"error: child: {type(e).__name__}: {str(e)[:300]}")
    r["process"] = "child"
    plan.say(f"bench: {name} (child process): {r['status']}"
             + (f", {r['ms_per_step']:.1f} ms/step, peak {r.get('peak_gib') or 0:.2f} GiB" if r.get("ms_per_step") else ""))
    return r


def child_row(args) -> int:
    """--row: one capped row in this (fresh) process; prints it as one JSON line."""
    from ti_fast.training.lowvram import lean_allocator
    plan = make_plan(argparse.Namespace(tiny=args.tiny, device=args.device, full=False, compile=False,
                                        compile_only=False, batches=None, quiet=True))
    if plan.device.type == "cuda":
        lean_allocator()
    models = TiFastModels(plan)
    C.free_memory(plan.device)
    r = cap_row(plan, models, args.row, args.channels_last, args.cap, args.cap, graph=args.graph)
    print(json.dumps(C.clean(r), default=C.jsonable))
    return 0


def best_under_cap(plan: Plan, models: TiFastModels, cap: float) -> dict:
    """The first of eager/low-vram at batch 8, 4, 1 that runs under the cap: what a card of that
    size gets."""
    tried = []
    for b in (8, 4, 1):
        for mode in ("eager", "low-vram"):
            r = measure(plan, f"ti-fast best under {cap:g} GiB ({mode})", "ti-fast", mode, b,
                        lambda: ti_step(models, plan, b, mode), cap=cap)
            if r["status"] == "ok":
                r["mode"], r["tried"] = "cap", tried
                return r
            tried.append(f"{mode} b{b}: {r['status']}")
    return C.row(f"ti-fast best under {cap:g} GiB", "ti-fast", "cap", None, cap_gib=cap, status="oom", tried=tried)


def peer_rows(plan: Plan) -> list[dict]:
    try:
        from .peer import DiffusersTI
        ucfg, ccfg = (TINY_UNET, TINY_CLIP) if plan.tiny else (UNetConfig(), CLIPConfig())
        peer = DiffusersTI(ucfg, TINY_VAE if plan.tiny else VAEConfig(), ccfg, plan.device, plan.size)
    except Exception as e:
        why = f"error: {type(e).__name__}: {str(e)[:300]}"
        return [C.row(n, "peer", m, b, status=why) for n, m, b in
                [("diffusers-TI", "eager", b) for b in plan.batches] +
                [("diffusers-TI + grad. checkpointing", "checkpointing", 1)]]

    def make(b, ckpt):
        def setup():
            peer.set_checkpointing(ckpt)
            pixels, ids = peer.batch(b)
            last, skipped0 = {}, peer.skipped_steps()

            def fn():
                last["loss"] = peer.step(pixels, ids)

            def finish():
                return {"loss": last["loss"], "skipped_steps": peer.skipped_steps() - skipped0}
            return fn, finish
        return setup

    batches = sorted(set(plan.batches) | ({4} if plan.full and not plan.tiny else set()))
    rows = [measure(plan, "diffusers-TI", "peer", "eager", b, make(b, False)) for b in batches]
    rows.append(measure(plan, "diffusers-TI + grad. checkpointing", "peer", "checkpointing", 1, make(1, True)))
    if plan.full and not plan.tiny:
        rows.append(measure(plan, "diffusers-TI + grad. checkpointing", "peer", "checkpointing", 4, make(4, True)))
    del peer
    C.free_memory(plan.device)
    return rows


def kernel_results(plan: Plan) -> dict:
    """The fused-kernel benchmarks, when their modules exist: each exposes run() -> list[dict]."""
    out = {}
    for mod in ("bench_group_norm_silu", "bench_geglu"):
        if plan.device.type != "cuda":
            out[mod] = {"status": "skipped: needs CUDA"}
            continue
        try:
            m = importlib.import_module(f"bench.{mod}")
        except ImportError as e:
            out[mod] = {"status": f"absent ({e})"}
            continue
        try:
            out[mod] = {"status": "ok", "rows": m.run()}
        except Exception as e:
            out[mod] = {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
        plan.say(f"bench: {mod}: {out[mod]['status']}")
    return out


# ----------------------------------------------------------------------------- main

def run(plan: Plan) -> dict:
    dev = plan.device
    t_start = time.perf_counter()
    context = C.cuda_context_bytes(dev)                # before anything is allocated
    env = C.environment(dev)
    env["ti_fast_kernels"] = "triton" if dev.type == "cuda" and ops.fused_ops("auto", verbose=False) else "torch"
    matmul = C.matmul_peak_flops(dev)
    plan.say(f"bench: {env['gpu']}: matmul peak {matmul['flops'] / 1e12:.1f} TFLOP/s ({matmul['dtype']} {matmul['n']}^3)")
    if plan.compile_only or plan.runs:
        from .runs import runs_rows
        models = TiFastModels(plan)
        env["ti_fast_attention"] = models.attention
        rows = runs_rows(plan, models, micro_batch) if plan.runs else compile_rows(plan, models)
        counted = count_flops(models, plan) if plan.tiny else None
        startup, kernels = {}, {}
        del models
    else:
        from .startup import run_startup
        with tempfile.TemporaryDirectory(prefix="ti-bench-") as work:
            startup = run_startup(Path(work), dev, plan.tiny, say=plan.say)
        rows, counted, env["ti_fast_attention"] = ti_rows(plan)
        rows += peer_rows(plan)
        kernels = kernel_results(plan)
    flop = counted if plan.tiny and counted else C.SD15_FLOP_PER_SAMPLE
    C.finish_rows(rows, flop, matmul["flops"])
    memory = {"cuda_context_gib": None if context is None else context / C.GIB,
              "outside_allocator_gib_at_end": None if dev.type != "cuda" else C.outside_allocator_bytes(dev) / C.GIB}
    return {"bench": "train_throughput", "tiny": plan.tiny, "full": plan.full, "size": plan.size, "env": env,
            "matmul_peak": matmul, "flop_per_sample": flop, "flop_per_sample_counted": counted,
            "memory": memory, "rows": rows, "startup": startup, "kernels": kernels,
            "wall_s": time.perf_counter() - t_start}


def summary(result: dict) -> str:
    s = result["startup"]
    lines = [C.format_table(result["rows"]), ""]
    la = s.get("launch", {})
    lines.append(f"launch-to-first-step ({la.get('images')} images, {la.get('size')} px): "
                 f"{la.get('launch_to_first_step_s')} s issued, {_r(la.get('train_call_s'))} s whole train() call"
                 f" [{la.get('status')}]")
    lw = s.get("launch_warm")
    if lw:
        lines.append(f"  again in a fresh process (Triton kernels cached on disk): {lw.get('launch_to_first_step_s')} s "
                     f"issued, {_r(lw.get('process_s'))} s from interpreter start [{lw.get('status')}]")
    lr = s.get("load_rss", {})
    lines.append(f"checkpoint load: peak RssAnon growth {_r(lr.get('rss_anon_growth_gib'))} GiB for a "
                 f"{_r(lr.get('file_gib'))} GiB file, {_r(lr.get('load_s'))} s [{lr.get('status')}]")
    g = s.get("generation", {})
    lines.append(f"generation ({g.get('steps')} Euler steps, CFG, {g.get('size')} px, decode): "
                 f"{_r(g.get('s_per_image'))} s/image, peak {_r(g.get('peak_gib'))} GiB [{g.get('status')}]")
    for k, v in result["kernels"].items():
        lines.append(f"{k}: {v['status']}" + (f" ({len(v['rows'])} rows in the JSON)" if "rows" in v else ""))
    m = result["memory"]
    lines.append(f"CUDA context {_r(m['cuda_context_gib'])} GiB; outside the allocator at the end "
                 f"{_r(m['outside_allocator_gib_at_end'])} GiB; FLOP/sample {result['flop_per_sample']:.3g}"
                 f" (counted: {_g(result['flop_per_sample_counted'])}); matmul peak "
                 f"{result['matmul_peak']['flops'] / 1e12:.1f} TFLOP/s; wall {result['wall_s']:.0f} s")
    return "\n".join(lines)


def _r(v):
    return "n/a" if v is None else f"{v:.2f}"


def _g(v):
    return "n/a" if v is None else f"{v:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models at 64 px on the CPU: checks the harness, not speed")
    ap.add_argument("--full", action="store_true", help="also batch 4, torch.compile, and 4/6/8 GiB caps")
    ap.add_argument("--compile", action="store_true", help="also torch.compile rows (first_step_s = compile time)")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile rows")
    ap.add_argument("--runs", action="store_true", help="only K = 1, 2, 4, 8 runs co-batched vs one after another")
    ap.add_argument("--batches", default=None, help="comma list replacing the batch 1 and 8 pair (e.g. 8)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; --tiny writes only with --out)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--row", choices=("low-vram", "offload"), help="(internal) one capped row in this process")
    ap.add_argument("--cap", type=float, default=None, help="(with --row) allocator cap in GiB")
    ap.add_argument("--channels-last", action="store_true", help="(with --row) NHWC")
    ap.add_argument("--graph", action="store_true", help="(with --row) the step replayed from a CUDA graph")
    args = ap.parse_args(argv)
    if args.row:
        return child_row(args)
    plan = make_plan(args)
    result = run(plan)
    print(summary(result))
    out = args.out or (None if plan.tiny else C.REPO / "bench" / "results")
    if out is not None:
        result["results_file"] = str(C.write_results(out, result))
    print(json.dumps(C.clean(result), default=C.jsonable, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
