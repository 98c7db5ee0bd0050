"""Tiny SD 1.x-shaped models with random weights, written as a single file or a diffusers folder.

`make_tiny(out_dir, layout, seed)` is what `ti-fast make-tiny` runs: deterministic by seed,
well under a second, and loadable by `load_model` (and, for the diffusers layout, by
diffusers/transformers `from_pretrained`). The writers here (`write_single`, `write_diffusers`)
also serve the tests that need variants (fp16/bf16, .bin, .fp16 files, old key names).
Shapes: UNet 32 -> 64 channels over two levels (attention at the first), latent /8 VAE with
16..32 channels, 3-layer 32-wide text encoder over the project's 819-token BPE vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fsutil import atomic_path, atomic_write_text
from ..models import UNet, UNetConfig, VAE, VAEConfig, CLIPTextEncoder, CLIPConfig
from . import configs as C
from .keys import UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, to_diffusers_map, is_vae_attn_matrix
from .tokenizer import write_tiny_tokenizer

TINY_VOCAB_SIZE = 819          # 512 byte tokens + 305 learned merges + 2 specials (checked by a test)
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                       attention_levels=(True, False), num_heads=2, context_dim=32, norm_groups=8)
TINY_VAE = VAEConfig(in_channels=3, out_channels=3, ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=2,
                     z_channels=4, norm_groups=8)
TINY_CLIP = CLIPConfig(vocab_size=TINY_VOCAB_SIZE, width=32, layers=3, heads=4, mlp=64, max_positions=77)


def tiny_models(seed: int = 0, unet_cfg: UNetConfig = TINY_UNET, vae_cfg: VAEConfig = TINY_VAE,
                clip_cfg: CLIPConfig = TINY_CLIP):
    """(unet, vae, text_encoder) with PyTorch's default init under `seed`, then every 1-D
    parameter (norm scales/shifts, biases) moved by N(0, 0.1) so that parity tests see
    non-trivial norm affines. The global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = (UNet(unet_cfg), VAE(vae_cfg), CLIPTextEncoder(clip_cfg))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in models:
                for p in m.parameters():
                    if p.ndim == 1:
                        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return tuple(m.eval().requires_grad_(False) for m in models)


def _cast(sd: dict, dtype) -> dict:
    return {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}


def config_json(unet: UNet, vae: VAE, clip: CLIPTextEncoder) -> str:
    return json.dumps({"unet": unet.config.to_dict(), "vae": vae.config.to_dict(), "clip": clip.config.to_dict()})


def single_state_dict(unet: UNet, vae: VAE, clip: CLIPTextEncoder) -> dict[str, torch.Tensor]:
    """Original single-file keys (model.diffusion_model., first_stage_model., cond_stage_model...)."""
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    sd.update({CLIP_PREFIX + k: v for k, v in clip.state_dict().items()})
    return sd


def write_single(path, unet: UNet, vae: VAE, clip: CLIPTextEncoder, dtype=None, with_config: bool = True,
                 extra: dict | None = None) -> Path:
    """One original-layout .safetensors; the architecture JSON in metadata `ti_fast_config`."""
    from safetensors.torch import save_file
    sd = _cast(single_state_dict(unet, vae, clip), dtype)
    if extra:
        sd.update(extra)
    # One metadata key only: safetensors stores metadata in a hash map, so two keys come out in
    # random order and the file would not be byte-identical across runs.
    meta = {"ti_fast_config": config_json(unet, vae, clip)} if with_config else {"format": "pt"}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return path


def diffusers_state_dicts(unet: UNet, vae: VAE, clip: CLIPTextEncoder) -> dict[str, dict]:
    """{'unet': ..., 'vae': ..., 'text_encoder': ...} in diffusers/transformers names."""
    umap = to_diffusers_map("unet", unet.config)
    vmap = to_diffusers_map("vae", vae.config)
    u = {umap[k]: v for k, v in unet.state_dict().items()}
    # VAE mid-attention 1x1 convs are Linear layers in diffusers: [C, C, 1, 1] -> [C, C]
    va = {vmap[k]: (v[:, :, 0, 0] if is_vae_attn_matrix(k) else v) for k, v in vae.state_dict().items()}
    te = {"text_model." + k: v for k, v in clip.state_dict().items()}   # transformers < 5.6 names
    return {"unet": u, "vae": va, "text_encoder": te}


def _save(sd: dict, path: Path, fmt: str):
    with atomic_path(path) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(sd, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(sd, str(tmp))


def write_diffusers(out_dir, unet: UNet, vae: VAE, clip: CLIPTextEncoder, dtype=None, fmt: str = "safetensors",
                    variant: str | None = None, scheduler: dict | None = None, tokenizer: bool = True) -> Path:
    """A diffusers StableDiffusionPipeline folder. fmt: 'safetensors' | 'bin';
    variant 'fp16' names files *.fp16.* (diffusers' variant convention)."""
    out = Path(out_dir)
    sds = diffusers_state_dicts(unet, vae, clip)
    ext = f"{'.' + variant if variant else ''}.{fmt}"
    te_stem = "model" if fmt == "safetensors" else "pytorch_model"
    _save(_cast(sds["unet"], dtype), out / "unet" / f"diffusion_pytorch_model{ext}", fmt)
    _save(_cast(sds["vae"], dtype), out / "vae" / f"diffusion_pytorch_model{ext}", fmt)
    _save(_cast(sds["text_encoder"], dtype), out / "text_encoder" / f"{te_stem}{ext}", fmt)
    dump = lambda p, d: atomic_write_text(out / p, json.dumps(d, indent=2))  # noqa: E731
    dump("unet/config.json", C.unet_to_diffusers(unet.config, sample_size=8))
    dump("vae/config.json", C.vae_to_diffusers(vae.config, sample_size=64))
    dump("text_encoder/config.json", C.clip_to_transformers(clip.config))
    dump("scheduler/scheduler_config.json", scheduler or C.SD15_SCHEDULER)
    dump("model_index.json", C.model_index())
    if tokenizer:
        write_tiny_tokenizer(out / "tokenizer")
    return out


def make_tiny(out_dir, layout: str = "single", seed: int = 0) -> Path:
    """Write a tiny random SD 1.x model. layout 'single': OUT/model.safetensors (original keys,
    ti_fast_config metadata) + OUT/tokenizer/; 'diffusers': a diffusers pipeline folder.
    Deterministic by seed. Returns OUT."""
    if layout not in ("single", "diffusers"):
        raise ValueError(f"make_tiny layout must be 'single' or 'diffusers', not {layout!r}")
    out = Path(out_dir)
    unet, vae, clip = tiny_models(seed)
    if layout == "single":
        write_single(out / "model.safetensors", unet, vae, clip)
        write_tiny_tokenizer(out / "tokenizer")
    else:
        write_diffusers(out, unet, vae, clip)
    return out
