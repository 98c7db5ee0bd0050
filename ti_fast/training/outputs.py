"""What a run writes: the loss log (CSV + plot), settings.json, and the resumable state.
Every file goes through an atomic temp-file + rename."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from ..errors import ConfigError
from ..fsutil import atomic_path, atomic_write_bytes, atomic_write_text, special_reason

CSV_HEADER = ["step", "epoch", "epoch_step", "loss", "lr"]


class LossLog:
    """loss.csv: one row per optimizer step (step = completed steps), kept in memory too for the
    plot. A resumed run keeps the rows up to its state's step; a malformed row is dropped."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.rows: list[list] = []
        if resume_step and special_reason(self.path) is None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
                r = csv.reader(f)
                next(r, None)
                self.rows = [row for row in r if _row_ok(row) and int(row[0]) <= resume_step]

    def add(self, step, epoch, epoch_step, loss, lr):
        self.rows.append([step, epoch, epoch_step, f"{loss:.8g}", f"{lr:.8g}"])

    def flush(self, upto: int | None = None):
        """Write the rows (those of steps <= `upto` when given: the file then agrees with a
        state saved at that step)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_HEADER)
        w.writerows(r for r in self.rows if upto is None or int(r[0]) <= upto)
        atomic_write_text(self.path, buf.getvalue())

    def losses(self, upto: int | None = None) -> list[tuple[int, float]]:
        return [(int(r[0]), float(r[3])) for r in self.rows if upto is None or int(r[0]) <= upto]


def _row_ok(row) -> bool:
    try:
        return len(row) == len(CSV_HEADER) and int(row[0]) >= 0 and float(row[3]) == float(row[3])
    except ValueError:
        return False


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


def read_settings(path: Path) -> dict | None:
    """settings.json of an earlier run, or None when it is missing or unreadable (it is a
    record, not a source of truth: the state file is)."""
    try:
        if special_reason(path) is None and Path(path).is_file():
            return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    return None


def save_state(path: Path, state: dict) -> None:
    """The resumable state (what is trained, optimizer, step, RNG states, data order):
    torch.save, atomic. Serialised in memory first: torch's file writer reports a full disk as a
    RuntimeError, an ordinary write as the OSError it is."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


# key -> what it must be, for load_state's checks
_STATE_KEYS = {"step": int, "seed": int, "optimizer": dict, "order": dict, "gen": torch.Tensor,
               "py_rng": (tuple, list)}


def load_state(path: Path) -> dict:
    """The resumable state, checked. ConfigError (one line) for a file that is not a regular
    file, damaged, truncated or not a ti-fast state: no silent fallback to a fresh run."""
    path = Path(path)
    why = special_reason(path)
    if why is not None:
        raise ConfigError(f"{path} is {why}, not a resumable state")
    fix = "delete it (or pass --overwrite) to start the run again"
    try:
        # Our own file, but still loaded without arbitrary globals.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"{path} is damaged or truncated ({type(e).__name__}: {first}): {fix}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not a ti-fast resumable state: {fix}")
    for key, kind in _STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ConfigError(f"{path} is not a complete ti-fast state (bad or missing {key!r}): {fix}")
    v = state.get("vectors")
    if state.get("kind", "embedding") == "embedding" and not (
            isinstance(v, torch.Tensor) and v.ndim == 2 and v.is_floating_point() and v.shape[0] >= 1):
        raise ConfigError(f"{path}: the state's vectors are missing or malformed: {fix}")
    if state["step"] < 0:
        raise ConfigError(f"{path}: the state's step {state['step']} is negative: {fix}")
    return state


class RunRecord:
    """settings.json: the current segment's settings at the top (config, seed, model, what actually
    ran, versions, launch and wall time) and `segments`, one entry per segment of the run — a
    resumed run appends its own, so every segment's settings are kept."""

    def __init__(self, path: Path, top: dict, resumed: bool):
        self.path = Path(path)
        prev = read_settings(self.path) if resumed else None
        self.segments = list(prev.get("segments", [])) if prev else []
        self.top = dict(top)
        self.segment = {k: top[k] for k in ("started", "config", "ran", "start_step") if k in top}
        self.segments.append(self.segment)

    def update(self, **values) -> None:
        """Record values in the current segment (and at the top) and write the file."""
        self.top.update(values)
        self.segment.update(values)
        write_settings(self.path, {**self.top, "segments": self.segments})
