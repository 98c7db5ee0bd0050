"""Compile the Triton kernels a run will need before it needs them, on worker threads.

Why: on a machine whose Triton cache is empty, the first training step of SD1.5 stops to
JIT-compile ~40 kernel specialisations (GroupNorm+SiLU and GEGLU, forward and backward, one
per distinct shape class) and to build a C launcher per signature: ~15 s on an H200 host,
one after the other, on the critical path (bench: first launch 26.8 s, later launches 11.5 s).
Compiling them on threads while the trainer loads data and caches latents takes them off it:
Triton's MLIR/LLVM passes, ptxas and the launcher's C compiler release the GIL for most of
their time, so threads overlap one another and the main thread.

How: every kernel launch in this package goes through `launch(kernel, grid, *args)`. Inside
`compile_only()` it becomes `kernel.warmup(...)`: Triton binds the arguments, specialises
(dtypes, 16-byte alignment and divisibility of the integer arguments), compiles or loads from
its disk cache, and launches nothing. The launchers are then called with META tensors of the
real shapes (no memory: a meta tensor's data_ptr is 0 plus its view offset, so alignment
specialises exactly as a CUDA allocation, which is 512-byte aligned, would). Finally each
compiled kernel is loaded onto the device (`_init_handles`: module load + C launcher build),
which the first real launch would otherwise do. The real launches then find everything in
Triton's in-memory cache. A specialisation missed here is simply compiled at its first launch,
as without precompilation: this is an optimisation, never needed for correctness.
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), or only its compilation inside compile_only()."""
    compiled = getattr(_local, "compiled", None)
    if compiled is None:
        return kernel[grid](*args, **kwargs)
    compiled.append(kernel.warmup(*args, grid=grid, **kwargs))
    return None


def config_device(x: torch.Tensor) -> torch.device:
    """The device whose properties (SM count) size a launch for x: x's own, or for a meta
    tensor inside compile_only(), the device being compiled for."""
    if x.device.type == "meta" and getattr(_local, "device", None) is not None:
        return _local.device
    return x.device


class compile_only:
    """Context manager: launches on this thread only compile (for `device`: meta tensors are
    sized as if they lived there); `.kernels` lists what the launches gave."""

    def __init__(self, device: torch.device | None = None):
        self.device = device

    def __enter__(self):
        self.kernels = []
        _local.compiled, _local.device = self.kernels, self.device
        return self

    def __exit__(self, *exc):
        _local.compiled = _local.device = None
        return False


def run_task(task, device: torch.device) -> int:
    """Run one precompile task (a callable making launcher calls on meta tensors) on this
    thread, compiling for `device` and loading what it compiled there; returns the number of
    launches compiled. Meant for worker threads (ti_fast.training.prewarm)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)     # the primary context current on this thread
    with compile_only(device) as c:
        task()
    for k in c.kernels:
        k = k.result() if hasattr(k, "result") else k
        if k is not None and device.type == "cuda":
            k._init_handles()                # module load + launcher build, off the first launch
    return len(c.kernels)
