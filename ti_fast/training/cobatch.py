"""The micro-batch, and co-batching: the micro-batches of several runs concatenated into the
sub-batches of ONE forward and backward (ti_fast.training.step.GroupStep).

Runs whose micro-batches have the same shape (latent [C, h, w] and dtype, --latents random or
not, inpainting conditioning or not) share a sub-batch; others go in separate sub-batches of the
same step (a 64 px run and a 512 px run, or a bucketed run's other aspect, never pad each other).
Inside a sub-batch each run's `vector_index` is shifted by the number of vectors of the runs
before it, so that one text-encoder call reads every run's vectors from their concatenation
[sum N_k, 768]. Optional per-row fields one run lacks (alpha loss weight, prompt emphasis) are
filled with ones, which is what their absence means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class MicroBatch:
    latents: torch.Tensor                 # [B, 4, h, w] scaled latents (or the posterior mean)
    input_ids: torch.Tensor               # [B, 77] long
    vector_index: torch.Tensor            # [B, 77] long, -1 = token table
    latent_std: torch.Tensor | None = None  # [B, 4, h, w]: re-sample each step (--latents random)
    weight: torch.Tensor | None = None    # [B, 1, h, w] per-pixel loss weight (alpha)
    c_concat: torch.Tensor | None = None  # [B, 5, h, w] inpainting conditioning (mask + grey latent)
    token_weight: torch.Tensor | None = None  # [B, 77] prompt emphasis, "(word:1.2)" (None: all 1)


@dataclass
class SubBatch:
    mb: MicroBatch                       # the concatenation of the parts
    parts: list[int]                     # index (into the caller's list) of each part, in order
    rows: list[tuple[int, int]]          # [start, end) rows of each part in mb


def shape_key(mb: MicroBatch) -> tuple:
    """What must match for two micro-batches to share a forward."""
    return (tuple(mb.latents.shape[1:]), mb.latents.dtype, mb.latent_std is not None, mb.c_concat is not None)


def _offset_index(vi: torch.Tensor, offset: int) -> torch.Tensor:
    """vector_index [B, 77] (-1 = token table) shifted by `offset` vectors."""
    return vi if offset == 0 else torch.where(vi >= 0, vi + offset, vi)


def _cat_optional(mbs: list[MicroBatch], field: str, fill_shape) -> torch.Tensor | None:
    """Concatenate an optional per-row field; rows of parts without it get ones."""
    vals = [getattr(mb, field) for mb in mbs]
    if all(v is None for v in vals):
        return None
    ref = next(v for v in vals if v is not None)
    return torch.cat([v if v is not None else torch.ones((mb.latents.shape[0], *fill_shape(mb)), dtype=ref.dtype,
                                                          device=ref.device)
                      for v, mb in zip(vals, mbs)])


def concat(mbs: list[MicroBatch], offsets: list[int]) -> MicroBatch:
    """One MicroBatch of all rows of `mbs` (same shape_key); offsets[i]: vector shift of part i."""
    def cat(field):
        vals = [getattr(mb, field) for mb in mbs]
        return None if vals[0] is None else torch.cat([v.contiguous() for v in vals])
    return MicroBatch(latents=cat("latents"), input_ids=cat("input_ids"),
                      vector_index=torch.cat([_offset_index(mb.vector_index, o) for mb, o in zip(mbs, offsets)]),
                      latent_std=cat("latent_std"), c_concat=cat("c_concat"),
                      weight=_cat_optional(mbs, "weight", lambda mb: (1, *mb.latents.shape[2:])),
                      token_weight=_cat_optional(mbs, "token_weight", lambda mb: tuple(mb.input_ids.shape[1:])))


def sub_batches(parts: list[MicroBatch], offsets: list[int]) -> list[SubBatch]:
    """Group `parts` (one micro-batch per run, offsets[i] its vector shift) into sub-batches of
    equal shape, first-seen order. A lone part is passed through untouched (no copies)."""
    groups: dict[tuple, list[int]] = {}
    for i, mb in enumerate(parts):
        groups.setdefault(shape_key(mb), []).append(i)
    out = []
    for idxs in groups.values():
        mbs = [parts[i] for i in idxs]
        mb = mbs[0] if len(mbs) == 1 and offsets[idxs[0]] == 0 else concat(mbs, [offsets[i] for i in idxs])
        rows, start = [], 0
        for m in mbs:
            rows.append((start, start + m.latents.shape[0]))
            start += m.latents.shape[0]
        out.append(SubBatch(mb=mb, parts=idxs, rows=rows))
    return out
