"""Shared helpers for the trainer tests: a tiny image folder and a quick config."""
from __future__ import annotations

from pathlib import Path

from ti_fast.training.config import TrainConfig
from ti_fast.training.demo import make_demo_images


def images(tmp: Path, n: int = 4) -> Path:
    return make_demo_images(Path(tmp) / "imgs", n=n, size=64)


def quick_config(model: Path, tmp: Path, **kw) -> TrainConfig:
    """A few steps at 64 px on the tiny model, quiet, on the CPU."""
    d = dict(name="tok", data=str(images(tmp)), model=str(model), width=64, height=64, steps=6,
             lr="0.01", save_every=0, seed=7, out=str(Path(tmp) / "out"), log_dir=str(Path(tmp) / "log"),
             quiet=True, device="cpu", vectors=2, init_text="ring", template="subject")
    d.update(kw)
    return TrainConfig(**d)
