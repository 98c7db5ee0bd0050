"""The benchmark's whole-program measurements: launch-to-first-step, peak RssAnon while loading a
checkpoint, and generation at the training size — each through ti-fast's real entry points.

Model: a single-file checkpoint written here with random weights (SD1.5 shapes, fp16, 2.1 GB;
make_tiny's model for --tiny) and a synthetic tokenizer of SD's size (49408 tokens: the real
BPE file cannot be fetched offline; its content does not change any timing here).
Data: 20 synthetic images at the training size.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .common import GIB, build, free_memory, json_from_child, peak_gib, reset_peak, sync

N_IMAGES = 20
TOKEN = "benchtok"


def sd_sized_tokenizer(out_dir: Path) -> Path:
    """vocab.json/merges.txt with SD's 48894 merges: the tiny tokenizer's learnt merges (so
    template words stay whole tokens), then filler pairs of byte characters."""
    from ti_fast.loading.tokenizer import SD_NUM_MERGES, bytes_to_unicode, tiny_merges, write_tokenizer
    merges = list(tiny_merges())
    made = {"".join(m) for m in merges}
    chars = list(bytes_to_unicode().values())
    for a in chars:
        for b in chars:
            if len(merges) == SD_NUM_MERGES:
                return write_tokenizer(out_dir, merges)
            if a + b not in made:
                merges.append((a, b))
                made.add(a + b)
    raise AssertionError("not enough filler pairs")


def write_model(out_dir: Path, device: torch.device, tiny: bool) -> Path:
    """A model folder load_model reads: model.safetensors (original keys) + tokenizer/."""
    from ti_fast.loading import make_tiny
    from ti_fast.loading.tiny import write_single
    from ti_fast.models import UNet, UNetConfig, VAE, VAEConfig, CLIPTextEncoder, CLIPConfig
    if tiny:
        return make_tiny(out_dir)
    # built on the GPU (seconds), saved from the CPU in fp16 as most SD1.5 files are
    parts = [build(c, device, torch.float16).cpu() for c in (lambda: UNet(UNetConfig()), lambda: VAE(VAEConfig()),
                                                              lambda: CLIPTextEncoder(CLIPConfig()))]
    write_single(out_dir / "model.safetensors", *parts)
    del parts
    sd_sized_tokenizer(out_dir / "tokenizer")
    return out_dir


def write_images(out_dir: Path, size: int, n: int = N_IMAGES) -> Path:
    """n PNGs, size x size: smooth random colour fields (compress like photos, decode like them)."""
    from PIL import Image
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(out_dir / f"img{i:02d}.png")
    return out_dir


def launch_to_first_step(work: Path, model_dir: Path, device: torch.device, size: int) -> dict:
    """ti_fast.training.loop.train for one step on 20 images: model load, data preparation, latent
    caching, optimizer, the first step. `launch_to_first_step_s` is the loop's own figure (time
    from entering train() to the first step being issued); `train_call_s` also covers the first
    step finishing (the loss is read) and the final save."""
    from ti_fast.training.config import TrainConfig
    from ti_fast.training.loop import train
    data = write_images(work / "data", size)
    cfg = TrainConfig(name=TOKEN, data=str(data), model=str(model_dir), steps=1, width=size, height=size,
                      out=str(work / "emb"), log_dir=str(work / "log"), quiet=True, seed=0, overwrite=True,
                      device=device.type, save_every=0, template="subject")
    sync(device)
    t0 = time.perf_counter()
    res = train(cfg)
    sync(device)
    total = time.perf_counter() - t0
    settings = json.loads((Path(cfg.log_dir) / "settings.json").read_text())
    return {"launch_to_first_step_s": settings.get("launch_to_first_step_s"), "train_call_s": total,
            "images": N_IMAGES, "size": size, "status": res.status, "loss": res.final_loss}


_CHILD = """import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import torch
from bench.startup import launch_to_first_step
r = launch_to_first_step(Path(sys.argv[1]), Path(sys.argv[2]), torch.device(sys.argv[3]), int(sys.argv[4]))
r["process_s"] = time.perf_counter() - t0
print(json.dumps(r))
"""


def launch_in_child(work: Path, model_dir: Path, device: torch.device, size: int) -> dict:
    """The same launch in a fresh Python process after this one's: a user's second and later
    launches. Triton's compiled kernels come from its on-disk cache; the interpreter, imports,
    CUDA context and cuDNN/cuBLAS start-up are paid again (`process_s` counts them too)."""
    try:
        return json_from_child([sys.executable, "-c", _CHILD, str(work), str(model_dir), device.type, str(size)],
                               timeout=240)
    except RuntimeError as e:
        return {"status": f"error: {e}"}


def load_rss(model_dir: Path, device: torch.device, dtype: torch.dtype):
    """Peak RssAnon (host, anonymous memory) while load_model reads the checkpoint onto `device`:
    the weights should stream tensor by tensor, not sit whole in host memory. Returns (row, model)."""
    try:
        from ti_fast.loading import load_model, peak_rss_anon_while
    except ImportError as e:
        return {"status": f"n/a ({e})"}, None
    f = model_dir / "model.safetensors"
    t0 = time.perf_counter()
    r = peak_rss_anon_while(load_model, model_dir, device=device, dtype=dtype)
    sync(device)
    return {"status": "ok", "load_s": time.perf_counter() - t0, "file_gib": f.stat().st_size / GIB,
            "peak_rss_anon_gib": r.peak / GIB, "rss_anon_growth_gib": (r.peak - r.before) / GIB}, r.result


def generation(model, device: torch.device, size: int, steps: int) -> dict:
    """sample_images (the trainer's previews and `ti-fast generate`): one image, Euler, CFG 7,
    `steps` steps, VAE decode. Peak = everything allocated, weights included."""
    from ti_fast.prompt import PromptTokenizer
    from ti_fast.diffusion.sampling import sample_images
    width = model.text_encoder.config.width
    ptok = PromptTokenizer(model.tokenizer, {TOKEN: 1})
    vec = torch.randn(1, width, generator=torch.Generator().manual_seed(0)) * 0.02
    prompt = f"a photo of {TOKEN}"

    def once():
        return sample_images(model, ptok, vec, prompt, "", sampler="euler", steps=steps, cfg=7.0, seeds=(0,),
                             width=size, height=size)

    if device.type == "cuda":
        once()                                          # kernels compiled, allocator warm
    free_memory(device)
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    reset_peak(device)
    t0 = time.perf_counter()
    imgs, _ = once()
    sync(device)
    dt = time.perf_counter() - t0
    return {"status": "ok", "steps": steps, "size": size, "s_per_image": dt, "peak_gib": peak_gib(device),
            "weights_gib": weights, "finite": bool(torch.isfinite(imgs).all())}


def run_startup(work: Path, device: torch.device, tiny: bool, say=print) -> dict:
    """All three, sharing the written model. Each part reports its own status."""
    size = 64 if tiny else 512
    dtype = torch.float32 if device.type != "cuda" else (
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    out = {}
    t0 = time.perf_counter()
    model_dir = write_model(work / "model", device, tiny)
    out["write_model_s"] = time.perf_counter() - t0
    free_memory(device)
    try:
        out["launch"] = launch_to_first_step(work, model_dir, device, size)
    except Exception as e:                     # the rest of the bench still runs
        out["launch"] = {"status": f"error: {type(e).__name__}: {e}"}
    say(f"bench: launch: {out['launch']}")
    free_memory(device)
    if device.type == "cuda":        # the first launch compiled the Triton kernels; now a later one
        try:
            out["launch_warm"] = launch_in_child(work, model_dir, device, size)
        except Exception as e:
            out["launch_warm"] = {"status": f"error: {type(e).__name__}: {e}"}
        say(f"bench: launch (fresh process, warm kernel cache): {out['launch_warm']}")
    model = None
    try:
        out["load_rss"], model = load_rss(model_dir, device, dtype)
    except Exception as e:
        out["load_rss"] = {"status": f"error: {type(e).__name__}: {e}"}
    say(f"bench: load_rss: {out['load_rss']}")
    if model is not None:
        try:
            out["generation"] = generation(model, device, size, steps=3 if tiny else 20)
        except Exception as e:
            out["generation"] = {"status": f"error: {type(e).__name__}: {e}"}
    else:
        out["generation"] = {"status": "skipped: no model loaded"}
    say(f"bench: generation: {out['generation']}")
    del model
    free_memory(device)
    return out
