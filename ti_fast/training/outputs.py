"""What a run writes: the loss log (CSV + plot), settings.json, and the resumable state.
Every file goes through an atomic temp-file + rename."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from ..fsutil import atomic_path, atomic_write_text

CSV_HEADER = ["step", "epoch", "epoch_step", "loss", "lr"]


class LossLog:
    """loss.csv: one row per optimizer step (step = completed steps). Kept in memory too for the plot."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.rows: list[list] = []
        if resume_step and self.path.exists():
            with open(self.path, newline="") as f:
                r = csv.reader(f)
                next(r, None)
                self.rows = [row for row in r if row and int(row[0]) <= resume_step]

    def add(self, step, epoch, epoch_step, loss, lr):
        self.rows.append([step, epoch, epoch_step, f"{loss:.8g}", f"{lr:.8g}"])

    def flush(self):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def losses(self) -> list[tuple[int, float]]:
        return [(int(r[0]), float(r[3])) for r in self.rows]


def plot_loss(points: list[tuple[int, float]], path: Path, title: str = "loss", window: int = 32) -> None:
    """loss.png: raw loss (light) and its moving average (dark) against the step; PIL only."""
    from PIL import Image, ImageDraw

    W, H, m = 800, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, 20, W - 20, H - m], outline="black")
    pts = [(s, l) for s, l in points if l == l and abs(l) != float("inf")]
    if pts:
        s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        lo, hi = min(l for _, l in pts), max(l for _, l in pts)
        hi = hi if hi > lo else lo + 1e-6

        def xy(s, l):
            return (m + (s - s0) / (s1 - s0) * (W - 20 - m), H - m - (l - lo) / (hi - lo) * (H - m - 20))

        d.line([xy(s, l) for s, l in pts], fill=(170, 190, 230), width=1)
        avg, acc = [], []
        for s, l in pts:
            acc.append(l)
            acc = acc[-window:]
            avg.append(xy(s, sum(acc) / len(acc)))
        d.line(avg, fill=(20, 50, 160), width=2)
        d.text((m, H - m + 8), f"step {s0}", fill="black")
        d.text((W - 120, H - m + 8), f"step {pts[-1][0]}", fill="black")
        d.text((5, 20), f"{hi:.4g}", fill="black")
        d.text((5, H - m - 10), f"{lo:.4g}", fill="black")
    d.text((m + 10, 25), f"{title} (light: per step, dark: mean of {window})", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_settings(path: Path, settings: dict) -> None:
    atomic_write_text(path, json.dumps(settings, indent=2, default=str) + "\n")


def save_state(path: Path, state: dict) -> None:
    """The resumable state (vectors, optimizer, step, RNG states, data order): torch.save, atomic."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    # Our own file, but still loaded without arbitrary globals.
    return torch.load(path, map_location="cpu", weights_only=True)
