"""The trainer end to end on the tiny model (CPU): outputs, resume, errors, NaN, OOM, 8-bit state."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from ti_fast.embeddings import read_embedding
from ti_fast.training import loop
from ti_fast.training.config import ConfigError, NonFiniteLossError, OutOfMemoryError
from ti_fast.training.loop import train
from ti_fast.training.outputs import load_state
from train_helpers import quick_config


def test_outputs_and_formats(tiny_single, tmp_path):
    import ti_fast
    res = ti_fast.train(quick_config(tiny_single, tmp_path, steps=4, save_every=2))   # the public API
    assert res.status == "completed" and res.steps == 4
    d = torch.load(res.embedding, weights_only=True)
    assert set(d) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    v = d["string_to_param"]["*"]
    assert v.dtype == torch.float32 and v.device.type == "cpu" and not v.requires_grad and v.shape == (2, 32)
    assert d["step"] == 4 and d["name"] == "tok" and len(d["sd_checkpoint"]) == 10
    st = read_embedding(res.embedding_safetensors)
    assert torch.equal(st.vectors, v)
    log = res.log_dir
    assert (log / "embeddings" / "tok-2.pt").exists() and (log / "embeddings" / "tok-4.pt").exists()
    assert torch.load(log / "embeddings" / "tok-2.pt", weights_only=True)["step"] == 2
    rows = list(csv.DictReader(open(log / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["lr"]) == 0.01 for r in rows)
    assert (log / "loss.png").stat().st_size > 0
    s = json.loads((log / "settings.json").read_text())
    assert s["config"]["steps"] == 4 and s["seed"] == 7 and s["model"]["hash"] == d["sd_checkpoint"]
    assert "torch" in s["versions"]


def test_existing_output_refused(tiny_single, tmp_path):
    train(quick_config(tiny_single, tmp_path, steps=1))
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        train(quick_config(tiny_single, tmp_path, steps=1))
    assert train(quick_config(tiny_single, tmp_path, steps=1, overwrite=True)).status == "completed"


def test_resume_is_bitwise(tiny_single, tmp_path):
    a = train(quick_config(tiny_single, tmp_path / "a", steps=10, grad_accum=2, batch_size=2))
    cfg = quick_config(tiny_single, tmp_path / "b", steps=5, grad_accum=2, batch_size=2)
    train(cfg)
    cfg.steps, cfg.resume = 10, True
    b = train(cfg)
    assert b.steps == 10
    va = torch.load(a.embedding, weights_only=True)["string_to_param"]["*"]
    vb = torch.load(b.embedding, weights_only=True)["string_to_param"]["*"]
    assert torch.equal(va, vb)
    ra = list(csv.reader(open(a.log_dir / "loss.csv")))
    rb = list(csv.reader(open(b.log_dir / "loss.csv")))
    assert ra == rb


def test_embedding_start_keeps_step(tiny_single, tmp_path):
    a = train(quick_config(tiny_single, tmp_path / "a", steps=3))
    b = train(quick_config(tiny_single, tmp_path / "b", steps=5, name=None, embedding=str(a.embedding)))
    assert b.steps == 5 and b.name == "tok"
    assert len(list(csv.reader(open(b.log_dir / "loss.csv")))) == 1 + 2   # steps 4 and 5


@pytest.mark.parametrize("kw, match", [
    (dict(data="/nonexistent/dir"), "nonexistent"),
    (dict(template="no_such_template"), "template"),
    (dict(lr="0.005:100, abc"), "abc"),
    (dict(vectors=0), "vectors"),
    (dict(width=65), "multiples? of 8"),
    (dict(clip_grad="norm:-1"), "clip-grad"),
])
def test_bad_input_fails_before_loading(tmp_path, kw, match):
    cfg = quick_config(tmp_path / "no-model-here", tmp_path, **kw)   # the model does not exist:
    with pytest.raises(ConfigError, match=match):                    # the check comes first
        train(cfg)


def test_explicit_backends_that_cannot_run_fail(tiny_single, tmp_path):
    with pytest.raises(ConfigError, match="CUDA"):
        train(quick_config(tiny_single, tmp_path, kernels="triton"))
    with pytest.raises(ConfigError, match="xformers"):
        train(quick_config(tiny_single, tmp_path, attention="xformers"))


def test_bad_model_is_a_config_error(tmp_path):
    (tmp_path / "notamodel.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="notamodel"):
        train(quick_config(tmp_path / "notamodel.safetensors", tmp_path))


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        train(quick_config(tmp_path / "nomodel", tmp_path, data=str(tmp_path / "empty")))


def test_unreadable_images_skipped(tiny_single, tmp_path, capsys):
    cfg = quick_config(tiny_single, tmp_path, steps=1, quiet=False)
    from pathlib import Path
    (Path(cfg.data) / "broken.png").write_bytes(b"not a png")
    assert train(cfg).status == "completed"
    assert "broken.png" in capsys.readouterr().err


def test_nan_restores_last_good(tiny_single, tmp_path):
    with pytest.raises(NonFiniteLossError, match="lower the learning rate|Lower the learning rate"):
        train(quick_config(tiny_single, tmp_path, steps=30, lr="1e30", allow_huge_lr=True))
    v = torch.load(tmp_path / "out" / "tok.pt", weights_only=True)["string_to_param"]["*"]
    assert torch.isfinite(v).all()


def test_oom_saves_and_names_knobs(tiny_single, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop.GroupStep.__call__

    def boom(self, mbs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, mbs)

    monkeypatch.setattr(loop.GroupStep, "__call__", boom)
    with pytest.raises(OutOfMemoryError, match="batch-size.*gradient-checkpointing"):
        train(quick_config(tiny_single, tmp_path, steps=10))
    d = torch.load(tmp_path / "out" / "tok.pt", weights_only=True)
    assert d["step"] == 2
    assert load_state(tmp_path / "log" / "state.pt")["step"] == 2


def test_cancel_by_callback_and_event(tiny_single, tmp_path):
    import threading
    res = train(quick_config(tiny_single, tmp_path / "a", steps=50), callback=lambda info: info["step"] == 3)
    assert res.status == "cancelled" and res.steps == 3
    assert torch.load(res.embedding, weights_only=True)["step"] == 3
    ev = threading.Event()
    ev.set()                                    # cancelled before the first step: nothing lost either
    res = train(quick_config(tiny_single, tmp_path / "b", steps=50), cancel=ev)
    assert res.status == "cancelled" and res.steps == 0 and res.embedding.exists()


def test_adamw8bit_holds_uint8_state(tiny_single, tmp_path):
    pytest.importorskip("bitsandbytes")
    res = train(quick_config(tiny_single, tmp_path, steps=2, optimizer="adamw8bit"))
    dtypes = {}

    def walk(d):                                # bnb nests its state under a private key
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif torch.is_tensor(v):
                dtypes[k] = v.dtype

    walk(load_state(res.files["state"])["optimizer"]["state"])
    assert dtypes.get("state1") == torch.uint8 and dtypes.get("state2") == torch.uint8, dtypes


def test_gradient_checkpointing_same_gradients(tiny_single):
    from ti_fast.loading import load_model
    m = load_model(tiny_single)
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32, requires_grad=True)
    t = torch.tensor([10, 900])
    grads = []
    for on in (False, True):
        m.unet.set_gradient_checkpointing(on)
        ctx.grad = None
        m.unet(x, t, ctx).square().mean().backward()
        grads.append(ctx.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_lowvram_checkpoints_best_memory_per_flop_until_the_budget_fits():
    from ti_fast.training.lowvram import checkpoint_blocks, activation_estimate_gib
    from ti_fast.models import UNet, UNetConfig
    with torch.device("meta"):                      # SD1.5 shapes, no memory, no init time
        unet = UNet(UNetConfig())
    names = checkpoint_blocks(unet)                 # 512 px, batch 1, bf16, 0.20 GiB
    assert names == ["input_blocks.1", "input_blocks.2", "input_blocks.3", "input_blocks.4", "input_blocks.5",
                     "output_blocks.6", "output_blocks.7", "output_blocks.9", "output_blocks.10", "output_blocks.11"]
    assert checkpoint_blocks(unet, budget_gib=0.45) == ["input_blocks.2", "output_blocks.9",
                                                        "output_blocks.10", "output_blocks.11"]
    assert activation_estimate_gib([]) == pytest.approx(0.686, abs=0.01)      # spec: ~0.7 GiB bf16
    assert activation_estimate_gib(names) <= 0.20
    more = checkpoint_blocks(unet, batch=4)         # a bigger batch needs more recomputation
    assert set(names) < set(more) and activation_estimate_gib(more, batch=4) <= 0.20
    from ti_fast.loading.tiny import TINY_UNET
    tiny = checkpoint_blocks(UNet(TINY_UNET))       # other shapes: the high-resolution levels
    assert tiny and all(n.startswith(("input_blocks", "output_blocks")) for n in tiny)


def test_long_captions_are_reported(tiny_single, tmp_path, capsys):
    from pathlib import Path
    cfg = quick_config(tiny_single, tmp_path, steps=1, quiet=False, template="subject_filewords")
    first = sorted(Path(cfg.data).glob("*.png"))[0]
    first.with_suffix(".txt").write_text("cat " * 120)
    assert train(cfg).status == "completed"
    assert "1 caption(s) make prompts longer than 75 tokens" in capsys.readouterr().err
