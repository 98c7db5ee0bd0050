"""Sampling math: schedule values, t <-> σ, denoiser/CFG wrapping, and each sampler against a
diffusers scheduler driving the SAME tiny random UNet from the SAME noise.

References: diffusers EulerDiscrete / EulerAncestralDiscrete / DDIM / DPMSolverMultistep with SD's
scaled-linear betas. Where the two legitimately differ (diffusers interpolates σ linearly in t
for Euler, rounds DPM-Solver's timesteps, draws unit-variance start noise in the DDPM view) the
test says so and feeds each side what A1111 would; nothing is loosened to hide it.
"""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)

from ti_fast.models.unet import UNet, UNetConfig
from ti_fast.diffusion import schedule
from ti_fast.diffusion.denoiser import CFGDenoiser, EpsDenoiser
from ti_fast.diffusion.samplers import (SAMPLERS, make_sigmas, sample_ddim, sample_dpmpp_2m,
                                     sample_euler, sample_euler_ancestral, schedule_label,
                                     start_sigma)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
AC = schedule.alphas_cumprod()
LOG_SIGMAS = schedule.alphas_cumprod_to_sigmas(AC).log()
B, SHAPE, T, D = 2, (2, 4, 8, 8), 7, 32
CFG = 7.0


def rel_err(a, b):
    """max |a − b| / max |b|: the acceptance metric for final latents."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops: a second thread only adds contention on a shared CPU box. Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False),
                          num_heads=2, context_dim=32, norm_groups=8)).eval()
    with torch.no_grad():
        net.out[2].weight.mul_(3.0)   # ε std ≈ 1 like a real model, so ε matters in every step
    return net


@pytest.fixture(scope="module")
def ctx():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)   # cond, uncond


@pytest.fixture(scope="module")
def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))


def ref_eps(unet, ctx, x_in, t):
    """Reference CFG ε for the diffusers loops: ε_u + s(ε_c − ε_u), t a scalar (any float)."""
    cond, uncond = ctx
    t_in = torch.full([2 * B], float(t))
    e_c, e_u = unet(torch.cat([x_in, x_in]), t_in, torch.cat([cond, uncond])).chunk(2)
    return e_u + CFG * (e_c - e_u)


def ours(unet, ctx, name, x, sigmas, **kw):
    model = CFGDenoiser(lambda x_in, t, cond: unet(x_in, t, cond), AC)
    cond, uncond = ctx
    args = dict(cond=cond, uncond=uncond, cond_scale=CFG)
    return SAMPLERS[name].fn(model, x, sigmas, extra_args=args, disable=True, **kw)


# ---------------------------------------------------------------- schedule facts

def test_alphas_cumprod_values():
    assert AC.dtype == torch.float64 and AC.shape == (1000,)
    assert abs(AC[0].item() - 0.99915) < 1e-12           # 1 − β₀ exactly
    assert abs(AC[-1].item() - 0.0046601) < 5e-8
    ref = DDPMScheduler(**SD).alphas_cumprod                # diffusers builds betas in float32
    assert torch.allclose(AC.float(), ref, rtol=2e-6, atol=0)


def test_sigma_levels_and_default_sigmas():
    den = EpsDenoiser(lambda *a, **k: None, AC)
    assert abs(den.sigma_min - 0.029167) < 1e-6 and abs(den.sigma_max - 14.614641) < 1e-6
    s = schedule.get_sigmas(20, LOG_SIGMAS)
    assert s.shape == (21,) and s[-1] == 0
    assert torch.allclose(s[:3], torch.tensor([14.6146, 10.7468, 8.0815], dtype=torch.float64), atol=5e-5)
    assert abs(s[-2].item() - 0.0292) < 5e-5 and abs(s[-2].item() - den.sigma_min) < 1e-12
    # diffusers interpolates σ linearly in t, k-diffusion/A1111 log-linearly: between integer
    # levels they differ by ≈ (Δlog σ)²/8 relative, which is what the tolerance allows.
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="linspace", interpolation_type="linear")
    ref.set_timesteps(20)
    assert 0 < rel_err(s[:-1], ref.sigmas[:-1]) and (s[:-1] / ref.sigmas[:-1].double() - 1).abs().max() < 3e-5


def test_t_sigma_round_trip_fractional():
    t = torch.rand(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 999
    t = torch.cat([t, torch.tensor([0.0, 0.25, 1.5, 998.75, 999.0], dtype=torch.float64)])
    sig = schedule.t_to_sigma(t, LOG_SIGMAS)
    assert torch.allclose(schedule.sigma_to_t(sig, LOG_SIGMAS), t, atol=1e-9, rtol=0)
    # the levels themselves map to integer t; out-of-range σ clamps to [0, 999]
    lv = LOG_SIGMAS.exp()
    assert torch.allclose(schedule.sigma_to_t(lv, LOG_SIGMAS), torch.arange(1000, dtype=torch.float64), atol=1e-9)
    out = schedule.sigma_to_t(torch.tensor([1e-3, 100.0], dtype=torch.float64), LOG_SIGMAS)
    assert out.tolist() == [0.0, 999.0]
    # half-way in log σ between levels 10 and 11 is t = 10.5 (not the linear-σ midpoint)
    mid = ((LOG_SIGMAS[10] + LOG_SIGMAS[11]) / 2).exp()
    assert abs(schedule.sigma_to_t(mid, LOG_SIGMAS).item() - 10.5) < 1e-9


def test_sigma_to_t_and_karras_match_diffusers():
    # diffusers' Euler with Karras sigmas derives fractional timesteps by the same log-σ interpolation
    ref = EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    ref.set_timesteps(15)
    # diffusers' σ levels come from float32 ᾱ: its σ_min is ~1.3e-5 off the float64 value, so
    # build ours between the reference's own end points to compare the Karras formula itself.
    ref_levels = schedule.alphas_cumprod_to_sigmas(ref.alphas_cumprod.double())
    ours_s = schedule.get_sigmas_karras(15, ref_levels[0].item(), ref_levels[-1].item())
    assert ours_s[-1] == 0 and ours_s.shape == (16,)
    assert (ours_s[:-1] / ref.sigmas[:-1].double() - 1).abs().max() < 1e-6
    t = schedule.sigma_to_t(ref.sigmas[:-1].double(), LOG_SIGMAS)
    assert (t - ref.timesteps.double()).abs().max() < 2e-3   # diffusers' ᾱ is float32


def test_ddim_timesteps_and_sigmas():
    assert schedule.ddim_timesteps(20).tolist() == list(range(951, 0, -50))
    ts30 = schedule.ddim_timesteps(30)                     # stride 33: 31 steps, as original DDIM
    assert len(ts30) == 31 and ts30[0] == 991 and ts30[-1] == 1
    s = schedule.get_sigmas_ddim(20, AC)
    sig = schedule.alphas_cumprod_to_sigmas(AC)
    assert s.shape == (21,) and s[0] == sig[951] and s[-2] == sig[1] and s[-1] == sig[0]


def test_q_sample_matches_diffusers_add_noise():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    got = schedule.q_sample(x0, eps, t, AC)
    ref = DDPMScheduler(**SD).add_noise(x0, eps, t)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=2e-6, rtol=0)
    a = AC[t].view(-1, 1, 1, 1)
    exact = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    assert (got.double() - exact).abs().max() < 1e-6
    bf = schedule.q_sample(x0.bfloat16(), eps.bfloat16(), t, AC)
    assert bf.dtype == torch.bfloat16 and (bf.double() - exact).abs().max() < 0.05


# ---------------------------------------------------------------- denoiser and CFG

def test_eps_denoiser_formula():
    seen = {}

    def eps_fn(x_in, t, cond):
        seen.update(x_in=x_in, t=t)
        return torch.ones_like(x_in) * 0.5

    den = EpsDenoiser(eps_fn, AC)
    x = torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([14.614641229333639, 0.5])
    out = den(x, sigma, cond=None)
    c_in = (sigma ** 2 + 1).rsqrt().view(2, 1, 1, 1)
    assert torch.allclose(seen["x_in"], x * c_in)
    assert torch.allclose(seen["t"], schedule.sigma_to_t(sigma.double(), LOG_SIGMAS).float())
    assert abs(seen["t"][0].item() - 999) < 1e-3
    assert torch.allclose(out, x - sigma.view(2, 1, 1, 1) * 0.5)


def test_cfg_one_batch_and_c_concat():
    calls = []

    def eps_fn(x_in, t, cond):
        calls.append((x_in, t, cond))
        return x_in[:, :4] * 0.1 + cond.mean((1, 2)).view(-1, 1, 1, 1)

    cfg = CFGDenoiser(eps_fn, AC)
    x, cc = torch.randn(3, 4, 4, 4), torch.randn(3, 5, 4, 4)
    cond, uncond = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    sigma = torch.tensor(2.0)
    out = cfg(x, sigma, cond=cond, uncond=uncond, cond_scale=5.0, c_concat=cc)
    assert len(calls) == 1                                  # cond and uncond in ONE model call
    x_in, t, ctx = calls[0]
    assert x_in.shape == (6, 9, 4, 4) and t.shape == (6,) and torch.equal(ctx, torch.cat([cond, uncond]))
    c_in = 1 / 5 ** 0.5
    assert torch.allclose(x_in[:, :4], torch.cat([x, x]) * c_in)   # scaled latent first …
    assert torch.equal(x_in[:, 4:], torch.cat([cc, cc]))           # … then the unscaled c_concat
    d_c = x - 2.0 * eps_fn(torch.cat([x * c_in, cc], 1), None, cond)
    d_u = x - 2.0 * eps_fn(torch.cat([x * c_in, cc], 1), None, uncond)
    assert torch.allclose(out, d_u + 5.0 * (d_c - d_u), atol=1e-5)
    with pytest.raises(ValueError, match="pad"):
        cfg(x, sigma, cond=cond, uncond=uncond[:, :3], cond_scale=5.0)
    calls.clear()                                           # a whole run: one call per step
    sigmas = schedule.get_sigmas(5, LOG_SIGMAS).float()
    sample_euler(cfg, x * sigmas[0], sigmas, extra_args=dict(cond=cond, uncond=uncond, cond_scale=5.0,
                                                             c_concat=cc), disable=True)
    assert [c[0].shape[0] for c in calls] == [6] * 5


def test_cfg_scale_one_equals_cond_only(unet, ctx):
    cond, uncond = ctx
    fn = lambda x_in, t, cond: unet(x_in, t, cond)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 3
    sigma = torch.tensor([3.0, 0.7])
    with torch.no_grad():
        got = CFGDenoiser(fn, AC)(x, sigma, cond=cond, uncond=uncond, cond_scale=1.0)
        ref = EpsDenoiser(fn, AC)(x, sigma, cond=cond)
        other = EpsDenoiser(fn, AC)(x, sigma, cond=uncond)
    assert rel_err(got, ref) < 1e-5 and rel_err(other, ref) > 1e-2   # uncond really differs


# ---------------------------------------------------------------- samplers vs diffusers

@torch.no_grad()
def test_euler_matches_diffusers(unet, ctx, noise):
    ref = EulerDiscreteScheduler(**SD, timestep_spacing="linspace", interpolation_type="linear",
                                 use_karras_sigmas=False)
    ref.set_timesteps(12)                                   # 999/11 apart: fractional t
    x = noise * ref.sigmas[0]
    for t in ref.timesteps:                                 # diffusers' own (fractional) t
        x = ref.step(ref_eps(unet, ctx, ref.scale_model_input(x, t), t), t, x).prev_sample
    sigmas = make_sigmas("euler", 12, None, EpsDenoiser(None, AC))
    got = ours(unet, ctx, "euler", noise * sigmas[0], sigmas)
    assert rel_err(got, x) < 1e-4, rel_err(got, x)


@torch.no_grad()
def test_euler_ancestral_matches_diffusers(unet, ctx, noise):
    steps, seed = 12, 6                                     # fractional t, as above
    ref = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = noise * ref.sigmas[0]
    for t in ref.timesteps:                                 # one randn(SHAPE) per step from g
        x = ref.step(ref_eps(unet, ctx, ref.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    g2 = torch.Generator().manual_seed(seed)                # the same sequence for our sampler
    drawn = []

    def noise_sampler(sigma, sigma_next):
        drawn.append(torch.randn(SHAPE, generator=g2))
        return drawn[-1]

    sigmas = make_sigmas("euler_a", steps, None, EpsDenoiser(None, AC))
    got = ours(unet, ctx, "euler_a", noise * sigmas[0], sigmas, noise_sampler=noise_sampler)
    assert len(drawn) == steps - 1                          # no noise on the step to σ = 0
    assert rel_err(got, x) < 1e-4, rel_err(got, x)
    plain = ours(unet, ctx, "euler", noise * sigmas[0], sigmas)
    assert rel_err(plain, x) > 1e-2                         # the noise path is really exercised


@torch.no_grad()
def test_ddim_matches_diffusers(unet, ctx, noise):
    ref = DDIMScheduler(**SD, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                        clip_sample=False)
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == schedule.ddim_timesteps(10).tolist()
    x = noise.clone()                                       # x_T = randn in the DDPM view
    for t in ref.timesteps:                                 # integer t = our t(σ) at DDIM levels
        x = ref.step(ref_eps(unet, ctx, x, t), t, x, eta=0.0).prev_sample
    sigmas = make_sigmas("ddim", 10, None, EpsDenoiser(None, AC))
    got = ours(unet, ctx, "ddim", noise * start_sigma("ddim", sigmas), sigmas)
    assert rel_err(got, x) < 1e-4, rel_err(got, x)


@torch.no_grad()
def test_dpmpp_2m_karras_matches_diffusers(unet, ctx, noise):
    steps = 10
    ref = DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                      use_karras_sigmas=True, final_sigmas_type="zero", lower_order_final=True)
    ref.set_timesteps(steps)
    # diffusers works in the DDPM view (x_t = x·c_in) from unit noise; A1111 starts at randn·σ₀
    # in the k-diffusion view, so give diffusers that same start point.
    s0 = ref.sigmas[0]
    x = noise * s0 / (1 + s0 ** 2).sqrt()
    for i, t in enumerate(ref.timesteps):
        # diffusers would hand the UNet round(t(σ)); A1111 hands it the fractional t(σ). Feed the
        # reference's UNet the fractional t of the σ its solver is at (t(σ) vs diffusers: above).
        t_frac = schedule.sigma_to_t(ref.sigmas[i].double(), LOG_SIGMAS).item()
        x = ref.step(ref_eps(unet, ctx, x, t_frac), t, x).prev_sample
    sigmas = make_sigmas("dpmpp_2m", steps, None, EpsDenoiser(None, AC))   # default: Karras
    got = ours(unet, ctx, "dpmpp_2m", noise * sigmas[0], sigmas)
    assert rel_err(got, x) < 1e-4, rel_err(got, x)
    first_order = ours(unet, ctx, "euler", noise * sigmas[0], sigmas)
    assert rel_err(first_order, x) > 1e-3                   # the 2nd-order correction matters


# ---------------------------------------------------------------- registry and callback

def test_registry_and_make_sigmas():
    den = EpsDenoiser(None, AC)
    assert {k: v.label for k, v in SAMPLERS.items()} == {
        "euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}
    assert SAMPLERS["dpmpp_2m"].fn is sample_dpmpp_2m and SAMPLERS["ddim"].fn is sample_ddim
    auto = make_sigmas("euler_a", 20, None, den)
    assert auto.dtype == torch.float32 and torch.allclose(auto, schedule.get_sigmas(20, LOG_SIGMAS).float())
    karras = schedule.get_sigmas_karras(20, den.sigma_min, den.sigma_max).float()
    assert torch.equal(make_sigmas("dpmpp_2m", 20, None, den), karras)
    assert torch.equal(make_sigmas("euler", 20, True, den), karras)
    assert torch.equal(make_sigmas("dpmpp_2m", 20, False, den), auto)
    assert [schedule_label(n, k) for n, k in [("euler_a", None), ("dpmpp_2m", None), ("euler", True),
                                              ("dpmpp_2m", False), ("ddim", None)]] == \
        ["Automatic", "Karras", "Karras", "Uniform", "Automatic"]
    with pytest.raises(ValueError):
        make_sigmas("ddim", 20, True, den)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sigmas("lms", 20, None, den)
    assert start_sigma("euler", auto) == auto[0]
    assert abs(start_sigma("ddim", make_sigmas("ddim", 20, None, den)).item()
               - (1 / AC[951]).sqrt().item()) < 1e-5


@pytest.mark.parametrize("fn", [sample_euler, sample_euler_ancestral, sample_dpmpp_2m, sample_ddim])
def test_callback_and_exact_denoiser(fn):
    # A perfect denoiser (always returns x0) must land on x0 from any start; the callback sees
    # each step once with k-diffusion's keys.
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    model = lambda x, sigma: x0.clone()
    sigmas = schedule.get_sigmas(6, LOG_SIGMAS).float()
    seen = []
    out = fn(model, x0 + torch.randn_like(x0) * sigmas[0], sigmas, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"} and seen[0]["sigma"] == sigmas[0]
    assert torch.allclose(out, x0, atol=1e-6)
