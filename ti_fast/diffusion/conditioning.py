"""Conditioning the 9-channel inpainting UNet when there is no mask: A1111 trains and samples
txt2img on such models with a mask of ones over a mid-grey image's latent. Shared by the trainer
(latent caching, previews) and generation.
"""
from __future__ import annotations

import torch

from ..models.vae import LATENT_SCALE


@torch.no_grad()
def grey_latent(vae, height: int, width: int, device) -> torch.Tensor:
    """Scaled latent of a mid-grey image (0 in [-1, 1]): A1111's inpainting conditioning
    when there is no mask to give. [1, 4, h, w] fp32."""
    x = torch.zeros(1, 3, height, width, device=device)
    return vae.encode(x).mean.float() * LATENT_SCALE


def inpaint_concat(grey: torch.Tensor) -> torch.Tensor:
    """[1, 5, h, w]: a mask of ones (everything to paint) then the grey image's latent."""
    return torch.cat([torch.ones_like(grey[:, :1]), grey], dim=1)
