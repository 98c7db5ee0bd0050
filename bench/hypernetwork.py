"""Hypernetwork training throughput, `python -m bench.train_throughput --hypernetwork [--tiny]`:
ti-fast's hypernetwork step against the way A1111 trains hypernetworks, and ti-fast's embedding
step, in one process on one GPU, on the same data (cached latents, one 77-token prompt per image)
and the same hypernetwork (A1111's defaults: 1,2,1, no activation, Normal init, no dropout, at
the model's widths 768/320/640/1280; fp32 master weights).

Rows, per batch (1 and 8; 1 and 2 with --tiny):
  hypernetwork graphed      ti-fast's step (training.step.build_step, cuda_graph=True) over
                            training.trainable_hypernetwork.HypernetworkTrainable: bf16 UNet and
                            text encoder, channels_last, Triton GroupNorm/GEGLU, SDPA, capturable
                            AdamW, replayed from a CUDA graph — the trainer's default on CUDA
  hypernetwork eager        the same step without the graph
  hypernetwork A1111-style  A1111's train_hypernetwork step: fp16 UNet and text encoder under
                            fp16 autocast, GradScaler (scale, step, update: a host sync each
                            step), every UNet block checkpointed, math attention, PyTorch ops,
                            eager, torch AdamW; the same hypernetwork modules (ti-fast's hook
                            computes them in fp32 where A1111 autocasts them: a few small matmuls)
  embedding graphed         ti-fast's graphed embedding step (the main bench's default row)
"vs peer" of the two ti-fast hypernetwork rows is the ratio to the A1111-style row at the same
batch. On the CPU (--tiny) the graphed rows are "skipped: needs CUDA" and the others run in fp32
(autocast and the scaler off): a check of the harness, not a speed.
"""
from __future__ import annotations

import time

import torch

from ti_fast.hypernetworks import new_hypernetwork, structure_from_options, unet_widths
from ti_fast.loading.tiny import TINY_CLIP, TINY_UNET
from ti_fast.models import CLIPConfig, CLIPTextEncoder, UNet, UNetConfig, ops, set_attention_backend
from ti_fast.diffusion.schedule import alphas_cumprod
from ti_fast.training.accel import ChannelsLast
from ti_fast.training.step import build_step, new_member
from ti_fast.training.trainable_hypernetwork import HypernetworkTrainable

from . import common as C
from .train_throughput import Plan, TiFastModels, count_flops, measure, micro_batch, ti_step

LR = 1e-5                      # A1111's hypernetwork default


def hypernetwork_for(unet, device) -> "torch.nn.Module":
    """A1111's default new hypernetwork at the UNet's widths, on the device (fp32)."""
    return new_hypernetwork("bench", unet_widths(unet), structure_from_options(), seed=0).to(device)


def hn_step(models: TiFastModels, plan: Plan, b: int, graph: bool):
    """(fn, finish) for ti-fast's hypernetwork step, as the trainer builds it on CUDA."""
    unet = models.unet
    nhwc = ChannelsLast(unet).attach() if plan.device.type == "cuda" else None
    trainable = HypernetworkTrainable(hypernetwork_for(unet, plan.device), "bench").attach(unet)
    built = None

    def restore():
        if built is not None:
            built.reset()
        trainable.close()
        if nhwc is not None:
            nhwc.detach()

    try:
        gen = torch.Generator(device=plan.device).manual_seed(0)
        m = new_member(trainable, lr=LR, generator=gen)
        built = build_step(unet, models.te, [m], cuda_graph=graph, say=plan.say)
        if graph and not built.graphed:
            raise RuntimeError("the hypernetwork step could not be captured in a CUDA graph")
        mb = [micro_batch(plan, models.te, b)]
    except BaseException:
        restore()
        raise
    last = {}

    def fn():
        for g in built.base.optimizers[0].param_groups:
            g["lr"] = LR
        last["out"] = built.fn([mb])

    def finish():
        restore()
        loss, finite = last["out"]
        return {"loss": float(loss), "finite": bool(finite)}

    return fn, finish


class A1111Style:
    """fp16 UNet and text encoder (fp32 on the CPU), math attention, PyTorch ops, every UNet
    block checkpointed; `step(b)` -> (fn, finish) for one batch size."""

    def __init__(self, plan: Plan):
        self.plan, dev = plan, plan.device
        self.cuda = dev.type == "cuda"
        dtype = torch.float16 if self.cuda else torch.float32
        ucfg, ccfg = (TINY_UNET, TINY_CLIP) if plan.tiny else (UNetConfig(), CLIPConfig())
        self.unet = C.build(lambda: UNet(ucfg), dev, dtype)
        self.te = C.build(lambda: CLIPTextEncoder(ccfg), dev, dtype)
        for m in (self.unet, self.te):
            set_attention_backend(m, "math", dev, verbose=False)
        ops.set_kernels(self.unet, "torch", verbose=False)
        self.unet.set_gradient_checkpointing(True)              # every block (A1111's training default)
        acp = alphas_cumprod().float().to(dev)
        self.sqrt_a, self.sqrt_1ma = acp.sqrt(), (1 - acp).sqrt()

    def step(self, b: int):
        dev, unet = self.plan.device, self.unet
        trainable = HypernetworkTrainable(hypernetwork_for(unet, dev), "a1111").attach(unet)
        opt = torch.optim.AdamW(trainable.parameters(), lr=LR, weight_decay=0.0)
        scaler = torch.amp.GradScaler(dev.type, enabled=self.cuda)
        gen = torch.Generator(device=dev).manual_seed(0)
        mb = micro_batch(self.plan, self.te, b)
        last = {}

        def fn():
            with torch.autocast(dev.type, dtype=torch.float16, enabled=self.cuda):
                with torch.no_grad():
                    ctx = self.te(mb.input_ids)
                x0 = mb.latents.float()
                noise = torch.randn(x0.shape, generator=gen, device=dev)
                t = torch.randint(0, 1000, (b,), generator=gen, device=dev)
                x_t = self.sqrt_a[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1ma[t].view(-1, 1, 1, 1) * noise
                loss = torch.nn.functional.mse_loss(unet(x_t.to(unet.dtype), t, ctx).float(), noise)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            last["loss"] = loss.detach()

        def finish():
            trainable.close()
            return {"loss": float(last["loss"]), "finite": bool(torch.isfinite(last["loss"]))}

        return fn, finish


def run_rows(plan: Plan) -> tuple[list[dict], float]:
    """Every row: the ti-fast ones first (bf16 models), then A1111-style on its own fp16 models;
    and the FLOPs per sample MFU counts (the embedding step's: 1.72e12 at SD1.5, counted at tiny
    shapes; the hypernetwork step skips the text encoder's backward and adds its small MLPs)."""
    cuda = plan.device.type == "cuda"
    rows = []
    models = TiFastModels(plan)
    flop = count_flops(models, plan) if plan.tiny else C.SD15_FLOP_PER_SAMPLE
    for b in plan.batches:
        if cuda:
            rows.append(measure(plan, "hypernetwork graphed", "ti-fast", "cuda-graph", b,
                                lambda: hn_step(models, plan, b, graph=True)))
        else:
            rows.append(C.row("hypernetwork graphed", "ti-fast", "cuda-graph", b, status="skipped: needs CUDA"))
        rows.append(measure(plan, "hypernetwork eager", "ti-fast", "eager", b, lambda: hn_step(models, plan, b, False)))
        if cuda:
            r = measure(plan, "embedding graphed", "ti-fast", "cuda-graph", b,
                        lambda: ti_step(models, plan, b, "cuda-graph", channels_last=True))
        else:
            r = C.row("embedding graphed", "ti-fast", "cuda-graph", b, status="skipped: needs CUDA")
        rows.append(dict(r, kind="embedding"))
    del models
    C.free_memory(plan.device)
    a1111 = A1111Style(plan)
    for b in plan.batches:
        rows.append(measure(plan, "hypernetwork A1111-style", "a1111", "checkpointing", b, lambda: a1111.step(b)))
    del a1111
    C.free_memory(plan.device)
    return rows, flop


def ratios(rows: list[dict]) -> None:
    """Each ti-fast hypernetwork row against the A1111-style row of its batch."""
    peer = {r["batch"]: r for r in rows if r["name"] == "hypernetwork A1111-style" and r["samples_per_s"]}
    for r in rows:
        p = peer.get(r["batch"])
        if r["name"].startswith("hypernetwork ") and r["impl"] == "ti-fast" and r["samples_per_s"] and p:
            r["ratio_vs_peer"], r["peer_row"] = r["samples_per_s"] / p["samples_per_s"], p["name"]


def run(plan: Plan) -> dict:
    t0 = time.perf_counter()
    env = C.environment(plan.device)
    matmul = C.matmul_peak_flops(plan.device)
    rows, flop = run_rows(plan)
    C.finish_rows(rows, flop, matmul["flops"])
    ratios(rows)
    return {"bench": "train_throughput --hypernetwork", "tiny": plan.tiny, "size": plan.size, "env": env,
            "matmul_peak": matmul, "flop_per_sample": flop, "rows": rows, "wall_s": time.perf_counter() - t0}


def write(out_dir, result: dict):
    """bench/results/<date>-<gpu>-hypernetwork.json (a run a day each: earlier ones kept)."""
    import json
    from pathlib import Path
    from ti_fast.fsutil import atomic_write_text
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = C.results_path(out, f"{result['env']['gpu']} hypernetwork")
    atomic_write_text(p, json.dumps(C.clean(result), indent=1, default=C.jsonable, allow_nan=False) + "\n")
    return p
