"""The frozen model a run trains against: loaded once, its fused ops and attention chosen for this
model alone (nothing process-wide), frozen, gradient checkpointing placed, and channels_last,
--offload and --compile applied in the one order that works. `ran` records what actually runs
(settings.json keeps it: no `cuda_graph: true` on a CPU)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..devices import resolve_precision
from ..errors import ConfigError
from ..loading import load_model
from ..models.attention import set_attention_backend
from ..models.ops import set_kernels
from .accel import prepare_unet
from .lowvram import checkpoint_blocks
from .preflight import check_device


@dataclass
class TrainModel:
    model: object                  # ti_fast.loading.SDModel: unet, vae, text_encoder, tokenizer, info
    unet: torch.nn.Module          # what the step calls (the UNet, or its compiled wrapper)
    device: torch.device
    dtype: torch.dtype
    ran: dict = field(default_factory=dict)


def load_for_training(cfg, say=print) -> TrainModel:
    """Load `cfg.model` and prepare it for a run with `cfg`'s settings."""
    device = check_device(cfg)
    dtype = resolve_precision(cfg.precision, device)
    say(f"ti-fast: loading {cfg.model} on {device} ({str(dtype).replace('torch.', '')})")
    # --offload: load on the CPU, move all but the UNet (its blocks stream, see prepare_unet)
    model = load_model(cfg.model, device="cpu" if cfg.offload else device, dtype=dtype, vae=cfg.vae,
                       tokenizer=cfg.tokenizer)
    unet, te, vae = model.unet, model.text_encoder, model.vae
    if cfg.offload:
        te.to(device)
        vae.to(device)
    if cfg.clip_skip > te.config.layers:
        raise ConfigError(f"--clip-skip {cfg.clip_skip}: the text encoder has {te.config.layers} layers")
    # CPU tensors always take PyTorch's ops: do not import Triton there for nothing
    kernels = set_kernels(unet, cfg.kernels if device.type == "cuda" else "torch", verbose=not cfg.quiet)
    set_kernels(vae, cfg.kernels if device.type == "cuda" else "torch", verbose=False)
    attention = set_attention_backend(unet, cfg.attention, device, verbose=not cfg.quiet)
    set_attention_backend(te, "sdpa" if cfg.attention in ("auto", "triton") else cfg.attention, device, verbose=False)
    for m in (unet, te, vae):
        m.requires_grad_(False).eval()
    blocks = None
    if cfg.gradient_checkpointing or cfg.low_vram:
        blocks = None if cfg.gradient_checkpointing else checkpoint_blocks(
            unet, batch=cfg.batch_size, latent_hw=(cfg.height // 8, cfg.width // 8), elem_bytes=dtype.itemsize)
        unet.set_gradient_checkpointing(True, blocks)
    channels_last = cfg.channels_last and device.type == "cuda"
    unet_step = prepare_unet(unet, device, channels_last=channels_last, offload=cfg.offload,
                             compile=cfg.compile, say=say)
    ran = {"device": str(device), "precision": str(dtype).replace("torch.", ""), "kernels": kernels,
           "attention": attention, "channels_last": channels_last, "offload": cfg.offload, "compile": cfg.compile,
           "gradient_checkpointing": "all" if cfg.gradient_checkpointing else blocks or False}
    return TrainModel(model=model, unet=unet_step, device=device, dtype=dtype, ran=ran)
