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
from .config import PreprocessConfig
from .pipeline import preprocess, run
from .report import PreprocessResult

__all__ = ["preprocess", "run", "PreprocessConfig", "PreprocessResult"]
