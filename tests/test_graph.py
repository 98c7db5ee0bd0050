"""ti_fast.training.graph: CUDA-graph capture of the training step.

CPU: the refusal and eager fallback, the static-buffer keys and copies, the in-place snapshot and
restore that undoes the warm-up, and the lr tensor hand-over. GPU (`gpu` marker): a graphed step
and an eager step from the same state give the same losses, vectors, optimizer state and
generator state, across lr changes, grad accumulation and two bucket shapes.
"""
import copy

import pytest
import torch

from ti_fast.models import UNet, UNetConfig, CLIPTextEncoder, CLIPConfig
from ti_fast.training.graph import (GraphedStep, GraphUnavailable, StaticBatches, batch_key, ineligible_reason,
                                 maybe_graphed, take_snapshot, restore_snapshot, LrTensors, state_steps_to)
from ti_fast.training.step import TrainStep, MicroBatch, LossScaler

UCFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False),
                  num_heads=2, context_dim=32, norm_groups=8)
CCFG = CLIPConfig(vocab_size=100, width=32, layers=2, heads=4, mlp=64)


def _step(device="cpu", dtype=torch.float32, seed=0, scaler=None, optimizer=None, models=None):
    if models is None:
        torch.manual_seed(0)
        models = (UNet(UCFG).to(device, dtype).requires_grad_(False),
                  CLIPTextEncoder(CCFG).to(device, dtype).requires_grad_(False))
    unet, te = models
    vectors = torch.nn.Parameter(torch.linspace(-0.05, 0.05, 2 * 32, device=device).view(2, 32))
    opt = optimizer([vectors]) if optimizer else torch.optim.AdamW([vectors], lr=1e-2, weight_decay=0.0)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return TrainStep(unet, te, vectors, opt, generator=gen, scaler=scaler), models


def _mb(b=1, hw=8, device="cpu", seed=0, weight=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 98, (b, 77), generator=g)
    vi = torch.full((b, 77), -1)
    vi[:, 2], vi[:, 3] = 0, 1
    w = torch.rand(b, 1, hw, hw, generator=g) if weight else None
    mb = MicroBatch(latents=torch.randn(b, 4, hw, hw, generator=g), input_ids=ids, vector_index=vi, weight=w)
    return MicroBatch(**{k: (v.to(device) if v is not None else None) for k, v in vars(mb).items()})


# ----------------------------------------------------------------------------- CPU

def test_refuses_cpu_step_clearly():
    step, _ = _step()
    reason = ineligible_reason(step)
    assert reason is not None and "CUDA" in reason
    with pytest.raises(GraphUnavailable, match="CUDA"):
        GraphedStep(step)


def test_maybe_graphed_falls_back_with_one_line():
    step, _ = _step()
    lines = []
    assert maybe_graphed(step, say=lines.append) is step
    assert len(lines) == 1 and "eagerly" in lines[0]


def test_batch_key_tells_shapes_dtypes_and_fields_apart():
    a, b = _mb(1), _mb(1, seed=5)
    assert batch_key([a]) == batch_key([b])                     # same shapes, other values
    assert batch_key([a]) != batch_key([_mb(2)])                # batch size
    assert batch_key([a]) != batch_key([_mb(1, hw=16)])         # bucket size
    assert batch_key([a]) != batch_key([_mb(1, weight=True)])   # optional field present
    assert batch_key([a]) != batch_key([a, a])                  # accumulation group length
    half = MicroBatch(a.latents.half(), a.input_ids, a.vector_index)
    assert batch_key([a]) != batch_key([half])


def test_static_batches_copy_in_place_and_refuse_other_shapes():
    src = [_mb(2, weight=True), _mb(2, seed=3, weight=True)]
    # an expanded c_concat, as the trainer builds for inpainting models
    src[0].c_concat = torch.randn(1, 5, 8, 8).expand(2, -1, -1, -1)
    src[1].c_concat = torch.randn(1, 5, 8, 8).expand(2, -1, -1, -1)
    st = StaticBatches(src)
    ptrs = [[getattr(m, f).data_ptr() for f in ("latents", "input_ids", "weight", "c_concat")] for m in st.mbs]
    assert st.mbs[0].latent_std is None
    assert st.mbs[0].c_concat.is_contiguous()
    new = [_mb(2, seed=7, weight=True), _mb(2, seed=8, weight=True)]
    for m in new:
        m.c_concat = torch.randn(1, 5, 8, 8).expand(2, -1, -1, -1)
    st.copy_from(new)
    for dst, s in zip(st.mbs, new):
        for f in ("latents", "input_ids", "vector_index", "weight", "c_concat"):
            assert torch.equal(getattr(dst, f), getattr(s, f)), f
    assert ptrs == [[getattr(m, f).data_ptr() for f in ("latents", "input_ids", "weight", "c_concat")] for m in st.mbs]
    with pytest.raises(ValueError):
        st.copy_from([_mb(1), _mb(1)])


def test_snapshot_restore_undoes_warmup_in_place():
    """After restore, training goes on exactly as from the snapshot: this is what lets the
    graph's warm-up run real steps without changing the run."""
    step, models = _step()
    mbs = [_mb(1)]
    step(mbs)                                    # some history: AdamW state exists
    snap = take_snapshot(step.vectors, step.optimizer, step.gen)
    ref, _ = _step(models=models)                # a twin at the same point
    ref.vectors.data.copy_(step.vectors.data)
    ref.optimizer.load_state_dict(copy.deepcopy(step.optimizer.state_dict()))   # no shared tensors
    ref.gen.set_state(step.gen.get_state())
    st = step.optimizer.state[step.vectors]
    ptrs = {k: v.data_ptr() for k, v in st.items()}
    vptr = step.vectors.data_ptr()
    for _ in range(2):                            # the "warm-up"
        step(mbs)
    assert not torch.equal(step.vectors, ref.vectors)
    restore_snapshot(snap, step.vectors, step.optimizer, step.gen)
    assert step.vectors.data_ptr() == vptr and {k: v.data_ptr() for k, v in st.items()} == ptrs
    la, _ = step(mbs)
    lb, _ = ref(mbs)
    assert torch.equal(la, lb)
    assert torch.equal(step.vectors, ref.vectors)


def test_restore_zeroes_state_created_by_warmup():
    """First capture: no AdamW state before the warm-up; zeroed state == a fresh optimizer."""
    step, models = _step()
    ref, _ = _step(models=models)
    mbs = [_mb(1)]
    snap = take_snapshot(step.vectors, step.optimizer, step.gen)
    step(mbs)
    assert step.optimizer.state[step.vectors]
    restore_snapshot(snap, step.vectors, step.optimizer, step.gen)
    for _ in range(2):
        la, _ = step(mbs)
        lb, _ = ref(mbs)
        assert torch.equal(la, lb)
    assert torch.equal(step.vectors, ref.vectors)


def test_lr_tensors_follow_the_trainers_floats():
    v = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([v], lr=0.5)
    lr = LrTensors(opt, torch.device("cpu"))
    old = lr.swap_in()
    assert opt.param_groups[0]["lr"] is lr.tensors[0] and opt.param_groups[0]["capturable"] is True
    lr.swap_out(old)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["capturable"] is False
    opt.param_groups[0]["lr"] = 0.125            # what the trainer does each step
    lr.sync()
    assert lr.tensors[0].item() == 0.125


def test_state_steps_move_to_the_device():
    v = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([v], lr=0.5)
    v.grad = torch.ones(3)
    opt.step()
    state_steps_to(opt, torch.device("meta"))
    assert opt.state[v]["step"].device.type == "meta" and opt.state[v]["step"].dtype == torch.float32


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("max_graphs", [8, 1], ids=["all_graphed", "limit_1_rest_eager"])
def test_graphed_equals_eager_on_gpu(max_graphs):
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager, models = _step(dev, seed=3)
    graphed_inner, _ = _step(dev, seed=3, models=models)
    graphed = GraphedStep(graphed_inner, warmup=2, max_graphs=max_graphs, say=lambda *a: None)
    groups = [[_mb(1, device=dev, seed=1)], [_mb(2, device=dev, seed=2)],            # two buckets
              [_mb(1, device=dev, seed=4), _mb(1, device=dev, seed=5)],              # grad accumulation
              [_mb(1, device=dev, seed=6)], [_mb(2, device=dev, seed=7, weight=False)]]
    lrs = [1e-2, 5e-3, 5e-3, 1e-3, 2e-3]
    for mbs, lr in zip(groups, lrs):
        for s in (eager, graphed_inner):
            for g in s.optimizer.param_groups:
                g["lr"] = lr
        le, fe = eager(mbs)
        lg, fg = graphed(mbs)
        torch.testing.assert_close(lg, le, rtol=1e-4, atol=1e-6)
        assert bool(fe) and bool(fg)
        torch.testing.assert_close(graphed_inner.vectors, eager.vectors, rtol=1e-4, atol=1e-6)
    assert len(graphed.graphs) == min(3, max_graphs)
    se, sg = eager.optimizer.state[eager.vectors], graphed_inner.optimizer.state[graphed_inner.vectors]
    torch.testing.assert_close(sg["exp_avg"], se["exp_avg"], rtol=1e-4, atol=1e-7)
    assert float(sg["step"]) == float(se["step"]) == len(groups)
    assert torch.equal(eager.gen.get_state(), graphed_inner.gen.get_state())


@pytest.mark.gpu
@needs_cuda
def test_fp16_scaler_and_other_optimizers_fall_back_on_gpu():
    dev = torch.device("cuda")
    s, _ = _step(dev, dtype=torch.float16, scaler=LossScaler())
    lines = []
    assert maybe_graphed(s, say=lines.append) is s and "fp16" in lines[0]
    s2, _ = _step(dev, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert "SGD" in ineligible_reason(s2)
