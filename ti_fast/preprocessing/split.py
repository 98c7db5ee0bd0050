"""Split oversized images: a long image becomes N overlapping target-sized tiles (A1111's formula).

For a w×h image and a W×H target (spec: a1111-compat.md, "Preprocessing"):
  portrait (h > w):        ratio = (w/h) / (W/H), tiles stacked along y, the image scaled to width W
  landscape or square:     ratio = (h/w) / (H/W), tiles side by side along x, scaled to height H
Split when ratio < 1 and ratio <= threshold (A1111's original preprocess; its later Extras script
skips only when `ratio >= 1 and ratio > threshold`, which ignores the threshold: not copied).
With L the scaled long side (L = long * T_short // short) and T the target's length along it:
  N = ceil((L - T*o) / (T*(1 - o)))      tiles, o = overlap
  offset_k = int(k * (L - T) / (N - 1))  k = 0..N-1 (exact integer arithmetic here)
N = 1 (L == T: the scaled image is exactly one tile) writes that one tile; A1111 divides by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from .fit import resize


@dataclass(frozen=True)
class SplitPlan:
    ratio: float
    along_y: bool                  # tiles stacked vertically (portrait image)
    scaled: tuple[int, int]        # (w, h) of the image scaled for splitting
    tile: tuple[int, int]          # (W, H)
    offsets: tuple[int, ...]       # start of each tile along its axis, px in the scaled image


def split_ratio(w: int, h: int, W: int, H: int) -> tuple[float, bool]:
    """-> (ratio, along_y). ratio < 1 means the image is longer, relative to its short side,
    than the target along the same axes."""
    if h > w:
        return (w * H) / (h * W), True
    return (h * W) / (w * H), False


def plan_split(w: int, h: int, W: int, H: int, threshold: float = 0.5, overlap: float = 0.2) -> SplitPlan | None:
    """The tiles of a w×h image, or None when it is not split."""
    ratio, along_y = split_ratio(w, h, W, H)
    if not (ratio < 1.0 and ratio <= threshold):
        return None
    if along_y:
        L, T = h * W // w, H
        scaled = (W, L)
    else:
        L, T = w * H // h, W
        scaled = (L, H)
    n = max(1, math.ceil((L - T * overlap) / (T * (1.0 - overlap))))
    offsets = tuple(k * (L - T) // (n - 1) for k in range(n)) if n > 1 else (0,)
    return SplitPlan(ratio, along_y, scaled, (W, H), offsets)


def split_image(img: Image.Image, plan: SplitPlan) -> list[Image.Image]:
    scaled = resize(img, plan.scaled)
    W, H = plan.tile
    if plan.along_y:
        return [scaled.crop((0, y, W, y + H)) for y in plan.offsets]
    return [scaled.crop((x, 0, x + W, H)) for x in plan.offsets]
