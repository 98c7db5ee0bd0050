"""--low-vram: gradient checkpointing placed where it saves the most memory per recomputed FLOP.

With frozen weights, backward needs only activations. Measured for SD1.5 at a 64x64 latent
(512 px), batch 1, fp32, fused (SDPA) attention, by scripts/activation_memory.py: the bytes each
block saves for backward (deduplicated by storage, weights excluded) and its forward FLOPs.
They total 1.37 GiB (0.69 GiB in bf16). Saved bytes scale with batch x latent area and the
element size; the ratio bytes/FLOP is what a recompute buys, so blocks are checkpointed in
descending ratio until the estimate fits the activation budget. The high-resolution
transformer blocks (input_blocks.1/2, output_blocks.9-11) come first: big GroupNorm/GEGLU maps
at 4096 tokens, cheap to recompute.
"""
from __future__ import annotations

# block: (MiB saved for backward, forward GFLOP) at SD1.5, 64x64 latent, batch 1, fp32
SD15_BLOCKS = {
    "input_blocks.1": (80.3, 32.0), "input_blocks.2": (150.5, 32.0), "input_blocks.3": (5.0, 1.9),
    "input_blocks.4": (71.7, 28.7), "input_blocks.5": (75.5, 32.0), "input_blocks.6": (2.5, 1.9),
    "input_blocks.7": (36.4, 28.8), "input_blocks.8": (38.3, 32.2), "input_blocks.9": (1.2, 1.9),
    "input_blocks.10": (1.9, 3.8), "input_blocks.11": (1.9, 3.8), "middle_block": (12.0, 12.1),
    "output_blocks.0": (2.8, 6.1), "output_blocks.1": (2.8, 6.1), "output_blocks.2": (4.1, 13.6),
    "output_blocks.3": (42.0, 41.4), "output_blocks.4": (42.0, 41.4), "output_blocks.5": (45.1, 67.4),
    "output_blocks.6": (90.5, 49.6), "output_blocks.7": (83.0, 41.3), "output_blocks.8": (89.2, 67.3),
    "output_blocks.9": (180.5, 49.6), "output_blocks.10": (165.5, 41.2), "output_blocks.11": (165.5, 41.2),
}
SD15_OTHER_MIB = 15.0            # outside the blocks (conv_in, out, time embedding)
# Activations beside 1.6 GiB UNet + 0.23 GiB text encoder in < 2.3 GiB. Measured on an H200
# (512 px, batch 1, bf16, NHWC): the first guess, 0.45 (estimate 0.363 GiB, 4 blocks),
# peaked at 2.307 GiB run eagerly; 0.30 (estimate 0.286, 7 blocks) with the step in a CUDA graph
# peaked at 2.317 GiB — the estimate leaves out ~0.1 GiB (text-encoder activations, gradients,
# the step's transients) and the graph's pool adds some. 0.20 (estimate 0.165 GiB, 10 blocks:
# + input_blocks.5, output_blocks.6 and .7) trades ~120 GFLOP more recompute for ~120 MiB.
DEFAULT_BUDGET_GIB = 0.20


def lean_allocator() -> bool:
    """Expandable segments for PyTorch's CUDA caching allocator (--low-vram, --offload): a freed
    block can be reused by any later size instead of staying carved into fixed segments, so a
    4-6 GB card loses little to fragmentation. Process-wide, and harmless to call twice; returns
    whether it took effect (False on the CPU or a torch without the setting)."""
    import torch
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        return True
    except (AttributeError, RuntimeError):
        return False


def _is_sd15(cfg) -> bool:
    return (cfg.model_channels, tuple(cfg.channel_mult), cfg.num_res_blocks) == (320, (1, 2, 4, 4), 2)


def activation_estimate_gib(blocks_checkpointed, batch: int = 1, latent_hw=(64, 64), elem_bytes: int = 2) -> float:
    """Estimated bytes saved for backward with these blocks checkpointed (SD1.5 only).
    A checkpointed block still keeps its input; that is small next to what it saves (ignored)."""
    scale = batch * latent_hw[0] * latent_hw[1] / 4096 * elem_bytes / 4
    mib = SD15_OTHER_MIB + sum(m for n, (m, _) in SD15_BLOCKS.items() if n not in blocks_checkpointed)
    return mib * scale / 1024


def checkpoint_blocks(unet, budget_gib: float = DEFAULT_BUDGET_GIB, batch: int = 1, latent_hw=(64, 64),
                      elem_bytes: int = 2) -> list[str]:
    """Blocks to checkpoint so the activations fit `budget_gib`, best memory-per-FLOP first.
    Other architectures (tiny test models): every block at the two highest resolutions."""
    if not _is_sd15(unet.config):
        return _high_resolution_blocks(unet.config, levels=2)
    order = sorted(SD15_BLOCKS, key=lambda n: SD15_BLOCKS[n][0] / SD15_BLOCKS[n][1], reverse=True)
    chosen: list[str] = []
    for name in order:
        if activation_estimate_gib(chosen, batch, latent_hw, elem_bytes) <= budget_gib:
            break
        chosen.append(name)
    return sorted(chosen, key=_block_order)


def _block_order(name: str):
    part, _, idx = name.partition(".")
    return ({"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[part], int(idx or 0))


def _high_resolution_blocks(cfg, levels: int) -> list[str]:
    nres, nlev = cfg.num_res_blocks, len(cfg.channel_mult)
    names, i = [], 1
    for lvl in range(nlev):            # input_blocks: nres blocks per level, then a downsampler
        for _ in range(nres):
            if lvl < levels:
                names.append(f"input_blocks.{i}")
            i += 1
        i += lvl != nlev - 1
    for j in range(nlev * (nres + 1)):  # output_blocks: deepest level first, nres + 1 per level
        if nlev - 1 - j // (nres + 1) < levels:
            names.append(f"output_blocks.{j}")
    return names
