"""The training step: the one piece of compute the trainer and the benchmark build, both through
`build_step`.

Per micro-batch (B images of one size):
  ctx  = trainable.context(text_encoder, mb)                          [B, 77, 768]
  t ~ U{0..999}, ε ~ N(0, I); x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε              [B, 4, h, w]
  loss = mean((unet(x_t, t, ctx) − ε)² · weight)                        scalar, fp32
Only the trainable's parameters (fp32 masters: an embedding's vectors [N, 768]) receive a
gradient; UNet and text encoder are frozen (requires_grad False), so backward computes input
gradients only. Nothing here synchronises with the host: the loss and a finiteness flag stay on
the device.

GroupStep does one optimizer step for EVERY member of a group of runs at once (co-batching,
cobatch.py): the j-th micro-batch of every member goes into one forward and backward; each member
keeps its own gradient accumulation (its micro-batch count), noise and timesteps from its own
generator, its loss (the mean of its own rows), fp16 loss scale, clipping, finiteness flag and
optimizer. A group of one computes exactly what the single-run step always computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.schedule import alphas_cumprod as _alphas_cumprod
from ..errors import ConfigError
from .cobatch import MicroBatch, sub_batches
from .latents import noise_shape, x0_and_noise
from .trainable import EmbeddingGroup, EmbeddingTrainable


def _squared_error(unet, text_encoder, conditioning, mb: MicroBatch, noise, t, sqrt_a, sqrt_1ma, clip_skip):
    """(ε̂ − ε)² · weight for one (sub-)batch: [B, 4, h, w] fp32."""
    ctx = conditioning.context(text_encoder, mb, clip_skip)
    x0, noise = x0_and_noise(mb.latents, mb.latent_std, noise)
    x_t = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
    x_in = x_t if mb.c_concat is None else torch.cat([x_t, mb.c_concat.float()], dim=1)
    eps = unet(x_in.to(unet.dtype), t, ctx)
    se = (eps.float() - noise) ** 2
    return se * mb.weight if mb.weight is not None else se


def ti_loss(unet, text_encoder, trainable, mb: MicroBatch, noise, t, sqrt_a, sqrt_1ma, clip_skip: int = 1):
    """Forward of one micro-batch -> its loss. trainable: a Trainable, or an embedding's vectors
    [N, D]; noise: the step's draw (latents.noise_shape), t [B] long, sqrt_a/sqrt_1ma [1000] fp32."""
    if isinstance(trainable, torch.Tensor):
        trainable = EmbeddingTrainable(trainable)
    return _squared_error(unet, text_encoder, trainable, mb, noise, t, sqrt_a, sqrt_1ma, clip_skip).mean()


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


@dataclass
class Member:
    """One run inside a GroupStep: what it trains and everything that is its own."""
    trainable: object                          # ti_fast.training.trainable (parameters(), context())
    optimizer: torch.optim.Optimizer
    generator: torch.Generator                 # its noise and timesteps
    clip_mode: str | None = None               # None | "value" | "norm"
    clip_value: torch.Tensor | None = None     # [] device tensor: a schedule changes it without syncs
    scaler: LossScaler | None = None           # fp16 loss scaling

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.trainable.parameters())


def member(trainable, optimizer, generator, clip_grad=None, scaler=None) -> Member:
    """A Member; clip_grad: (mode, first threshold) or None."""
    dev = next(iter(trainable.parameters())).device
    return Member(trainable, optimizer, generator, clip_grad[0] if clip_grad else None,
                  torch.tensor(float(clip_grad[1]) if clip_grad else 0.0, device=dev), scaler)


class GroupStep:
    """One optimizer step for every member: micro_batches[k] are member k's grad_accum
    micro-batches; returns device tensors (mean loss [K], finite flag [K]). The caller sets each
    member's learning rate in its optimizer's param_groups."""

    def __init__(self, unet, text_encoder, members: list[Member], *, clip_skip: int = 1):
        self.unet, self.text_encoder, self.members, self.clip_skip = unet, text_encoder, members, clip_skip
        self.device = members[0].params[0].device
        trainables = [m.trainable for m in members]
        # several embeddings read their vectors from one concatenation; a lone run reads its own
        self.conditioning = trainables[0] if len(trainables) == 1 else EmbeddingGroup(trainables)
        self.offsets = self.conditioning.offsets if len(trainables) > 1 else [0]
        acp = _alphas_cumprod().float().to(self.device)
        self.sqrt_a, self.sqrt_1ma = acp.sqrt(), (1 - acp).sqrt()

    # what a CUDA graph (graph.py) needs to know of the step
    @property
    def params(self) -> list[torch.Tensor]:
        return [p for m in self.members for p in m.params]

    @property
    def optimizers(self) -> list:
        return [m.optimizer for m in self.members]

    @property
    def generators(self) -> list:
        return [m.generator for m in self.members]

    @property
    def scalers(self) -> list:
        return [m.scaler for m in self.members if m.scaler is not None]

    @staticmethod
    def _draw(m: Member, mb: MicroBatch):
        """Member m's noise (latents.noise_shape) and t for one micro-batch, from its generator."""
        dev = mb.latents.device
        noise = torch.randn(noise_shape(mb.latents, mb.latent_std), generator=m.generator, device=dev,
                            dtype=torch.float32)
        t = torch.randint(0, 1000, (mb.latents.shape[0],), generator=m.generator, device=dev)
        return noise, t

    def __call__(self, micro_batches: list[list[MicroBatch]]):
        means, finites = self._step(micro_batches)
        return torch.stack(means), torch.stack(finites)

    def _step(self, groups: list[list[MicroBatch]]):
        members, accum = self.members, [len(g) for g in groups]
        for p in self.params:
            p.grad = None
        totals = [torch.zeros((), device=self.device) for _ in members]
        scales = [m.scaler.scale if m.scaler is not None else 1.0 for m in members]
        for j in range(max(accum)):
            ks = [k for k in range(len(members)) if j < accum[k]]
            for k in ks:
                getattr(members[k].trainable, "before_micro_batch", lambda: None)()
            draws = [self._draw(members[k], groups[k][j]) for k in ks]
            for sb in sub_batches([groups[k][j] for k in ks], [self.offsets[k] for k in ks]):
                noise = torch.cat([draws[i][0] for i in sb.parts]) if len(sb.parts) > 1 else draws[sb.parts[0]][0]
                t = torch.cat([draws[i][1] for i in sb.parts]) if len(sb.parts) > 1 else draws[sb.parts[0]][1]
                se = _squared_error(self.unet, self.text_encoder, self.conditioning, sb.mb, noise, t,
                                    self.sqrt_a, self.sqrt_1ma, self.clip_skip)
                rows = se.flatten(1).mean(1) if len(sb.parts) > 1 else None      # [sum B] per-row loss
                objective = None
                for i, (r0, r1) in zip(sb.parts, sb.rows):
                    k = ks[i]
                    loss = se.mean() if rows is None else rows[r0:r1].mean()
                    term = loss * (scales[k] / accum[k])
                    objective = term if objective is None else objective + term
                    totals[k] = totals[k] + loss.detach()
                objective.backward()
        return zip(*[self._update(m, totals[k] / accum[k], scales[k]) for k, m in enumerate(members)])

    @staticmethod
    def _update(m: Member, mean: torch.Tensor, scale: float):
        """Unscale, check, clip and step one member -> (its mean loss, its finite flag)."""
        grads = [p.grad for p in m.params if p.grad is not None]
        if scale != 1.0:
            for g in grads:
                g.mul_(1.0 / scale)                # clip and step on UNSCALED gradients
        finite = torch.isfinite(mean)
        for g in grads:
            finite = finite & torch.isfinite(g).all()
        if m.scaler is not None:
            ok = bool(finite)                      # fp16 only: the skip decision needs the host
            m.scaler.update(ok)
            if not ok:                             # overflow: skip this update, lower the scale;
                return mean, torch.isfinite(mean)  # a non-finite LOSS is still a real failure
        if m.clip_mode == "value":
            for g in grads:
                g.copy_(torch.maximum(torch.minimum(g, m.clip_value), -m.clip_value))
        elif m.clip_mode == "norm":                # as clip_grad_norm_, with a tensor threshold
            norm = grads[0].norm() if len(grads) == 1 else torch.stack([g.norm() for g in grads]).norm()
            factor = (m.clip_value / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(factor)
        m.optimizer.step()
        return mean, finite


class TrainStep(GroupStep):
    """The step of ONE run (a group of one): micro_batches -> (mean loss, finite flag), 0-d
    device tensors. trainable: a Trainable, or an embedding's vectors [N, D]."""

    def __init__(self, unet, text_encoder, trainable, optimizer, *, generator: torch.Generator,
                 clip_skip: int = 1, clip_grad=None, scaler: LossScaler | None = None):
        if isinstance(trainable, torch.Tensor):
            trainable = EmbeddingTrainable(trainable)
        super().__init__(unet, text_encoder, [member(trainable, optimizer, generator, clip_grad, scaler)],
                         clip_skip=clip_skip)
        self.trainable, self.optimizer, self.gen, self.scaler = trainable, optimizer, generator, scaler
        self.vectors = getattr(trainable, "vectors", None)    # an embedding's [N, D] (tests, bench)

    def set_clip(self, threshold: float) -> None:
        """Threshold for the next steps (a schedule's value); a device-side fill, no sync."""
        self.members[0].clip_value.fill_(float(threshold))

    def draw(self, mb: MicroBatch):
        """ε (and the latent sample's noise for --latents random) and t, from the step's generator."""
        return self._draw(self.members[0], mb)

    def __call__(self, micro_batches: list[MicroBatch]):
        (mean,), (finite,) = self._step([micro_batches])
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


def new_member(trainable, *, optimizer: str = "adamw", lr: float, generator: torch.Generator, clip_grad=None,
               fp16: bool = False) -> Member:
    """A run's Member: its optimizer over the trainable's parameters, its fp16 loss scaler, its
    clipping. clip_grad: (mode, first threshold) or None."""
    opt = make_optimizer(optimizer, list(trainable.parameters()), lr)
    return member(trainable, opt, generator, clip_grad, LossScaler() if fp16 else None)


@dataclass
class BuiltStep:
    fn: object                       # micro_batches per member -> (loss [K], finite [K]): GroupStep or GraphedStep
    base: GroupStep                  # the eager step (graphs share its tensors)
    graphed: bool                    # fn replays CUDA graphs

    def reset(self) -> None:
        """Free the captured graphs' memory pool now, not at garbage collection."""
        if hasattr(self.fn, "reset"):
            self.fn.reset()


def build_step(unet, text_encoder, members: list[Member], *, clip_skip: int = 1, cuda_graph: bool = False,
               say=print) -> BuiltStep:
    """The step the trainer (one run, or a group of co-batched runs) and the bench run: the eager
    GroupStep and, where it can be captured (CUDA, bf16/fp32, torch AdamW), its CUDA-graph replay."""
    base = GroupStep(unet, text_encoder, members, clip_skip=clip_skip)
    fn = base
    if cuda_graph:
        from .graph import maybe_graphed
        fn = maybe_graphed(base, say=say)      # one line and eager where it cannot be captured
    return BuiltStep(fn=fn, base=base, graphed=fn is not base)
