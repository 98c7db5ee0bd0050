"""Kernel precompilation (ti_fast/training/prewarm.py, ti_fast/kernels/precompile.py).

CPU: the meta-device trace records the fused-op calls of a UNet forward and a VAE encode.
sm_90 harness (no GPU: Triton compiles for an H100/H200 target, nothing launches): after the
precompile tasks ran, a real UNet forward + backward finds every kernel it launches already
compiled — the property that takes the JIT off the first training step.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ti_fast.loading.tiny import TINY_UNET, TINY_VAE
from ti_fast.models import UNet, VAE
from ti_fast.training import prewarm

from kernel_testing import compile_for_sm90, count_compiles


def test_trace_records_the_fused_calls_of_a_unet_forward_and_a_vae_encode():
    unet = UNet(TINY_UNET).to(torch.bfloat16)
    calls = prewarm.unet_calls(unet, 2, (16, 16), torch.bfloat16)
    kinds = {c[0] for c in calls}
    assert kinds == {"group_norm", "geglu"}
    gn = [c for c in calls if c[0] == "group_norm"]
    assert all(c[1][0] == 2 and c[2] == torch.bfloat16 for c in gn)
    # the first ResBlock sees only the noisy latents (no gradient needed there); after the first
    # cross-attention the activations depend on the trainable embedding
    assert gn[0][6] is False and gn[-1][6] is True
    assert any(c[5] for c in gn) and any(not c[5] for c in gn)          # with and without SiLU
    vcalls = prewarm.vae_calls(VAE(TINY_VAE), 4, (64, 64))
    assert vcalls and all(c[1][0] == 4 and c[6] is False for c in vcalls)
    assert all(p.device.type == "cpu" for p in unet.parameters())     # the real model is untouched


def test_nothing_to_precompile_on_the_cpu():
    unet, vae = UNet(TINY_UNET), VAE(TINY_VAE)
    assert prewarm.start(unet, vae, device=torch.device("cpu"), batch=1, image_hw=(64, 64),
                         dtype=torch.float32, channels_last=False) is None


CHECK = r"""
import sys, torch
sys.path.insert(0, TESTS_DIR)
from kernel_testing import count_compiles
from ti_fast.models import UNet, ops
from ti_fast.loading.tiny import TINY_UNET
from ti_fast.training import prewarm
from ti_fast.kernels.precompile import run_task
ops._on_device = lambda x: True      # CPU tensors through the (compile-only) kernels
for cl in (False, True):
    unet = UNet(TINY_UNET).to(torch.bfloat16).requires_grad_(False)
    ops.set_kernels(unet, "triton")
    fmt = torch.channels_last if cl else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    tasks = prewarm.tasks_for(prewarm.unet_calls(unet, 2, (16, 16), torch.bfloat16), channels_last=cl)
    with count_compiles() as pre:
        launches = sum(run_task(t, torch.device("cpu")) for t in tasks)
    x = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16).to(memory_format=fmt)
    ctx = torch.randn(2, 77, TINY_UNET.context_dim, dtype=torch.bfloat16, requires_grad=True)
    with count_compiles() as after:
        unet(x, torch.tensor([10, 20]), ctx).float().sum().backward()
    found.append({"check": cl, "tasks": len(tasks), "launches": launches, "precompiled": pre["compiles"],
                  "compiled_after": after["compiles"]})
""".replace("TESTS_DIR", repr(str(Path(__file__).parent)))


def test_precompiled_kernels_cover_a_real_forward_and_backward():
    found = [f for f in compile_for_sm90(CHECK) if "check" in f]
    assert len(found) == 2, found
    for f in found:
        assert f["tasks"] > 0 and f["precompiled"] > 0, f
        assert f["compiled_after"] == 0, f"a real step compiled {f['compiled_after']} more kernels: {f}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precompile_on_cuda_leaves_nothing_to_compile_at_the_first_step():
    pytest.importorskip("triton")
    from ti_fast.models import ops
    dev = torch.device("cuda")
    unet = UNet(TINY_UNET).to(dev, torch.bfloat16).requires_grad_(False)
    vae = VAE(TINY_VAE).to(dev, torch.bfloat16).requires_grad_(False)
    ops.set_kernels(unet, "triton")
    ops.set_kernels(vae, "triton")
    lines = []
    pw = prewarm.start(unet, vae, device=dev, batch=2, image_hw=(64, 64), dtype=torch.bfloat16,
                       channels_last=False, say=lines.append)
    n_vae, n_unet = pw.wait("vae"), pw.wait("unet")
    pw.close()
    assert n_vae > 0 and n_unet > 0, lines
    assert not lines, lines
    with count_compiles() as n:
        vae.encode(torch.randn(4, 3, 64, 64, device=dev))
        ctx = torch.randn(2, 77, TINY_UNET.context_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
        h = 64 // vae.downscale
        unet(torch.randn(2, 4, h, h, device=dev, dtype=torch.bfloat16), torch.tensor([1, 2], device=dev),
             ctx).float().sum().backward()
        torch.cuda.synchronize()
    assert n["compiles"] == 0
