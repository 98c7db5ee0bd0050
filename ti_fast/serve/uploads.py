"""Dataset uploads: multipart images and captions, or one zip, streamed into HOME/tmp, checked, installed.

The files land in HOME/datasets/NAME only once every check has passed.

Checks, each a one-line 4xx naming the file: a file name with a directory part, '..' or a leading
dot (400; other characters are replaced by '_', so captions still pair with their images); a type
other than the training images (.png .jpg .jpeg .webp .bmp) and .txt captions (400); each file,
the whole upload and the file count against the limits (413, counted as the bytes arrive, never
trusting a header); every image opened with the pixel bound (ti_fast.images.open_image: the size
is read from the header before any pixel is decoded) and a caption that is not UTF-8 (400). A
zip is checked entry by entry BEFORE anything is extracted — traversal, absolute names,
symbolic links and other special entries, encryption, the total uncompressed size and the entry
count — and each entry's bytes are counted again while it is written.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from ..errors import DataError
from ..images import IMAGE_EXTS, open_image
from .errors import Conflict, HTTPRefusal, TooLarge

CAPTION_EXTS = (".txt",)
MAX_CAPTION_BYTES = 1 << 20
MAX_FIELD_BYTES = 1 << 16
# Entries packers add beside the data: skipped without a word.
_PACKER_NOISE = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass
class Limits:
    max_upload: int              # bytes, all files together (a zip: its entries' uncompressed total)
    max_file: int                # bytes, one file or zip entry
    max_files: int
    max_pixels: int


@dataclass
class Received:
    files: dict = field(default_factory=dict)     # stored name -> (client's name, path)
    fields: dict = field(default_factory=dict)    # plain form fields
    skipped: list = field(default_factory=list)   # zip entries that are not images or captions


def stored_name(client_name: str) -> str:
    """The name a client's file is stored under: refused when it names a directory or is hidden,
    otherwise every character but letters, digits and '._- ' becomes '_'."""
    name = str(client_name)
    if "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or name.startswith("."):
        raise HTTPRefusal(f"{name!r}: file names may not contain '/', '\\' or start with '.' (send plain file names)")
    clean = "".join(ch if (ch.isalnum() or ch in "._- ") else "_" for ch in name).strip()
    if not clean or clean.startswith(".") or len(clean.encode()) > 200:
        raise HTTPRefusal(f"{name!r}: not a usable file name")
    return clean


def kind_of_name(name: str) -> str | None:
    ext = Path(name).suffix.lower()
    return "image" if ext in IMAGE_EXTS else "caption" if ext in CAPTION_EXTS else "zip" if ext == ".zip" else None


async def receive(request, dest: Path, limits: Limits) -> Received:
    """Stream a multipart/form-data body into `dest`; TooLarge / HTTPRefusal as the bytes arrive."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPRefusal("upload: send multipart/form-data (files in fields named 'files')")
    got = Received()
    part: dict = {}
    total = 0

    def on_part_begin():
        part.clear()
        part.update(headers={}, field=b"", value=b"", file=None, size=0, data=bytearray())

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        part["headers"][part["field"].lower().decode("latin-1")] = part["value"]
        part["field"], part["value"] = b"", b""

    def on_headers_finished():
        _, opts = parse_options_header(part["headers"].get("content-disposition", b""))
        part["name"] = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            client = opts[b"filename"].decode("utf-8", "replace")
            name = stored_name(client)
            if name in got.files:
                raise HTTPRefusal(f"{client!r}: sent twice (or two names that become {name!r})")
            if len(got.files) >= limits.max_files:
                raise TooLarge(f"{client!r}: more than {limits.max_files} files in one upload")
            if kind_of_name(name) is None:
                raise HTTPRefusal(f"{client!r}: not a training image ({' '.join(IMAGE_EXTS)}), a caption (.txt) "
                                  "or a .zip of them")
            path = dest / name
            part["file"] = open(path, "xb")
            got.files[name] = (client, path)
            part["client"] = client

    def on_part_data(data, start, end):
        nonlocal total
        n = end - start
        total += n
        if total > limits.max_upload:
            raise TooLarge(f"upload over the {limits.max_upload >> 20} MiB limit")
        if part.get("file") is not None:
            part["size"] += n
            if part["size"] > limits.max_file:
                raise TooLarge(f"{part['client']!r}: over the {limits.max_file >> 20} MiB limit for one file")
            part["file"].write(data[start:end])
        else:
            part["data"] += data[start:end]
            if len(part["data"]) > MAX_FIELD_BYTES:
                raise TooLarge(f"form field {part.get('name')!r}: too long")

    def on_part_end():
        if part.get("file") is not None:
            part["file"].close()
            part["file"] = None
        elif part.get("name"):
            got.fields[part["name"]] = part["data"].decode("utf-8", "replace")

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished})   # (its max_size truncates
                                                                                          # silently: counted above)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except (HTTPRefusal, TooLarge):
        raise
    except Exception as e:
        if type(e).__name__ == "BodyTooLarge":
            raise
        raise HTTPRefusal(f"upload: malformed multipart body ({type(e).__name__})") from None
    finally:
        if part.get("file") is not None:
            part["file"].close()
    if not got.files:
        raise HTTPRefusal("upload: no files (send images and captions, or one .zip, as multipart files)")
    return got


# ---------------------------------------------------------------------------- zips

def _entry_parts(info: zipfile.ZipInfo) -> list[str]:
    name = info.filename
    if "\x00" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise HTTPRefusal(f"zip entry {name!r}: absolute or Windows-style path refused")
    parts = [p for p in name.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise HTTPRefusal(f"zip entry {name!r}: '..' leads outside the dataset; refused")
    return parts


def check_zip(path: Path, client: str, limits: Limits) -> tuple[list[tuple[zipfile.ZipInfo, str]], list[str]]:
    """(entries to extract with their stored relative paths, skipped names), after checking every
    entry; nothing is written here."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise HTTPRefusal(f"{client!r}: not a readable zip file ({e})") from None
    with zf:
        infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise TooLarge(f"{client!r}: {len(infos)} entries, over the {limits.max_files} file limit")
    keep, skipped, total, seen = [], [], 0, set()
    for info in infos:
        parts = _entry_parts(info)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise HTTPRefusal(f"zip entry {info.filename!r}: a symbolic link; refused")
        if info.is_dir() or not parts:
            continue
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):      # (no type bits: a plain file, as zip tools write)
            raise HTTPRefusal(f"zip entry {info.filename!r}: not a regular file; refused")
        if info.flag_bits & 0x1:
            raise HTTPRefusal(f"zip entry {info.filename!r}: encrypted; send an unencrypted zip")
        if any(p in _PACKER_NOISE or p.startswith("._") for p in parts) or parts[-1].startswith("."):
            continue
        if kind_of_name(parts[-1]) not in ("image", "caption"):
            skipped.append(info.filename)
            continue
        if info.file_size > limits.max_file:
            raise TooLarge(f"zip entry {info.filename!r}: {info.file_size >> 20} MiB, over the "
                           f"{limits.max_file >> 20} MiB limit for one file")
        total += info.file_size
        if total > limits.max_upload:
            raise TooLarge(f"{client!r}: over {limits.max_upload >> 20} MiB once extracted")
        rel = "/".join(stored_name(p) for p in parts)
        if rel in seen:
            raise HTTPRefusal(f"zip entry {info.filename!r}: two entries would be stored as {rel!r}")
        seen.add(rel)
        keep.append((info, rel))
    return keep, skipped


def extract_zip(path: Path, client: str, dest: Path, limits: Limits) -> tuple[list[str], list[str]]:
    """Checked entries written under dest (bytes counted against the header's size as they come)."""
    keep, skipped = check_zip(path, client, limits)
    with zipfile.ZipFile(path) as zf:
        for info, rel in keep:
            target = dest.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            n = 0
            try:
                with zf.open(info) as src, open(target, "xb") as out:
                    while block := src.read(1 << 16):
                        n += len(block)
                        if n > info.file_size or n > limits.max_file:
                            raise TooLarge(f"zip entry {info.filename!r}: holds more than its header says")
                        out.write(block)
            except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
                raise HTTPRefusal(f"zip entry {info.filename!r}: cannot be read ({e})") from None
    return [rel for _, rel in keep], skipped


# ---------------------------------------------------------------------------- checks and install

def check_files(root: Path, names: dict, limits: Limits) -> dict:
    """Open every image (pixel bound) and decode every caption; 400 naming the client's file.
    names: stored relative path -> the name the client knows. Returns counts."""
    images = captions = 0
    for rel, client in names.items():
        p = root / rel
        kind = kind_of_name(rel)
        if kind == "image":
            try:
                open_image(p, max_pixels=limits.max_pixels).close()
            except DataError as e:
                raise HTTPRefusal(f"{client}: not a usable image ({_after_path(str(e), p)})") from None
            images += 1
        elif kind == "caption":
            if p.stat().st_size > MAX_CAPTION_BYTES:
                raise TooLarge(f"{client}: a caption over {MAX_CAPTION_BYTES >> 20} MiB")
            try:
                p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise HTTPRefusal(f"{client}: captions must be UTF-8 text") from None
            captions += 1
    if images == 0:
        raise HTTPRefusal("upload: no training images in it (.png .jpg .jpeg .webp .bmp)")
    return {"images": images, "captions": captions}


def _after_path(message: str, path: Path) -> str:
    """The reason of a DataError without the staging path it names."""
    return message.replace(f"image {path}", "").replace(str(path), "").strip(" :;")


def install(staging: Path, target: Path, replace: bool) -> None:
    """Move the checked files into the dataset folder (created, or merged into)."""
    if not target.exists():
        os.rename(staging, target)
        return
    clashes = [p.relative_to(staging) for p in staging.rglob("*") if p.is_file() and (target / p.relative_to(staging)).exists()]
    if clashes and not replace:
        raise Conflict(f"{clashes[0]} exists in dataset {target.name!r}: send replace=true to replace files")
    for p in sorted(staging.rglob("*")):
        if p.is_file():
            dst = target / p.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dst)
    shutil.rmtree(staging, ignore_errors=True)


def describe_dataset(folder: Path) -> dict:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()]
    return {"name": folder.name,
            "images": sum(1 for p in files if kind_of_name(p.name) == "image"),
            "captions": sum(1 for p in files if kind_of_name(p.name) == "caption"),
            "bytes": sum(p.stat().st_size for p in files)}
