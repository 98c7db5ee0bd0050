"""Auto-sized crop: each image gets the size that fits its aspect best (A1111's "auto-sized crop").

Candidates are all (w, h) with w and h from --min-size to --max-size in steps of 64 whose area
lies within [--min-area, --max-area] and whose aspect error 1 - min(r, 1/r) (r = image aspect /
candidate aspect) is at most --error-threshold. The objective picks one:
  area   the largest area; ties: the smaller error
  error  the smallest error; ties: the larger area
remaining ties: the first in the order w ascending, then h ascending (A1111's max() over that
order). The image is then centre-cropped to the candidate's aspect and resampled to it
(Lanczos). No candidate -> the image gets no auto-sized output (the caller says so in one line).
"""
from __future__ import annotations

from PIL import Image

from ..images import source_box
from .fit import resize

STEP = 64


def aspect_error(iw: int, ih: int, w: int, h: int) -> float:
    r = (iw / ih) / (w / h)
    return 1.0 - (r if r < 1 else 1.0 / r)


def candidates(iw: int, ih: int, min_size: int, max_size: int, min_area: int, max_area: int,
               threshold: float) -> list[tuple[int, int]]:
    sides = range(min_size, max_size + 1, STEP)
    return [(w, h) for w in sides for h in sides
            if min_area <= w * h <= max_area and aspect_error(iw, ih, w, h) <= threshold]


def choose_size(iw: int, ih: int, min_size: int = 384, max_size: int = 768, min_area: int = 64 * 64,
                max_area: int = 640 * 640, objective: str = "area", threshold: float = 0.1) -> tuple[int, int] | None:
    """The chosen (w, h) for an iw×ih image, or None when no candidate is within the threshold."""
    best, best_key = None, None
    for w, h in candidates(iw, ih, min_size, max_size, min_area, max_area, threshold):
        area, neg_err = w * h, -aspect_error(iw, ih, w, h)
        key = (area, neg_err) if objective == "area" else (neg_err, area)
        if best_key is None or key > best_key:           # strictly greater: the first best stays
            best, best_key = (w, h), key
    return best


def autosized_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    w, h = size
    return resize(img, size, box=source_box(img.width, img.height, w, h, "crop"))
