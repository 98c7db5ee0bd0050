"""The run's training data once its latents are cached: items, latents, loss weights, inpainting
conditioning, prompts and the batch order, turned into the micro-batches of each optimizer step.

`TrainingData.next_group()` is the one call the loop makes. Every random choice here (the
template line, tag dropout and shuffle, which cached orientation with --flip) comes from the
run's own random.Random(seed) and the batch order from BatchOrder(seed): a run's data stream
depends on nothing else in the process, and `state_dict` resumes it exactly.
"""
from __future__ import annotations

import random

import torch

from ..diffusion.conditioning import grey_latent, inpaint_concat
from ..errors import ConfigError
from ..prompt import PromptTokenizer
from . import prewarm
from .data import BatchOrder, latent_weight, prepare_dataset
from .latents import encode_dataset
from .step import MicroBatch
from .templates import draw_prompt, render_prompt


def _tuple(x):
    """torch.load gives lists where random.getstate() had tuples."""
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class TrainingData:
    """items: data.Item list; latents: latents.CachedLatent per item ([F, 4, h, w], F = 2 with
    flip); weights: per item [F, 1, h, w] or None; concat: {(w, h): [1, 5, h, w]} for the
    inpainting UNet; ptok: the prompt tokenizer knowing the trigger word; lines: template lines."""

    def __init__(self, items, latents, weights, concat, ptok, lines, name: str, *, batch_size: int,
                 grad_accum: int, flip: bool, shuffle_tags: bool, tag_dropout: float, seed: int, device):
        self.items, self.latents, self.weights, self.concat = items, latents, weights, concat
        self.ptok, self.lines, self.name = ptok, lines, name
        self.batch_size, self.grad_accum, self.flip = batch_size, grad_accum, flip
        self.shuffle_tags, self.tag_dropout, self.device = shuffle_tags, tag_dropout, device
        self.rng = random.Random(seed)
        self.order = BatchOrder([tuple(it.size) for it in items], batch_size, seed)

    @property
    def epoch(self) -> int:
        return self.order.epoch

    @property
    def position(self) -> int:
        return self.order.position

    def next_group(self) -> list[MicroBatch]:
        """The grad_accum micro-batches of the next optimizer step."""
        return [self._micro_batch(self.order.next_batch()) for _ in range(self.grad_accum)]

    def _micro_batch(self, batch: list[int]) -> MicroBatch:
        lat, std, wts, prompts = [], [], [], []
        for i in batch:
            f = self.rng.randrange(2) if self.flip else 0     # which cached orientation
            lat.append(self.latents[i].mean[f])
            if self.latents[i].std is not None:
                std.append(self.latents[i].std[f])
            if self.weights is not None:
                wts.append(self.weights[i][f])
            prompts.append(draw_prompt(self.lines, self.name, self.items[i].caption, self.rng,
                                       self.shuffle_tags, self.tag_dropout))
        tok = self.ptok(prompts, chunks=1)
        cc = self.concat.get(tuple(self.items[batch[0]].size))
        dev = self.device
        return MicroBatch(latents=torch.stack(lat), input_ids=tok.input_ids.to(dev),
                          vector_index=tok.vector_index.to(dev),
                          token_weight=tok.weights.to(dev) if tok.weighted else None,
                          latent_std=torch.stack(std) if std else None,
                          weight=torch.stack(wts) if wts else None,
                          c_concat=cc.expand(len(batch), -1, -1, -1) if cc is not None else None)

    def first_prompt(self) -> str:
        """A training prompt (the first template line, first image): the default preview prompt."""
        return render_prompt(self.lines[0], self.name, self.items[0].caption, rng=random.Random(0))

    def long_captions(self) -> int:
        """Images whose longest prompt exceeds one 75-token chunk (training cuts it there)."""
        return sum(self.ptok.n_chunks(max((ln.replace("[filewords]", it.caption) for ln in self.lines), key=len)) > 1
                   for it in self.items)

    def check_trigger_fits(self) -> None:
        """ConfigError when a template line cannot hold the trigger's vectors in its 75 tokens:
        A1111's chunking moves an embedding that does not fit to the next chunk, which training
        cuts, so that prompt would train nothing. (A hypernetwork has no trigger: nothing to do.)"""
        if self.name not in self.ptok.rows:
            return
        want = self.ptok.rows[self.name][1]
        for line in self.lines:
            text = render_prompt(line, self.name, "", rng=random.Random(0))
            if self.name in text and int((self.ptok([text], chunks=1).vector_index >= 0).sum()) < want:
                raise ConfigError(f"--vectors {want}: the template line {line!r} with {want} vectors needs more "
                                  "than the 75 tokens a prompt holds: use fewer vectors or shorter template lines")

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "py_rng": self.rng.getstate()}

    def load_state_dict(self, d: dict) -> None:
        self.order.load_state_dict(d["order"])
        self.rng.setstate(_tuple(d["py_rng"]))


def alpha_weights(items, down: int, flip: bool, device) -> list[torch.Tensor]:
    """Per item, its alpha map [H, W] as a per-latent-pixel loss weight [F, 1, h, w] (block mean,
    scaled to mean 1; F = 2 with flip: original, mirrored)."""
    out = []
    for it in items:
        w = latent_weight(it.weight, down)                    # [h, w]
        ws = [w] + ([w.flip(-1)] if flip else [])
        out.append(torch.stack(ws)[:, None].to(device))
    return out


def build_training_data(plan, tm, trainable, say=print, memo: dict | None = None) -> TrainingData:
    """Images -> fitted pixels -> cached latents (the VAE's Triton kernels and the UNet step's
    compile on worker threads meanwhile) -> TrainingData. On CUDA the VAE leaves the GPU after
    (and comes back for a run added to a group later). memo: the group's latent cache."""
    cfg, model, device = plan.cfg, tm.model, tm.device
    ds = prepare_dataset(cfg.data, recursive=cfg.recursive, width=cfg.width, height=cfg.height,
                         resize=cfg.resize, buckets=cfg.buckets, flip=False, alpha_weight=cfg.alpha_weight,
                         warn=say, paths=plan.images)
    items, vae, unet = ds.items, model.vae, model.unet
    vae.to(device)                              # back from the CPU for a run joining a group
    warm = prewarm.start(unet, vae, device=device, batch=cfg.batch_size, image_hw=(cfg.height, cfg.width),
                         dtype=tm.dtype, channels_last=tm.ran["channels_last"], say=say)
    try:
        say(f"ti-fast: {len(items)} images; caching latents ({cfg.latents}{', flipped too' if cfg.flip else ''})")
        if warm is not None:
            warm.wait("vae")                # the encoder's kernels: compiled in parallel, not one by one
        latents = encode_dataset(vae, items, device=device, mode=cfg.latents,
                                 store_dtype=tm.dtype if device.type == "cuda" else torch.float32,
                                 cache_dir=cfg.cache_dir, vae_hash=model.info.hash, resize=cfg.resize,
                                 flip=cfg.flip, seed=plan.seed, memo=memo)
        weights = alpha_weights(items, vae.downscale, cfg.flip, device) if cfg.alpha_weight else None
        concat = {}
        if unet.config.in_channels == 9:     # inpainting UNet: a mask of ones over a grey image
            for size in {tuple(it.size) for it in items}:
                concat[size] = inpaint_concat(grey_latent(vae, size[1], size[0], device))
        if warm is not None:
            warm.wait("unet")
    finally:
        if warm is not None:
            warm.close()
    if device.type == "cuda":
        vae.to("cpu")                           # the VAE leaves the GPU after caching
        torch.cuda.empty_cache()
    data = TrainingData(items, latents, weights, concat, PromptTokenizer(model.tokenizer, trainable.slots),
                        plan.lines, plan.name, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                        flip=cfg.flip, shuffle_tags=cfg.shuffle_tags, tag_dropout=cfg.tag_dropout,
                        seed=plan.seed, device=device)
    data.check_trigger_fits()
    long = data.long_captions()
    if long:
        say(f"ti-fast: {long} caption(s) make prompts longer than 75 tokens; training cuts them there")
    return data
