"""Architecture configs: ours <-> diffusers/transformers config.json (read and write).

Reading refuses configs that are not SD 1.x-shaped (SD 2.x linear projections / 1024-wide
context, SDXL additional embeddings, class embeddings, deeper transformers) with a ModelLoadError
naming the folder. Writing produces what diffusers' UNet2DConditionModel / AutoencoderKL and
transformers' CLIPTextModel `from_pretrained` accept.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ..fsutil import kind_of
from ..models import UNetConfig, VAEConfig, CLIPConfig
from .errors import refuse

SD15_SCHEDULER = {   # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "trained_betas": None,
}


def read_json(path: Path) -> dict:
    kind = kind_of(path)
    if kind not in ("file", "missing"):           # a FIFO would block the read forever
        where = f"{Path(path).parent.name}/{Path(path).name}"
        raise refuse(where, f"is a {kind}, not a regular file: a diffusers folder needs a config.json file there")
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise refuse(path, "missing (a diffusers folder needs unet/, vae/, text_encoder/ with config.json)") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise refuse(path, f"corrupt JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(d, dict):
        raise refuse(path, "corrupt JSON (not an object)")
    return d


def _config_reader(fn):
    """A config.json with a missing key or a value of the wrong type is refused in one line."""
    @functools.wraps(fn)
    def read(d: dict, path):
        try:
            return fn(d, path)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise refuse(path, f"missing or malformed value ({type(e).__name__}: {e})") from None
    return read


# Bounds that every real SD 1.x-family checkpoint (and the tiny test models) is well inside: a
# config outside them is damaged, and building it could allocate without limit.
def _ints(cfg, names, lo, hi):
    return [(n, getattr(cfg, n)) for n in names
            if not (isinstance(getattr(cfg, n), int) and not isinstance(getattr(cfg, n), bool)
                    and lo <= getattr(cfg, n) <= hi)]


def check_config(kind: str, cfg, where) -> None:
    """Refuse (one line naming `where`) an architecture config with impossible values:
    non-positive or huge sizes, widths the heads or norm groups do not divide, level lists of
    the wrong length."""
    bad = []
    if kind == "unet":
        bad += _ints(cfg, ("in_channels", "out_channels"), 1, 16)
        bad += _ints(cfg, ("model_channels", "context_dim"), 1, 4096) + _ints(cfg, ("num_res_blocks",), 1, 8)
        bad += _ints(cfg, ("num_heads", "norm_groups"), 1, 256)
        mult, attn = tuple(cfg.channel_mult), tuple(cfg.attention_levels)
        if not (1 <= len(mult) <= 8 and all(isinstance(m, int) and 1 <= m <= 16 for m in mult)):
            bad.append(("channel_mult", mult))
        elif len(attn) != len(mult) or not all(isinstance(a, bool) for a in attn):
            bad.append(("attention_levels", attn))
        elif not bad and any((cfg.model_channels * m) % cfg.num_heads or (cfg.model_channels * m) % cfg.norm_groups
                             for m in mult):
            bad.append(("num_heads/norm_groups", (cfg.num_heads, cfg.norm_groups)))
    elif kind == "vae":
        bad += _ints(cfg, ("in_channels", "out_channels", "z_channels"), 1, 16)
        bad += _ints(cfg, ("ch",), 1, 1024) + _ints(cfg, ("num_res_blocks",), 1, 8) + _ints(cfg, ("norm_groups",), 1, 256)
        mult = tuple(cfg.ch_mult)
        if not (1 <= len(mult) <= 8 and all(isinstance(m, int) and 1 <= m <= 16 for m in mult)):
            bad.append(("ch_mult", mult))
        elif not bad and any((cfg.ch * m) % cfg.norm_groups for m in mult):
            bad.append(("norm_groups", cfg.norm_groups))
    else:
        bad += _ints(cfg, ("vocab_size",), 1, 1_000_000) + _ints(cfg, ("width",), 1, 8192)
        bad += _ints(cfg, ("layers", "heads"), 1, 128) + _ints(cfg, ("mlp",), 1, 65536)
        bad += _ints(cfg, ("max_positions",), 77, 4096)
        if not bad and cfg.width % cfg.heads:
            bad.append(("heads", cfg.heads))
    if bad:
        what = ", ".join(f"{n}={v!r}" for n, v in bad[:3])
        raise refuse(where, f"impossible {kind} architecture ({what}): a damaged or foreign config; "
                            "download the model again")


@_config_reader
def unet_from_diffusers(d: dict, path) -> UNetConfig:
    """diffusers UNet2DConditionModel config -> UNetConfig (SD 1.x shapes only)."""
    if d.get("addition_embed_type") or d.get("class_embed_type") or d.get("num_class_embeds"):
        raise refuse(path, "SDXL/unCLIP-style UNet (additional/class embeddings): ti-fast trains SD 1.x only")
    if d.get("cross_attention_dim", 768) == 1024 or d.get("use_linear_projection"):
        raise refuse(path, "SD 2.x UNet (1024-wide context / linear projections): ti-fast trains SD 1.x only")
    tl = d.get("transformer_layers_per_block", 1)
    if tl not in (1, None) and not (isinstance(tl, list) and set(tl) == {1}):
        raise refuse(path, f"UNet with transformer_layers_per_block={tl} (SDXL-like): not SD 1.x")
    if d.get("in_channels", 4) == 8:
        raise refuse(path, "instruct-pix2pix UNet (8 input channels): not supported")
    boc = list(d["block_out_channels"])
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)   # SD1 configs misname heads
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise refuse(path, f"UNet with per-level head counts {heads}: not SD 1.x")
        heads = heads[0]
    down = list(d["down_block_types"])
    return UNetConfig(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
                      model_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc),
                      num_res_blocks=d.get("layers_per_block", 2),
                      attention_levels=tuple(t.startswith("CrossAttn") for t in down),
                      num_heads=int(heads), context_dim=d.get("cross_attention_dim", 768),
                      norm_groups=d.get("norm_num_groups", 32))


def unet_to_diffusers(cfg: UNetConfig, sample_size: int = 64) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "act_fn": "silu",
            "attention_head_dim": cfg.num_heads, "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
            "center_input_sample": False, "cross_attention_dim": cfg.context_dim, "down_block_types": down,
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": cfg.in_channels,
            "layers_per_block": cfg.num_res_blocks, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": cfg.norm_groups, "out_channels": cfg.out_channels, "sample_size": sample_size,
            "up_block_types": up, "use_linear_projection": False, "upcast_attention": False}


@_config_reader
def vae_from_diffusers(d: dict, path) -> VAEConfig:
    boc = list(d["block_out_channels"])
    if d.get("latent_channels", 4) != 4 or not d.get("mid_block_add_attention", True):
        raise refuse(path, "VAE with a latent shape other than SD 1.x's (4 channels, mid attention)")
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), ch=boc[0],
                     ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=d.get("layers_per_block", 2),
                     z_channels=d.get("latent_channels", 4), norm_groups=d.get("norm_num_groups", 32))


def vae_to_diffusers(cfg: VAEConfig, sample_size: int = 512) -> dict:
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "act_fn": "silu",
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * n,
            "in_channels": cfg.in_channels, "latent_channels": cfg.z_channels, "layers_per_block": cfg.num_res_blocks,
            "norm_num_groups": cfg.norm_groups, "out_channels": cfg.out_channels, "sample_size": sample_size,
            "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * n}


@_config_reader
def clip_from_transformers(d: dict, path) -> CLIPConfig:
    if d.get("hidden_size", 768) == 1024 or d.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise refuse(path, "SD 2.x text encoder (OpenCLIP ViT-H, 1024 wide / gelu): ti-fast trains SD 1.x only")
    return CLIPConfig(vocab_size=d.get("vocab_size", 49408), width=d.get("hidden_size", 768),
                      layers=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 12),
                      mlp=d.get("intermediate_size", 3072), max_positions=d.get("max_position_embeddings", 77))


def clip_to_transformers(cfg: CLIPConfig) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "bos_token_id": cfg.vocab_size - 2, "eos_token_id": cfg.vocab_size - 1, "pad_token_id": 1,
            "hidden_act": "quick_gelu", "hidden_size": cfg.width, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": cfg.mlp, "layer_norm_eps": 1e-05,
            "max_position_embeddings": cfg.max_positions, "num_attention_heads": cfg.heads,
            "num_hidden_layers": cfg.layers, "projection_dim": 768, "torch_dtype": "float32",
            "vocab_size": cfg.vocab_size}


def model_index() -> dict:
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
            "feature_extractor": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
