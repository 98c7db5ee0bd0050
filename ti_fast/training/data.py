"""Training images: files -> RGB pixels at the training size, captions, aspect buckets, and the
batch order.

Everything here runs BEFORE any model is loaded, so a bad data folder or size fails in a second
(`check_size`, `list_images`), not after a minute of loading weights.

Behaviour vs A1111 (modules/textual_inversion/dataset.py):
- A1111 squashes every image to W×H with BICUBIC; here `crop` (scale to cover, centre crop) is
  the default and `squash` reproduces A1111. Both resample with LANCZOS and reducing_gap=3.0
  (Pillow first box-reduces by an integer factor, then runs Lanczos on an image at most 3× the
  target: indistinguishable from a full Lanczos, much faster on large photos).
- A1111 ignores EXIF orientation and drops alpha with convert('RGB') (transparent pixels keep
  whatever colour they store, often black). Here EXIF orientation is applied and transparency
  is composited on WHITE; with alpha_weight the alpha is also kept as a per-pixel loss weight
  (A1111's "use PNG alpha channel as loss weight").
- A1111 drops the last incomplete batch (DataLoader drop_last=True). Here every batch has
  exactly `batch_size` items (static shapes for CUDA graphs) and every image is seen each epoch:
  an incomplete batch is filled by wrapping around within its bucket (see BatchOrder).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..fsutil import kind_of, special_reason
from ..images import (IMAGE_EXTS, assign_bucket, caption_for, load_image, make_buckets,  # noqa: F401  (re-exported)
                      source_box)


RESIZE_MODES = ("crop", "squash")
_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0


# ----------------------------------------------------------------------------- files, captions

def check_size(width: int, height: int) -> None:
    """Training sizes must be multiples of 8 (the VAE downsamples by 8) and at least 64."""
    for what, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < 64 or v % 8:
            near = max(64, int(round(v / 8)) * 8) if isinstance(v, (int, float)) else 512
            raise DataError(f"training {what} {v!r} must be a multiple of 8 and at least 64 "
                            f"(the VAE works on 8×8 pixel blocks): try {near}")


def list_images(data_dir, recursive: bool = False, warn=None) -> list[Path]:
    """Image files in `data_dir` (png/jpg/jpeg/webp/bmp, any case), sorted by relative path.
    Names starting with "." are skipped (macOS "._x.jpg" resource forks, .ipynb_checkpoints).
    An image name that is a FIFO, socket, device or broken link is skipped with one `warn` line
    and never opened (opening a FIFO blocks)."""
    d = Path(data_dir).expanduser()
    kind = kind_of(d)
    if kind == "missing":
        raise DataError(f"--data {d}: the folder does not exist; point --data at a folder of images")
    if kind != "folder":
        raise DataError(f"--data {d} is a {kind}, not a folder: point it at the folder holding the images")
    walk = d.rglob("*") if recursive else d.iterdir()
    found = []
    for p in walk:
        rel = p.relative_to(d)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_EXTS:
            continue
        why = special_reason(p)
        if why is not None:
            if warn is not None:
                warn(f"ti-fast: skipping {p}: it is {why}")
            continue
        if p.is_file():
            found.append(p)
    if not found:
        where = f"{d} or its subfolders" if recursive else f"{d} (subfolders not searched: use recursive)"
        raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {where}: add some")
    return sorted(found, key=lambda p: p.relative_to(d).as_posix())


# ----------------------------------------------------------------------------- pixels

def _fit(img: Image.Image, alpha: np.ndarray | None, width: int, height: int, mode: str):
    """-> (uint8 [3, H, W] tensor, uint8 [H, W] tensor or None): the compact stored form."""
    if mode not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {mode!r}: use one of {', '.join(RESIZE_MODES)}")
    box = source_box(img.width, img.height, width, height, mode)
    out = img.resize((width, height), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)
    pixels = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    a8 = None
    if alpha is not None:
        a = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32))  # mode "F"
        a = a.resize((width, height), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)
        # Lanczos overshoots near edges: clip back into [0, 1] before quantising.
        a8 = torch.from_numpy(np.clip(np.rint(np.asarray(a) * 255.0), 0, 255).astype(np.uint8))
    return pixels, a8


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0    # uint8 [3,H,W] -> float32 [3,H,W] in [-1, 1]


def fit_image(img: Image.Image, alpha: np.ndarray | None, width: int, height: int,
              mode: str = "crop") -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (float32 [3, H, W] in [-1, 1], weight float32 [H, W] in [0, 1] or None).
    crop: scale so the image covers W×H, centre crop. squash: stretch to W×H (A1111)."""
    pixels, a8 = _fit(img, alpha, width, height, mode)
    return _to_float(pixels), (a8.float() / 255.0 if a8 is not None else None)


def latent_weight(weight: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Pixel weight [..., H, W] -> latent weight [..., H/8, W/8] with mean 1 per image, so a
    weighted loss stays on the scale of an unweighted one (A1111 also normalises to mean 1; it
    first subtracts the minimum, which divides by zero on a constant map — not done here).
    Area-averaging matches how a latent cell covers an 8×8 pixel block."""
    lead = weight.shape[:-2]
    w = torch.nn.functional.avg_pool2d(weight.reshape(-1, 1, *weight.shape[-2:]).float(), factor)
    mean = w.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    return (w / mean).reshape(*lead, *w.shape[-2:])


# ----------------------------------------------------------------------------- dataset

@dataclass(eq=False)
class Item:
    """One training image, fitted to its bucket. Pixels are stored as uint8 (1 byte per value,
    a quarter of float32); `image` and friends build float tensors on demand."""
    path: Path
    caption: str
    size: tuple[int, int]                # (w, h) of the bucket the image was fitted to
    pixels: torch.Tensor                 # uint8 [3, h, w] RGB
    alpha: torch.Tensor | None           # uint8 [h, w]; None = opaque (or alpha_weight off)
    flip: bool = False                   # the mirrored copy is part of the data
    weighted: bool = False               # alpha_weight on: every item has a weight map

    @property
    def image(self) -> torch.Tensor:                 # float32 [3, h, w] in [-1, 1]
        return _to_float(self.pixels)

    @property
    def image_flipped(self) -> torch.Tensor | None:  # mirrored left-right, None without flip
        return _to_float(self.pixels.flip(-1)) if self.flip else None

    @property
    def weight(self) -> torch.Tensor | None:         # float32 [h, w] in [0, 1], None if unweighted
        if not self.weighted:
            return None
        if self.alpha is None:                       # opaque image: uniform weight, stackable
            return torch.ones(self.size[1], self.size[0])
        return self.alpha.float() / 255.0

    @property
    def weight_flipped(self) -> torch.Tensor | None:
        w = self.weight
        return w.flip(-1) if (w is not None and self.flip) else None

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """[(image, weight)] for each orientation: the original, then the mirror with flip."""
        v = [(self.image, self.weight)]
        if self.flip:
            v.append((self.image_flipped, self.weight_flipped))
        return v


@dataclass
class Dataset:
    data_dir: Path
    items: list[Item]
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # (file, why)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

    @property
    def bucket_sizes(self) -> list[tuple[int, int]]:      # per item, the input of BatchOrder
        return [it.size for it in self.items]

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return dict(sorted(Counter(self.bucket_sizes).items()))


def prepare_dataset(data_dir, *, recursive: bool = False, width: int = 512, height: int = 512,
                    resize: str = "crop", buckets: bool = False, flip: bool = False,
                    alpha_weight: bool = False, warn=print, bucket_step: int = 64,
                    max_ratio: float = 2.0, word_regex: str | None = None,
                    join: str = " ", paths: list[Path] | None = None) -> Dataset:
    """Load every image of `data_dir`, fitted to W×H (or to its aspect bucket). An unreadable
    image is named in one `warn` line and skipped; no usable image at all -> DataError.
    With alpha_weight, a fully transparent image (all-zero weight: nothing to learn) is skipped.
    paths: the image files when already listed (the preflight's list_images)."""
    check_size(width, height)
    if resize not in RESIZE_MODES:
        raise DataError(f"unknown resize mode {resize!r}: use one of {', '.join(RESIZE_MODES)}")
    if paths is None:
        paths = list_images(data_dir, recursive, warn=warn)
    sizes = make_buckets(width, height, bucket_step, max_ratio) if buckets else [(width, height)]
    items, skipped = [], []
    for p in paths:
        try:
            img, alpha = load_image(p, alpha_weight)
            if alpha is not None and float(alpha.max()) == 0.0:
                raise DataError(f"image {p} is fully transparent: with alpha weighting it teaches "
                                "nothing; remove it or train without alpha weighting")
            caption = caption_for(p, word_regex, join)
        except DataError as e:
            skipped.append((p, str(e)))
            warn(f"ti-fast: skipping {p}: {e}")
            continue
        size = assign_bucket(img.width, img.height, sizes) if buckets else (width, height)
        pixels, a8 = _fit(img, alpha, size[0], size[1], resize)
        items.append(Item(p, caption, size, pixels, a8, flip=flip, weighted=alpha_weight))
    if not items:
        raise DataError(f"none of the {len(paths)} images in {data_dir} could be used "
                        "(see the warnings above): fix or replace them")
    return Dataset(Path(data_dir), items, skipped)


# ----------------------------------------------------------------------------- batch order

class BatchOrder:
    """Reproducible, resumable epoch order. Each batch holds `batch_size` indices of ONE bucket
    (equal shapes stack). Per epoch, each bucket is shuffled and cut into batches; the last,
    incomplete one is filled by wrapping around to the start of that bucket's shuffled order
    (a bucket smaller than the batch repeats its images). So every image is seen at least once
    per epoch and every step has the same batch size (static shapes for CUDA graphs). Batches
    of all buckets are then shuffled together.

    The shuffle of epoch e depends only on (seed, e): np.random.SeedSequence hashes the pair
    (stable by numpy's policy) into a legacy RandomState (frozen stream), so an order is the
    same across runs, machines and numpy versions. Resume = restore (epoch, position).
    Which orientation (with flip) an index uses is the caller's choice."""

    def __init__(self, bucket_sizes: list[tuple], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if not bucket_sizes:
            raise ValueError("no items to batch")
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(bucket_sizes):
            groups.setdefault(tuple(s), []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]   # sorted: independent of item order
        self.batch_size = batch_size
        self.seed = int(seed)
        self.n_items = len(bucket_sizes)
        self.steps_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups)
        self.epoch = 0          # current epoch
        self.position = 0       # batches of `epoch` already handed out
        self._cache: tuple[int, list[list[int]]] | None = None

    def _rng(self, epoch: int) -> np.random.RandomState:
        ss = np.random.SeedSequence([self.seed & (2**64 - 1), epoch])
        return np.random.RandomState(int(ss.generate_state(1)[0]))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` in order; a pure function of (seed, epoch, buckets, batch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng, b = self._rng(epoch), self.batch_size
        batches = []
        for g in self.groups:
            perm = [g[j] for j in rng.permutation(len(g))]
            for start in range(0, len(perm), b):
                batch = perm[start:start + b]
                batch += [perm[k % len(perm)] for k in range(b - len(batch))]
                batches.append(batch)
        out = [batches[j] for j in rng.permutation(len(batches))]
        self._cache = (epoch, out)
        return out

    def next_batch(self) -> list[int]:
        """The next batch; moves to the next epoch when this one is used up."""
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_batches(self.epoch)[self.position]
        self.position += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "n_items": self.n_items,
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> bool:
        """Restore the position. Returns True when the order continues exactly; False when the
        data or batch size changed since (the old position means nothing): then the order
        starts afresh at the beginning of the next epoch."""
        same = all(state.get(k) == v for k, v in
                   (("seed", self.seed), ("batch_size", self.batch_size),
                    ("n_items", self.n_items), ("steps_per_epoch", self.steps_per_epoch)))
        epoch, position = int(state["epoch"]), int(state["position"])
        if same:
            self.epoch, self.position = epoch, position
        else:
            self.epoch, self.position = (epoch + 1 if position else epoch), 0
        return same
