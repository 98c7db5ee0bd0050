"""Duplicates: exact (same file content, sha256) and near (perceptual hash within a Hamming distance).

The perceptual hash is the common 64-bit pHash (as the `imagehash` package computes it, done
here with numpy instead of a dependency): the image in greyscale resampled to 32×32 (Lanczos),
a 2-D DCT-II, the 8×8 lowest frequencies (DC included) compared with their median. Re-encoded,
resized or slightly recoloured copies land within a few bits of each other; different pictures
differ in about half of the 64. Images are compared in file-name order against every earlier
image still kept, so the first of a group is kept and the later ones are reported (and skipped
with --dedupe).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HASH_SIZE = 8                  # 8×8 low frequencies -> 64 bits
SAMPLE = HASH_SIZE * 4         # 32×32 greyscale input to the DCT


def _dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II as a matrix: X[k] = 2 * sum_i x[i] cos(pi k (2i + 1) / 2n)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(SAMPLE)     # [32, 32], built once at import (read-only afterwards)


def phash_bits(img: Image.Image) -> np.ndarray:
    """bool [8, 8]: the low-frequency DCT coefficients above their median."""
    if img.mode in ("RGBA", "LA"):      # transparent images are compared as they train: on white
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    grey = np.asarray(img.convert("L").resize((SAMPLE, SAMPLE), Image.Resampling.LANCZOS), dtype=np.float64)
    coef = _DCT @ grey @ _DCT.T                                  # [32, 32]: DCT along y, then x
    low = coef[:HASH_SIZE, :HASH_SIZE]
    return low > np.median(low)


def phash(img: Image.Image) -> int:
    """The 64-bit pHash as an int (bits in row-major order, first bit most significant)."""
    return int("".join("1" if b else "0" for b in phash_bits(img).ravel()), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass
class Duplicate:
    path: Path                 # the later file
    of: Path                   # the earlier file it duplicates
    distance: int              # Hamming distance of the pHashes (0 for exact duplicates)
    exact: bool                # same file content
    skipped: bool              # not processed (--dedupe)

    def line(self) -> str:
        what = "exact duplicate" if self.exact else f"near duplicate (hash distance {self.distance})"
        then = "skipped" if self.skipped else "kept (--dedupe skips it)"
        return f"{self.path.name}: {what} of {self.of.name}; {then}"


class DuplicateIndex:
    """The images kept so far, by content hash and pHash."""

    def __init__(self, distance: int = 4):
        self.distance = distance
        self._by_sha: dict[str, Path] = {}
        self._paths: list[Path] = []
        self._hashes: list[int] = []

    def find(self, path: Path, sha: str, ph: int, skip: bool) -> Duplicate | None:
        """The earlier image this one duplicates (exact first, else the nearest within the
        distance), or None."""
        if sha in self._by_sha:
            return Duplicate(path, self._by_sha[sha], 0, True, skip)
        best = None
        for p, h in zip(self._paths, self._hashes):
            d = hamming(ph, h)
            if d <= self.distance and (best is None or d < best[1]):
                best = (p, d)
        return Duplicate(path, best[0], best[1], False, skip) if best else None

    def add(self, path: Path, sha: str, ph: int) -> None:
        self._by_sha.setdefault(sha, path)
        self._paths.append(path)
        self._hashes.append(ph)
