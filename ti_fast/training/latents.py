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
from safetensors.torch import load_file, save_file

from ..fsutil import atomic_path
from ..loading.hashes import sha256_file
from ..models.vae import LATENT_SCALE


@dataclass
class CachedLatent:
    mean: torch.Tensor            # [F, 4, h, w] scaled (F = 2 with --flip: original, mirrored)
    std: torch.Tensor | None      # [F, 4, h, w] scaled, --latents random only


def cache_key(image_path: Path, vae_hash: str, size, resize: str, flip: bool, mode: str, seed: int) -> str:
    # "once" samples the posterior: the seed decides the sample, so it is part of the key.
    meta = json.dumps([sha256_file(image_path), vae_hash, list(size), resize, bool(flip), mode,
                       seed if mode == "once" else None])
    return hashlib.sha256(meta.encode()).hexdigest()[:32]


@torch.no_grad()
def _encode(vae, images: torch.Tensor, generator, mode: str):
    """images [n, 3, H, W] in [-1, 1] -> (mean or sample, std or None), unscaled, fp32."""
    post = vae.encode(images)
    mean, std = post.mean.float(), post.std.float()
    if mode == "once":
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return mean + std * eps, None
    return mean, (std if mode == "random" else None)


def encode_dataset(vae, items, *, device, mode: str, generator: torch.Generator, store_dtype,
                   batch: int = 4, cache_dir=None, vae_hash: str = "", resize: str = "crop",
                   flip: bool = False, seed: int = 0, progress=None) -> list[CachedLatent]:
    """Encode every item (its image and, with flip, the mirrored copy). The VAE runs in its own
    dtype (half on GPU); a non-finite result is encoded again in fp32."""
    out: list[CachedLatent | None] = [None] * len(items)
    todo = []
    cdir = Path(cache_dir) if cache_dir else None
    keys = [None] * len(items)
    for i, it in enumerate(items):
        if cdir is not None:
            keys[i] = cache_key(Path(it.path), vae_hash, it.size, resize, flip, mode, seed)
            f = cdir / f"{keys[i]}.safetensors"
            if f.exists():
                try:
                    d = load_file(str(f))
                    out[i] = CachedLatent(d["mean"].to(device, store_dtype),
                                          d["std"].to(device, store_dtype) if "std" in d else None)
                    continue
                except Exception:
                    pass  # unreadable cache entry: encode again
        todo.append(i)

    # group by size so each VAE call is one batch of equal shapes
    by_size: dict[tuple, list[int]] = {}
    for i in todo:
        by_size.setdefault(tuple(items[i].size), []).append(i)
    for size, idxs in by_size.items():
        imgs = []
        for i in idxs:
            imgs.append(items[i].image)
            if flip:
                imgs.append(items[i].image.flip(-1))
        per = 2 if flip else 1
        means, stds = [], []
        for s in range(0, len(imgs), batch):
            x = torch.stack(imgs[s:s + batch]).to(device)
            m, sd = _encode(vae, x, generator, mode)
            bad = ~torch.isfinite(m).flatten(1).all(1)
            if sd is not None:
                bad |= ~torch.isfinite(sd).flatten(1).all(1)
            if bad.any():                            # half-precision VAE overflow: redo in fp32
                half = vae.dtype
                m2, sd2 = _encode(vae.float(), x[bad].float(), generator, mode)
                vae.to(half)
                m[bad] = m2
                if sd is not None:
                    sd[bad] = sd2
            means.append(m)
            stds.append(sd)
            if progress:
                progress(len(x))
        mean = torch.cat(means) * LATENT_SCALE
        std = torch.cat(stds) * LATENT_SCALE if stds[0] is not None else None
        for j, i in enumerate(idxs):
            m = mean[j * per:(j + 1) * per].to(store_dtype)
            sd = std[j * per:(j + 1) * per].to(store_dtype) if std is not None else None
            out[i] = CachedLatent(m, sd)
            if cdir is not None:
                d = {"mean": m.float().cpu().contiguous()}
                if sd is not None:
                    d["std"] = sd.float().cpu().contiguous()
                with atomic_path(cdir / f"{keys[i]}.safetensors") as tmp:
                    save_file(d, str(tmp))
    return out


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
