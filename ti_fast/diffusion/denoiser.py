"""Denoiser wrappers: SD's ε-prediction UNet seen as a k-diffusion denoiser D(x, σ) -> x0.

After crowsonkb/k-diffusion external.py (DiscreteEpsDDPMDenoiser / CompVisDenoiser,
quantize=False) and AUTOMATIC1111 modules/sd_samplers_cfg_denoiser.py (CFGDenoiser: cond and
uncond in one batch, cond first, guidance combined on the denoised outputs; inpainting image
conditioning reaches the UNet through ldm's hybrid wrapper as cat([x·c_in, c_concat], dim=1)).

    D(x, σ) = x − σ·ε(x·c_in, t(σ)),  c_in = 1/√(σ²+1),  t(σ) fractional (log-σ interpolation).

x·c_in is exactly the DDPM-view latent x_t = √ᾱ·x0 + √(1−ᾱ)·ε the UNet was trained on.
"""
from __future__ import annotations

import torch

from . import schedule


class EpsDenoiser:
    """k-diffusion's CompVisDenoiser over any ε-model.

    eps_fn(x_in, t, **extra) -> ε: x_in [B, Cin, h, w] (Cin = 4, or 4 + c_concat channels),
    t float32 [B] fractional timesteps in [0, 999]; returns ε [B, 4, h, w]. For ti_fast's UNet:
    eps_fn = lambda x, t, cond: unet(x, t, cond).
    alphas_cumprod: ᾱ [1000] (schedule.alphas_cumprod()); kept in float64 here.
    """

    def __init__(self, eps_fn, alphas_cumprod: torch.Tensor):
        self.eps_fn = eps_fn
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).to(torch.float64).cpu()
        self.sigmas = schedule.alphas_cumprod_to_sigmas(self.alphas_cumprod)   # [1000] ascending
        self.log_sigmas = self.sigmas.log()
        self._log_sigmas_on = {}   # device -> log_sigmas there: no host->device copy per step

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        if device not in self._log_sigmas_on:
            # float64 everywhere but MPS, which has none; t stays exact to ~1e-12 in float64.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._log_sigmas_on[device] = self.log_sigmas.to(device=device, dtype=dtype)
        return self._log_sigmas_on[device]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return schedule.sigma_to_t(sigma, self._log_sigmas(sigma.device))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return schedule.t_to_sigma(t, self._log_sigmas(t.device))

    def get_sigmas(self, n: int) -> torch.Tensor:
        """A1111 "Automatic" schedule, [n+1] float64 on CPU (schedule.get_sigmas)."""
        return schedule.get_sigmas(n, self.log_sigmas)

    def __call__(self, x: torch.Tensor, sigma, c_concat: torch.Tensor | None = None, **extra) -> torch.Tensor:
        """x [B, 4, h, w] (k-diffusion variable), sigma scalar or [B] -> denoised [B, 4, h, w].

        c_concat [B, Cc, h, w] (inpainting: mask 1 + masked-image latent 4) is appended to the
        scaled input, not scaled itself: it is a clean conditioning image, not part of x_t.
        """
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        s = sigma.view((b,) + (1,) * (x.ndim - 1))                        # [B,1,1,1]
        c_in = (s * s + 1.0).rsqrt()
        x_in = x * c_in
        if c_concat is not None:
            x_in = torch.cat([x_in, c_concat.to(x_in.dtype)], dim=1)
        t = self.sigma_to_t(sigma).to(torch.float32)                      # [B] fractional
        eps = self.eps_fn(x_in, t, **extra)
        return (x - s * eps).to(x.dtype)


class CFGDenoiser(EpsDenoiser):
    """Classifier-free guidance with cond and uncond in ONE ε-model batch (A1111's default).

    __call__(x [B,4,h,w], sigma, cond [B,T,D], uncond [B,T,D], cond_scale, c_concat=None)
    -> D_u + s·(D_c − D_u), which equals x − σ·(ε_u + s(ε_c − ε_u)). The caller pads cond and
    uncond to the same T (A1111 repeats the empty-prompt chunk). No shortcut at s = 1: the
    uncond half is still computed, as A1111 does.
    """

    def __call__(self, x: torch.Tensor, sigma, cond: torch.Tensor, uncond: torch.Tensor,
                 cond_scale: float, c_concat: torch.Tensor | None = None, **extra) -> torch.Tensor:
        if cond.shape != uncond.shape:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} must match: "
                             "pad the shorter to the same token count first")
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        # [2B, ...]: cond half first, uncond half second (A1111's order).
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        cc = None if c_concat is None else torch.cat([c_concat, c_concat])
        den = super().__call__(x_in, sigma_in, c_concat=cc, cond=torch.cat([cond, uncond]), **extra)
        den_c, den_u = den[:b], den[b:]
        return den_u + (den_c - den_u) * cond_scale
