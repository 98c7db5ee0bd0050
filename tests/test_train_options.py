"""Trainer options on the tiny model: latent modes and the disk cache, buckets + flip + alpha
weights, fp16 loss scaling with clipping on unscaled gradients."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from ti_fast.training.loop import train
from train_helpers import quick_config


def _vec(res):
    return torch.load(res.embedding, weights_only=True)["string_to_param"]["*"]


@pytest.mark.parametrize("mode", ["once", "deterministic", "random"])
def test_latent_modes_train(tiny_single, tmp_path, mode):
    res = train(quick_config(tiny_single, tmp_path, steps=3, latents=mode))
    assert res.status == "completed" and torch.isfinite(_vec(res)).all()


def test_cache_dir_reuses_latents(tiny_single, tmp_path):
    cache = tmp_path / "cache"
    a = train(quick_config(tiny_single, tmp_path / "a", steps=3, cache_dir=str(cache)))
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 4                                    # one per image
    stamps = [f.stat().st_mtime_ns for f in files]
    b = train(quick_config(tiny_single, tmp_path / "b", steps=3, cache_dir=str(cache)))
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))] == stamps   # read, not rewritten
    assert torch.equal(_vec(a), _vec(b))
    train(quick_config(tiny_single, tmp_path / "c", steps=1, cache_dir=str(cache), flip=True))
    assert len(list(cache.glob("*.safetensors"))) == 8        # flip is part of the key


def test_buckets_flip_alpha(tiny_single, tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    for i, (w, h) in enumerate([(128, 64), (64, 128), (96, 96), (130, 70)]):
        img = Image.new("RGBA", (w, h), (200, 50, 50, 255))
        img.putpixel((1, 1), (0, 0, 0, 0))
        img.save(data / f"{i}-thing.png")
    res = train(quick_config(tiny_single, tmp_path, steps=4, data=str(data), buckets=True, flip=True,
                             alpha_weight=True, batch_size=2, width=64, height=64))
    assert res.status == "completed" and torch.isfinite(_vec(res)).all()


def test_fp16_scaling_clips_unscaled_gradients(tiny_single):
    """With a power-of-two loss scale, the scaled path must give the very same update."""
    from ti_fast.loading import load_model
    from ti_fast.prompt import PromptTokenizer
    from ti_fast.training.step import LossScaler, MicroBatch, TrainStep
    m = load_model(tiny_single)
    tok = PromptTokenizer(m.tokenizer, {"tok": 2})(["a tok"], chunks=1)
    mb = MicroBatch(latents=torch.randn(1, 4, 8, 8), input_ids=tok.input_ids, vector_index=tok.vector_index)
    outs = []
    for scaler in (None, LossScaler(init=2.0 ** 10)):
        v = torch.nn.Parameter(torch.ones(2, 32) * 0.1)
        opt = torch.optim.SGD([v], lr=1.0)
        step = TrainStep(m.unet, m.text_encoder, v, opt, generator=torch.Generator().manual_seed(0),
                         clip_grad=("norm", 1e-6), scaler=scaler)
        step([mb])
        outs.append(v.detach().clone())
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-7)
    assert (torch.ones(2, 32) * 0.1 - outs[0]).norm() == pytest.approx(1e-6, rel=1e-2)   # clipped to the norm


def test_clip_grad_value_and_schedule(tiny_single, tmp_path):
    from ti_fast.training.config import ConfigError
    from ti_fast.training.lr import parse_clip_grad
    mode, sched = parse_clip_grad("norm:0.1:3, 0.05", 10)
    assert mode == "norm" and sched.rate(0) == 0.1 and sched.rate(3) == 0.05
    for bad in ("norm:abc", "size:1", "value:-1", "value:"):
        with pytest.raises(ConfigError, match="clip-grad"):
            parse_clip_grad(bad, 10)
    res = train(quick_config(tiny_single, tmp_path, steps=4, clip_grad="value:1e-4:2, 1e-5", lr="1.0",
                             optimizer="adamw"))
    assert res.status == "completed"


def test_value_clip_bounds_each_component(tiny_single):
    from ti_fast.loading import load_model
    from ti_fast.prompt import PromptTokenizer
    from ti_fast.training.step import MicroBatch, TrainStep
    m = load_model(tiny_single)
    tok = PromptTokenizer(m.tokenizer, {"tok": 1})(["a tok"], chunks=1)
    mb = MicroBatch(latents=torch.randn(1, 4, 8, 8), input_ids=tok.input_ids, vector_index=tok.vector_index)
    v = torch.nn.Parameter(torch.zeros(1, 32))
    step = TrainStep(m.unet, m.text_encoder, v, torch.optim.SGD([v], lr=1.0),
                     generator=torch.Generator().manual_seed(0), clip_grad=("value", 1e-9))
    step([mb])
    assert v.detach().abs().max() <= 1e-9 * (1 + 1e-6) and v.detach().abs().max() > 0
    step.set_clip(0.0)
    before = v.detach().clone()
    step([mb])
    assert torch.equal(v.detach(), before)


def test_emphasised_captions_train(tiny_single, tmp_path):
    cfg = quick_config(tiny_single, tmp_path, steps=3, template="subject_filewords")
    from pathlib import Path
    for p in Path(cfg.data).glob("*.png"):
        p.with_suffix(".txt").write_text("(orange ring:1.3), [background]")
    res = train(cfg)
    assert res.status == "completed" and torch.isfinite(_vec(res)).all()


def test_progress_bar_shows_the_lr_of_the_step_it_shows(tiny_single, tmp_path, capsys, monkeypatch):
    """The bar's `lr=` is the lr loss.csv logs for the step count the bar shows (it lagged one)."""
    import csv
    import re
    import ti_fast.training.run as run

    real_bar = run._bar

    def every_update(plan):                  # redraw on every update, not every 0.1 s
        bar = real_bar(plan)
        bar.mininterval, bar.miniters = 0, 0
        return bar
    monkeypatch.setattr(run, "_bar", every_update)
    train(quick_config(tiny_single, tmp_path, steps=6, quiet=False,
                       lr="0.01:1, 0.002:2, 0.003:3, 0.004:4, 0.005:5, 0.006"))
    shown = re.findall(r"\b(\d)/6 \[[^\]]*lr=([0-9.e+-]+)\]", capsys.readouterr().err)
    with open(tmp_path / "log" / "loss.csv", newline="") as f:
        logged = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert len({s for s, _ in shown}) >= 5, shown
    for step, lr in shown:
        assert float(lr) == logged[int(step)], (step, lr, logged)
