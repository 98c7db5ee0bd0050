"""Pure nn.Modules of SD 1.x: no file I/O, no training logic."""
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig, DiagonalGaussian, LATENT_SCALE
from .clip import CLIPTextEncoder, CLIPConfig
from .attention import set_attention_backend, available_backends

__all__ = ["UNet", "UNetConfig", "VAE", "VAEConfig", "DiagonalGaussian", "LATENT_SCALE",
           "CLIPTextEncoder", "CLIPConfig", "set_attention_backend", "available_backends"]
