"""Shared helpers for the preprocess tests: optional packages (fail under CI), synthetic images, folder hashes."""
from __future__ import annotations

import hashlib
import importlib
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ci_helpers import skip_or_fail


def need(module: str, install: str):
    """The module, or skip — except under CI (CI=1), where a missing test package is a failure:
    .ci/run installs it, so its absence means the CI setup broke."""
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_or_fail(f"{module} is not installed ({install})")


def need_cv2():
    return need("cv2", "pip install 'opencv-python-headless<5'")


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def position_image(w: int, h: int) -> Image.Image:
    """Every pixel unique: R = x mod 256, G = y mod 256, B = (x // 256) * 16 + y // 256, so a crop's
    position can be read back exactly."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    rgb = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def png_bomb(path: Path, w: int = 100_000, h: int = 100_000) -> Path:
    """A ~100-byte PNG whose header declares w×h pixels (a decompression bomb); written by hand
    from the PNG spec (signature, IHDR, IDAT, IEND, each chunk with its CRC)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)        # 8-bit RGB, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def tree_state(folder: Path) -> dict[str, tuple]:
    """{relative path: (sha256 of the content, mode, mtime_ns)} of every regular file, and
    (kind, mode) of everything else, under `folder` (links not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not p.is_symlink():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode, st.st_mtime_ns)
        else:
            out[rel] = ("other", st.st_mode, st.st_mtime_ns)
    return out


def outputs(dst: Path) -> list[str]:
    """The PNG names written to DST (top level), sorted."""
    return sorted(p.name for p in dst.glob("*.png"))
