"""The training step: the one piece of compute the trainer and the benchmark build, both through
`build_step`.

Per micro-batch (B images of one size):
  ctx  = trainable.context(text_encoder, mb)                          [B, 77, 768]
  t ~ U{0..999}, ε ~ N(0, I); x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε              [B, 4, h, w]
  loss = mean((unet(x_t, t, ctx) − ε)² · weight)                        scalar, fp32
Only the trainable's parameters (fp32 masters: an embedding's vectors [N, 768], or a
hypernetwork's module weights, which act inside the UNet) receive a gradient; UNet and text
encoder are frozen (requires_grad False), so backward computes input
gradients only. Nothing here synchronises with the host: the loss and a finiteness flag stay on
the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.schedule import alphas_cumprod as _alphas_cumprod
from ..errors import ConfigError
from .latents import noise_shape, x0_and_noise
from .trainable import EmbeddingTrainable


@dataclass
class MicroBatch:
    latents: torch.Tensor                 # [B, 4, h, w] scaled latents (or the posterior mean)
    input_ids: torch.Tensor               # [B, 77] long
    vector_index: torch.Tensor            # [B, 77] long, -1 = token table
    latent_std: torch.Tensor | None = None  # [B, 4, h, w]: re-sample each step (--latents random)
    weight: torch.Tensor | None = None    # [B, 1, h, w] per-pixel loss weight (alpha)
    c_concat: torch.Tensor | None = None  # [B, 5, h, w] inpainting conditioning (mask + grey latent)
    token_weight: torch.Tensor | None = None  # [B, 77] prompt emphasis, "(word:1.2)" (None: all 1)


def ti_loss(unet, text_encoder, trainable, mb: MicroBatch, noise, t, sqrt_a, sqrt_1ma, clip_skip: int = 1):
    """Forward of one micro-batch. trainable: a Trainable, or an embedding's vectors [N, D];
    noise: the step's draw (latents.noise_shape), t [B] long, sqrt_a/sqrt_1ma [1000] fp32."""
    if isinstance(trainable, torch.Tensor):
        trainable = EmbeddingTrainable(trainable)
    ctx = trainable.context(text_encoder, mb, clip_skip)
    x0, noise = x0_and_noise(mb.latents, mb.latent_std, noise)
    x_t = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
    x_in = x_t if mb.c_concat is None else torch.cat([x_t, mb.c_concat.float()], dim=1)
    eps = unet(x_in.to(unet.dtype), t, ctx)
    se = (eps.float() - noise) ** 2
    if mb.weight is not None:
        se = se * mb.weight
    return se.mean()


class LossScaler:
    """Dynamic fp16 loss scaling for the one trainable tensor (as torch.amp.GradScaler)."""

    def __init__(self, init: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale = init
        self.good = 0
        self.growth_interval = growth_interval

    def update(self, finite: bool) -> None:
        if finite:
            self.good += 1
            if self.good % self.growth_interval == 0:
                self.scale *= 2.0
        else:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good = 0

    def state_dict(self):
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, d):
        self.scale, self.good = float(d["scale"]), int(d["good"])


class TrainStep:
    """One optimizer step over `grad_accum` micro-batches; returns device tensors
    (mean loss over the group, finite flag). The caller sets the learning rate.

    trainable: what is trained (ti_fast.training.trainable); a plain tensor is taken as an
    embedding's vectors [N, D]."""

    def __init__(self, unet, text_encoder, trainable, optimizer, *, generator: torch.Generator,
                 clip_skip: int = 1, clip_grad=None, scaler: LossScaler | None = None):
        if isinstance(trainable, torch.Tensor):
            trainable = EmbeddingTrainable(trainable)
        self.unet, self.text_encoder, self.trainable = unet, text_encoder, trainable
        # device-side work before each micro-batch's forward (a hypernetwork's dropout seed)
        self.before_micro_batch = getattr(trainable, "before_micro_batch", None)
        self.params = list(trainable.parameters())
        self.vectors = getattr(trainable, "vectors", None)    # an embedding's [N, D] (tests, bench)
        self.device = self.params[0].device
        self.optimizer, self.gen = optimizer, generator
        self.clip_skip, self.scaler = clip_skip, scaler
        # clip_grad: (mode, threshold). The threshold lives in a device tensor so a schedule can
        # change it between steps without host syncs (and under CUDA-graph replay).
        self.clip_mode = clip_grad[0] if clip_grad else None
        self.clip_value = torch.tensor(float(clip_grad[1]) if clip_grad else 0.0, device=self.device)
        acp = _alphas_cumprod().float().to(self.device)
        self.sqrt_a, self.sqrt_1ma = acp.sqrt(), (1 - acp).sqrt()

    def set_clip(self, threshold: float) -> None:
        """Threshold for the next steps (a schedule's value); a device-side fill, no sync."""
        self.clip_value.fill_(float(threshold))

    def draw(self, mb: MicroBatch):
        """The step's noise (latents.noise_shape) and t, from the step's generator."""
        dev = mb.latents.device
        noise = torch.randn(noise_shape(mb.latents, mb.latent_std), generator=self.gen, device=dev,
                            dtype=torch.float32)
        t = torch.randint(0, 1000, (mb.latents.shape[0],), generator=self.gen, device=dev)
        return noise, t

    def __call__(self, micro_batches: list[MicroBatch]):
        n = len(micro_batches)
        for p in self.params:
            p.grad = None
        total = torch.zeros((), device=self.device)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        for mb in micro_batches:
            if self.before_micro_batch is not None:
                self.before_micro_batch()
            noise, t = self.draw(mb)
            loss = ti_loss(self.unet, self.text_encoder, self.trainable, mb, noise, t,
                           self.sqrt_a, self.sqrt_1ma, self.clip_skip)
            (loss * (scale / n)).backward()
            total = total + loss.detach()
        grads = [p.grad for p in self.params if p.grad is not None]
        if scale != 1.0:
            for g in grads:
                g.mul_(1.0 / scale)                # clip and step on UNSCALED gradients
        mean = total / n
        finite = torch.isfinite(mean)
        for g in grads:
            finite = finite & torch.isfinite(g).all()
        if self.scaler is not None:
            ok = bool(finite)                      # fp16 only: the skip decision needs the host
            self.scaler.update(ok)
            if not ok:                             # overflow: skip this update, lower the scale;
                return mean, torch.isfinite(mean)  # a non-finite LOSS is still a real failure
        if self.clip_mode == "value":
            for g in grads:
                g.copy_(torch.maximum(torch.minimum(g, self.clip_value), -self.clip_value))
        elif self.clip_mode == "norm":                 # as clip_grad_norm_, with a tensor threshold
            norm = grads[0].norm() if len(grads) == 1 else torch.stack([g.norm() for g in grads]).norm()
            factor = (self.clip_value / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(factor)
        self.optimizer.step()
        return mean, finite


def make_optimizer(kind: str, params, lr: float):
    """AdamW (weight decay 0, as A1111) or bitsandbytes' AdamW8bit over `params`."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:
            raise ConfigError(f"--optimizer adamw8bit needs bitsandbytes ({e}); pip install bitsandbytes") from None
        # min_8bit_size lowered: N x 768 vectors are far below bnb's default 4096-element
        # threshold, and we want real 8-bit state, not a silent fp32 fallback.
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=1)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


@dataclass
class BuiltStep:
    fn: object                       # micro_batches -> (loss, finite): TrainStep or GraphedStep
    base: TrainStep                  # the eager step (set_clip lives here; graphs share its tensor)
    optimizer: torch.optim.Optimizer
    scaler: LossScaler | None
    graphed: bool                    # fn replays CUDA graphs

    def reset(self) -> None:
        """Free the captured graphs' memory pool now, not at garbage collection."""
        if hasattr(self.fn, "reset"):
            self.fn.reset()


def build_step(unet, text_encoder, trainable, *, optimizer: str = "adamw", lr: float, generator: torch.Generator,
               clip_skip: int = 1, clip_grad=None, fp16: bool = False, cuda_graph: bool = False,
               say=print) -> BuiltStep:
    """The step the trainer and the bench run: optimizer, fp16 loss scaler, eager step and,
    where it can be captured (CUDA, bf16/fp32, torch AdamW), the CUDA-graph replay of it.
    clip_grad: (mode, first threshold) or None."""
    opt = make_optimizer(optimizer, list(trainable.parameters()), lr)
    scaler = LossScaler() if fp16 else None
    base = TrainStep(unet, text_encoder, trainable, opt, generator=generator, clip_skip=clip_skip,
                     clip_grad=clip_grad, scaler=scaler)
    fn = base
    if cuda_graph:
        from .graph import maybe_graphed
        fn = maybe_graphed(base, say=say)      # one line and eager where it cannot be captured
    return BuiltStep(fn=fn, base=base, optimizer=opt, scaler=scaler, graphed=fn is not base)
