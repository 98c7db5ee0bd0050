"""Reading one embedding file of any kind, and loading a library of them from folders.

A1111 semantics (v1.10.1 EmbeddingDatabase): the trigger word is the file stem (image
embeddings: their stored name); `*.preview.*` images are previews, not embeddings; images
without an embedding are skipped silently; embeddings for another model width are skipped,
not fatal. Where A1111 prints a traceback we print one line naming the file, and where it lets
a later file silently replace an earlier trigger word we keep the first and say so.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from ti_fast.embeddings.formats import Embedding, EmbeddingError, _error, read_tensor_file
from ti_fast.fsutil import special_reason
from ti_fast.embeddings.png import read_png_embedding

TENSOR_EXTS = (".pt", ".bin", ".safetensors")
IMAGE_EXTS = (".png", ".webp")
EMBEDDING_EXTS = TENSOR_EXTS + IMAGE_EXTS


def is_preview_image(path: Path) -> bool:
    """`foo.preview.png` is a UI thumbnail for `foo.pt` (A1111/Civitai convention)."""
    return path.suffix.lower() in IMAGE_EXTS and Path(path.stem).suffix.lower() == ".preview"


def read_embedding(path, width: int | None = None) -> Embedding:
    """Reads one embedding file: .pt/.bin/.safetensors, or a .png/.webp carrying one.

    width: expected vector width (768 for SD1.x); None accepts any. Raises EmbeddingError
    (WrongModelEmbedding for SDXL or another width) with one line naming the file."""
    path = Path(path)
    why = special_reason(path)
    if why is not None:
        raise _error(path, f"is {why}; name a regular file")
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        emb = read_png_embedding(path, width=width)
        if emb is None:
            raise _error(path, "image carries no embedding (no sd-ti-embedding chunk, no data in pixels)")
        return emb
    if ext in TENSOR_EXTS:
        return read_tensor_file(path, width=width)
    raise _error(path, f"unsupported embedding file type {ext or '(none)'}; "
                       f"expected one of {', '.join(EMBEDDING_EXTS)}")


def _candidates(root: Path) -> Iterable[Path]:
    """Files under root in a stable order (sorted, depth-first), following links as A1111 does."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for fn in sorted(filenames):
            yield Path(dirpath) / fn


def load_library(paths, width: int = 768, warn: Callable[[str], None] = print) -> dict[str, Embedding]:
    """Loads every embedding under `paths` (folders, recursively, or single files).

    Returns {trigger word: Embedding} sorted by lower-cased name (A1111's display order).
    Each skipped file costs exactly one `warn` line naming it: wrong model/width, corrupt,
    duplicate trigger word (the first one found is kept). Images with no embedding, previews,
    and files of other types inside folders are skipped silently."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[str, Embedding] = {}
    for root in map(Path, paths):
        why = special_reason(root)
        if why is not None:         # named directly: refused, never opened (a FIFO would block)
            raise EmbeddingError(f"--embeddings {root} is {why}: name a file or a folder of embeddings")
        if not root.exists():
            warn(f"embeddings: {root} does not exist, skipped")
            continue
        explicit = root.is_file()
        for path in _candidates(root):
            ext = path.suffix.lower()
            why = special_reason(path)
            if why is not None:
                if ext in EMBEDDING_EXTS:
                    warn(f"embeddings: {path} is {why}, skipped")
                continue
            if ext not in EMBEDDING_EXTS or is_preview_image(path):
                if explicit:
                    warn(f"embeddings: {path}: not an embedding file type, skipped")
                continue
            try:
                if ext in IMAGE_EXTS:
                    emb = read_png_embedding(path, width=width)
                    if emb is None:
                        continue  # an ordinary picture (e.g. a sample) sitting beside embeddings
                else:
                    emb = read_tensor_file(path, width=width)
            except EmbeddingError as e:
                warn(f"embeddings: skipped {e}")
                continue
            if emb.name in found:
                if torch.equal(found[emb.name].vectors, emb.vectors):
                    continue  # the same embedding in another format (ti-fast writes NAME.pt + NAME.safetensors)
                warn(f"embeddings: {path}: trigger word {emb.name!r} already loaded from "
                     f"{found[emb.name].path}, skipped")
                continue
            found[emb.name] = emb
    return {e.name: e for e in sorted(found.values(), key=lambda e: e.name.lower())}
