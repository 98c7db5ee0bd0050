"""Diffusion below training and generation: the SD 1.x noise schedule, samplers as pure functions,
the denoiser wrappers, sampling images (CFG, per-image seeds, VAE decode) and inpainting
conditioning. ti_fast.training (previews, the step's schedule) and ti_fast.sample (txt2img) both
build on it and never on each other."""
