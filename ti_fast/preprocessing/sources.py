"""What is in SRC: the image files in name order, and a one-line note for everything else.

Only SRC's top level is read. Entries are classified from `stat` alone (nothing is opened here):
image files by extension (png, jpg, jpeg, webp, bmp, and tif/tiff/gif, whose first frame is
used); `<stem>.txt` captions silently; names starting with "." silently (macOS "._x.jpg",
.ipynb_checkpoints); anything else — sub-folders, other files, FIFOs, sockets, devices, broken
links — gets one note. An image-named FIFO or bomb stays in the list: the pipeline numbers it and
skips it with its own line, without opening it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, FileKindError
from ..fsutil import kind_of
from ..images import IMAGE_EXTS

READ_EXTS = IMAGE_EXTS + (".tif", ".tiff", ".gif")


@dataclass
class Sources:
    images: list[Path]                                            # image files, name order
    notes: list[tuple[Path, str]] = field(default_factory=list)   # (entry, why it is not read)


def list_sources(src: Path) -> Sources:
    try:
        names = sorted(os.listdir(src))
    except OSError as e:
        raise FileKindError(f"source folder {src} cannot be listed ({e.strerror}): fix its permissions") from None
    images, notes = [], []
    for name in names:
        if name.startswith("."):
            continue
        p = src / name
        ext = p.suffix.lower()
        if ext in READ_EXTS:
            images.append(p)
            continue
        k = kind_of(p)
        if k == "file" and ext == ".txt":
            continue
        if k == "folder":
            notes.append((p, "a sub-folder: not read (preprocess reads SRC's top level only)"))
        elif k == "file":
            notes.append((p, f"not an image ({', '.join(e[1:] for e in READ_EXTS)}): not read"))
        else:
            notes.append((p, f"a {k}, not a regular file: not read"))
    if not images:
        raise DataError(f"source folder {src} has no images ({', '.join(e[1:] for e in READ_EXTS)}): "
                        "name the folder holding them")
    return Sources(images, notes)
