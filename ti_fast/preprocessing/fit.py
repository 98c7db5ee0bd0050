"""The plain fit (crop, squash, or none = keep the aspect) and the one resampling every operation uses.

The plain fit is what an image gets when no other operation (split, focal crop, auto-sized crop)
wrote anything for it, as in A1111:
  crop    scale to cover W×H, centre crop (the trainer's default `--resize crop`)
  squash  stretch to W×H (A1111's training resize)
  none    keep the aspect: with --buckets, scaled down (never up) to just cover the trainer's
          aspect bucket of W×H that the image falls in, so that `ti-fast train --buckets` at the
          same W×H only trims a few pixels; without --buckets, the size is kept as it is (A1111's
          "keep original size")
With --buckets, crop and squash fit each image to its bucket instead of W×H.
Resampling is Lanczos with Pillow's reducing_gap=3 (box-reduce by an integer factor first), as
the trainer resamples, so a preprocessed image and a raw one train on the same pixels.
"""
from __future__ import annotations

from PIL import Image

from ..images import assign_bucket, make_buckets, source_box

RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0


def resize(img: Image.Image, size: tuple[int, int], box=None) -> Image.Image:
    """`img` (or its `box` region) resampled to `size`; a copy when nothing changes."""
    size = (int(size[0]), int(size[1]))
    if size == img.size and (box is None or tuple(box) == (0, 0, img.width, img.height)):
        return img.copy()
    return img.resize(size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def fit_size(w: int, h: int, W: int, H: int, fit: str = "crop", buckets: bool = False) -> tuple[int, int]:
    """Output size of the plain fit for a w×h image."""
    target = assign_bucket(w, h, make_buckets(W, H)) if buckets else (W, H)
    if fit != "none":
        return target
    if not buckets:
        return (w, h)
    bw, bh = target
    s = max(bw / w, bh / h)                  # the scale at which the image just covers the bucket
    if s >= 1:
        return (w, h)                        # already no larger than the bucket: never upscaled
    return (max(bw, round(w * s)), max(bh, round(h * s)))


def plain_fit(img: Image.Image, W: int, H: int, fit: str = "crop", buckets: bool = False) -> Image.Image:
    size = fit_size(img.width, img.height, W, H, fit, buckets)
    if fit == "none":
        return resize(img, size)
    return resize(img, size, box=source_box(img.width, img.height, size[0], size[1], fit))
