"""`ti-fast train --demo`: a tiny random SD1-shaped model and a small synthetic image set,
written under ./ti-demo/, so the whole pipeline runs in seconds on a CPU with no download."""
from __future__ import annotations

import random
from pathlib import Path

from .config import TrainConfig

COLORS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70), "yellow": (220, 200, 40),
          "purple": (130, 50, 160), "grey": (128, 128, 128)}


def make_demo_images(folder: Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """n images of one subject (an orange ring with a dark dot) on varied backgrounds,
    captioned by file name ("003-orange ring on blue.png")."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(n):
        bg = names[i % len(names)]
        img = Image.new("RGB", (size, size), COLORS[bg])
        d = ImageDraw.Draw(img)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(240, 140, 20), width=max(2, r // 3))
        d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(20, 20, 20))
        img.save(folder / f"{i:03d}-orange ring on {bg}.png")
    return folder


def demo_config(base: str | Path = "ti-demo", **overrides) -> TrainConfig:
    """Build (once) the tiny model and images under `base`, and a config that trains on them."""
    from ..loading import make_tiny

    base = Path(base)
    model = base / "model"
    if not (model / "model.safetensors").exists():
        make_tiny(model, layout="single", seed=0)
    images = base / "images"
    if not images.exists() or not any(images.iterdir()):
        make_demo_images(images)
    cfg = dict(name="demo-ring", data=str(images), model=str(model), width=64, height=64, steps=150,
               lr="0.05:100, 0.02", save_every=50, template="subject_filewords", init_text="ring",
               vectors=2, out=str(base / "embeddings"), log_dir=str(base / "logs"), seed=0, overwrite=True,
               preview_every=50, preview_steps=12, preview_prompt="a photo of a demo-ring")
    cfg.update(overrides)
    if cfg.get("resume"):
        cfg["overwrite"] = False
    return TrainConfig(**cfg)
