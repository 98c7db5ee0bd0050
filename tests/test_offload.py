"""ti_fast.training.offload: the UNet's blocks streamed from (pinned) host memory.

CPU (the same hooks and state machine, copies are plain clones): forward, the context gradient
and a TrainStep's vector gradient are bitwise equal to the resident model's; each block's
parameters point at device copies only while it runs; copies are issued in forward order, then
in reverse for backward, twice per block per step, never more than prefetch + 1 at once; detach
restores the model; the config refuses --offload without CUDA and with --compile/--cuda-graph.
GPU (`gpu` marker): the same equalities with real streams, the peak memory far below the
weights, and the trainer end to end.
"""
from __future__ import annotations

import pytest
import torch

from ti_fast.loading.tiny import tiny_models
from ti_fast.training.config import ConfigError, TrainConfig
from ti_fast.training.preflight import validate
from ti_fast.training.offload import Offloader, streamed_blocks
from ti_fast.training.step import MicroBatch, TrainStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(b=2, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 8, 8, generator=g).to(device, dtype)
    t = torch.tensor([500, 17][:b], device=device)
    ctx = torch.randn(b, 77, 32, generator=g).to(device, dtype).requires_grad_(True)
    return x, t, ctx


def _fwd_bwd(unet, x, t, ctx):
    """eps [B, 4, 8, 8] and d(sum of eps^2)/d(context) [B, 77, 32]."""
    ctx.grad = None
    y = unet(x, t, ctx)
    y.float().square().sum().backward()
    return y.detach(), ctx.grad.clone()


def _names(unet):
    return [n for n, _ in streamed_blocks(unet)]


def test_forward_and_context_grad_bitwise_equal():
    unet = tiny_models(0)[0]
    x, t, ctx = _inputs()
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    with torch.no_grad():
        n0 = unet(x, t, ctx)
    off = Offloader(unet, "cpu").attach()
    y1, g1 = _fwd_bwd(unet, x, t, ctx)
    with torch.no_grad():
        n1 = unet(x, t, ctx)
    assert torch.equal(y1, y0) and torch.equal(g1, g0) and torch.equal(n1, n0)
    off.detach()


def test_trainstep_vector_gradient_and_update_bitwise_equal():
    unet, _, te = tiny_models(0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 800, (2, 77), generator=g)
    vi = torch.full((2, 77), -1)
    vi[:, 3], vi[:, 4] = 0, 1
    mb = MicroBatch(latents=torch.randn(2, 4, 8, 8, generator=g), input_ids=ids, vector_index=vi)
    outs = []
    for offload in (False, True):
        off = Offloader(unet, "cpu").attach() if offload else None
        v = torch.nn.Parameter(torch.linspace(-0.1, 0.1, 64).view(2, 32))
        opt = torch.optim.AdamW([v], lr=1e-2, weight_decay=0.0)
        step = TrainStep(unet, te, v, opt, generator=torch.Generator().manual_seed(5))
        loss, finite = step([mb, mb])                 # grad accumulation: two forward/backward pairs
        outs.append((loss, v.grad.clone(), v.detach().clone(), bool(finite)))
        if off is not None:
            assert all(n == 4 for n in off.loads.values()), off.loads
            off.detach()
    (l0, g0, v0, f0), (l1, g1, v1, f1) = outs
    assert f0 and f1 and torch.equal(l1, l0) and torch.equal(g1, g0) and torch.equal(v1, v0)
    assert g0.abs().sum() > 0


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_weights_on_device_only_while_their_block_runs(prefetch):
    unet = tiny_models(0)[0]
    off = Offloader(unet, "cpu", prefetch=prefetch).attach()
    names = _names(unet)
    assert all(off.on_host(n) for n in names)
    seen = []

    def probe(name, module, args):
        # runs after the offloader's own pre-hook (registered later): this block is loaded, no
        # other, and every parameter sits 256-byte aligned in the block's buffer
        base = off.current_copy.bufs[torch.float32].data_ptr()
        aligned = all((q.data_ptr() - base) % 256 == 0 for q in dict(streamed_blocks(unet))[name].parameters())
        seen.append((name, not off.on_host(name) and aligned, all(off.on_host(o) for o in names if o != name)))

    for name, blk in streamed_blocks(unet):
        for child in blk.children():
            child.register_forward_pre_hook(lambda m, a, name=name: probe(name, m, a))
    x, t, ctx = _inputs()
    _fwd_bwd(unet, x, t, ctx)
    assert seen and all(loaded and others for _, loaded, others in seen), seen
    assert {n for n, _, _ in seen} == set(names)
    assert all(off.on_host(n) for n in names)                      # all back home after backward
    # forward order, then backward's recompute in reverse: each block twice, no wasted prefetch
    assert off.order == names + names[::-1]
    assert off.loads == {n: 2 for n in names}
    assert off.max_resident == prefetch + 1
    # time_embed, conv_in and out never stream: exactly their parameters are outside the buffer
    def in_host(p):
        h = off.host[p.dtype]
        return h.data_ptr() <= p.data_ptr() < h.data_ptr() + h.numel() * h.element_size()
    resident = {n.split(".")[0] + ("" if n.split(".")[0] != "input_blocks" else "." + n.split(".")[1])
                for n, p in unet.named_parameters() if not in_host(p)}
    assert resident == {"time_embed", "input_blocks.0", "out"}
    off.detach()


class _PoisonedHome(Offloader):
    """A block that has left points its parameters at NaNs instead of the (equal) host buffer: any
    kernel that still uses a parameter after its block left — as a CUDA backward would, reading a
    host tensor — poisons the result. On the CPU this is how a use-after-leave becomes visible."""

    def _leave(self, k):
        if self.current != k:
            return
        super()._leave(k)
        for slots in self.blocks[k].slots.values():
            for s in slots:
                s.param.data = torch.full(s.shape, float("nan"), dtype=s.param.dtype)


def test_backward_uses_weights_only_while_their_block_is_loaded():
    """The tensors a recompute saves for backward include the parameters themselves: a block must
    stay loaded until its backward ran (the GPU run of 2026-11-26 failed exactly here)."""
    unet = tiny_models(0)[0]
    x, t, ctx = _inputs()
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    off = _PoisonedHome(unet, "cpu").attach()
    for _ in range(2):
        y1, g1 = _fwd_bwd(unet, x, t, ctx)
        assert torch.equal(y1, y0) and torch.equal(g1, g0)
        assert off.current is None                 # the last block left once ctx's gradient was done
    off.detach()


def test_early_stopped_recompute_still_leaves_the_block():
    """torch's checkpoint stops a recompute (by raising) after the last tensor backward needs.
    Give the block backward runs last a trailing child that saves nothing, so the stop happens in
    the child before it: the block must still go back to host memory."""
    unet = tiny_models(0)[0]
    unet.input_blocks[1].append(torch.nn.Identity())
    off = Offloader(unet, "cpu").attach()
    x, t, ctx = _inputs()
    ran = []
    unet.input_blocks[1][-1].register_forward_hook(lambda m, a, out: ran.append(1))
    _fwd_bwd(unet, x, t, ctx)
    assert len(ran) == 1                           # the trailing child ran in forward only
    assert off.current is None and all(off.on_host(n) for n in _names(unet))
    off.detach()


def test_inference_forward_copies_each_block_once():
    unet = tiny_models(0)[0]
    off = Offloader(unet, "cpu").attach()
    x, t, ctx = _inputs()
    with torch.no_grad():
        unet(x, t, ctx)
    names = _names(unet)
    assert off.order == names                      # no backward follows: nothing prefetched at the end
    assert not off.loaded and off.current is None and all(off.on_host(n) for n in names)
    off.detach()


def test_streamed_blocks_are_checkpointed_while_attached():
    unet = tiny_models(0)[0]
    unet.set_gradient_checkpointing(True, ["output_blocks.2"])
    off = Offloader(unet, "cpu").attach()
    assert all(b.checkpoint for _, b in streamed_blocks(unet))
    off.detach()
    assert [n for n, b in streamed_blocks(unet) if b.checkpoint] == ["output_blocks.2"]


def test_detach_restores_the_model():
    unet = tiny_models(0)[0]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    params = dict(unet.named_parameters())
    x, t, ctx = _inputs()
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    off = Offloader(unet, "cpu").attach()
    host = {dt: (h.data_ptr(), h.numel() * h.element_size()) for dt, h in off.host.items()}
    _fwd_bwd(unet, x, t, ctx)
    off.detach()
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[n] and p.is_contiguous() for n, p in unet.named_parameters())
    for p in unet.parameters():                    # no parameter is left a view of the host buffer
        a, size = host[p.dtype]
        assert not (a <= p.data_ptr() < a + size)
    hooks = [m for m in unet.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooks and not any(b.checkpoint for _, b in streamed_blocks(unet))
    y2, g2 = _fwd_bwd(unet, x, t, ctx)
    assert torch.equal(y2, y0) and torch.equal(g2, g0)
    off2 = Offloader(unet, "cpu").attach()
    with pytest.raises(RuntimeError, match="already"):
        off2.attach()
    off2.detach()


def test_keeps_channels_last_weights():
    from ti_fast.training.accel import ChannelsLast
    unet = tiny_models(0)[0]
    ChannelsLast(unet).attach()
    x, t, ctx = _inputs()
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    off = Offloader(unet, "cpu").attach()
    conv = unet.input_blocks[1][0].in_layers[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    y1, g1 = _fwd_bwd(unet, x, t, ctx)
    assert torch.equal(y1, y0) and torch.equal(g1, g0)
    off.detach()
    assert unet.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kw, msg", [
    (dict(device="cpu"), "needs a CUDA device"),
    (dict(device="cuda", compile=True), "--compile"),
])
def test_config_refuses_offload_combinations(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        validate(TrainConfig(name="x", data="d", offload=True, **kw))
    validate(TrainConfig(name="x", data="d", offload=False, **kw))


def test_offload_with_the_default_cuda_graph_validates():
    # the graph is on by default; with --offload the trainer runs the step eagerly instead
    assert TrainConfig().cuda_graph
    validate(TrainConfig(name="x", data="d", device="cuda", offload=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto resolves to CUDA here")
def test_train_refuses_offload_when_auto_means_cpu(tiny_single, tmp_path):
    from ti_fast.training.loop import train
    from train_helpers import quick_config
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(quick_config(tiny_single, tmp_path, device="auto", offload=True))


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@needs_cuda
def test_gpu_offload_equals_resident_with_streams():
    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    unet = tiny_models(0)[0].to(dev)
    x, t, ctx = _inputs(device=dev)
    y0, g0 = _fwd_bwd(unet, x, t, ctx)
    off = Offloader(unet.cpu(), dev).attach()
    assert all(h.is_pinned() for h in off.host.values())
    assert unet.time_embed[0].weight.is_cuda and not unet.middle_block[0].in_layers[2].weight.is_cuda
    for _ in range(2):
        y1, g1 = _fwd_bwd(unet, x, t, ctx)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    assert off.order == _names(unet) + _names(unet)[::-1]
    off.detach()
    assert all(p.is_cpu for p in unet.parameters())      # back where attach found them


@pytest.mark.gpu
@needs_cuda
def test_gpu_peak_memory_far_below_the_weights():
    """A wider UNet (model_channels 128, ~140 M parameters, 0.28 GB in bf16) at 16x16 latents:
    weights dominate, so the peak with streaming must be a fraction of them."""
    from ti_fast.models import UNet, UNetConfig
    dev = torch.device("cuda")
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=128)).to(torch.bfloat16).requires_grad_(False).eval()
    off = Offloader(unet, dev).attach()
    weights = off.streamed_bytes()
    x = torch.randn(1, 4, 16, 16, device=dev, dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 768, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.tensor([400], device=dev)
    unet(x, t, ctx).float().square().mean().backward()     # cuBLAS/cuDNN workspaces: not ours
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        unet(x, t, ctx).float().square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(ctx.grad).all() and ctx.grad.abs().sum() > 0
    assert peak < 0.5 * weights, (peak / 2**20, weights / 2**20)     # resident: >= 1x
    off.detach()


@pytest.mark.gpu
@needs_cuda
def test_gpu_train_with_offload(tiny_single, tmp_path):
    import csv
    from ti_fast.training.loop import train
    from train_helpers import quick_config

    def losses(res):
        with open(res.log_dir / "loss.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]
    a = train(quick_config(tiny_single, tmp_path / "a", device="cuda", precision="full", steps=3, check_every=1))
    b = train(quick_config(tiny_single, tmp_path / "b", device="cuda", precision="full", steps=3, check_every=1,
                           offload=True))
    assert a.status == b.status == "completed"
    assert losses(b) == pytest.approx(losses(a), rel=1e-3)
