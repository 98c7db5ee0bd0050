"""ti_fast.training.accel: --channels-last and --compile change the memory layout and the
kernels, not the arithmetic: outputs and gradients within 1e-5 (relative to the largest value)
of the plain eager UNet, on the tiny model on the CPU; both flags wired through the trainer.
The compile tests are `slow` (a cold Inductor compile of the tiny UNet's forward and backward
takes about 75 s on 2 CPU cores; the trainer's second compile reuses Inductor's cache)."""
from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from ti_fast.loading.tiny import tiny_models
from ti_fast.training.accel import ChannelsLast, compile_unet
from ti_fast.training.loop import train
from train_helpers import quick_config

NHWC = torch.channels_last


def _inputs():
    """The trainer's shapes at 64 px, batch 1 (so the compile tests share one cached graph)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([611])
    ctx = torch.randn(1, 77, 32, generator=g).requires_grad_(True)
    return x, t, ctx


def _fwd_bwd(unet, x, t, ctx):
    """eps [1, 4, 8, 8] and the gradient of mean(eps^2) w.r.t. the context [1, 77, 32]."""
    ctx.grad = None
    y = unet(x, t, ctx)
    y.square().mean().backward()
    return y.detach(), ctx.grad.clone()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _losses(res):
    with open(res.log_dir / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_channels_last_same_outputs_and_gradients():
    unet = tiny_models(0)[0]
    x, t, ctx = _inputs()
    seen = []
    unet.input_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=NHWC)))
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    nhwc = ChannelsLast(unet).attach()
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=NHWC) and not w.is_contiguous() for w in convs if w.shape[-1] > 1)
    y1, g1 = _fwd_bwd(unet, x, t, ctx)
    y2, g2 = _fwd_bwd_kw(unet, x, t, ctx)
    assert seen == [False, True, True]             # converted once, at the UNet's entry
    assert y1.is_contiguous(memory_format=NHWC)
    for y, g in ((y1, g1), (y2, g2)):
        assert _rel(y, y0) <= 1e-5 and _rel(g, g0) <= 1e-5, (_rel(y, y0), _rel(g, g0))
    nhwc.detach()
    assert all(w.is_contiguous() for w in convs) and not unet._forward_pre_hooks
    y3, g3 = _fwd_bwd(unet, x, t, ctx)
    assert torch.equal(y3, y0) and torch.equal(g3, g0)


def _fwd_bwd_kw(unet, x, t, ctx):
    """The same call with the input passed by name (the pre-hook converts it either way)."""
    ctx.grad = None
    y = unet(x=x, t=t, context=ctx)
    y.square().mean().backward()
    return y.detach(), ctx.grad.clone()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="channels_last applies on CUDA only")
def test_train_channels_last_matches_plain(tiny_single, tmp_path):
    a = train(quick_config(tiny_single, tmp_path / "a", steps=3, device="cuda", precision="full",
                           channels_last=False, cuda_graph=False))
    b = train(quick_config(tiny_single, tmp_path / "b", steps=3, device="cuda", precision="full",
                           channels_last=True, cuda_graph=False))
    assert b.status == "completed" and len(_losses(b)) == 3
    assert _losses(b) == pytest.approx(_losses(a), rel=1e-5)


def test_prepare_unet_nhwc_then_offload():
    from ti_fast.training.accel import prepare_unet
    unet = tiny_models(0)[0]
    x, t, ctx = _inputs()
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    lines = []
    assert prepare_unet(unet, "cpu", channels_last=True, offload=True, say=lines.append) is unet
    assert len(lines) == 1 and "12 UNet blocks" in lines[0]     # tiny: input_blocks.1-5, middle, 6 up
    w = unet.output_blocks[0][0].in_layers[2].weight                # a streamed conv, NHWC in pinned memory
    assert w.is_contiguous(memory_format=NHWC) and not w.is_contiguous()
    y1, g1 = _fwd_bwd(unet, x, t, ctx)
    assert _rel(y1, y0) <= 1e-5 and _rel(g1, g0) <= 1e-5


def test_flags_parse():
    from ti_fast.cli import add_train_args
    p = argparse.ArgumentParser()
    add_train_args(p)
    a = p.parse_args(["--offload", "--compile", "--channels-last"])
    assert a.offload and a.compile and a.channels_last
    b = p.parse_args(["--no-channels-last", "--no-cuda-graph"])
    assert b.channels_last is False and b.cuda_graph is False
    assert not hasattr(p.parse_args([]), "cuda_graph")       # unset flags leave TrainConfig's default (on)


@pytest.mark.slow
def test_compiled_unet_equals_eager():
    unet = tiny_models(0)[0]
    x, t, ctx = _inputs()
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    compiled = compile_unet(unet)
    assert compiled.dtype == unet.dtype and compiled.config is unet.config   # what TrainStep reads
    try:
        for _ in range(2):                         # the compiling call, then the cached graph
            y1, g1 = _fwd_bwd(compiled, x, t, ctx)
            assert _rel(y1, y0) <= 1e-5 and _rel(g1, g0) <= 1e-5, (_rel(y1, y0), _rel(g1, g0))
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_train_compile_reports_compile_time(tiny_single, tmp_path):
    a = train(quick_config(tiny_single, tmp_path / "a", steps=2))
    try:
        b = train(quick_config(tiny_single, tmp_path / "b", steps=2, compile=True))
    finally:
        torch._dynamo.reset()
    settings = json.loads((b.log_dir / "settings.json").read_text())
    assert b.status == "completed" and settings["config"]["compile"] is True
    assert settings["compile_s"] > 0 and "compile_s" not in json.loads((a.log_dir / "settings.json").read_text())
    assert _losses(b)[0] == pytest.approx(_losses(a)[0], rel=1e-5)   # same first step, compiled


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_gpu_channels_last_matches_nchw(kernels):
    """On CUDA the NHWC path is cuDNN's NHWC convs and, with --kernels triton, the GroupNorm
    kernel's channels-last variant: same outputs and context gradient as NCHW (fp32, no TF32)."""
    from ti_fast.models import ops
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        unet = tiny_models(0)[0].cuda()
        assert ops.set_kernels(unet, kernels, verbose=False) == kernels
        x, t, ctx = (v.cuda() for v in _inputs())
        ctx = ctx.detach().requires_grad_(True)
        y0, g0 = _fwd_bwd(unet, x, t, ctx)
        ChannelsLast(unet).attach()
        y1, g1 = _fwd_bwd(unet, x, t, ctx)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    assert y1.is_contiguous(memory_format=NHWC)
    assert _rel(y1, y0) <= 1e-5 and _rel(g1, g0) <= 1e-5, (_rel(y1, y0), _rel(g1, g0))
