"""Where hypernetworks act: the k/v inputs of every attention in the UNet's transformer blocks.

`attach(unet, [(hypernetwork, strength), ...])` sets `kv_hook` on each of the UNet's
CrossAttention modules whose context width some attached hypernetwork has (self-attention at the
block widths, cross-attention at the text width); `detach(unet)` clears them. The text encoder
and the VAE have their own attention classes and are never touched. Per attention, in order:

    ctx_k, ctx_v = ctx, ctx
    for each hypernetwork (strength s != 0) with a module pair at this width:
        ctx_k = H_k(ctx_k.float(), s).to(dtype);  ctx_v = H_v(ctx_v.float(), s).to(dtype)

as A1111's apply_hypernetworks (fp32 compute, cast back to the UNet's dtype after each one).
The hook holds only Python floats and module references chosen at attach time: no host sync, no
branching on tensor values, so it runs unchanged under gradient checkpointing (dropout masks are
a hash of the hypernetwork's seed tensor: a recomputed block redraws the same mask), in
channels_last models (it sees [B, N, C] tokens) and inside a captured CUDA graph.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.unet import CrossAttention
from .hypernetwork import Hypernetwork


class KVHook:
    """ctx [B, T, C] -> (ctx_k, ctx_v) for one attention; a plain object (not an nn.Module), so
    the hypernetworks never become part of the UNet's parameters or state_dict."""

    def __init__(self, steps: list, salt: int):
        # steps: [(hypernetwork, module_k, module_v, strength)] in application order
        self.steps = steps
        self.salt = salt            # this attention's index: distinct dropout masks per call site

    def __call__(self, ctx: torch.Tensor):
        dtype = ctx.dtype
        k = v = ctx
        with torch.autocast(ctx.device.type, enabled=False):   # fp32 even inside an autocast region
            for hn, mk, mv, s in self.steps:
                k = mk(k.float(), s, hn.dropout_seed, 2 * self.salt).to(dtype)
                v = mv(v.float(), s, hn.dropout_seed, 2 * self.salt + 1).to(dtype)
        return k, v

    def __repr__(self) -> str:
        return f"KVHook({', '.join(f'{hn.name}@{s:g}' for hn, _, _, s in self.steps)})"


def attentions(unet) -> list[tuple[str, CrossAttention]]:
    """(name, module) of every attention in the UNet's transformer blocks, in module order."""
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, CrossAttention)]


def context_width(attn: CrossAttention) -> int:
    """The width of what to_k / to_v read: the block width (attn1) or the text width (attn2)."""
    return int(attn.to_k.in_features)


def unet_widths(unet) -> list[int]:
    """[text width] + block widths ascending: what a hypernetwork can act on in this UNet."""
    attn2 = sorted({context_width(m) for n, m in attentions(unet) if n.endswith("attn2")})
    attn1 = sorted({context_width(m) for n, m in attentions(unet) if not n.endswith("attn2")})
    return list(dict.fromkeys(attn2 + attn1))


def attach(unet, hypernetworks) -> list[str]:
    """Hook `hypernetworks` — [(Hypernetwork, strength)] or bare Hypernetworks (strength 1) —
    into `unet`, replacing any earlier attachment; returns the names of the hooked attentions.

    Entries with strength 0 are left out entirely (so strength 0 is bitwise the UNet alone).
    Each hypernetwork is moved to the UNet's device and kept in fp32 (its master weights);
    its own train()/eval() mode decides whether dropout is on."""
    pairs = [(h, 1.0) if isinstance(h, Hypernetwork) else (h[0], float(h[1])) for h in hypernetworks]
    for hn, _ in pairs:
        if not isinstance(hn, Hypernetwork):
            raise TypeError(f"attach: expected Hypernetwork objects, got {type(hn).__name__}")
    detach(unet)
    device = unet.out[2].weight.device
    active = [(hn.to(device=device), s) for hn, s in pairs if s != 0.0]
    hooked = []
    for salt, (name, attn) in enumerate(attentions(unet)):
        w = context_width(attn)
        steps = [(hn, *hn.pair(w), s) for hn, s in active if hn.pair(w) is not None]
        if steps:
            attn.kv_hook = KVHook(steps, salt)
            hooked.append(name)
    return hooked


def detach(unet) -> None:
    """Remove every hypernetwork hook from `unet` (the plain UNet again)."""
    for _, attn in attentions(unet):
        attn.kv_hook = None


@contextmanager
def attached(unet, hypernetworks, train: bool | None = None):
    """`with attached(unet, [(hn, 0.8)], train=False):` ... — detached again on exit, also on
    errors. train: None keeps each hypernetwork's mode; True/False sets it for the block and
    puts the previous modes back afterwards."""
    hns = [h if isinstance(h, Hypernetwork) else h[0] for h in hypernetworks]
    modes = [hn.training for hn in hns]
    try:
        if train is not None:
            for hn in hns:
                hn.train(train)
        yield attach(unet, hypernetworks)
    finally:
        detach(unet)
        for hn, mode in zip(hns, modes):
            hn.train(mode)
