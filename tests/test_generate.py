"""txt2img on the tiny model: files, infotext, per-image seeds, embeddings, inpainting models, tiling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ti_fast.cli import main
from ti_fast.sample.generate import GenerateConfig, generate
from ti_fast.diffusion.sampling import decode_latents
from ti_fast.infotext import parse_infotext


@pytest.fixture(scope="module")
def model(tiny_single):
    from ti_fast.loading import load_model
    return load_model(tiny_single)


def test_cli_generate_writes_pngs_with_infotext(tiny_single, tmp_path):
    from ti_fast.embeddings import Embedding, save_pt
    emb_dir = tmp_path / "emb"
    save_pt(Embedding(name="zzq", vectors=torch.randn(2, 32)), emb_dir / "zzq.pt")
    rc = main(["generate", "--model", str(tiny_single), "--prompt", "a photo of zzq", "--negative-prompt", "blurry",
               "--embeddings", str(emb_dir), "--steps", "3", "--seed", "42", "--width", "64", "--height", "64",
               "--batch", "2", "--clip-skip", "2", "--out", str(tmp_path / "out"), "--device", "cpu",
               "--sampler", "dpmpp_2m", "--quiet"])
    assert rc == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["00000-42.png", "00001-43.png"]
    img = Image.open(files[1])
    assert img.size == (64, 64)
    text = img.text["parameters"]
    assert text.startswith("a photo of zzq\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 43, Size: 64x64, ")
    p = parse_infotext(text)
    assert p["Clip skip"] == "2" and p["Model"] == tiny_single.name and len(p["Model hash"]) == 10
    assert p["TI hashes"].startswith("zzq: ") and len(p["TI hashes"]) == len("zzq: ") + 12


def test_schedule_labels():
    from ti_fast.diffusion.samplers import schedule_label
    assert schedule_label("dpmpp_2m", None) == "Karras" and schedule_label("dpmpp_2m", False) == "Uniform"
    assert schedule_label("euler_a", None) == "Automatic" and schedule_label("euler", True) == "Karras"
    assert schedule_label("ddim", None) == "Automatic"


def test_seeds_are_per_image(model, tmp_path):
    kw = dict(model="unused", prompt="a cat", steps=3, width=64, height=64, device="cpu", quiet=True)
    two = generate(GenerateConfig(seed=10, batch=2, out=str(tmp_path / "a"), **kw), model=model)
    one = generate(GenerateConfig(seed=11, batch=1, out=str(tmp_path / "b"), **kw), model=model)
    a, b = (torch.from_numpy(np.array(i)).int() for i in (two.images[1], one.images[0]))
    assert (a - b).abs().max() <= 1            # same image up to batch-size rounding
    assert two.seeds == [10, 11]


def test_embedding_changes_the_image(model, tmp_path):
    from ti_fast.embeddings import Embedding, save_pt
    save_pt(Embedding(name="zzq", vectors=torch.randn(1, 32) * 3), tmp_path / "e" / "zzq.pt")
    kw = dict(model="unused", steps=3, width=64, height=64, device="cpu", quiet=True, seed=1, sampler="euler")
    with_e = generate(GenerateConfig(prompt="zzq", embeddings=[str(tmp_path / "e")], out=str(tmp_path / "a"), **kw), model=model)
    without = generate(GenerateConfig(prompt="zzq", out=str(tmp_path / "b"), **kw), model=model)
    assert not np.array_equal(np.asarray(with_e.images[0]), np.asarray(without.images[0]))


def test_bad_sizes_and_sampler(model, tmp_path):
    from ti_fast.sample.generate import GenerateError
    with pytest.raises(GenerateError, match="multiples of 8"):
        generate(GenerateConfig(model="x", prompt="a", width=60, out=str(tmp_path)), model=model)
    with pytest.raises(GenerateError, match="unknown sampler"):
        generate(GenerateConfig(model="x", prompt="a", sampler="lms", out=str(tmp_path)), model=model)


def test_tiled_decode_matches_shape_and_is_close(model):
    torch.manual_seed(0)
    lat = torch.randn(1, 4, 12, 16) * 0.5
    full = decode_latents(model.vae, lat, tile=64)
    tiled = decode_latents(model.vae, lat, tile=8, overlap=4)
    assert tiled.shape == full.shape == (1, 3, 96, 128)
    assert torch.isfinite(tiled).all() and (tiled - full).abs().mean() < 0.05


def test_inpainting_model_trains_and_generates(tmp_path):
    """A 9-channel UNet gets A1111's conditioning (mask of ones + grey latent) in both jobs."""
    from ti_fast.loading import load_model
    from ti_fast.loading.tiny import tiny_models, write_single, TINY_UNET
    import dataclasses
    from ti_fast.training.loop import train
    from train_helpers import quick_config
    unet, vae, clip = tiny_models(seed=0, unet_cfg=dataclasses.replace(TINY_UNET, in_channels=9))
    d = tmp_path / "inpaint"
    d.mkdir()
    write_single(d / "model.safetensors", unet, vae, clip)
    import shutil
    from ti_fast.loading import make_tiny
    shutil.copytree(make_tiny(tmp_path / "t", "single") / "tokenizer", d / "tokenizer")
    m = load_model(d)
    assert m.info.variant == "sd1-inpainting"
    res = train(quick_config(d, tmp_path, steps=2))
    assert res.status == "completed"
    out = generate(GenerateConfig(model="x", prompt="a tok", steps=2, width=64, height=64, device="cpu", quiet=True,
                                  seed=0, out=str(tmp_path / "g")), model=m)
    assert out.images[0].size == (64, 64)
