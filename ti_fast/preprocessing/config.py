"""Preprocess settings: one dataclass, and the preflight that refuses bad ones before any image is read.

Every refusal is one line naming the flag (or folder) and what to do. Settings whose
combination has no meaning are refused rather than silently ignored: `--fit`/`--buckets` with
`--autosized-crop` (the auto-sized crop gives every image its own size, so the plain fit never
runs), `--focal-debug` without `--focal-crop`, `--join` without `--filename-regex`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError, FileKindError
from ..fsutil import check_writable_dir, kind_of

FITS = ("crop", "squash", "none")
OBJECTIVES = ("area", "error")


@dataclass
class PreprocessConfig:
    """Every setting of a preprocess run; the `ti-fast preprocess` flags map 1:1 onto the fields."""
    src: str = ""                     # folder of source images; read only, never modified
    dst: str = ""                     # output folder; created; must not lie inside src
    # size and the plain fit (runs only when no other operation wrote anything for an image)
    width: int = 512                  # target width in px (multiple of 8, at least 64)
    height: int = 512                 # target height in px (multiple of 8, at least 64)
    fit: str | None = None            # crop (centre, the default), squash, none (keep the aspect)
    buckets: bool = False             # plain fit to the trainer's aspect bucket of W×H
    keep_alpha: bool = False          # keep transparency (RGBA PNGs) instead of white behind it
    # split oversized images
    split: bool = False
    split_threshold: float = 0.5      # split when the aspect ratio (spec) is < 1 and <= this
    overlap: float = 0.2              # overlap of neighbouring tiles, fraction of a tile
    # auto focal-point crop (OpenCV)
    focal_crop: bool = False
    face_weight: float = 0.9          # weight of the faces' centroid
    entropy_weight: float = 0.15      # weight of the highest-"entropy" window's centre
    edges_weight: float = 0.5         # weight of the corner points' centroid
    focal_debug: bool = False         # also write the annotated image to DST/focal-debug/
    # auto-sized crop (A1111's "auto-sized crop")
    autosized_crop: bool = False
    min_size: int = 384               # smallest side tried (then +64 up to max_size)
    max_size: int = 768               # largest side tried
    min_area: int = 64 * 64           # candidate area bounds, px
    max_area: int = 640 * 640
    objective: str = "area"           # area: largest area first; error: smallest aspect error first
    error_threshold: float = 0.1      # largest accepted aspect error 1 - min(r, 1/r)
    # copies and captions
    flip: bool = False                # also write the mirrored copy of every output
    filename_regex: str | None = None  # caption from the file name: only the matches of this regex
    join: str | None = None           # ... joined by this (default " ")
    caption_prefix: str = ""          # added before every caption, literally
    caption_suffix: str = ""          # added after every caption, literally
    # duplicates
    dedupe: bool = False              # skip exact and near duplicates (else only report them)
    dedupe_distance: int = 4          # near duplicate: perceptual-hash Hamming distance <= this
    # the run
    dry_run: bool = False             # print what would be written, write nothing
    overwrite: bool = False           # allow a non-empty DST (files of the same name are replaced)
    quiet: bool = False               # no progress bar, no summary


def _check_size(flag: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 64 or v % 8:
        near = max(64, int(round(v / 8)) * 8) if isinstance(v, (int, float)) else 512
        raise ConfigError(f"{flag} {v!r} must be a multiple of 8 and at least 64 (the VAE works on "
                          f"8x8 pixel blocks): try {near}")


def _check_fraction(flag: str, v, top_open: bool = True) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v and (v < 1 if top_open else v <= 1)
    if not ok:
        raise ConfigError(f"{flag} {v!r} must lie in [0, {'1)' if top_open else '1]'}")


def check_settings(c: PreprocessConfig) -> None:
    """The flags alone: sizes, ranges, choices, conflicts, OpenCV for --focal-crop."""
    _check_size("--width", c.width)
    _check_size("--height", c.height)
    if c.fit is not None and c.fit not in FITS:
        raise ConfigError(f"--fit {c.fit!r}: use one of {', '.join(FITS)}")
    _check_fraction("--split-threshold", c.split_threshold)
    _check_fraction("--overlap", c.overlap)
    for flag, v in (("--face-weight", c.face_weight), ("--entropy-weight", c.entropy_weight),
                    ("--edges-weight", c.edges_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConfigError(f"{flag} {v!r} must be a number >= 0")
    if c.focal_crop and c.face_weight + c.entropy_weight + c.edges_weight == 0:
        raise ConfigError("--focal-crop with all three weights 0 has no focal point: give "
                          "--face-weight, --entropy-weight or --edges-weight a positive value")
    if c.focal_debug and not c.focal_crop:
        raise ConfigError("--focal-debug draws the focal crop: add --focal-crop or drop --focal-debug")
    _check_size("--min-size", c.min_size)
    _check_size("--max-size", c.max_size)
    if c.min_size > c.max_size:
        raise ConfigError(f"--min-size {c.min_size} is above --max-size {c.max_size}: swap them")
    for flag, v in (("--min-area", c.min_area), ("--max-area", c.max_area)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag} {v!r} must be a positive whole number of pixels")
    if c.min_area > c.max_area:
        raise ConfigError(f"--min-area {c.min_area} is above --max-area {c.max_area}: swap them")
    if c.objective not in OBJECTIVES:
        raise ConfigError(f"--objective {c.objective!r}: use area or error")
    _check_fraction("--error-threshold", c.error_threshold, top_open=False)
    if c.autosized_crop and (c.fit is not None or c.buckets):
        flag = "--fit" if c.fit is not None else "--buckets"
        raise ConfigError(f"{flag} has no effect with --autosized-crop (every image gets its own "
                          f"size or is skipped, so the plain fit never runs): drop {flag}")
    if c.join is not None and not c.filename_regex:
        raise ConfigError("--join joins the matches of --filename-regex: add --filename-regex or drop --join")
    if c.filename_regex:
        try:
            re.compile(c.filename_regex)
        except re.error as e:
            raise ConfigError(f"--filename-regex {c.filename_regex!r} is not a valid regular expression: {e}") from None
    d = c.dedupe_distance
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 64:
        raise ConfigError(f"--dedupe-distance {d!r} must be a whole number from 0 to 64 (bits of the 64-bit hash)")
    if c.focal_crop:
        from .opencv import require_opencv      # numpy/PIL/cv2 only when needed
        require_opencv()


def check_paths(c: PreprocessConfig) -> tuple[Path, Path]:
    """SRC is a folder; DST is not SRC nor inside it, is writable (or creatable), and is empty
    unless `overwrite`. -> (src, dst) with `~` expanded."""
    if not c.src or not c.dst:
        raise ConfigError("preprocess needs a source folder and an output folder: ti-fast preprocess SRC DST")
    src, dst = Path(c.src).expanduser(), Path(c.dst).expanduser()
    k = kind_of(src)
    if k == "missing":
        raise DataError(f"source folder {src} does not exist: name the folder holding the images")
    if k != "folder":
        raise FileKindError(f"source {src} is a {k}, not a folder: name the folder holding the images")
    rs, rd = src.resolve(), dst.resolve()
    if rd == rs or rs in rd.parents:
        raise ConfigError(f"output folder {dst} lies inside the source folder {src}: choose a folder "
                          "outside it (preprocess never writes into its source)")
    check_writable_dir(dst, "output folder")
    if kind_of(dst) == "folder" and not c.overwrite:
        try:
            entries = os.listdir(dst)
        except OSError as e:
            raise FileKindError(f"output folder {dst} cannot be listed ({e.strerror}): fix its permissions") from None
        if entries:
            raise ConfigError(f"output folder {dst} is not empty ({len(entries)} entries): choose a new "
                              "folder, or pass --overwrite to replace files of the same names")
    return src, dst
