"""The preprocess run: check everything, then each source image -> its outputs, captions, summary.

As A1111's preprocess: each enabled operation (split, focal crop, auto-sized crop) writes its own
outputs from the source image; the plain fit runs only when none of them applied to the image
(split: the image was not oversized; focal crop: the image is square; an enabled auto-sized crop
always counts, even when it found no size); a flipped copy follows every output; every output
gets the caption of its source. Writes are atomic (a crash never leaves a half-written PNG);
SRC is only read. Lines about single files go to stderr (through tqdm, so the bar stays
intact), `--dry-run`'s plan and the summary to stdout.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..errors import DataError, FileKindError
from ..fsutil import atomic_path, atomic_write_text, disk_full_error, is_disk_full, special_reason
from ..images import PixelLimitError, load_image
from ..loading.hashes import sha256_file
from .autosize import autosized_crop, choose_size
from .config import PreprocessConfig, check_paths, check_settings
from .dedupe import DuplicateIndex, phash
from .fit import plain_fit
from .focal import focal_crop
from .naming import caption_text, output_stem
from .report import Output, PreprocessResult, Skip
from .sources import list_sources
from .split import plan_split, split_image

DEBUG_DIR = "focal-debug"


def preprocess(src, dst, *, warn=None, say=None, **options) -> PreprocessResult:
    """Prepare the images of folder `src` for training into folder `dst`; options are the fields
    of PreprocessConfig (width=512, height=512, split=False, focal_crop=False, flip=False, ...).
    Raises a UserError subclass (one line) for bad settings or folders before reading any image.
    `warn(line)` gets the lines about single files (default: stderr), `say(line)` the dry-run
    plan and the summary (default: stdout)."""
    return run(PreprocessConfig(src=str(src), dst=str(dst), **options), warn=warn, say=say)


def run(cfg: PreprocessConfig, warn=None, say=None) -> PreprocessResult:
    check_settings(cfg)
    src, dst = check_paths(cfg)
    sources = list_sources(src)
    say = say or print
    warn = warn or (lambda line: tqdm.write(line, file=sys.stderr))
    res = PreprocessResult(src, dst, images=len(sources.images), notes=list(sources.notes), dry_run=cfg.dry_run)
    for p, why in sources.notes:
        warn(f"{p}: {why}")
    dups = DuplicateIndex(cfg.dedupe_distance)
    with tqdm(total=len(sources.images), file=sys.stderr, disable=cfg.quiet, unit="img",
              desc="preprocess", dynamic_ncols=True) as bar:
        for index, path in enumerate(sources.images):
            _one(cfg, index, path, dst, dups, res, warn, say)
            bar.update()
    if not res.outputs:
        raise DataError(f"none of the {res.images} images in {src} could be used (see the lines above): "
                        "fix or replace them, or loosen the settings that skipped them")
    if not cfg.quiet:
        say(res.summary())
    return res


def _skip(res: PreprocessResult, warn, path: Path, reason: str, message: str) -> None:
    res.skipped.append(Skip(path, reason, message))
    warn(message)


def _one(cfg: PreprocessConfig, index: int, path: Path, dst: Path, dups: DuplicateIndex,
         res: PreprocessResult, warn, say) -> None:
    """All outputs of one source image (or one line saying why it has none)."""
    why = special_reason(path)
    if why is not None:
        return _skip(res, warn, path, "not a regular file", f"skipped {path}: it is {why} (never opened)")
    try:
        img, _ = load_image(path, keep_alpha=cfg.keep_alpha)
    except PixelLimitError as e:
        return _skip(res, warn, path, "over the pixel limit", f"skipped: {e}")
    except DataError as e:
        return _skip(res, warn, path, "unreadable", f"skipped: {e}")

    try:
        sha = sha256_file(path)
    except OSError as e:
        return _skip(res, warn, path, "unreadable", f"skipped {path}: cannot read it ({e.strerror})")
    ph = phash(img)
    dup = dups.find(path, sha, ph, skip=cfg.dedupe)
    if dup is not None:
        res.duplicates.append(dup)
        if dup.skipped:
            return _skip(res, warn, path, "duplicate", dup.line())
        warn(dup.line())

    try:
        caption = caption_text(path, cfg.filename_regex, cfg.join, cfg.caption_prefix, cfg.caption_suffix)
    except DataError as e:
        return _skip(res, warn, path, "caption unreadable", f"skipped: {e}")

    W, H = cfg.width, cfg.height
    w, h = img.size
    outs: list[tuple[str, Image.Image]] = []
    plan = plan_split(w, h, W, H, cfg.split_threshold, cfg.overlap) if cfg.split else None
    if plan is not None:
        outs += [("split", tile) for tile in split_image(img, plan)]
    focal = cfg.focal_crop and w != h
    if focal:
        crop, focus, debug = focal_crop(img, W, H, cfg.face_weight, cfg.entropy_weight, cfg.edges_weight,
                                        cfg.focal_debug)
        outs.append(("focal", crop))
        if debug is not None:
            target = dst / DEBUG_DIR / f"{output_stem(index, None, path)}.png"
            _save(debug, target, None, cfg.dry_run)
            res.debug_images.append(target)
            if cfg.dry_run:
                say(f"would write {target} (focal debug image)")
    if cfg.autosized_crop:
        size = choose_size(w, h, cfg.min_size, cfg.max_size, cfg.min_area, cfg.max_area, cfg.objective,
                           cfg.error_threshold)
        if size is not None:
            outs.append(("autosized", autosized_crop(img, size)))
        else:
            msg = (f"{path}: no auto-sized crop for {w}x{h} (no size from {cfg.min_size} to {cfg.max_size} "
                   f"within aspect error {cfg.error_threshold}); raise --error-threshold or widen the sizes")
            if not outs:
                return _skip(res, warn, path, "no auto-sized crop", f"skipped {msg}")
            warn(msg)
    if plan is None and not focal and not cfg.autosized_crop:
        outs.append(("fit", plain_fit(img, W, H, cfg.fit or "crop", cfg.buckets)))

    dups.add(path, sha, ph)                     # later images are compared with the ones kept
    k = 0
    for kind, im in outs:
        for flipped in ((False, True) if cfg.flip else (False,)):
            target = dst / f"{output_stem(index, k, path)}.png"
            out = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else im
            _save(out, target, caption, cfg.dry_run)
            res.outputs.append(Output(target, path, kind, out.size, flipped, caption))
            if cfg.dry_run:
                say(f"would write {target} ({out.width}x{out.height}, {kind}{', flipped' if flipped else ''}) "
                    f"caption {caption!r}")
            k += 1


def _save(img: Image.Image, path: Path, caption: str | None, dry_run: bool) -> None:
    """The PNG (and its caption .txt unless None), each written atomically."""
    if dry_run:
        return
    try:
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        if caption is not None:
            atomic_write_text(path.with_suffix(".txt"), caption)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, e) from None
        raise FileKindError(f"cannot write {path} ({e.strerror or e}): check the output folder") from None
