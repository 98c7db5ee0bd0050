"""Output names (A1111's `NNNNN-k-NAME.png`, caption in `NNNNN-k-NAME.txt`) and the caption text.

NNNNN is the source image's index in SRC's name order (every image file counts, also one that is
then skipped, so names stay put when a file is fixed and the run repeated), k counts the outputs
of that image in the order written (a flipped copy right after its original), NAME is the
source's file stem. The caption is the source's `<stem>.txt` when there is one, else made from
the source's file name (leading digits/dashes removed; with a regex, its matches joined), with
the prefix and suffix added literally. Training on the output with filename captions also works:
A1111's rule strips the `NNNNN-k-` again.
"""
from __future__ import annotations

from pathlib import Path

from ..images import caption_for

MAX_NAME_BYTES = 255            # a file name's limit on Linux, macOS and Windows filesystems


def output_stem(index: int, k: int | None, source: Path) -> str:
    """`NNNNN-k-NAME` (`NNNNN-NAME` for k None: the focal debug image), NAME shortened (never
    split inside a character) so that the .png and .txt names fit the file-name limit."""
    head = f"{index:05}-" if k is None else f"{index:05}-{k}-"
    room = MAX_NAME_BYTES - len(head.encode()) - len(".png")
    name = source.stem
    while len(name.encode("utf-8")) > room:
        name = name[:-1]
    return head + name


def caption_text(source: Path, word_regex: str | None = None, join: str | None = None,
                 prefix: str = "", suffix: str = "") -> str:
    """The caption of every output of `source` (DataError if its .txt cannot be read)."""
    return f"{prefix}{caption_for(source, word_regex, ' ' if join is None else join)}{suffix}"
