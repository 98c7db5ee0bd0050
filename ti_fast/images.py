"""Image files: opening them safely, and the caption that goes with each.

Shared by the trainer's data (ti_fast.training.data) and `ti-fast preprocess`. Safety first:
a path is `stat`ed as a regular file before it is opened (a FIFO would block the open), and an
image's pixel count is read from its header and bounded BEFORE its pixels are decoded, so a PNG
"zlib bomb" (a few KB declaring 100k × 100k pixels) costs nothing. A1111 ignores EXIF orientation
and drops alpha with convert('RGB') (transparent pixels keep whatever colour they store, often
black); here EXIF orientation is applied and transparency is composited on WHITE.
"""
from __future__ import annotations

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
                    raise DataError(f"image {path} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                                    f"{max_pixels / 1e6:.0f} MP limit (a decompression bomb or a huge scan): "
                                    "downscale it first")
                im.load()
                return ImageOps.exif_transpose(im) if transpose else im
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path}: {e}; downscale it first") from None
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


def load_image(path, alpha_weight: bool = False, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, np.ndarray | None]:
    """-> (RGB image, alpha float32 [H, W] in [0, 1] or None), EXIF orientation applied.
    Transparency (RGBA, LA, palette/grey/RGB with a transparent colour) is composited on white;
    the alpha is returned only when `alpha_weight` and the image has transparency information."""
    im = open_image(path, max_pixels)
    try:
        if im.mode.startswith("I") or im.mode == "F":
            im = _grey_to_l(im)
        alpha = None
        if has_alpha(im):
            rgba = im.convert("RGBA")
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
