"""`ti-fast preprocess SRC DST ...`: argument parsing (the work is in pipeline.py).

Flags mirror PreprocessConfig's fields (`--split-threshold` sets `split_threshold`); a flag not
given keeps the dataclass default, so that "--fit given" can be told from "--fit defaulted".
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

# (section, field, help). Defaults come from PreprocessConfig; booleans are switches.
PREPROCESS_FLAGS = [
    ("size and fit", "width", "target width in px (multiple of 8)"),
    ("size and fit", "height", "target height in px (multiple of 8)"),
    ("size and fit", "fit", "plain fit when no other operation wrote: crop (centre), squash, none (keep the "
     "aspect: scaled down to the image's --buckets size; without --buckets the size is kept)"),
    ("size and fit", "buckets", "plain fit to the trainer's aspect bucket of WIDTHxHEIGHT instead of WIDTHxHEIGHT"),
    ("size and fit", "keep_alpha", "keep transparency (RGBA PNGs) instead of compositing on white"),
    ("split oversized", "split", "split images much longer than the target into overlapping tiles"),
    ("split oversized", "split_threshold", "split when the aspect ratio (see README) is < 1 and <= this, in [0, 1)"),
    ("split oversized", "overlap", "overlap of neighbouring tiles as a fraction of a tile, in [0, 1)"),
    ("focal-point crop", "focal_crop", "crop non-square images around faces, corners and detail (needs OpenCV)"),
    ("focal-point crop", "face_weight", "weight of the faces found"),
    ("focal-point crop", "entropy_weight", "weight of the most detailed window"),
    ("focal-point crop", "edges_weight", "weight of the corner points"),
    ("focal-point crop", "focal_debug", "also write the annotated image to DST/focal-debug/"),
    ("auto-sized crop", "autosized_crop", "centre-crop each image to its own best size (ignores --width/--height)"),
    ("auto-sized crop", "min_size", "smallest side tried, px (then in steps of 64)"),
    ("auto-sized crop", "max_size", "largest side tried, px"),
    ("auto-sized crop", "min_area", "smallest area accepted, px"),
    ("auto-sized crop", "max_area", "largest area accepted, px"),
    ("auto-sized crop", "objective", "area (largest area first) or error (smallest aspect error first)"),
    ("auto-sized crop", "error_threshold", "largest aspect error accepted, 1 - min(r, 1/r)"),
    ("copies and captions", "flip", "also write the mirrored copy of every output"),
    ("copies and captions", "filename_regex", "caption from a file name: only the matches of this regex"),
    ("copies and captions", "join", "join the regex's matches with this (default: a space)"),
    ("copies and captions", "caption_prefix", "text put before every caption, as given"),
    ("copies and captions", "caption_suffix", "text put after every caption, as given"),
    ("duplicates", "dedupe", "skip exact and near duplicates (they are always reported)"),
    ("duplicates", "dedupe_distance", "near duplicate: perceptual-hash distance at most this (0-64)"),
    ("run", "dry_run", "print what would be written; write nothing"),
    ("run", "overwrite", "allow a non-empty DST; files of the same names are replaced"),
    ("run", "quiet", "no progress bar and no summary"),
]
CHOICES = {"fit": "{crop,squash,none}", "objective": "{area,error}"}   # checked by config.py (one line)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_preprocess_parser(sub):
    from .config import PreprocessConfig
    p = sub.add_parser("preprocess", help="prepare a folder of images for training (split, crop, flip, captions)",
                       description="Write training-ready PNGs with captions from the images of SRC into DST "
                                   "(A1111's Preprocess images). SRC is never modified.")
    p.add_argument("src", help="folder of source images (its top level is read)")
    p.add_argument("dst", help="output folder (created; not inside SRC; empty unless --overwrite)")
    fields = {f.name: f for f in dataclasses.fields(PreprocessConfig)}
    groups = {}
    for section, name, help_ in PREPROCESS_FLAGS:
        g = groups.setdefault(section, p.add_argument_group(section))
        default = fields[name].default
        if isinstance(default, bool):
            g.add_argument(_flag(name), action="store_true", default=argparse.SUPPRESS, help=f"{help_} (off)")
            continue
        typ = int if isinstance(default, int) else float if isinstance(default, float) else str
        shown = "crop" if name == "fit" else default
        hint = "" if shown is None else " (default: empty)" if shown == "" else f" (default: {shown})"
        metavar = CHOICES.get(name) or {int: "N", float: "X", str: "TEXT"}[typ]
        g.add_argument(_flag(name), type=typ, default=argparse.SUPPRESS, metavar=metavar, help=help_ + hint)
    p.set_defaults(func=cmd_preprocess)


def cmd_preprocess(a) -> int:
    from ..errors import UserError
    from .config import PreprocessConfig
    from .pipeline import run
    try:
        run(PreprocessConfig(**{k: v for k, v in vars(a).items() if k not in ("cmd", "func")}))
    except UserError as e:
        print(f"ti-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                  # every file written so far is whole (atomic writes)
        print("ti-fast: interrupted; the files written so far are complete", file=sys.stderr)
        return 130
    return 0
