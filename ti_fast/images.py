"""Image files: opening them safely, the caption that goes with each, the size each is fitted to.

Shared by the trainer's data (ti_fast.training.data) and `ti-fast preprocess`. Safety first:
a path is `stat`ed as a regular file before it is opened (a FIFO would block the open), and an
image's pixel count is read from its header and bounded BEFORE its pixels are decoded, so a PNG
"zlib bomb" (a few KB declaring 100k × 100k pixels) costs nothing. A1111 ignores EXIF orientation
and drops alpha with convert('RGB') (transparent pixels keep whatever colour they store, often
black); here EXIF orientation is applied and transparency is composited on WHITE.
The fitting geometry (the crop/squash source box, aspect buckets) lives here too, so that the
trainer and preprocess fit an image to the same pixels.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError
from .fsutil import special_reason

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# 64 megapixels: an 8k x 8k photo fits; decoded as RGBA that is 256 MB, the most one image may
# cost. Pillow's own guard (Image.MAX_IMAGE_PIXELS, process-wide) is left as it is.
MAX_PIXELS = 64 * 2**20
# A1111's re_numbers_at_start: "001-a red car" -> "a red car" (numbering from dataset tools).
_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")


class PixelLimitError(DataError):
    """An image over the pixel limit, found from its header before any pixel was decoded."""


def open_image(path, max_pixels: int = MAX_PIXELS, transpose: bool = True) -> Image.Image:
    """The decoded first frame of an image file, EXIF orientation applied (unless `transpose` is
    False: data stored in the pixels must be read as stored). DataError (one line naming the
    file) for special files, images over `max_pixels` (checked from the header, before decoding)
    and anything Pillow cannot read."""
    path = Path(path)
    why = special_reason(path)
    if why is not None:
        raise DataError(f"image {path} is {why}; skipped")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:                     # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    raise PixelLimitError(f"image {path} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                                          f"{max_pixels / 1e6:.0f} MP limit (a decompression bomb or a huge "
                                          "scan): downscale it first")
                im.load()
                return ImageOps.exif_transpose(im) if transpose else im
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise PixelLimitError(f"image {path}: {e}; downscale it first") from None
    except Exception as e:  # Pillow raises many types on corrupt files; all mean "unusable"
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e}); re-save or remove it") from None


def _grey_to_l(im: Image.Image) -> Image.Image:
    # Pillow's I/F -> L conversion clips at 255 instead of scaling: 16-bit greys become white.
    a = np.asarray(im, dtype=np.float32)
    if im.mode.startswith("I;16") or a.max(initial=0) > 255:
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def has_alpha(im: Image.Image) -> bool:
    return "A" in im.getbands() or im.mode in ("RGBa", "La") or "transparency" in im.info


def load_image(path, alpha_weight: bool = False, max_pixels: int = MAX_PIXELS,
               keep_alpha: bool = False) -> tuple[Image.Image, np.ndarray | None]:
    """-> (RGB image, alpha float32 [H, W] in [0, 1] or None), EXIF orientation applied.
    Transparency (RGBA, LA, palette/grey/RGB with a transparent colour) is composited on white;
    the alpha is returned only when `alpha_weight` and the image has transparency information.
    With `keep_alpha`, an image with transparency comes back as RGBA instead, not composited."""
    im = open_image(path, max_pixels)
    try:
        if im.mode.startswith("I") or im.mode == "F":
            im = _grey_to_l(im)
        alpha = None
        if has_alpha(im):
            rgba = im.convert("RGBA")
            if keep_alpha:
                return rgba, (np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0 if alpha_weight else None)
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
            if alpha_weight:
                alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        else:
            rgb = im.convert("RGB")
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e}); re-save or remove it") from None
    return rgb, alpha


def caption_from_name(path, word_regex: str | None = None, join: str = " ") -> str:
    """A1111's caption from a file name: the stem without leading digits/dashes/spaces; with
    `word_regex` (A1111's "filename word regex") reduced to its matches joined by `join`."""
    text = _NUMBERS_AT_START.sub("", Path(path).stem)
    if word_regex:
        text = join.join(re.findall(word_regex, text))
    return text


def caption_for(path, word_regex: str | None = None, join: str = " ") -> str:
    """Caption of an image: the whole text of `<stem>.txt` beside it (stripped), else
    caption_from_name. A caption path that is not a regular file is ignored."""
    path = Path(path)
    txt = path.with_suffix(".txt")
    if txt.is_file():                  # a regular file (or a link to one): never a FIFO
        try:
            return txt.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read caption {txt}: {e}; save it as UTF-8 text") from None
    return caption_from_name(path, word_regex, join)


# ----------------------------------------------------------------------------- fitting geometry

def source_box(w: int, h: int, W: int, H: int, mode: str) -> tuple[float, float, float, float]:
    """Region of the w×h source that maps onto the W×H output (sub-pixel, for Image.resize):
    `squash` the whole image; `crop` the centred region of the target's aspect (scale to cover,
    centre crop)."""
    if mode == "squash":
        return (0.0, 0.0, float(w), float(h))
    if w * H > W * h:                      # source wider than target: trim left and right
        cw = h * W / H
        return ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
    ch = w * H / W                         # source taller (or equal): trim top and bottom
    return (0.0, (h - ch) / 2, float(w), (h + ch) / 2)


def make_buckets(width: int, height: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of `step`, with about width×height pixels (never more) and aspect
    ratio at most `max_ratio` either way (kohya-style), closed under swapping w and h. The
    requested (width, height) is always one of them (it is only a multiple of 8). Sorted from
    tallest to widest."""
    if step % 8 or step < 8:
        raise DataError(f"bucket step {step} must be a positive multiple of 8")
    if max_ratio < 1:
        raise DataError(f"bucket max ratio {max_ratio} must be at least 1")
    area = width * height
    out = {(width, height)}
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            out |= {(w, h), (h, w)}   # mirrored too: portrait and landscape get the same choice
        w += step
    return sorted(out, key=lambda s: (s[0] / s[1], s[0]))


def assign_bucket(img_w: int, img_h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (compared in log space, so 1:2 and 2:1 are
    equally far from 1:1); ties go to the earlier bucket."""
    r = math.log(img_w / img_h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))
