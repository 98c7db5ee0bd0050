"""`ti-fast convert IN OUT`: any embedding ti-fast reads, written in another tool's format with
the same float32 vectors, bit for bit.

  a1111      OUT.pt (or .bin): A1111's dict (string_to_token, string_to_param {"*": [N, D]}, name,
             step, sd_checkpoint, sd_checkpoint_name); the trigger word is OUT's stem
  kohya      OUT.safetensors: `emb_params` [N, D], name/step/checkpoint as string metadata
  diffusers  OUT.bin / OUT.pt (torch.save) or OUT.safetensors: {NAME: tensor}, the key being the
             token diffusers registers; one vector is stored 1-D [D] as diffusers' own training
             script wrote it (InvokeAI reads a diffusers file's width from dim 0 of its tensor)
  png        OUT.png: A1111's PNG embedding, both encodings, on --image PICTURE or on A1111's
             plain card; the trigger word is the stored name

The format defaults from OUT's suffix (.pt a1111, .safetensors kohya, .bin diffusers, .png png).
NAME is --name, else OUT's stem (tensor formats) or the source's name (png). An existing OUT is
kept unless --force; every write is atomic.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..embeddings import Embedding, read_embedding, save_png_embedding, save_pt, save_safetensors
from ..errors import ConfigError
from ..fsutil import atomic_path, check_writable_dir, kind_of, require_file

FORMATS = ("a1111", "kohya", "diffusers", "png")
FORMAT_OF_SUFFIX = {".pt": "a1111", ".safetensors": "kohya", ".bin": "diffusers", ".png": "png"}
SUFFIXES = {"a1111": (".pt", ".bin"), "kohya": (".safetensors",), "diffusers": (".bin", ".pt", ".safetensors"),
            "png": (".png",)}


def output_format(out: Path, fmt: str | None) -> str:
    """The format for OUT: --format if given (its suffix must fit), else from OUT's suffix."""
    suffix = out.suffix.lower()
    if fmt is None:
        fmt = FORMAT_OF_SUFFIX.get(suffix)
        if fmt is None:
            raise ConfigError(f"{out}: cannot tell the format from {suffix or 'no suffix'}; use .pt, .safetensors, "
                              f".bin or .png, or pass --format {'|'.join(FORMATS)}")
        return fmt
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if suffix not in SUFFIXES[fmt]:
        raise ConfigError(f"{out}: a {fmt} file must end in {' or '.join(SUFFIXES[fmt])}")
    return fmt


def check_output(out: Path, force: bool) -> None:
    """Refuses an existing OUT without --force, and anything that is not a plain file."""
    k = kind_of(out)
    if k == "missing":
        check_writable_dir(out.parent if str(out.parent) else Path("."), "OUT's folder")
        return
    if k != "file":
        raise ConfigError(f"{out} is a {k}: name a file to write")
    if not force:
        raise ConfigError(f"{out} exists (pass --force to replace it)")


def save_diffusers(emb: Embedding, path: Path) -> Path:
    """{name: [D]} for one vector, {name: [N, D]} for several; torch.save or safetensors by suffix."""
    vec = emb.vectors[0].clone() if emb.num_vectors == 1 else emb.vectors.clone()
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            import safetensors.torch
            safetensors.torch.save_file({emb.name: vec}, str(tmp))
        else:
            torch.save({emb.name: vec}, tmp)
    return path


def convert(src, out, fmt: str | None = None, image=None, name: str | None = None, force: bool = False) -> dict:
    """Reads SRC (any embedding ti-fast reads), writes OUT in `fmt`. Every check that needs no
    reading comes first. Returns {path, format, name, vectors, width}."""
    from ..embeddings import sanitize_name
    from ..images import open_image
    src, out = Path(src), Path(out)
    if kind_of(src) == "missing":
        raise ConfigError(f"{src}: no such file")
    require_file(src, "IN")
    fmt = output_format(out, fmt)
    if image is not None and fmt != "png":
        raise ConfigError(f"--image is for --format png, not {fmt}")
    if name is not None:
        name = sanitize_name(name)
    check_output(out, force)
    preview = open_image(image).convert("RGB") if image is not None else None
    emb = read_embedding(src)                      # any width; SDXL and damaged files are refused here
    new_name = name or (emb.name if fmt == "png" else sanitize_name(out.stem))
    copy = Embedding(name=new_name, vectors=emb.vectors, step=emb.step, sd_checkpoint=emb.sd_checkpoint,
                     sd_checkpoint_name=emb.sd_checkpoint_name)
    if fmt == "a1111":
        save_pt(copy, out)
    elif fmt == "kohya":
        save_safetensors(copy, out)
    elif fmt == "diffusers":
        save_diffusers(copy, out)
    else:
        save_png_embedding(copy, out, preview=preview)
    return {"path": str(out), "format": fmt, "name": new_name, "vectors": copy.num_vectors, "width": copy.width}


__all__ = ["FORMATS", "convert", "output_format", "save_diffusers"]
