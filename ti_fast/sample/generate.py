"""txt2img: prompts (with embeddings) -> CFG sampling -> VAE decode -> PNGs with A1111 infotext.

`sample_images` is the core, shared with the trainer's previews; `generate(GenerateConfig)` is the
Python API behind `ti-fast generate`. Seeds are per image (seed, seed+1, ...): each image's start
noise and its ancestral noise come from its own CPU generator, so an image does not depend on
the batch it was drawn in or on the device.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from ..models.vae import LATENT_SCALE
from ..prompt import PromptTokenizer, encode
from . import samplers as S
from .denoiser import CFGDenoiser
from .schedule import alphas_cumprod

VERSION = f"ti-fast v{__version__}"


@dataclass
class GenerateConfig:
    model: str                                  # checkpoint file or folder
    prompt: str
    negative_prompt: str = ""
    embeddings: list = field(default_factory=list)  # folders or files
    hypernetworks: list = field(default_factory=list)  # folders, .pt files or Hypernetwork objects: the
                                                # names that <hypernet:NAME:STRENGTH> tags can use
    sampler: str = "euler_a"                    # euler_a | euler | ddim | dpmpp_2m
    karras: bool | None = None                  # None: the sampler's default (dpmpp_2m: Karras)
    steps: int = 20
    cfg: float = 7.0
    seed: int | None = None                     # None: drawn at random
    width: int = 512
    height: int = 512
    batch: int = 1
    clip_skip: int = 1
    out: str = "outputs"
    device: str = "auto"
    precision: str = "auto"
    vae: str | None = None
    tokenizer: str | None = None
    quiet: bool = False


@dataclass
class GenerateResult:
    images: list            # PIL images
    paths: list             # written PNGs
    infotexts: list
    seeds: list


class GenerateError(UserError):
    """A generation setting is wrong (one line naming the flag)."""


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
        raise GenerateError(f"--width/--height must be multiples of 8 (got {width}x{height})")
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


def used_embeddings(ptok: PromptTokenizer, *texts) -> list[str]:
    """Trigger words of the embeddings that occur in the texts (for infotext TI hashes)."""
    names = []
    for text in texts:
        for p in ptok.pieces(text):
            if p[0] == "emb":
                for word, (first, n) in ptok.rows.items():
                    if first == p[1] and word not in names:
                        names.append(word)
    return names


def next_index(folder: Path) -> int:
    """A1111 file numbering: 00000-SEED.png, continuing after the highest number present."""
    best = -1
    for p in folder.glob("*.png"):
        head = p.name.split("-", 1)[0]
        if head.isdigit():
            best = max(best, int(head))
    return best + 1


def _check_hypernetwork_widths(chosen, model_path, model) -> None:
    """Refuse a hypernetwork none of whose widths the model has (made for another model); read
    from the checkpoint's header when the model is not loaded yet."""
    if not chosen:
        return
    from ..hypernetworks import HypernetworkError, model_widths, unet_widths
    widths = unet_widths(model.unet) if model is not None else model_widths(model_path)
    for hn, _ in chosen:
        if not set(hn.widths) & set(widths):
            raise HypernetworkError(f"{hn.path or hn.name}: made for another model (widths "
                                    f"{', '.join(map(str, hn.widths))}; this model has {', '.join(map(str, widths))})")


def generate(cfg: GenerateConfig, model=None) -> GenerateResult:
    """Load (unless given), sample cfg.batch images, write PNGs with infotext into cfg.out."""
    from ..embeddings import load_library
    from ..hypernetworks import attached, plan_prompts
    from ..loading import load_model
    from ..training.loop import resolve_precision, _device
    from ..training.latents import grey_latent, inpaint_concat
    from .infotext import make_infotext, write_png_with_infotext

    if cfg.sampler not in S.SAMPLERS:
        raise GenerateError(f"unknown sampler {cfg.sampler!r}: choose {', '.join(S.SAMPLERS)}")
    if cfg.width % 8 or cfg.height % 8:
        raise GenerateError(f"--width/--height must be multiples of 8 (got {cfg.width}x{cfg.height})")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.clip_skip < 1:
        raise GenerateError("--steps, --batch and --clip-skip must be at least 1")
    say = (lambda *a: None) if cfg.quiet else print
    # <hypernet:...> tags out of both prompts, their files read and checked before the model loads
    plan = plan_prompts(cfg.prompt, cfg.negative_prompt, cfg.hypernetworks, warn=say)
    for tag in plan.ignored:
        say(f"ti-fast: {tag.text} removed from the prompt and not applied (ti-fast applies hypernet tags only)")
    _check_hypernetwork_widths(plan.hypernetworks, cfg.model, model)
    dev = _device(cfg.device)
    if model is None:
        model = load_model(cfg.model, device=dev, dtype=resolve_precision(cfg.precision, dev),
                           vae=cfg.vae, tokenizer=cfg.tokenizer)
    width = model.text_encoder.config.width
    lib = load_library(cfg.embeddings, width=width, warn=say) if cfg.embeddings else {}
    ptok = PromptTokenizer(model.tokenizer, {n: e.vectors.shape[0] for n, e in lib.items()})
    vectors = torch.cat([lib[n].vectors for n in ptok.rows]) if ptok.rows else None
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**32)
    seeds = [seed + i for i in range(cfg.batch)]
    c_concat = None
    if model.unet.config.in_channels == 9:
        c_concat = inpaint_concat(grey_latent(model.vae, cfg.height, cfg.width, dev))
    with attached(model.unet, plan.hypernetworks, train=False):     # generation: dropout off
        imgs, _ = sample_images(model, ptok, vectors, plan.prompt, plan.negative_prompt, sampler=cfg.sampler,
                                karras=cfg.karras, steps=cfg.steps, cfg=cfg.cfg, seeds=seeds, width=cfg.width,
                                height=cfg.height, clip_skip=cfg.clip_skip, c_concat=c_concat)
    used = used_embeddings(ptok, plan.prompt, plan.negative_prompt)
    ti_hashes = {n: lib[n].shorthash for n in used if lib[n].shorthash}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    idx = next_index(out)
    pils, paths, infos = to_pil(imgs), [], []
    for i, (img, s) in enumerate(zip(pils, seeds)):
        info = make_infotext(cfg.prompt, cfg.negative_prompt, steps=cfg.steps, sampler=S.SAMPLERS[cfg.sampler].label,
                             schedule_type=S.schedule_label(cfg.sampler, cfg.karras), cfg_scale=cfg.cfg, seed=s,
                             width=cfg.width, height=cfg.height, model_hash=model.info.hash, model_name=model.info.name,
                             clip_skip=cfg.clip_skip, ti_hashes=ti_hashes or None, version=VERSION)
        path = out / f"{idx + i:05d}-{s}.png"
        write_png_with_infotext(img, path, info)
        paths.append(path)
        infos.append(info)
        say(str(path))
    return GenerateResult(images=pils, paths=paths, infotexts=infos, seeds=seeds)
