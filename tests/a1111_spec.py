"""An independent reader and writer of embedding files, written from ../shared/spec/a1111-compat.md
("Embedding files", "Embedding inside a PNG") and nothing of ti_fast: the tests of inspect,
verify and convert build their inputs and check their outputs with it."""
from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image, PngImagePlugin

TAG = "TORCHTENSOR"


def a1111_dict(vectors: torch.Tensor, name: str, step=None, sd_checkpoint=None, sd_checkpoint_name=None) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": step,
            "sd_checkpoint": sd_checkpoint, "sd_checkpoint_name": sd_checkpoint_name}


def to_json(d: dict) -> str:
    return json.dumps(d, default=lambda t: {TAG: t.tolist()})


def from_json(text) -> dict:
    return json.loads(text, object_hook=lambda d: torch.tensor(d[TAG], dtype=torch.float64) if TAG in d else d)


def keystream(n: int) -> np.ndarray:
    """(state mod 255) & 0x0F of the LCG state = (1664525·state + 1013904223) mod 2³², seed 0."""
    out, state = np.empty(n, dtype=np.uint8), 0
    for i in range(n):
        state = (1664525 * state + 1013904223) % 2**32
        out[i] = (state % 255) & 0x0F
    return out


def _xor(block: np.ndarray) -> np.ndarray:
    return block ^ keystream(block.size).reshape(block.shape)


def pixels_image(d: dict, preview: Image.Image) -> Image.Image:
    """[low block | black column | preview | black column | high block], data in the low nibbles
    (no decoration: the spec calls it cosmetic)."""
    h = preview.size[1]
    payload = np.frombuffer(zlib.compress(to_json(d).encode(), 9), np.uint8)
    size = payload.size + (h - payload.size % h)
    size += h * 3 - size % (h * 3)
    low = _xor(np.resize(payload & 0x0F, size).reshape(h, -1, 3))
    high = _xor(np.resize(payload >> 4, size).reshape(h, -1, 3))
    w = low.shape[1]
    out = np.zeros((h, preview.size[0] + 2 * w + 2, 3), np.uint8)
    out[:, :w], out[:, w + 1: w + 1 + preview.size[0]], out[:, -w:] = low, np.asarray(preview.convert("RGB")), high
    return Image.fromarray(out)


def write_png(path: Path, d: dict, chunk=True, pixels=True, fmt="PNG", size=(64, 48)):
    preview = Image.new("RGB", size, (96, 96, 104))
    image = pixels_image(d, preview) if pixels else preview
    kw = {}
    if chunk:
        info = PngImagePlugin.PngInfo()
        info.add_text("sd-ti-embedding", base64.b64encode(to_json(d).encode()).decode())
        kw["pnginfo"] = info
    if fmt == "WEBP":
        kw = {"lossless": True}
    image.save(path, format=fmt, **kw)
    return path


def read_pixels(image: Image.Image) -> dict | None:
    a = np.asarray(image.convert("RGB"), dtype=np.uint8)
    live = (a > 0).all(2)
    rows, cols = np.flatnonzero(live.any(1)), np.flatnonzero(live.any(0))
    a = a[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] & 0x0F
    zero = np.flatnonzero(a.sum(axis=(0, 2)) == 0)
    if zero.size < 2:
        return None
    left, right = _xor(a[:, : zero[0]]), _xor(a[:, zero[-1] + 1:])
    return from_json(zlib.decompressobj().decompress(((right << 4) | left).tobytes()))


def read_a1111(path, width: int | None = None) -> tuple[str, torch.Tensor]:
    """(trigger word, float32 vectors [N, D]) by the spec's A1111 loading rules; AssertionError
    for what A1111 would skip or refuse."""
    path = Path(path)
    name, ext = path.stem, path.suffix.lower()
    if ext in (".png", ".webp"):
        with Image.open(path) as im:
            im.load()
            text = getattr(im, "text", {}) or {}
            data = from_json(base64.b64decode(text["sd-ti-embedding"])) if "sd-ti-embedding" in text \
                else read_pixels(im)
        assert data is not None, f"{path}: no embedding in the image"
        name = data.get("name", name)
    elif ext in (".pt", ".bin"):
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    elif ext == ".safetensors":
        data = safetensors.torch.load_file(str(path))
    else:
        raise AssertionError(f"{path}: A1111 does not read {ext}")
    if "string_to_param" in data:
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
        assert len(params) == 1, "multiple terms"
        vec = next(iter(params.values()))
    else:
        assert "clip_g" not in data, "SDXL"
        assert len(data) == 1 and torch.is_tensor(next(iter(data.values()))), "multiple terms"
        vec = next(iter(data.values()))
        vec = vec.unsqueeze(0) if vec.ndim == 1 else vec
    vec = vec.detach().to(torch.float32)
    assert width is None or vec.shape[-1] == width, "wrong width: skipped"
    return name, vec
