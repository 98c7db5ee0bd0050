"""SD 1.x noise schedule: ᾱ, σ levels, t <-> σ, sampling sigma lists, and q_sample for training.

After crowsonkb/k-diffusion (sampling.py get_sigmas_karras / append_zero, external.py
DiscreteSchedule) and CompVis/stable-diffusion (ldm/modules/diffusionmodules/util.py:
make_beta_schedule "linear", make_ddim_timesteps "uniform").

Two views of the same process:
- DDPM view: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, t ∈ {0..999} (what training and DDIM use).
- k-diffusion view: x = x0 + σ·ε with σ = √((1−ᾱ)/ᾱ), i.e. x = x_t / √ᾱ_t. The 1000 discrete
  σ levels are ascending in t (σ_min = σ(0) ≈ 0.029167, σ_max = σ(999) ≈ 14.614641).
Everything here is computed in float64; callers cast where they need to.
"""
from __future__ import annotations

import torch

N_TRAIN = 1000  # discrete DDPM timesteps of SD 1.x


def alphas_cumprod(n: int = N_TRAIN, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ [n] float64. SD's "scaled linear" betas: linspace in √β, squared (ldm's "linear")."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_to_sigmas(ac: torch.Tensor) -> torch.Tensor:
    """ᾱ [n] -> σ [n] = √((1−ᾱ)/ᾱ), ascending. Keeps ac's dtype."""
    return ((1.0 - ac) / ac).sqrt()


def sigmas_to_alphas_cumprod(sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of alphas_cumprod_to_sigmas: ᾱ = 1/(1+σ²)."""
    return 1.0 / (1.0 + sigmas ** 2)


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep for σ: linear interpolation in log σ between the two bracketing levels.

    sigma: any shape; log_sigmas: [n] ascending. Returns t of sigma's shape in [0, n−1]
    (clamped outside [σ_min, σ_max]), in sigma's dtype (log_sigmas' dtype if sigma isn't float).
    k-diffusion's DiscreteSchedule.sigma_to_t with quantize=False; A1111 does not quantize.
    """
    sigma = torch.as_tensor(sigma, device=log_sigmas.device)
    out_dtype = sigma.dtype if sigma.is_floating_point() else log_sigmas.dtype
    log_sigma = sigma.to(log_sigmas.dtype).log().reshape(-1)              # [M]
    n = log_sigmas.shape[0]
    # low = index of the last level ≤ log σ, kept in [0, n−2] so low+1 exists.
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, n - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)                        # 0 at lo, 1 at hi
    t = low.to(log_sigmas.dtype) + w
    return t.reshape(sigma.shape).to(out_dtype)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """σ at fractional t: exp of the linear interpolation of log σ between floor(t) and ceil(t).

    t: any shape in [0, n−1]; returns σ of t's shape, in t's dtype if float else log_sigmas'.
    """
    t = torch.as_tensor(t, device=log_sigmas.device)
    out_dtype = t.dtype if t.is_floating_point() else log_sigmas.dtype
    t = t.to(log_sigmas.dtype)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low.to(t.dtype)
    log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
    return log_sigma.exp().to(out_dtype)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """[n] -> [n+1] with a final 0: every k-diffusion schedule ends at the clean image."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas(n: int, log_sigmas: torch.Tensor) -> torch.Tensor:
    """A1111 "Automatic" schedule for Euler/Euler a: t = linspace(999, 0, n), σ(t), then 0.

    Returns [n+1] descending, log_sigmas' dtype. SD1.x, n=20: 14.6146, 10.7468, 8.0815, …, 0.0292, 0.
    """
    t = torch.linspace(log_sigmas.shape[0] - 1, 0, n, dtype=log_sigmas.dtype, device=log_sigmas.device)
    return append_zero(t_to_sigma(t, log_sigmas))


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      dtype=torch.float64, device=None) -> torch.Tensor:
    """Karras et al. (2022) schedule: uniform in σ^(1/ρ) from σ_max to σ_min, then 0. [n+1]."""
    ramp = torch.linspace(0, 1, n, dtype=dtype, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def ddim_timesteps(steps: int, n_train: int = N_TRAIN) -> torch.Tensor:
    """Original DDIM ("uniform") timesteps, descending: arange(0, n_train, n_train//steps) + 1.

    Long [k]. k == steps only when steps divides n_train: steps=30 -> stride 33 -> 31 timesteps
    (991 … 1), as ldm's DDIMSampler. Clipped to n_train−1 as A1111 does (steps > n_train/2).
    """
    c = n_train // steps
    if c < 1:
        raise ValueError(f"DDIM steps must be ≤ {n_train}, got {steps}")
    ts = (torch.arange(0, n_train, c) + 1).clamp(max=n_train - 1)
    return ts.flip(0)


def get_sigmas_ddim(steps: int, ac: torch.Tensor) -> torch.Tensor:
    """DDIM in the k-diffusion variable: σ(ᾱ[t]) at each DDIM timestep, then σ(ᾱ[0]).

    [k+1] descending, ac's dtype. The last entry is σ_min ≈ 0.0292, NOT 0: original DDIM's final
    a_prev is ᾱ[0] (not 1), so its output is x0 + σ_min·ε (see samplers.sample_ddim).
    """
    ts = ddim_timesteps(steps, ac.shape[0]).to(ac.device)
    sig = alphas_cumprod_to_sigmas(ac)
    return torch.cat([sig[ts], sig[:1]])


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """Forward diffusion for training: √ᾱ_t·x0 + √(1−ᾱ_t)·ε.

    x0, noise: [B, C, h, w]; t: long [B]; ac: ᾱ [1000] (any float dtype/device). The coefficients
    are gathered and square-rooted in fp32 (bf16 ᾱ near 1 would round √(1−ᾱ) badly), then cast
    to x0.dtype. Returns [B, C, h, w] in x0.dtype.
    """
    a = ac.to(device=t.device, dtype=torch.float32)[t]                    # [B]
    shape = (-1,) + (1,) * (x0.ndim - 1)                                  # [B,1,1,1]
    sqrt_a = a.sqrt().view(shape).to(x0.dtype)
    sqrt_1ma = (1.0 - a).sqrt().view(shape).to(x0.dtype)
    return sqrt_a * x0 + sqrt_1ma * noise.to(x0.dtype)
