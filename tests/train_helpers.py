"""Shared helpers for the trainer tests: a tiny image folder, a quick config, a Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import time
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


def interrupt_when(args: list[str], marker: str, timeout: float = 240) -> tuple[int, str]:
    """Run a trainer command line; once its output shows `marker` (tqdm's "5/100000": the loop
    runs), send SIGINT. Returns its exit code and everything it printed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        ch = p.stdout.read(1)
        if not ch:
            break
        out.append(ch)
        if marker in "".join(out[-200:]):
            break
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=120)
    return p.returncode, "".join(out) + rest
