"""The SD 1.x UNet (epsilon prediction), after CompVis/stable-diffusion's openaimodel.py.

Attribute names mirror the original checkpoint keys (model.diffusion_model.*), so loading is
a strict load_state_dict after stripping the prefix. Shapes: x [B, Cin, h, w] latents,
t [B] (float, fractional allowed), context [B, T, 768] -> eps [B, 4, h, w].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .attention import attention_sdpa


@dataclass
class UNetConfig:
    in_channels: int = 4                 # 4, or 9 for inpainting (latent + mask + masked latent)
    out_channels: int = 4
    model_channels: int = 320            # width of level 0
    channel_mult: tuple = (1, 2, 4, 4)   # width multiplier per level
    num_res_blocks: int = 2              # ResBlocks per level on the way down (up: +1)
    attention_levels: tuple = (True, True, True, False)  # a SpatialTransformer at this level?
    num_heads: int = 8                   # heads at every level (SD1: head dim 40/80/160)
    context_dim: int = 768               # text encoder width
    norm_groups: int = 32

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        for k in ("channel_mult", "attention_levels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] -> [B, dim] = [cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / half). fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back, as the original."""

    def forward(self, x):
        return ops.group_norm(x, self, silu=False)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(GroupNorm32(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb_silu):
        # emb_silu: SiLU(time embedding) [B, emb_dim], shared by every block (computed once).
        h = self.in_layers[2](ops.group_norm(x, self.in_layers[0], silu=True))
        h = h + self.emb_layers[1](emb_silu).to(h.dtype)[:, :, None, None]
        h = self.out_layers[3](ops.group_norm(h, self.out_layers[0], silu=True))
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.attn_fn = attention_sdpa  # set by attention.set_attention_backend
        # None, or a plain callable ctx -> (ctx_k, ctx_v) transforming the inputs of to_k / to_v
        # (same shapes and dtype). Set and cleared per instance by ti_fast.hypernetworks.hooks;
        # not an nn.Module, so it never enters this model's parameters or state_dict.
        self.kv_hook = None

    def forward(self, x, context=None):
        # x [B, N, C]; context [B, T, Cctx] (None = self-attention)
        ctx = x if context is None else context
        ctx_k = ctx_v = ctx
        if self.kv_hook is not None:
            ctx_k, ctx_v = self.kv_hook(ctx)
        b, n, c = x.shape
        h = self.heads
        q = self.to_q(x).view(b, n, h, c // h).transpose(1, 2)            # [B, H, N, D]
        k = self.to_k(ctx_k).view(b, ctx.shape[1], h, c // h).transpose(1, 2)
        v = self.to_v(ctx_v).view(b, ctx.shape[1], h, c // h).transpose(1, 2)
        o = self.attn_fn(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.to_out[0](o)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)
        self.fused_ops = None            # set per model by ops.set_kernels (None: PyTorch ops)

    def forward(self, x):
        return ops.geglu(self.proj(x), self.fused_ops)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim, heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        b, c, hh, ww = x.shape
        h = self.proj_in(ops.group_norm(x, self.norm, silu=False))
        h = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)                   # [B, HW, C] tokens
        for blk in self.transformer_blocks:
            h = blk(h, context)
        h = h.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        return self.proj_out(h) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # Upsample to the next skip's size (not blindly x2): any multiple of 8 px works.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """One input/middle/output block; `checkpoint` recomputes it in backward."""
    checkpoint = False

    def _run(self, x, emb_silu, context, up_size):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_silu)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x

    def forward(self, x, emb_silu, context, up_size=None):
        if self.checkpoint and torch.is_grad_enabled():
            # no RNG inside a block (dropout p=0, eval): skip saving/restoring RNG states, which a
            # CUDA graph capture (the trainer's default step) must not do
            return checkpoint(self._run, x, emb_silu, context, up_size, use_reentrant=False,
                              preserve_rng_state=False)
        return self._run(x, emb_silu, context, up_size)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        ed = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ed), nn.SiLU(), nn.Linear(ed, ed))

        def st(ch):
            return SpatialTransformer(ch, cfg.context_dim, cfg.num_heads, g)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_ch, ch = [mc], mc
        nlev = len(cfg.channel_mult)
        for lvl, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mc * mult, ed, g)]
                ch = mc * mult
                if cfg.attention_levels[lvl]:
                    layers.append(st(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_ch.append(ch)
            if lvl != nlev - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_ch.append(ch)

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, ch, ed, g), st(ch), ResBlock(ch, ch, ed, g))

        self.output_blocks = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_ch.pop(), mc * mult, ed, g)]
                ch = mc * mult
                if cfg.attention_levels[lvl]:
                    layers.append(st(ch))
                if lvl != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self):
        return self.out[2].weight.dtype

    def set_gradient_checkpointing(self, enable: bool = True, blocks=None):
        """Recompute blocks in backward. blocks: None = all, else names like 'input_blocks.4'."""
        named = {f"input_blocks.{i}": b for i, b in enumerate(self.input_blocks)}
        named["middle_block"] = self.middle_block
        named.update({f"output_blocks.{i}": b for i, b in enumerate(self.output_blocks)})
        for name, blk in named.items():
            blk.checkpoint = bool(enable) and (blocks is None or name in blocks)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device)
        t = t.to(x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        emb_silu = F.silu(emb)                       # every ResBlock starts its emb path with SiLU
        context = context.to(dtype)
        h = x.to(dtype)
        hs = []
        for blk in self.input_blocks:
            h = blk(h, emb_silu, context)
            hs.append(h)
        h = self.middle_block(h, emb_silu, context)
        for blk in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            up_size = hs[-1].shape[-2:] if hs else None
            h = blk(h, emb_silu, context, up_size)
        return self.out[2](ops.group_norm(h, self.out[0], silu=True))
