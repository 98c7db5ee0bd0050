"""Latents cached once, before training: the VAE encoder costs more than a UNet forward
(≈1.1 TFLOP per 512 px image), so it never runs per step.

Modes (A1111): once = one posterior sample per image; deterministic = the posterior mean;
random = mean and std kept (compactly, in the latent dtype) and re-sampled every step.
Stored SCALED (× LATENT_SCALE, what the UNet sees), one entry per image and orientation.
An optional disk cache keys each entry by image content, VAE hash, size, resize mode, flip
and mode.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..fsutil import atomic_write_bytes
from ..loading.hashes import sha256_file
from ..models.vae import LATENT_SCALE


@dataclass
class CachedLatent:
    mean: torch.Tensor            # [F, 4, h, w] scaled (F = 2 with --flip: original, mirrored)
    std: torch.Tensor | None      # [F, 4, h, w] scaled, --latents random only


def cache_key(image_path: Path, vae_hash: str, size, resize: str, flip: bool, mode: str, seed: int) -> str:
    # "once" samples the posterior: the seed decides the sample, so it is part of the key. "v2":
    # the sample is drawn per image (below), not from one stream over the dataset.
    meta = json.dumps(["v2", sha256_file(image_path), vae_hash, list(size), resize, bool(flip), mode,
                       seed if mode == "once" else None])
    return hashlib.sha256(meta.encode()).hexdigest()[:32]


def _sample_generator(key: str, device) -> torch.Generator:
    """The generator of one image's posterior sample (--latents once): seeded from its cache key
    (image content, size, settings, run seed), so the sample depends on nothing else — not on
    which other images the run has, nor on their order — and runs sharing the image (co-batched
    runs, ti_fast.training.group) share one encoding exactly."""
    return torch.Generator(device=device).manual_seed(int(key[:15], 16))


@torch.no_grad()
def _encode(vae, images: torch.Tensor, gens, mode: str, per: int):
    """images [n, 3, H, W] in [-1, 1] -> (mean or sample, std or None), unscaled, fp32.
    gens: one generator per item (each item has `per` consecutive images) for --latents once."""
    post = vae.encode(images)
    mean, std = post.mean.float(), post.std.float()
    if mode == "once":
        shape = (per, *mean.shape[1:])
        eps = torch.cat([torch.randn(shape, generator=g, device=mean.device, dtype=torch.float32) for g in gens])
        return mean + std * eps, None
    return mean, (std if mode == "random" else None)


def encode_dataset(vae, items, *, device, mode: str, store_dtype, batch: int = 4, cache_dir=None,
                   vae_hash: str = "", resize: str = "crop", flip: bool = False, seed: int = 0,
                   memo: dict | None = None, progress=None) -> list[CachedLatent]:
    """Encode every item (its image and, with flip, the mirrored copy). The VAE runs in its own
    dtype (half on GPU); a non-finite result is encoded again in fp32. `memo`: a dict shared by
    runs over one model (cache key -> CachedLatent), so an image encoded for one run is reused by
    the others; `cache_dir`: the same on disk, across processes."""
    out: list[CachedLatent | None] = [None] * len(items)
    cdir = Path(cache_dir) if cache_dir else None
    keys = [cache_key(Path(it.path), vae_hash, it.size, resize, flip, mode, seed) for it in items]
    todo = []
    for i, key in enumerate(keys):
        out[i] = memo.get(key) if memo is not None else None
        if out[i] is None and cdir is not None and (cdir / f"{key}.safetensors").is_file():
            try:
                d = load_file(str(cdir / f"{key}.safetensors"))
                out[i] = CachedLatent(d["mean"].to(device, store_dtype),
                                      d["std"].to(device, store_dtype) if "std" in d else None)
            except Exception:
                pass  # unreadable cache entry: encode again
        if out[i] is None:
            todo.append(i)
    per = 2 if flip else 1
    by_size: dict[tuple, list[int]] = {}          # one VAE call per batch of equal shapes
    for i in todo:
        by_size.setdefault(tuple(items[i].size), []).append(i)
    for idxs in by_size.values():
        for s in range(0, len(idxs), max(1, batch // per)):
            chunk = idxs[s:s + max(1, batch // per)]
            imgs = [v for i in chunk for v in ([items[i].image] + ([items[i].image.flip(-1)] if flip else []))]
            m, sd = _encode_checked(vae, torch.stack(imgs).to(device), [_sample_generator(keys[i], device) for i in chunk],
                                    mode, per)
            for j, i in enumerate(chunk):
                lat = CachedLatent((m[j * per:(j + 1) * per] * LATENT_SCALE).to(store_dtype),
                                   (sd[j * per:(j + 1) * per] * LATENT_SCALE).to(store_dtype) if sd is not None else None)
                out[i] = lat
                if cdir is not None:
                    _store(cdir / f"{keys[i]}.safetensors", lat)
            if progress:
                progress(len(imgs))
    if memo is not None:
        memo.update(zip(keys, out))
    return out


def _encode_checked(vae, x, gens, mode, per):
    """_encode, redoing in fp32 the images whose half-precision result is not finite (the same
    generators, so the sample is the one the half pass would have drawn)."""
    states = [g.get_state() for g in gens]
    m, sd = _encode(vae, x, gens, mode, per)
    bad = ~torch.isfinite(m).flatten(1).all(1)
    if sd is not None:
        bad |= ~torch.isfinite(sd).flatten(1).all(1)
    if bad.any():                                   # half-precision VAE overflow: redo in fp32
        half = vae.dtype
        for g, st in zip(gens, states):
            g.set_state(st)
        m2, sd2 = _encode(vae.float(), x.float(), gens, mode, per)
        vae.to(half)
        m, sd = torch.where(bad.view(-1, 1, 1, 1), m2, m), (None if sd is None else torch.where(bad.view(-1, 1, 1, 1), sd2, sd))
    return m, sd


def _store(path: Path, lat: CachedLatent) -> None:
    d = {"mean": lat.mean.float().cpu().contiguous()}
    if lat.std is not None:
        d["std"] = lat.std.float().cpu().contiguous()
    # serialised in memory, then one atomic write: a full disk is an OSError naming the file
    atomic_write_bytes(path, save(d))


# ----------------------------------------------------------------------------- --latents random
# The one home of the --latents random convention. The cached entry keeps the posterior's mean
# and std; every step re-samples x0 = mean + std * e. That e and the diffusion noise eps are
# drawn as ONE normal tensor of 2C channels [B, 8, h, w] (first C: eps, last C: e), so a step
# makes a single generator call whatever the mode, which the CUDA graph and resume replay.

def noise_shape(latents: torch.Tensor, std: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Shape of the step's noise draw for latents [B, C, h, w]: [B, 2C, h, w] when re-sampled."""
    b, c, h, w = latents.shape
    return (b, 2 * c if std is not None else c, h, w)


def x0_and_noise(latents: torch.Tensor, std: torch.Tensor | None, noise: torch.Tensor):
    """(x0 fp32 [B, C, h, w], diffusion noise eps [B, C, h, w]) from the cached latents and the
    step's draw (noise_shape)."""
    x0 = latents.float()
    if std is None:
        return x0, noise
    c = latents.shape[1]
    return x0 + std.float() * noise[:, c:], noise[:, :c]
