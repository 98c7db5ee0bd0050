"""The peer, "diffusers-TI": what diffusers' examples/textual_inversion/textual_inversion.py does
per step, as performance.md describes it, on random SD1.5-shaped weights.

Per step (batch B, images S x S):
  latents = vae.encode(pixels fp16).latent_dist.sample() * 0.18215        VAE encode EVERY step
  noise, t ~ torch default generator; noisy = DDPMScheduler.add_noise(latents, noise, t)
  ctx = text_encoder(ids)[0] under fp16 autocast (fp32 weights), cast to fp16   [B, 77, 768]
  loss = mse(unet_fp16(noisy, t, ctx).sample.float(), noise.float())      UNet outside autocast
  GradScaler: scale(loss).backward(); step(optimizer) (reads found-inf on the host); update()
  AdamW over the WHOLE token table (49409 x 768 after adding the placeholder token), weight
  decay 1e-2, then every row but the new one copied back from the original (boolean mask
  indexing, as the script does); loss.item() for the log line.
SDPA attention (diffusers AttnProcessor2_0, transformers' sdpa). accelerate wraps only the
prepared text encoder in autocast, so the UNet and VAE run plain fp16.
On the CPU (--tiny harness check) everything is fp32 with autocast and the scaler disabled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ti_fast.loading.configs import unet_to_diffusers, vae_to_diffusers, clip_to_transformers

from .common import fast_init_


class DiffusersTI:
    """Models, optimizer and scaler of the peer; `step(pixels, ids) -> float loss`."""

    def __init__(self, unet_cfg, vae_cfg, clip_cfg, device: torch.device, image_size: int, lr: float = 5e-4):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.utils import logging as dlogging
        from diffusers.models.attention_processor import AttnProcessor2_0
        from transformers import CLIPTextConfig, CLIPTextModel

        dlogging.set_verbosity_error()      # its cast warnings are about loading real weights
        self.device, self.size = device, image_size
        cuda = device.type == "cuda"
        self.wdtype = torch.float16 if cuda else torch.float32
        self.autocast = cuda
        # built directly on the device (default init is quick there), then the bench's cheap init
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(unet_to_diffusers(unet_cfg, sample_size=image_size // 8))
            vae = AutoencoderKL.from_config(vae_to_diffusers(vae_cfg, sample_size=image_size))
            te = CLIPTextModel(CLIPTextConfig(**clip_to_transformers(clip_cfg), attn_implementation="sdpa"))
        for i, m in enumerate((unet, vae, te)):
            fast_init_(m, seed=i)
        # tokenizer.add_tokens(placeholder) + resize_token_embeddings: one more row, initialised
        # from an existing token (the script's --initializer_token)
        te.resize_token_embeddings(clip_cfg.vocab_size + 1, mean_resizing=False)
        emb = te.get_input_embeddings()
        self.token_id = clip_cfg.vocab_size
        with torch.no_grad():
            emb.weight[self.token_id] = emb.weight[clip_cfg.vocab_size // 3]
        unet.set_attn_processor(AttnProcessor2_0())
        self.unet = unet.to(self.wdtype).requires_grad_(False)
        self.vae = vae.to(self.wdtype).requires_grad_(False)
        te.requires_grad_(False)
        emb.weight.requires_grad_(True)                         # the whole table trains
        self.te = te.train()
        self.emb = emb
        self.opt = torch.optim.AdamW(emb.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cuda)
        self.sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000)
        self.orig = emb.weight.detach().clone()
        self.keep = torch.ones(emb.weight.shape[0], dtype=torch.bool, device=device)
        self.keep[self.token_id] = False
        self.scaling = vae.config.scaling_factor
        self.init_scale = self.scaler.get_scale() if cuda else 1.0

    def set_checkpointing(self, on: bool) -> None:
        """--gradient_checkpointing: the script also keeps the UNet in train mode then."""
        # transformers >= 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*
        te_on = getattr(self.te, "activation_checkpointing_enable", None) or self.te.gradient_checkpointing_enable
        te_off = getattr(self.te, "activation_checkpointing_disable", None) or self.te.gradient_checkpointing_disable
        if on:
            self.unet.train()
            self.unet.enable_gradient_checkpointing()
            te_on()
        else:
            self.unet.eval()
            self.unet.disable_gradient_checkpointing()
            te_off()

    def skipped_steps(self) -> int:
        """Updates the scaler skipped for inf/NaN gradients so far: each halves the scale (the
        scale grows only every 2000 good steps, far beyond a benchmark)."""
        if not self.autocast:
            return 0
        return max(0, round(math.log2(self.init_scale / self.scaler.get_scale())))

    def batch(self, b: int, seed: int = 0):
        """Pixels [B,3,S,S] fp32 in [-1,1] and ids [B,77] ('<bos> a photo of <token> <eos>...')."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        pixels = (torch.rand(b, 3, self.size, self.size, generator=g, device=self.device) * 2 - 1)
        ids = torch.full((b, 77), self.token_id - 1, dtype=torch.long, device=self.device)   # eos padding
        ids[:, 0] = self.token_id - 2
        ids[:, 1:4] = torch.randint(0, self.token_id - 2, (b, 3), generator=g, device=self.device)
        ids[:, 4] = self.token_id
        return pixels, ids

    def step(self, pixels: torch.Tensor, ids: torch.Tensor) -> float:
        latents = self.vae.encode(pixels.to(self.wdtype)).latent_dist.sample().detach() * self.scaling
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()
        noisy = self.sched.add_noise(latents, noise, t)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            ctx = self.te(ids)[0].to(dtype=self.wdtype)
        pred = self.unet(noisy, t, ctx).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad()
        with torch.no_grad():
            self.emb.weight[self.keep] = self.orig[self.keep]
        return loss.detach().item()
