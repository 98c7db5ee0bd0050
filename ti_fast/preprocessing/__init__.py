"""`ti-fast preprocess`: a folder of raw images -> training-ready PNGs with captions (A1111's Preprocess images).

  config.py    PreprocessConfig and the preflight (flags, conflicts, folders)
  sources.py   what is in SRC: image files in order, a note for everything else
  fit.py       the plain fit (crop, squash, none/buckets) and the shared resampling
  split.py     split oversized images into overlapping tiles (A1111's formula)
  focal.py     auto focal-point crop: cover scale, entropy window, weighted focal point
  opencv.py    Haar-cascade faces and corner points (the only cv2 user; optional extra)
  autosize.py  auto-sized crop: the candidate size per objective
  dedupe.py    exact (sha256) and near (64-bit pHash) duplicates
  naming.py    NNNNN-k-NAME.png output names and captions
  report.py    the result: outputs, skips, duplicates, summary line
  pipeline.py  the run: preprocess(src, dst, **options)
  cli.py       the `ti-fast preprocess` argument parser
Nothing here imports ti_fast.training or ti_fast.sample.
"""
import importlib

# public name -> the module that defines it, imported on first use (PEP 562): registering the
# `preprocess` subcommand (ti-fast --help) must not import numpy or PIL.
_EXPORTS = {"preprocess": ".pipeline", "run": ".pipeline", "PreprocessConfig": ".config",
            "PreprocessResult": ".report"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
