"""Measure what each SD1.5 UNet block saves for backward (frozen weights, context requires grad)
and its forward FLOPs, at a 64x64 latent, batch 1, fp32, on the CPU (~20 s, ~7 GB): the table in
ti_fast/training/lowvram.py. Saved tensors are deduplicated by storage; weights are excluded."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ti_fast.models import UNet, UNetConfig


def measure(hw: int = 64) -> dict[str, tuple[float, float]]:
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    unet = unet.to_empty(device="cpu").requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    blocks = {f"input_blocks.{i}": b for i, b in enumerate(unet.input_blocks)}
    blocks["middle_block"] = unet.middle_block
    blocks.update({f"output_blocks.{i}": b for i, b in enumerate(unet.output_blocks)})
    current, saved = ["other"], {}
    seen = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            saved[current[0]] = saved.get(current[0], 0) + st.nbytes()
        return t

    for name, blk in blocks.items():
        blk.register_forward_pre_hook(lambda m, a, name=name: current.__setitem__(0, name))
        blk.register_forward_hook(lambda m, a, o: current.__setitem__(0, "other"))
    x, t = torch.randn(1, 4, hw, hw), torch.tensor([500])
    ctx = torch.randn(1, 77, 768, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as fc:
        unet(x, t, ctx)
    flops = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    return {n: (saved.get(n, 0) / 2**20, flops.get(f"UNet.{n}", 0) / 1e9) for n in [*blocks, "other"]}


if __name__ == "__main__":
    for name, (mib, gflop) in measure().items():
        print(f"{name:18s} {mib:8.1f} MiB {gflop:7.1f} GFLOP")
