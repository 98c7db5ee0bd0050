"""What the trainer writes loads elsewhere, and the run survives what users do to it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ti_fast.training.loop import train
from ti_fast.training.outputs import load_state
from train_helpers import quick_config


def test_diffusers_load_textual_inversion(tiny_diffusers, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    res = train(quick_config(tiny_diffusers, tmp_path, steps=2))
    ours = torch.load(res.embedding, weights_only=True)["string_to_param"]["*"]
    for i, path in enumerate((res.embedding, res.embedding_safetensors)):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_diffusers, safety_checker=None,
                                                                 requires_safety_checker=False)
        word = f"tok{i}"
        pipe.load_textual_inversion(str(path), token=word)
        # diffusers expands a 2-vector embedding to tokens word, word_1
        ids = pipe.tokenizer.convert_tokens_to_ids([word, f"{word}_1"])
        table = pipe.text_encoder.get_input_embeddings().weight
        assert torch.equal(table[ids].detach(), ours), path


def test_sigint_leaves_loadable_embedding_and_state(tiny_single, tmp_path):
    cfg = quick_config(tiny_single, tmp_path, steps=100000, save_every=0, quiet=False)
    args = [sys.executable, "-m", "ti_fast.cli", "train", "--name", "tok", "--data", cfg.data, "--model", cfg.model,
            "--width", "64", "--height", "64", "--steps", "100000", "--out", cfg.out, "--log-dir", cfg.log_dir,
            "--device", "cpu", "--seed", "1", "--template", "subject"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out = []
    deadline = time.time() + 240
    # wait until the loop runs: tqdm prints "N/100000" after a few steps
    while time.time() < deadline:
        ch = p.stdout.read(1)
        if not ch:
            break
        out.append(ch)
        if "5/100000" in "".join(out[-200:]):
            break
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=120)
    log = "".join(out) + rest
    assert p.returncode == 130, log[-2000:]
    d = torch.load(Path(cfg.out) / "tok.pt", weights_only=True)
    assert d["step"] >= 5 and torch.isfinite(d["string_to_param"]["*"]).all()
    st = load_state(Path(cfg.log_dir) / "state.pt")
    assert st["step"] == d["step"]
    assert "interrupted" in log


def test_previews_do_not_disturb_training(tiny_single, tmp_path):
    a = train(quick_config(tiny_single, tmp_path / "a", steps=4))
    b = train(quick_config(tiny_single, tmp_path / "b", steps=4, preview_every=2, preview_steps=3, png_embed=True))
    va = torch.load(a.embedding, weights_only=True)["string_to_param"]["*"]
    vb = torch.load(b.embedding, weights_only=True)["string_to_param"]["*"]
    assert torch.equal(va, vb)
    imgs = b.log_dir / "images"
    assert (imgs / "tok-2.png").exists() and (imgs / "tok-4.png").exists() and (imgs / "tok-grid.png").exists()
    from PIL import Image
    info = Image.open(imgs / "tok-2.png").text["parameters"]
    assert "Steps: 3" in info and "Sampler: Euler a" in info
    from ti_fast.embeddings import read_embedding
    assert "Steps: 3" in Image.open(imgs / "tok-grid.png").text["parameters"]
    emb_png = b.log_dir / "image_embeddings" / "tok-4.png"
    assert "Sampler: Euler a" in Image.open(emb_png).text["parameters"]
    e = read_embedding(emb_png)
    assert e.name == "tok-4" and e.step == 4 and torch.equal(e.vectors, vb)   # A1111: NAME-STEP


def test_learning_reduces_loss_on_fixed_pairs(tmp_path):
    """Loss on a fixed set of (noise, t) pairs drops clearly after a short run. The random tiny
    model's cross-attention is scaled up (x4 on attn2 to_v/to_out) so the text has a real say."""
    from ti_fast.embeddings import init_vectors
    from ti_fast.loading import load_model, make_tiny
    from ti_fast.loading.tiny import write_single
    from ti_fast.models.vae import LATENT_SCALE
    from ti_fast.prompt import PromptTokenizer
    from ti_fast.training.data import prepare_dataset
    from ti_fast.training.step import MicroBatch, TrainStep, ti_loss
    base = make_tiny(tmp_path / "base", "single", seed=0)
    m = load_model(base)
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "attn2.to_v" in n or "attn2.to_out" in n:
                p.mul_(4.0)
    write_single(base / "model.safetensors", m.unet, m.vae, m.text_encoder)
    m = load_model(base)
    cfg = quick_config(base, tmp_path, steps=100, lr="0.05", template="subject", vectors=2, batch_size=4)
    res = train(cfg)
    ds = prepare_dataset(cfg.data, width=64, height=64, resize="crop", buckets=False, flip=False, alpha_weight=False)
    with torch.no_grad():
        lat = torch.stack([m.vae.encode(it.image[None]).mean[0] for it in ds.items]) * LATENT_SCALE
    ptok = PromptTokenizer(m.tokenizer, {"tok": 2})
    tok = ptok(["a photo of a tok"] * len(ds.items), chunks=1)
    mb = MicroBatch(latents=lat, input_ids=tok.input_ids, vector_index=tok.vector_index)
    g = torch.Generator().manual_seed(123)
    pairs = [(torch.randn(lat.shape, generator=g), torch.randint(50, 950, (lat.shape[0],), generator=g)) for _ in range(8)]
    coef = TrainStep(m.unet, m.text_encoder, torch.zeros(1), None, generator=g)

    def fixed_loss(vectors):
        with torch.no_grad():
            return sum(ti_loss(m.unet, m.text_encoder, vectors, mb, n, t, coef.sqrt_a, coef.sqrt_1ma).item()
                       for n, t in pairs) / len(pairs)

    ids = m.tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
    before = fixed_loss(init_vectors(m.text_encoder.token_table.detach(), ids, 2))
    after = fixed_loss(torch.load(res.embedding, weights_only=True)["string_to_param"]["*"])
    assert after < before * 0.98, (before, after)


def test_previews_carry_ti_hashes_of_the_embedding(tiny_single, tmp_path):
    """A1111 v1.10 writes `TI hashes: "NAME: HASH"` into infotext; the preview of the last step
    names the hash of the NAME.pt the run wrote at that step (sha256 of the file, 12 hex)."""
    import hashlib
    from PIL import Image
    from ti_fast.infotext import parse_infotext, parse_ti_hashes
    res = train(quick_config(tiny_single, tmp_path, steps=4, preview_every=2, preview_steps=2))
    info = parse_infotext(Image.open(res.log_dir / "images" / "tok-4.png").text["parameters"])
    want = hashlib.sha256(res.embedding.read_bytes()).hexdigest()[:12]
    assert parse_ti_hashes(info["TI hashes"]) == {"tok": want}
    earlier = parse_ti_hashes(parse_infotext(Image.open(res.log_dir / "images" / "tok-2.png").text["parameters"])
                              ["TI hashes"])
    assert set(earlier) == {"tok"} and earlier["tok"] != want        # the vectors of step 2
