"""Model hashes as A1111 shows them, cached by (path, size, mtime).

  shorthash    sha256 of the whole file, first 10 hex (infotext "Model hash")
  legacy       sha256 of the 64 KiB at offset 1 MiB, first 8 hex (old "Model hash")
  folder       sha256 over the unet, text_encoder, vae weight files' bytes, in that order
Hashing a 4 GB file takes seconds, so results live in <cache>/hashes.json keyed by the
absolute path and checked against size and mtime_ns (any change recomputes).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..fsutil import atomic_write_text
from .files import cache_dir

BLOCK = 1 << 20


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(BLOCK):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path) -> str:
    """Full sha256 hex of a file, uncached (image contents for the latent cache's keys)."""
    return _sha256_files([Path(path)])


def legacy_hash(path) -> str:
    """A1111's old model hash: sha256 of 0x10000 bytes at 0x100000, 8 hex."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _load_cache() -> dict:
    try:
        d = json.loads(_cache_file().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _stamp(paths: list[Path]) -> list:
    return [[str(p.resolve()), (s := p.stat()).st_size, s.st_mtime_ns] for p in paths]


def _cached(kind: str, paths: list[Path], compute) -> str:
    """compute() unless the cache holds a value for exactly these files (path, size, mtime)."""
    key = f"{kind}:" + "|".join(str(p.resolve()) for p in paths)
    stamp = _stamp(paths)
    cache = _load_cache()
    ent = cache.get(key)
    if isinstance(ent, dict) and ent.get("stamp") == stamp and isinstance(ent.get("value"), str):
        return ent["value"]
    value = compute()
    cache = _load_cache()                      # re-read: another process may have written
    cache[key] = {"stamp": stamp, "value": value}
    try:
        atomic_write_text(_cache_file(), json.dumps(cache, indent=0))
    except OSError:
        pass                                   # a read-only cache only costs time
    return value


def file_sha256(path) -> str:
    """Full sha256 hex of a file (cached)."""
    p = Path(path)
    return _cached("sha256", [p], lambda: _sha256_files([p]))


def file_hashes(path) -> tuple[str, str]:
    """(shorthash 10 hex, legacy 8 hex) of a single-file model."""
    p = Path(path)
    return file_sha256(p)[:10], _cached("legacy", [p], lambda: legacy_hash(p))


def folder_sha256(weight_files: list[Path]) -> str:
    """sha256 over the unet, text_encoder, vae weight files' bytes (cached)."""
    files = [Path(p) for p in weight_files]
    return _cached("folder", files, lambda: _sha256_files(files))
