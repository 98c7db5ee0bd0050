"""Key rules: single-file (original CompVis) names <-> diffusers-folder names, any depth.

Our modules use the original names with the prefix stripped, so a single file loads by
stripping prefixes; a diffusers folder loads by renaming each key with the rules below.
The rules are written original -> diffusers, applied to every key of a meta-device model of
the given config, and the resulting bijection is inverted for diffusers -> original (so both
directions always agree and any num_res_blocks / number of levels works).

UNet (L = num_res_blocks):
  input_blocks.0.0                 conv_in
  input_blocks.i (i >= 1)          down_blocks.{(i-1)//(L+1)}: slot (i-1)%(L+1);
                                   slot < L: .0 resnets.slot, .1 attentions.slot
                                   slot = L: .0.op downsamplers.0.conv
  middle_block.0 / .1 / .2         mid_block.resnets.0 / attentions.0 / resnets.1
  output_blocks.i                  up_blocks.{i//(L+1)}: .0 resnets.{i%(L+1)},
                                   .1 attentions.{i%(L+1)} (or upsamplers.0 if .1.conv), .2 upsamplers.0
  time_embed.0/2, out.0/2          time_embedding.linear_1/2, conv_norm_out, conv_out
  ResBlock: in_layers.0 norm1, in_layers.2 conv1, emb_layers.1 time_emb_proj,
            out_layers.0 norm2, out_layers.3 conv2, skip_connection conv_shortcut
  SpatialTransformer sub-keys are identical.
VAE: down.i.block.j -> down_blocks.i.resnets.j, down.i.downsample -> down_blocks.i.downsamplers.0,
  up.k -> up_blocks.{n-1-k} (upsample -> upsamplers.0), mid.block_1/2 -> mid_block.resnets.0/1,
  mid.attn_1 -> mid_block.attentions.0 (norm group_norm, q/k/v to_q/k/v, proj_out to_out.0; the
  only reshaped tensors: 1x1 conv [C,C,1,1] <-> Linear [C,C]), nin_shortcut conv_shortcut,
  norm_out conv_norm_out.
CLIP: identical names below `text_model.` (transformers < 5.6 nests them there, 5.6+ does not).
"""
from __future__ import annotations

import functools
import json
import re

import torch
from torch.overrides import TorchFunctionMode

from ..models import UNet, UNetConfig, VAE, VAEConfig, CLIPTextEncoder, CLIPConfig

# Single-file prefixes of the three parts (original LDM layout).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
CLIP_PREFIX_OLD = "cond_stage_model.transformer."      # older files: no `text_model.`

_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _resnet(rest: str) -> str:
    for old, new in _RES.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def unet_key_to_diffusers(key: str, cfg: UNetConfig) -> str:
    """One UNet key, original (prefix stripped) -> diffusers."""
    L = cfg.num_res_blocks
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        blk, slot = (i - 1) // (L + 1), (i - 1) % (L + 1)
        if slot == L:                                       # the downsampler's own block
            return f"down_blocks.{blk}.downsamplers.0.conv." + rest.removeprefix("op.")
        if sub == 0:
            return f"down_blocks.{blk}.resnets.{slot}.{_resnet(rest)}"
        return f"down_blocks.{blk}.attentions.{slot}.{rest}"
    m = re.match(r"middle_block\.(\d)\.(.+)", key)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{sub // 2}.{_resnet(rest)}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        blk, slot = i // (L + 1), i % (L + 1)
        if sub == 0:
            return f"up_blocks.{blk}.resnets.{slot}.{_resnet(rest)}"
        if rest.startswith("conv."):                        # .1.conv or .2.conv: the upsampler
            return f"up_blocks.{blk}.upsamplers.0.{rest}"
        return f"up_blocks.{blk}.attentions.{slot}.{rest}"
    raise KeyError(f"no diffusers rule for UNet key {key!r}")


def vae_key_to_diffusers(key: str, cfg: VAEConfig) -> str:
    """One VAE key, original (prefix stripped) -> diffusers."""
    n = len(cfg.ch_mult)
    key = key.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(.+)", key)
    if m:
        part, mod, sub, rest = m.groups()
        if mod == "attn_1":
            return f"{part}.mid_block.attentions.0.{_VAE_ATTN[sub]}.{rest}"
        return f"{part}.mid_block.resnets.{int(mod[-1]) - 1}.{sub}.{rest}"
    m = re.match(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)", key)
    if m:
        i, what, j, rest = m.groups()
        mid = f"resnets.{j}" if j is not None else "downsamplers.0"
        return f"encoder.down_blocks.{i}.{mid}.{rest}"
    m = re.match(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)", key)
    if m:
        k, what, j, rest = m.groups()
        mid = f"resnets.{j}" if j is not None else "upsamplers.0"
        return f"decoder.up_blocks.{n - 1 - int(k)}.{mid}.{rest}"
    return key                   # conv_in, conv_out, quant_conv, post_quant_conv


def _cfg_key(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


class _SkipNormalInit(TorchFunctionMode):
    """Meta tensors have no values to initialise; nn.Embedding's normal_ on meta would import
    torch._dynamo (~2 s, once per process) for nothing, so it is answered with the tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def meta_model(kind: str, cfg):
    """An uninitialised `kind` model ('unet'|'vae'|'clip') on the meta device (no memory)."""
    cls = {"unet": UNet, "vae": VAE, "clip": CLIPTextEncoder}[kind]
    with torch.device("meta"), _SkipNormalInit():
        return cls(cfg)


@functools.lru_cache(maxsize=16)
def _expected(kind: str, cfg_json: str) -> dict[str, tuple]:
    ccls = {"unet": UNetConfig, "vae": VAEConfig, "clip": CLIPConfig}[kind]
    model = meta_model(kind, ccls.from_dict(json.loads(cfg_json)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_shapes(kind: str, cfg) -> dict[str, tuple]:
    """Canonical (original, prefix-stripped) key -> shape of a model of `cfg` (meta build, cached)."""
    return dict(_expected(kind, _cfg_key(cfg)))


@functools.lru_cache(maxsize=16)
def _to_diffusers(kind: str, cfg_json: str) -> dict[str, str]:
    d = json.loads(cfg_json)
    if kind == "unet":
        cfg = UNetConfig.from_dict(d)
        return {k: unet_key_to_diffusers(k, cfg) for k in _expected("unet", cfg_json)}
    if kind == "vae":
        cfg = VAEConfig.from_dict(d)
        return {k: vae_key_to_diffusers(k, cfg) for k in _expected("vae", cfg_json)}
    return {k: k for k in _expected("clip", cfg_json)}


def to_diffusers_map(kind: str, cfg) -> dict[str, str]:
    """Canonical key -> diffusers key for every tensor of a `kind` model ('unet'|'vae'|'clip')."""
    return dict(_to_diffusers(kind, _cfg_key(cfg)))


def from_diffusers_map(kind: str, cfg) -> dict[str, str]:
    """Diffusers key -> canonical key (the inverse of to_diffusers_map; it is a bijection)."""
    fwd = _to_diffusers(kind, _cfg_key(cfg))
    inv = {v: k for k, v in fwd.items()}
    assert len(inv) == len(fwd), "diffusers key rules are not one-to-one"
    return inv


def is_vae_attn_matrix(canonical_key: str) -> bool:
    """The VAE mid-attention q/k/v/proj_out weights: [C,C,1,1] here, [C,C] in diffusers."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", canonical_key) is not None


def clip_canonical(key: str) -> str:
    """A text-encoder key below its file prefix, with or without `text_model.`, -> canonical."""
    return key.removeprefix("text_model.")
