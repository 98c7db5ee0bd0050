"""The SD 1.x VAE (AutoencoderKL), after CompVis/latent-diffusion's diffusionmodules/model.py.

Attribute names mirror the original checkpoint keys (first_stage_model.*).
encode: images [B, 3, H, W] in [-1, 1] -> DiagonalGaussian over UNSCALED latents [B, 4, H/8, W/8].
decode: unscaled latents -> images [B, 3, H, W], UNCLAMPED (clamping is the caller's).
The UNet works on LATENT_SCALE * latents.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .attention import attention_sdpa

# SD1's latent scale: unet_latent = LATENT_SCALE * vae_latent. The one place it lives.
LATENT_SCALE = 0.18215


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                       # width of level 0
    ch_mult: tuple = (1, 2, 4, 4)       # width multiplier per level; 2**(levels-1) = downscale
    num_res_blocks: int = 2             # encoder; the decoder has one more per level
    z_channels: int = 4
    norm_groups: int = 32

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if "ch_mult" in d:
            d["ch_mult"] = tuple(d["ch_mult"])
        return cls(**d)


class DiagonalGaussian:
    """Posterior over unscaled latents; mean/std [B, z, h, w]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean


def _norm(groups, ch):
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(ops.group_norm(x, self.norm1, silu=True))
        h = self.conv2(ops.group_norm(h, self.norm2, silu=True))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)
        self.attn_fn = attention_sdpa

    def forward(self, x):
        b, c, h, w = x.shape
        hn = ops.group_norm(x, self.norm, silu=False)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))  # [B,1,HW,C]
        o = self.attn_fn(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, unlike the UNet


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    pass


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            lvl = _Level()
            cout = cfg.ch * mult
            lvl.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                lvl.block.append(ResnetBlock(cin, cout, g))
                cin = cout
            if i != len(cfg.ch_mult) - 1:
                lvl.downsample = Downsample(cout)
            self.down.append(lvl)
        self.mid = _Mid(cin, g)
        self.norm_out = _norm(g, cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid(h)
        return self.conv_out(ops.group_norm(h, self.norm_out, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, g)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):  # built deepest first, stored in level order
            lvl = _Level()
            cout = cfg.ch * cfg.ch_mult[i]
            lvl.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                lvl.block.append(ResnetBlock(cin, cout, g))
                cin = cout
            if i != 0:
                lvl.upsample = Upsample(cout)
            levels.insert(0, lvl)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(g, cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(ops.group_norm(h, self.norm_out, silu=True))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def dtype(self):
        return self.quant_conv.weight.dtype

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8 for SD1)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(images.to(self.dtype)))
        return DiagonalGaussian(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents.to(self.dtype)))
