"""txt2img: prompts (with embeddings) -> CFG sampling -> VAE decode -> PNGs with A1111 infotext.

`generate(GenerateConfig)` is the Python API behind `ti-fast generate`; the sampling itself is
ti_fast.diffusion.sampling (shared with the trainer's previews). Seeds are per image (seed,
seed+1, ...), each from its own CPU generator.
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import PRECISIONS, check_device_name, resolve_device, resolve_precision
from ..diffusion import samplers as S
from ..diffusion.conditioning import grey_latent, inpaint_concat
from ..diffusion.sampling import MAX_SIDE, check_fits, sample_images, to_pil
from ..errors import ConfigError
from ..fsutil import check_writable_dir, kind_of, make_dir, special_reason
from ..infotext import VERSION, make_infotext, write_png_with_infotext
from ..prompt import PromptTokenizer


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


def validate(cfg: GenerateConfig) -> None:
    """Every check of a generation's settings that needs no model: GenerateError naming the flag."""
    def need(ok, msg):
        if not ok:
            raise GenerateError(msg)
    cfg.sampler = S.sampler_key(cfg.sampler, error=GenerateError)
    need(all(isinstance(v, int) and 8 <= v <= MAX_SIDE and v % 8 == 0 for v in (cfg.width, cfg.height)),
         f"--width/--height must be multiples of 8 from 8 to {MAX_SIDE} (got {cfg.width}x{cfg.height})")
    need(isinstance(cfg.steps, int) and 1 <= cfg.steps <= 1000, f"--steps {cfg.steps!r}: from 1 to 1000")
    need(isinstance(cfg.batch, int) and 1 <= cfg.batch <= 64, f"--batch {cfg.batch!r}: from 1 to 64")
    need(isinstance(cfg.clip_skip, int) and 1 <= cfg.clip_skip <= 12, f"--clip-skip {cfg.clip_skip!r}: from 1 to 12")
    need(isinstance(cfg.cfg, (int, float)) and math.isfinite(cfg.cfg), f"--cfg {cfg.cfg!r}: a finite number")
    need(cfg.seed is None or (isinstance(cfg.seed, int) and 0 <= cfg.seed <= 2**64 - 1 - cfg.batch),
         f"--seed {cfg.seed!r}: from 0 to 2^64-1")
    need(cfg.precision in PRECISIONS, f"--precision {cfg.precision!r}: choose {', '.join(PRECISIONS)}")
    check_device_name(cfg.device)
    for flag, value in (("--model", cfg.model), ("--vae", cfg.vae), ("--tokenizer", cfg.tokenizer)):
        if value is not None and special_reason(value) is not None:
            raise GenerateError(f"{flag} {value} is {special_reason(value)}")
    check_writable_dir(cfg.out, "--out")


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
    from ..embeddings import load_library, read_embedding
    from ..hypernetworks import attached, plan_prompts
    from ..loading import load_model

    validate(cfg)
    say = (lambda *a: None) if cfg.quiet else print            # the images' paths: stdout
    # notes and skipped files: stderr, one `ti-fast:` line each, so stdout stays the list of images
    note = (lambda m: None) if cfg.quiet else (lambda m: print(f"ti-fast: {m}", file=sys.stderr))
    # <hypernet:...> tags out of both prompts, their files read and checked before the model loads
    plan = plan_prompts(cfg.prompt, cfg.negative_prompt, cfg.hypernetworks, warn=note)
    for tag in plan.ignored:
        note(f"{tag.text} removed from the prompt and not applied (ti-fast applies hypernet tags only)")
    _check_hypernetwork_widths(plan.hypernetworks, cfg.model, model)
    for path in cfg.embeddings or []:    # a file named directly (not a folder's) is refused if broken
        if kind_of(path) not in ("folder", "missing"):
            read_embedding(path)             # (a FIFO or device: refused unopened)
    make_dir(cfg.out, "--out")           # made now: a place that cannot hold it fails before sampling
    dev = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.model, device=dev, dtype=resolve_precision(cfg.precision, dev),
                           vae=cfg.vae, tokenizer=cfg.tokenizer)
    check_fits(model, cfg.batch, cfg.width, cfg.height, dev, error=GenerateError)
    width = model.text_encoder.config.width
    lib = load_library(cfg.embeddings, width=width, warn=note) if cfg.embeddings else {}
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
    out = Path(cfg.out).expanduser()
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
