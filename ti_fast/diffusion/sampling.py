"""Sampling images from the UNet: CFG sampling with per-image seeds, then the VAE decode.

`sample_images` is the one core behind `ti-fast generate` (ti_fast.sample) and the trainer's
previews (ti_fast.training.previews). Seeds are per image: each image's start noise and its
ancestral noise come from its own CPU generator, so an image does not depend on the batch it
was drawn in or on the device.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.vae import LATENT_SCALE
from ..prompt import PromptTokenizer, encode
from . import samplers as S
from .denoiser import CFGDenoiser
from .schedule import alphas_cumprod


def _noise_sampler(gens, x):
    """Ancestral noise for each image from its own generator (CPU, then to x's device)."""
    def ns(sigma, sigma_next):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)
    return ns


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """Latents (UNet scale) [B,4,h,w] -> images [B,3,H,W] in [0,1]. Runs in the VAE's dtype (half
    on GPU) and redoes a non-finite result in fp32; latents larger than `tile` (512 px) are decoded
    in overlapping tiles blended linearly, which bounds the decoder's activation memory."""
    z = latents / LATENT_SCALE
    out = _decode_tiled(vae, z, tile, overlap)
    if not torch.isfinite(out).all():
        dt = vae.dtype
        out = _decode_tiled(vae.float(), z.float(), tile, overlap)
        vae.to(dt)
    return ((out.float() + 1) / 2).clamp(0, 1)


def _decode_tiled(vae, z, tile, overlap):
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae.decode(z).float()
    f = vae.downscale
    out = torch.zeros(b, 3, h * f, w * f, device=z.device)
    wsum = torch.zeros(1, 1, h * f, w * f, device=z.device)
    step = tile - overlap
    ys = list(range(0, max(h - tile, 0) + 1, step)) or [0]
    xs = list(range(0, max(w - tile, 0) + 1, step)) or [0]
    if ys[-1] + tile < h:
        ys.append(h - tile)
    if xs[-1] + tile < w:
        xs.append(w - tile)
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            dec = vae.decode(z[:, :, y:y + th, x:x + tw]).float()
            # linear ramp over the overlap on every inner edge: [th*f, tw*f] weights
            ry = _ramp(th * f, overlap * f, y > 0, y + th < h, z.device)
            rx = _ramp(tw * f, overlap * f, x > 0, x + tw < w, z.device)
            wt = ry[:, None] * rx[None, :]
            out[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += dec * wt
            wsum[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += wt
    return out / wsum


def _ramp(n, ov, start, end, device):
    r = torch.ones(n, device=device)
    k = torch.linspace(0, 1, ov + 2, device=device)[1:-1]
    if start:
        r[:ov] = torch.minimum(r[:ov], k)
    if end:
        r[-ov:] = torch.minimum(r[-ov:], k.flip(0))
    return r


@torch.no_grad()
def sample_images(model, ptok: PromptTokenizer, vectors, prompt: str, negative_prompt: str = "", *,
                  sampler: str = "euler_a", karras=None, steps: int = 20, cfg: float = 7.0, seeds=(0,),
                  width: int = 512, height: int = 512, clip_skip: int = 1, c_concat=None, decode_device=None):
    """Sample len(seeds) images; returns (images [B,3,H,W] in [0,1] on CPU, final latents)."""
    unet, te, vae = model.unet, model.text_encoder, model.vae
    dev = unet.out[2].weight.device
    f = vae.downscale
    if width % 8 or height % 8:
        raise ConfigError(f"--width/--height must be multiples of 8 (got {width}x{height})")
    b = len(seeds)
    k = max(ptok.n_chunks(prompt), ptok.n_chunks(negative_prompt))
    vec = None if vectors is None or vectors.numel() == 0 else vectors.to(dev)
    cond = encode(te, ptok([prompt] * b, chunks=k), vec, clip_skip)
    uncond = encode(te, ptok([negative_prompt] * b, chunks=k), vec, clip_skip)
    den = CFGDenoiser(lambda x, t, cond: unet(x, t, cond), alphas_cumprod())
    sigmas = S.make_sigmas(sampler, steps, karras, den, device=dev)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (4, height // f, width // f)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev) * S.start_sigma(sampler, sigmas)
    extra = {"cond": cond, "uncond": uncond, "cond_scale": cfg}
    if c_concat is not None:
        extra["c_concat"] = c_concat.expand(b, -1, -1, -1).to(dev)
    lat = S.SAMPLERS[sampler].fn(den, x, sigmas, extra_args=extra, disable=True,
                                  noise_sampler=_noise_sampler(gens, x))
    # The trainer moves the VAE off the GPU after caching: bring it over for the decode only.
    vdev = torch.device(decode_device) if decode_device is not None else dev
    home = vae.quant_conv.weight.device
    if home != vdev:
        vae.to(vdev)
    imgs = decode_latents(vae, lat.to(vdev))
    if home != vdev:
        vae.to(home)
    return imgs.cpu(), lat


def to_pil(images: torch.Tensor):
    from PIL import Image
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in arr]


MAX_SIDE = 16384                 # px: beyond this nothing fits on any card, tiles or not


def estimate_bytes(model, batch: int, width: int, height: int) -> int:
    """A generous estimate of what sampling `batch` images of width x height needs beyond the
    weights: the UNet's largest working set (CFG doubles the batch; ~16 live tensors of the first
    level's [tokens, channels] in the compute dtype) and the decoded images in fp32 (the output
    and its tile accumulators)."""
    f = model.vae.downscale
    tokens = (height // f) * (width // f)
    elem = next(model.unet.parameters()).element_size()
    unet = 2 * batch * tokens * model.unet.config.model_channels * elem * 16
    pixels = batch * 3 * height * width * 4 * 3
    return unet + pixels


def available_bytes(device) -> int | None:
    """Free memory on `device` (CUDA: the driver's free + what torch holds in its cache; CPU:
    the kernel's MemAvailable), or None when it cannot be told."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(model, batch: int, width: int, height: int, device, error=ConfigError) -> None:
    """Refuse, before anything is allocated, a generation that cannot fit in memory."""
    if max(width, height) > MAX_SIDE:
        raise error(f"--width/--height {width}x{height}: at most {MAX_SIDE} px a side; generate smaller "
                    "and upscale")
    need, have = estimate_bytes(model, batch, width, height), available_bytes(device)
    if have is not None and need > have:
        raise error(f"--width/--height {width}x{height} with --batch {batch} needs about {need / 2**30:.1f} GiB "
                    f"of memory, {torch.device(device).type} has {have / 2**30:.1f} GiB free: lower the size "
                    "or the batch")
