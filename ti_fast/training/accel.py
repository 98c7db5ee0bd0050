"""--compile and --channels-last (two opt-in ways to run the same UNet arithmetic faster) and
prepare_unet, where the trainer applies them and --offload (ti_fast.training.offload).

compile_unet: torch.compile with the default mode, fullgraph=False (a graph break falls back to
eager instead of failing) and dynamic=False (each latent size gets its own static graph; with
--buckets that is one compilation per bucket). Inductor fuses the UNet's memory-bound
elementwise chains; performance.md measured 56.5 vs 87.3 ms/step at batch 1 on an H200, but
242 s of compilation, a large share of a 5-15 minute run: hence opt-in, and the trainer reports
the first step's time as compile_s.

ChannelsLast: conv weights [Cout, Cin, kh, kw] stored NHWC and the UNet's input x [B, C, h, w]
converted once at the UNet's entry by a forward pre-hook; every conv, GroupNorm (the Triton
kernel reads NHWC natively; PyTorch's handles it) and interpolate then keeps NHWC, and
SpatialTransformer's [B, C, h, w] -> [B, hw, C] token reshape becomes a free view. cuDNN's NHWC
convs are its fast path on tensor cores. performance.md (diffusers' UNet, H200): with the step
in a CUDA graph it helped at batch 1 (21.3 -> 17.7 ms) and hurt at batch 8 (63.0 -> 67.6 ms).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def prepare_unet(unet: nn.Module, device, *, channels_last: bool = False, offload: bool = False,
                 compile: bool = False, say=print) -> nn.Module:
    """The trainer's opt-in UNet preparations, in the one order that works: NHWC first (the
    offloader's pinned copies keep the strides), then offload, then compile (it wraps the
    result; TrainConfig refuses compile with offload). Returns the module the step calls."""
    if channels_last:
        ChannelsLast(unet).attach()
    if offload:
        from .offload import Offloader
        off = Offloader(unet, device, prefetch=1).attach()
        say(f"ti-fast: --offload: {len(off.blocks)} UNet blocks ({off.streamed_bytes() / 1e9:.2f} GB) stream from "
            "pinned CPU memory, one prefetched; every block is recomputed in backward")
    return compile_unet(unet) if compile else unet


def compile_unet(unet: nn.Module) -> nn.Module:
    """The compiled UNet (an OptimizedModule sharing `unet`'s parameters; attribute access such
    as .dtype and .config reaches the original). Compilation happens at the first call."""
    return torch.compile(unet, fullgraph=False, dynamic=False)


class ChannelsLast:
    """attach(): 4-D parameters (the conv weights) to torch.channels_last and a forward pre-hook
    that converts the input x [B, C, h, w]; detach(): contiguous weights, hook removed."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.handle = None

    def attach(self) -> "ChannelsLast":
        if self.handle is not None:
            raise RuntimeError("ChannelsLast already attached")
        self.unet.to(memory_format=torch.channels_last)      # only 4-D tensors change layout
        self.handle = self.unet.register_forward_pre_hook(_nhwc_input, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self.handle is None:
            return
        self.handle.remove()
        self.handle = None
        self.unet.to(memory_format=torch.contiguous_format)


def _nhwc_input(module, args, kwargs):
    """UNet.forward(x, t, context): x, positional or by name, as channels_last."""
    if args:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
    if "x" in kwargs:
        return args, {**kwargs, "x": kwargs["x"].contiguous(memory_format=torch.channels_last)}
    return None
