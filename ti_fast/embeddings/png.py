"""Embeddings inside images, in A1111's two encodings (shared/spec/a1111-compat.md):

(a) tEXt chunk `sd-ti-embedding` = base64(JSON of the .pt dict, tensors as
    {"TORCHTENSOR": nested lists});
(b) data in pixels: zlib(JSON) split into low/high nibbles, laid out as two blocks of
    shape (h, w, 3) either side of the captioned preview, XORed with an LCG keystream, with
    grey-dot decoration in the unused high nibble. Survives chunk-stripping re-saves.

Layout of the written image (h = preview height):
    [low block (h, w) | 1 black col | captioned preview (h, W) | 1 black col | high block (h, w)]
Facts from A1111 modules/textual_inversion/image_embedding.py; the code is our own.
"""
from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ti_fast.embeddings.formats import (Embedding, EmbeddingError, _error,
                                        embedding_from_data, embedding_to_a1111_dict)
from ti_fast.errors import DataError
from ti_fast.fsutil import atomic_path
from ti_fast.images import open_image

CHUNK_KEY = "sd-ti-embedding"
_TENSOR_TAG = "TORCHTENSOR"
_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32


# ---------------------------------------------------------------- JSON (both encodings)
def _to_json(data: dict) -> str:
    # json.dumps with default separators, like A1111: the pixel payload is zlib of this text,
    # so matching it byte for byte lets us reproduce A1111's images exactly.
    def default(obj):
        if isinstance(obj, torch.Tensor):
            return {_TENSOR_TAG: obj.detach().cpu().tolist()}
        raise TypeError(f"cannot serialise {type(obj).__name__} in an embedding")
    return json.dumps(data, default=default)


def _from_json(text) -> dict:
    def hook(d):
        if _TENSOR_TAG in d:
            return torch.tensor(d[_TENSOR_TAG], dtype=torch.float64)
        return d
    return json.loads(text, object_hook=hook)


# ---------------------------------------------------------------- pixel encoding
def lcg_keystream(n: int) -> np.ndarray:
    """First n outputs of A1111's generator: state = (a*state + c) mod 2^32 from seed 0,
    emitting state mod 255. uint8 [n].

    Vectorised by doubling: knowing states s_1..s_k, s_{i+k} = A_k*s_i + C_k (mod 2^32)
    where (A_k, C_k) is the LCG map composed k times. Products stay below 2^64 in uint64."""
    states = np.array([_LCG_C], dtype=np.uint64)  # s_1 = a*0 + c
    a_k, c_k = _LCG_A, _LCG_C                     # map for one step
    while states.shape[0] < n:
        nxt = (np.uint64(a_k) * states + np.uint64(c_k)) & np.uint64(_LCG_M - 1)
        states = np.concatenate([states, nxt])
        a_k, c_k = (a_k * a_k) % _LCG_M, (a_k * c_k + c_k) % _LCG_M
    return (states[:n] % np.uint64(255)).astype(np.uint8)


def _xor_keystream(block: np.ndarray) -> np.ndarray:
    """XOR the low nibble of a (h, w, 3) uint8 block with the keystream laid out row-major;
    the keystream restarts at the beginning for every block."""
    ks = lcg_keystream(block.size).reshape(block.shape) & 0x0F
    return np.bitwise_xor(block.astype(np.uint8), ks)


def _decorate(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """A1111's grey-dot pattern (6-px circles on an 8-px staggered grid, shade cycling over
    `shades`) XORed into the high nibble only; the data in the low nibble is untouched."""
    h, w = block.shape[:2]
    im = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, w, 8):
        for yi, y in enumerate(range(-6, h, 8)):
            off = 4 if yi % 2 == 0 else 0
            s = int(shades[i % len(shades)])
            i += 1
            draw.ellipse((x + off, y, x + 6 + off, y + 6), fill=(s, s, s))
    return block ^ (np.asarray(im, dtype=np.uint8) & 0xF0)


def _dot_shades(vectors: torch.Tensor) -> np.ndarray:
    # Shades from |first vector| scaled to 0..255 (first 1024 values), as A1111 does.
    first = vectors[0, :1024].abs().double().numpy()
    peak = first.max() if first.size else 0.0
    if peak <= 0:
        return np.zeros(max(first.size, 1), dtype=np.uint8)
    return (first / peak * 255).astype(np.uint8)


def insert_data_in_pixels(image: Image.Image, data: dict) -> Image.Image:
    """Returns [low block | black | image | black | high block] carrying zlib(JSON(data))."""
    image = image.convert("RGB")
    h = image.size[1]
    payload = np.frombuffer(zlib.compress(_to_json(data).encode(), level=9), np.uint8)
    # Pad to a multiple of h, then of 3h (A1111's arithmetic: always grows by >= one step);
    # np.resize pads by cyclic repetition. Blocks are (h, size / (3h), 3), filled row by row.
    size = payload.shape[0] + (h - payload.shape[0] % h)
    size = size + (h * 3 - size % (h * 3))
    low = np.resize(payload & 0x0F, size).reshape(h, -1, 3)
    high = np.resize(payload >> 4, size).reshape(h, -1, 3)
    vec = next(iter(data["string_to_param"].values()))
    shades = _dot_shades(vec)
    low = _xor_keystream(_decorate(low, shades))
    high = _xor_keystream(_decorate(high, shades[::-1]))
    bw = low.shape[1]
    out = Image.new("RGB", (image.size[0] + 2 * bw + 2, h), (0, 0, 0))
    out.paste(Image.fromarray(low, "RGB"), (0, 0))
    out.paste(image, (bw + 1, 0))
    out.paste(Image.fromarray(high, "RGB"), (bw + 1 + image.size[0] + 1, 0))
    return out


def _crop_black(arr: np.ndarray) -> np.ndarray:
    # Drop outer rows/columns in which no pixel has all three channels > 0.
    mask = (arr > 0).all(2)
    cols, rows = mask.any(0), mask.any(1)
    if not cols.any():
        return arr[:0, :0]
    c0, c1 = cols.argmax(), mask.shape[1] - cols[::-1].argmax()
    r0, r1 = rows.argmax(), mask.shape[0] - rows[::-1].argmax()
    return arr[r0:r1, c0:c1]


def _zlib_header_ok(b: bytes) -> bool:
    # RFC 1950: CM = 8 (deflate) and the 16-bit header is a multiple of 31.
    return len(b) >= 2 and (b[0] & 0x0F) == 8 and ((b[0] << 8) | b[1]) % 31 == 0


def extract_data_from_pixels(image: Image.Image, where=None) -> dict | None:
    """Inverse of insert_data_in_pixels; None when the image carries no pixel data (fewer
    than two all-zero low-nibble columns, or no zlib stream where the data should start)."""
    arr = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    zero_cols = np.flatnonzero(arr.sum(axis=(0, 2)) == 0)
    if zero_cols.shape[0] < 2:
        return None
    low = _xor_keystream(arr[:, : zero_cols.min(), :])
    high = _xor_keystream(arr[:, zero_cols.max() + 1:, :])
    if low.shape != high.shape:
        return None
    raw = ((high << 4) | low).tobytes()
    if not _zlib_header_ok(raw):
        return None  # an ordinary picture with dark columns, not an embedding
    try:
        # Trailing bytes (the cyclic padding) after the end of the stream are ignored.
        return _from_json(zlib.decompress(raw))
    except (zlib.error, ValueError, UnicodeDecodeError) as e:
        raise _error(where, f"damaged embedding data in pixels ({e})") from e


# ---------------------------------------------------------------- caption overlay
def _font(size: int):
    try:
        return ImageFont.load_default(size=max(int(size), 1))
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def caption_overlay(image: Image.Image, title: str, footer: tuple[str, str, str]) -> Image.Image:
    """A1111's caption_image_overlay: a dark gradient at top and bottom, the title top-left
    sized to ~3/4 of the width (<= 72 px), three footers (left, centre, right) at the bottom
    in one shared size fitted to a third of the width each. A1111 uses a bundled Noto Sans;
    we use Pillow's default scalable font."""
    w, h = image.size
    # Row alpha: 1 - cos rises from the top and (slightly faster) from the bottom edge.
    y = np.arange(h, dtype=np.float64)
    mag = np.maximum(1 - np.cos(y / h * 1.5), 1 - np.cos((h - y) / h * 1.5 * 1.1))
    alpha = np.clip((mag * 255).astype(np.int64), 0, 255).astype(np.uint8)
    shade = np.zeros((h, w, 4), dtype=np.uint8)
    shade[..., 3] = alpha[:, None]
    out = Image.alpha_composite(image.convert("RGBA"), Image.fromarray(shade, "RGBA")).convert("RGB")
    draw = ImageDraw.Draw(out)
    pad, white = 10, (255, 255, 255)

    def fitted(text: str, target: float, base: int = 32) -> int:
        tw = draw.textbbox((0, 0), text, font=_font(base))[2] if text else 0
        return 72 if tw <= 0 else min(int(base * target / tw), 72)

    # As in A1111 the footers are measured against the title's size, not the base 32.
    title_size = fitted(title, w * 0.75 - pad * 4) if title else 32
    if title:
        draw.text((pad, pad), title, anchor="lt", font=_font(title_size), fill=white)
    left, mid, right = footer
    size = min(fitted(t, w / 3 - pad, base=title_size) for t in (left, mid, right))
    font = _font(size)
    draw.text((pad, h - pad), left, anchor="ls", font=font, fill=white)
    draw.text((w / 2, h - pad), mid, anchor="ms", font=font, fill=white)
    draw.text((w - pad, h - pad), right, anchor="rs", font=font, fill=white)
    return out


def default_caption(emb: Embedding) -> tuple[str, tuple[str, str, str]]:
    """A1111's texts: title "<name>", footer (model name, "[model hash]", "{N}v {step}s")."""
    step = emb.step if emb.step is not None else "?"
    mid = f"[{emb.sd_checkpoint}]" if emb.sd_checkpoint else ""
    return f"<{emb.name}>", (emb.sd_checkpoint_name or "", mid, f"{emb.num_vectors}v {step}s")


def embedding_to_png(emb: Embedding, preview: Image.Image | None = None,
                     caption_title: str | None = None,
                     caption_footer: tuple[str, str, str] | None = None) -> Image.Image:
    """The captioned preview with the embedding in its pixels (encoding b). preview None ->
    a plain 512x512 grey card. Titles default to A1111's (see default_caption)."""
    title, footer = default_caption(emb)
    title = title if caption_title is None else caption_title
    footer = footer if caption_footer is None else tuple(caption_footer)
    if preview is None:
        preview = Image.new("RGB", (512, 512), (96, 96, 104))
    captioned = caption_overlay(preview.convert("RGB"), title, footer)
    return insert_data_in_pixels(captioned, embedding_to_a1111_dict(emb))


def embedding_chunk_text(emb: Embedding) -> str:
    """Value of the `sd-ti-embedding` tEXt chunk (encoding a)."""
    return base64.b64encode(_to_json(embedding_to_a1111_dict(emb)).encode()).decode("ascii")


def save_png_embedding(emb: Embedding, path, preview: Image.Image | None = None, **caption) -> Path:
    """Writes a PNG carrying the embedding in both encodings, atomically. The file is named
    by the caller; readers use the stored name, not the stem."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(CHUNK_KEY, embedding_chunk_text(emb))
    image = embedding_to_png(emb, preview, **caption)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_embedding(source, width: int | None = None) -> Embedding | None:
    """Embedding stored in an image (path or PIL image): the chunk first, then the pixels.
    None when the image carries neither; EmbeddingError when it carries a damaged one."""
    if isinstance(source, Image.Image):
        where = Path(source.filename) if getattr(source, "filename", "") else None
        return _embedding_from_image(source, where, width)
    path = Path(source)
    try:    # stat first (never a FIFO), the pixel count bounded from the header before decoding
        image = open_image(path, transpose=False)
    except DataError as e:                   # its one line already names the file
        raise EmbeddingError(str(e)) from None
    with image:
        return _embedding_from_image(image, path, width)


def embedding_data_from_image(image: Image.Image, where=None) -> tuple[dict | None, str | None]:
    """(the stored .pt dict, "chunk" or "pixels") as A1111 reads an image: the tEXt chunk first,
    then the pixels; (None, None) for an ordinary picture. EmbeddingError for a damaged one."""
    text = getattr(image, "text", None) or {}  # PNG text chunks, also those after IDAT
    chunk = text.get(CHUNK_KEY) or image.info.get(CHUNK_KEY)
    if chunk:
        try:
            data, encoding = _from_json(base64.b64decode(chunk)), "chunk"
        except (ValueError, UnicodeDecodeError) as e:
            raise _error(where, f"damaged {CHUNK_KEY} chunk ({e})") from e
    else:
        data, encoding = extract_data_from_pixels(image, where=where), "pixels"
        if data is None:
            return None, None
    if not isinstance(data, dict):
        raise _error(where, "image embedding data is not a dict")
    return data, encoding


def _embedding_from_image(image: Image.Image, path: Path | None, width: int | None) -> Embedding | None:
    data, _ = embedding_data_from_image(image, path)
    if data is None:
        return None
    stored = data.get("name")
    # Image embeddings are named by their stored name (A1111), not the file stem.
    name = stored if isinstance(stored, str) and stored else (path.stem if path else "embedding")
    return embedding_from_data(data, path, name=name, width=width)


__all__ = ["CHUNK_KEY", "EmbeddingError", "caption_overlay", "default_caption", "embedding_chunk_text",
           "embedding_data_from_image", "embedding_to_png", "extract_data_from_pixels", "insert_data_in_pixels",
           "lcg_keystream", "read_png_embedding", "save_png_embedding"]
