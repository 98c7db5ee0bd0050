"""Samplers as pure functions over a denoiser, and the A1111 sampler registry.

After crowsonkb/k-diffusion sampling.py (sample_euler, sample_euler_ancestral, get_ancestral_step,
sample_dpmpp_2m), CompVis ldm's DDIMSampler (eta 0) and AUTOMATIC1111's sampler tables
(sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_schedulers.py).

Every sampler: f(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None)
- model(x [B,4,h,w], sigma [B], **extra_args) -> denoised [B,4,h,w] (a denoiser.EpsDenoiser or
  CFGDenoiser), x in the k-diffusion variable (x = x0 + σ·ε).
- sigmas [n+1] descending, from make_sigmas. x on entry is the start latent at sigmas[0]: the
  caller draws it as randn·start_sigma(name, sigmas) (= randn·σ₀ for the k-diffusion samplers,
  as A1111; DDIM differs, see start_sigma).
- callback({"x", "i", "sigma", "sigma_hat", "denoised"}) once per step, after the model call.
- disable: passed to tqdm (None = off when not a terminal, as k-diffusion).
- noise_sampler(σ, σ_next) -> noise like x; only ancestral samplers draw noise, the
  deterministic ones accept and ignore it so that every sampler takes the same arguments.
Returns the final latent [B,4,h,w] (what the VAE decodes, before its 1/0.18215 scaling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import trange

from ..errors import ConfigError

from . import schedule


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dσ = (x − D(x, σ))/σ, i.e. the predicted ε. sigma 0-dim."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split the step σ -> σ_next into a deterministic part to σ_down and fresh noise σ_up.

    σ_up = min(σ_next, η·√(σ_next²(σ²−σ_next²)/σ²)), σ_down = √(σ_next² − σ_up²),
    so σ_down² + σ_up² = σ_next². eta 0 gives (σ_next, 0): plain Euler.
    """
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: torch.Tensor):
    return lambda sigma, sigma_next: torch.randn_like(x)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Euler on the probability-flow ODE: x += d·(σ_next − σ). Deterministic (no churn)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           noise_sampler=None, eta: float = 1.0):
    """Euler a: Euler step to σ_down, then add noise·σ_up (none on the step to σ = 0)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DPM-Solver++(2M) in λ = −log σ: exact exponential step on a linear extrapolation of D.

    First step and the step to σ = 0 are first order (the latter gives x = denoised).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            x = denoised                      # limit of the formula: σ_next/σ = 0, expm1(−h) = −1
        else:
            h = sigma.log() - sigma_next.log()                       # λ_next − λ
            d = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - sigma.log()) / h          # h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Deterministic DDIM (eta 0), written in the k-diffusion variable.

    DDIM's update x_prev = √a_prev·x0̂ + √(1−a_prev)·ε̂, divided by √a_prev, is
    x̃_prev = x0̂ + σ_prev·ε̂ = x̃ + (σ_prev − σ)·ε̂: an Euler step between DDIM's σ levels.
    sigmas = schedule.get_sigmas_ddim(...) ends at σ(ᾱ[0]) (original DDIM's final a_prev = ᾱ[0]),
    so the result x̃ = x0̂ + σ_min·ε̂ is scaled back by √ᾱ[0] = 1/√(1+σ_last²) to DDIM's own
    output. For sigmas ending at 0 this is plain Euler.
    """
    x = sample_euler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)
    return x * (1.0 + sigmas[-1] ** 2).rsqrt()


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable             # the sampler function above
    label: str               # A1111 display name (infotext "Sampler")
    default_schedule: str    # "automatic" (get_sigmas), "karras", or "ddim" (own timesteps)


SAMPLERS = {
    "euler_a": SamplerInfo(sample_euler_ancestral, "Euler a", "automatic"),
    "euler": SamplerInfo(sample_euler, "Euler", "automatic"),
    "ddim": SamplerInfo(sample_ddim, "DDIM", "ddim"),
    # A1111 1.10 merged "DPM++ 2M Karras" into "DPM++ 2M" with Karras as its default schedule.
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, "DPM++ 2M", "karras"),
}


# A1111's older labels that name one of ours (before 1.10 the schedule was part of the name).
_OLD_LABELS = {"dpm++ 2m karras": "dpmpp_2m", "k_euler_a": "euler_a", "k_euler": "euler"}


def sampler_key(name, flag: str = "--sampler", error=ConfigError) -> str:
    """Our key for a sampler given by key ("euler_a") or by A1111's label ("Euler a",
    "DPM++ 2M", any case); `error` (a ConfigError) listing both forms otherwise."""
    text = str(name).strip()
    if text in SAMPLERS:
        return text
    low = text.lower()
    for key, info in SAMPLERS.items():
        if low in (key, info.label.lower()):
            return key
    if low in _OLD_LABELS:
        return _OLD_LABELS[low]
    allowed = ", ".join(f"{k} ({i.label!r})" for k, i in SAMPLERS.items())
    raise error(f"{flag} {name!r}: unknown sampler; choose one of {allowed}")


def _info(sampler_name: str) -> SamplerInfo:
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler_name]


def _use_karras(info: SamplerInfo, karras: bool | None) -> bool:
    return info.default_schedule == "karras" if karras is None else bool(karras)


def make_sigmas(sampler_name: str, steps: int, karras: bool | None, denoiser,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """Sigmas [k+1] for a sampler. karras None = the sampler's default (A1111 "Automatic").

    denoiser: an EpsDenoiser (for σ_min/σ_max, the log-σ table and ᾱ). DDIM always uses its
    own timesteps (k = len(ddim_timesteps(steps)), last σ = σ_min); asking it for Karras raises.
    """
    info = _info(sampler_name)
    if info.default_schedule == "ddim":
        if karras:
            raise ValueError("DDIM uses its own timesteps; a Karras schedule does not apply")
        sigmas = schedule.get_sigmas_ddim(steps, denoiser.alphas_cumprod)
    elif _use_karras(info, karras):
        sigmas = schedule.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    else:
        sigmas = denoiser.get_sigmas(steps)
    return sigmas.to(device=device, dtype=dtype)


def schedule_label(sampler_name: str, karras: bool | None) -> str:
    """A1111 1.10 infotext "Schedule type": "Karras" when Karras sigmas are used (also by
    DPM++ 2M's default); "Uniform" when a Karras-by-default sampler is switched to the model's
    own discrete schedule; else "Automatic"."""
    info = _info(sampler_name)
    if info.default_schedule == "ddim":
        return "Automatic"
    if _use_karras(info, karras):
        return "Karras"
    return "Uniform" if info.default_schedule == "karras" else "Automatic"


def start_sigma(sampler_name: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Std of the start latent in the k-diffusion variable: x = randn·start_sigma.

    k-diffusion samplers (A1111): σ₀. DDIM starts from x_T = randn in the DDPM view, which is
    randn/√ᾱ_T = randn·√(1+σ₀²) here (0.3% larger than σ₀ at t=981).
    """
    s0 = sigmas[0]
    return (1.0 + s0 ** 2).sqrt() if _info(sampler_name).default_schedule == "ddim" else s0
