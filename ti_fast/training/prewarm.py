"""Compile the run's Triton kernels on worker threads while the trainer prepares data.

The trainer calls `start(...)` once the models are loaded and `wait("vae")` before caching
latents, `wait("unet")` before the first step. Which kernel specialisations a run needs follows
from its shapes, so they are found by running the UNet (forward) and the VAE encoder on the
META device under ops.record_calls(): no memory, no arithmetic, ~0.3 s for SD1.5. Each distinct
call becomes one task of ti_fast.kernels.precompile (forward, plus the input-gradient backward
where the input requires grad, as in the real step where gradients flow back to the text
embedding). If anything here fails, the kernels simply compile at their first launch, as they
would without this: one printed line, never an error.

channels_last: meta convolutions return NCHW whatever their input, so the UNet's GroupNorm
inputs are taken to be NHWC when the run uses channels_last (on CUDA its convolutions return
NHWC for NHWC inputs); the VAE is not converted, so its calls are NCHW.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..models import ops

TEXT_TOKENS = 77


def unet_calls(unet, batch: int, latent_hw: tuple[int, int], dtype: torch.dtype) -> list[tuple]:
    """The fused-op calls of one UNet forward: x [batch, in_ch, h, w], a 77-token context that
    requires grad (the trainable embedding reaches every cross-attention)."""
    cfg = unet.config
    with torch.device("meta"):
        m = type(unet)(cfg).to(dtype).requires_grad_(False)
        x = torch.empty(batch, cfg.in_channels, *latent_hw, dtype=dtype)
        ctx = torch.empty(batch, TEXT_TOKENS, cfg.context_dim, dtype=dtype, requires_grad=True)
        with ops.record_calls() as calls:
            m(x, torch.zeros(batch), ctx)
    return calls


def vae_calls(vae, batch: int, image_hw: tuple[int, int]) -> list[tuple]:
    """The fused-op calls of one VAE encode of [batch, 3, H, W] images (no backward)."""
    with torch.device("meta"):
        m = type(vae)(vae.config).to(vae.dtype).requires_grad_(False)
        with ops.record_calls() as calls:
            m.encode(torch.empty(batch, 3, *image_hw, dtype=vae.dtype))
    return calls


def tasks_for(calls: list[tuple], channels_last: bool) -> list:
    """One precompile task per distinct call (kernels.group_norm_silu / geglu .precompile_task)."""
    from ti_fast.kernels import geglu, group_norm_silu
    tasks = []
    for c in dict.fromkeys(calls):
        if c[0] == "group_norm":
            _, shape, dtype, wdtype, groups, silu, grad = c
            tasks.append(group_norm_silu.precompile_task(shape, dtype, wdtype, groups, silu,
                                                         channels_last and len(shape) == 4, backward=grad))
        elif c[0] == "geglu":
            _, shape, dtype, grad = c
            tasks.append(geglu.precompile_task(shape, dtype, backward=grad))
    return tasks


class Prewarm:
    """Precompilation in the background: one thread traces the shapes (`plan()` -> {group name:
    tasks}), then the tasks of every group run on a pool of worker threads. wait(name) blocks
    until that group is compiled; a failure prints one line (then the kernels compile at first
    use, as without this) and is never raised."""

    def __init__(self, device: torch.device, plan, workers: int | None = None, say=print):
        if device.type == "cuda" and device.index is None:   # workers must not guess the device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.say, self.failed = device, say, False
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1),
                                       thread_name_prefix="ti-fast-precompile")
        self.t0 = time.perf_counter()
        self.planned = self.pool.submit(self._submit_all, plan)

    def _submit_all(self, plan) -> dict:
        from ti_fast.kernels.precompile import run_task
        return {name: [self.pool.submit(run_task, t, self.device) for t in tasks]
                for name, tasks in plan().items()}

    def _report(self, e: BaseException) -> None:
        if not self.failed:
            self.say(f"ti-fast: precompiling Triton kernels failed ({type(e).__name__}: {str(e)[:200]}); "
                     "they compile at first use")
        self.failed = True

    def wait(self, name: str) -> int:
        """Block until group `name` is done; the number of launches it compiled."""
        try:
            futures = self.planned.result().get(name, [])
        except Exception as e:
            self._report(e)
            return 0
        n = 0
        for f in futures:
            try:
                n += f.result()
            except Exception as e:   # an optimisation only: report once and carry on
                self._report(e)
        return n

    def close(self) -> None:
        """Wait for everything (the pool's threads must not outlive the run) and stop the pool."""
        try:
            for name in self.planned.result():
                self.wait(name)
        except Exception:
            pass
        self.pool.shutdown(wait=True)


def start(unet, vae, *, device: torch.device, batch: int, image_hw: tuple[int, int], dtype: torch.dtype,
          channels_last: bool, vae_batch: int = 4, say=print) -> Prewarm | None:
    """Begin compiling, in the background, the VAE encoder's kernels (group "vae") and the UNet
    step's (group "unet") for this run's main shape. None when there is nothing to compile
    (PyTorch ops, CPU, the Triton interpreter)."""
    if device.type != "cuda" or ops.kernels_of(unet) != "triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    down = vae.downscale
    latent_hw = (image_hw[0] // down, image_hw[1] // down)

    def plan():
        return {"vae": tasks_for(vae_calls(vae, vae_batch, image_hw), channels_last=False),
                "unet": tasks_for(unet_calls(unet, batch, latent_hw, dtype), channels_last=channels_last)}
    return Prewarm(device, plan, say=say)
