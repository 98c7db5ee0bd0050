"""txt2img: prompts (with embeddings) -> CFG sampling -> VAE decode -> PNGs with A1111 infotext.

`generate(GenerateConfig)` is the Python API behind `ti-fast generate`; the sampling itself is
ti_fast.diffusion.sampling (shared with the trainer's previews). Seeds are per image (seed,
seed+1, ...), each from its own CPU generator.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import resolve_device, resolve_precision
from ..diffusion import samplers as S
from ..diffusion.conditioning import grey_latent, inpaint_concat
from ..diffusion.sampling import sample_images, to_pil
from ..errors import ConfigError
from ..infotext import VERSION, make_infotext, write_png_with_infotext
from ..prompt import PromptTokenizer


@dataclass
class GenerateConfig:
    model: str                                  # checkpoint file or folder
    prompt: str
    negative_prompt: str = ""
    embeddings: list = field(default_factory=list)  # folders or files
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


class GenerateError(ConfigError):
    """A generation setting is wrong (one line naming the flag)."""


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


def generate(cfg: GenerateConfig, model=None) -> GenerateResult:
    """Load (unless given), sample cfg.batch images, write PNGs with infotext into cfg.out."""
    from ..embeddings import load_library
    from ..loading import load_model

    cfg.sampler = S.sampler_key(cfg.sampler, error=GenerateError)
    if cfg.width % 8 or cfg.height % 8:
        raise GenerateError(f"--width/--height must be multiples of 8 (got {cfg.width}x{cfg.height})")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.clip_skip < 1:
        raise GenerateError("--steps, --batch and --clip-skip must be at least 1")
    say = (lambda *a: None) if cfg.quiet else print
    dev = resolve_device(cfg.device)
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
    imgs, _ = sample_images(model, ptok, vectors, cfg.prompt, cfg.negative_prompt, sampler=cfg.sampler,
                            karras=cfg.karras, steps=cfg.steps, cfg=cfg.cfg, seeds=seeds, width=cfg.width,
                            height=cfg.height, clip_skip=cfg.clip_skip, c_concat=c_concat)
    used = used_embeddings(ptok, cfg.prompt, cfg.negative_prompt)
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
