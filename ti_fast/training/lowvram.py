"""--low-vram: where to put gradient checkpointing.

With frozen weights, backward needs only activations, and most of them live in the blocks at
the two highest resolutions (64x64 and 32x32 latents at 512 px): their GroupNorm/SiLU/conv
chains and the GEGLU feed-forward over 4096 tokens. Their FLOPs per saved byte are the lowest
in the network (memory-bound ops on large maps), so recomputing them buys the most memory per
recomputed FLOP. The deep blocks (16x16, 8x8, the middle block) hold little and stay as they are.
"""
from __future__ import annotations


def checkpoint_blocks(unet, levels: int = 2) -> list[str]:
    """Names of the UNet blocks at the `levels` highest resolutions, for set_gradient_checkpointing."""
    cfg = unet.config
    nres = cfg.num_res_blocks
    names = []
    # input_blocks: 0 = conv_in; then per level nres blocks and (except the last level) a downsampler
    i = 1
    for lvl in range(len(cfg.channel_mult)):
        for _ in range(nres):
            if lvl < levels:
                names.append(f"input_blocks.{i}")
            i += 1
        if lvl != len(cfg.channel_mult) - 1:
            i += 1
    # output_blocks run deepest level first, nres + 1 blocks per level
    nlev = len(cfg.channel_mult)
    for j in range(nlev * (nres + 1)):
        lvl = nlev - 1 - j // (nres + 1)
        if lvl < levels:
            names.append(f"output_blocks.{j}")
    return names
