"""The textual-inversion training step: the one piece of compute the benchmark imports.

Per micro-batch (B images of one size):
  ctx  = text_encoder(ids, vectors placed at vector_index)          [B, 77, 768]
  t ~ U{0..999}, ε ~ N(0, I); x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε            [B, 4, h, w]
  loss = mean((unet(x_t, t, ctx) − ε)² · weight)                      scalar, fp32
Only `vectors` (fp32 master copy [N, 768]) receives a gradient; UNet and text encoder are frozen
(requires_grad False), so backward computes input gradients only.
Nothing here synchronises with the host: the loss and a finiteness flag stay on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prompt import emphasize
from ..diffusion.schedule import alphas_cumprod as _alphas_cumprod


@dataclass
class MicroBatch:
    latents: torch.Tensor                 # [B, 4, h, w] scaled latents (or the posterior mean)
    input_ids: torch.Tensor               # [B, 77] long
    vector_index: torch.Tensor            # [B, 77] long, -1 = token table
    latent_std: torch.Tensor | None = None  # [B, 4, h, w]: re-sample each step (--latents random)
    weight: torch.Tensor | None = None    # [B, 1, h, w] per-pixel loss weight (alpha)
    c_concat: torch.Tensor | None = None  # [B, 5, h, w] inpainting conditioning (mask + grey latent)
    token_weight: torch.Tensor | None = None  # [B, 77] prompt emphasis, "(word:1.2)" (None: all 1)


def ti_loss(unet, text_encoder, vectors, mb: MicroBatch, noise, t, sqrt_a, sqrt_1ma, clip_skip: int = 1):
    """Forward of one micro-batch. noise [B,4,h,w], t [B] long, sqrt_a/sqrt_1ma [1000] fp32."""
    ctx = text_encoder(mb.input_ids, clip_skip=clip_skip, vectors=vectors, vector_index=mb.vector_index)
    if mb.token_weight is not None:
        ctx = emphasize(ctx, mb.token_weight)
    x0 = mb.latents.float()
    if mb.latent_std is not None:
        # noise carries 8 channels here: 4 for the latent sample, 4 for the diffusion noise
        x0 = x0 + mb.latent_std.float() * noise[:, 4:]
        noise = noise[:, :4]
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
    (mean loss over the group, finite flag). The caller sets the learning rate."""

    def __init__(self, unet, text_encoder, vectors: torch.Tensor, optimizer, *, generator: torch.Generator,
                 clip_skip: int = 1, clip_grad=None, scaler: LossScaler | None = None):
        self.unet, self.text_encoder, self.vectors = unet, text_encoder, vectors
        self.optimizer, self.gen = optimizer, generator
        self.clip_skip, self.scaler = clip_skip, scaler
        # clip_grad: (mode, threshold). The threshold lives in a device tensor so a schedule can
        # change it between steps without host syncs (and under CUDA-graph replay).
        self.clip_mode = clip_grad[0] if clip_grad else None
        self.clip_value = torch.tensor(float(clip_grad[1]) if clip_grad else 0.0, device=vectors.device)
        acp = _alphas_cumprod().float().to(vectors.device)
        self.sqrt_a, self.sqrt_1ma = acp.sqrt(), (1 - acp).sqrt()

    def set_clip(self, threshold: float) -> None:
        """Threshold for the next steps (a schedule's value); a device-side fill, no sync."""
        self.clip_value.fill_(float(threshold))

    def draw(self, mb: MicroBatch):
        """ε (and the latent sample's noise for --latents random) and t, from the step's generator."""
        b, c, h, w = mb.latents.shape
        c = c * 2 if mb.latent_std is not None else c
        dev = mb.latents.device
        noise = torch.randn((b, c, h, w), generator=self.gen, device=dev, dtype=torch.float32)
        t = torch.randint(0, 1000, (b,), generator=self.gen, device=dev)
        return noise, t

    def __call__(self, micro_batches: list[MicroBatch]):
        n = len(micro_batches)
        self.vectors.grad = None
        total = torch.zeros((), device=self.vectors.device)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        for mb in micro_batches:
            noise, t = self.draw(mb)
            loss = ti_loss(self.unet, self.text_encoder, self.vectors, mb, noise, t,
                           self.sqrt_a, self.sqrt_1ma, self.clip_skip)
            (loss * (scale / n)).backward()
            total = total + loss.detach()
        grad = self.vectors.grad
        if scale != 1.0:
            grad.mul_(1.0 / scale)                 # clip and step on UNSCALED gradients
        mean = total / n
        finite = torch.isfinite(mean) & torch.isfinite(grad).all()
        if self.scaler is not None:
            ok = bool(finite)                      # fp16 only: the skip decision needs the host
            self.scaler.update(ok)
            if not ok:                             # overflow: skip this update, lower the scale;
                return mean, torch.isfinite(mean)  # a non-finite LOSS is still a real failure
        if self.clip_mode == "value":
            grad.copy_(torch.maximum(torch.minimum(grad, self.clip_value), -self.clip_value))
        elif self.clip_mode == "norm":                 # as clip_grad_norm_, with a tensor threshold
            grad.mul_((self.clip_value / (grad.norm() + 1e-6)).clamp(max=1.0))
        self.optimizer.step()
        return mean, finite
