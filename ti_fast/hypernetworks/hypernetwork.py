"""The in-memory hypernetwork: a (k, v) module pair per width, its metadata, and its A1111 file dict.

`Hypernetwork` is an nn.Module so that train()/eval() switch dropout, parameters() are the fp32
master weights an optimizer steps, and state_dict() round-trips for resume. It is never put
inside the UNet: `attach` points the UNet's attention hooks at it.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from ..fsutil import atomic_write_bytes
from .module import HypernetworkModule, Structure

# Seeds of the recompute-safe dropout stay below 2**31 (see module.hash_uniform).
_SEED_MASK = 0x7FFFFFFF


class Hypernetwork(nn.Module):
    """Modules for each context width (A1111 `layers`), in file order, plus the file's metadata.

    name: stored name (A1111 uses it for nothing but display; the prompt tag uses the file stem).
    step: completed training steps. sd_checkpoint / sd_checkpoint_name: 10-hex A1111 hash and
    stem of the model it was trained on. optional_info: A1111's free-text field (None if empty).
    path: the file it was read from / last saved to.
    """

    def __init__(self, name: str, widths, structure: Structure, *, step: int = 0,
                 sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None,
                 optional_info: str | None = None, path=None):
        super().__init__()
        self.name = name
        self.structure = structure
        self.step = step
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.optional_info = optional_info
        self.path = Path(path) if path is not None else None
        # width -> [module for k, module for v]; ModuleDict keys must be str
        self.layers = nn.ModuleDict({str(int(w)): nn.ModuleList([HypernetworkModule(int(w), structure),
                                                                  HypernetworkModule(int(w), structure)])
                                     for w in widths})
        # Dropout masks are a hash of this seed (advance it once per micro-batch in training);
        # a buffer, so it moves with .to(device) and is part of state_dict() for resume.
        self.register_buffer("dropout_seed", torch.zeros(1, dtype=torch.int64))
        self.eval()

    def __repr__(self) -> str:
        s = self.structure
        return (f"Hypernetwork(name={self.name!r}, widths={self.widths}, layer_structure={list(s.layer_structure)}, "
                f"activation={s.activation!r}, step={self.step}, path={str(self.path) if self.path else None!r})")

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.layers]

    def pair(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The (k, v) modules for a context width, or None when this hypernetwork has none."""
        mods = self.layers[str(width)] if str(width) in self.layers else None
        return (mods[0], mods[1]) if mods is not None else None

    def master_parameters(self) -> list[nn.Parameter]:
        """The fp32 weights to optimise, in file order (width, k then v, Sequential order)."""
        return list(self.parameters())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- dropout seed
    @torch.no_grad()
    def seed_dropout(self, seed: int) -> None:
        """Set the dropout seed (in place: a captured CUDA graph keeps reading the same tensor)."""
        self.dropout_seed.fill_(int(seed) & _SEED_MASK)

    @torch.no_grad()
    def advance_dropout(self) -> None:
        """Next dropout masks: seed += 1 on the seed's device, no host sync (graph-capturable)."""
        self.dropout_seed.add_(1).bitwise_and_(_SEED_MASK)

    # ---------------------------------------------------------------- rollback / resume
    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of every weight and the dropout seed, on their devices (NaN rollback, resume)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    @torch.no_grad()
    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        """Copy a snapshot back in place: parameters keep their identity (optimizer, graphs)."""
        current = self.state_dict()
        missing = [k for k in current if k not in snap]
        if missing or len(snap) != len(current):
            raise ValueError(f"snapshot does not match this hypernetwork (first missing: {missing[:1]})")
        for k, t in current.items():
            t.copy_(snap[k])

    # ---------------------------------------------------------------- the A1111 file
    def to_file_dict(self) -> dict:
        """The dict A1111's Hypernetwork.save writes, every key present, in its order: width ->
        (k state dict, v state dict) as OrderedDicts of CPU fp32 tensors, then the metadata.
        Only builtins, OrderedDict and tensors: it loads with torch.load(weights_only=True)."""
        s = self.structure
        out: dict = {}
        for w in self.widths:
            mk, mv = self.pair(w)
            out[w] = tuple(OrderedDict((k, v.detach().to("cpu", torch.float32).contiguous().clone())
                                       for k, v in m.state_dict().items()) for m in (mk, mv))
        out.update({
            "step": int(self.step or 0),
            "name": str(self.name),
            "layer_structure": [float(x) for x in s.layer_structure],
            "activation_func": str(s.activation),
            "is_layer_norm": bool(s.layer_norm),
            "weight_initialization": str(s.weight_init),
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "activate_output": bool(s.activate_output),
            "use_dropout": bool(s.use_dropout),
            "dropout_structure": [float(p) for p in s.dropout_structure],
            "last_layer_dropout": bool(s.last_layer_dropout),
            "optional_info": self.optional_info or None,
        })
        return out

    def save(self, path, *, step: int | None = None, name: str | None = None, sd_checkpoint: str | None = None,
             sd_checkpoint_name: str | None = None) -> Path:
        """Write the A1111 .pt atomically (the previous file survives any failure). Arguments
        that are not None update the metadata first; `path` becomes self.path."""
        if step is not None:
            self.step = int(step)
        if name is not None:
            self.name = name
        if sd_checkpoint is not None:
            self.sd_checkpoint = sd_checkpoint
        if sd_checkpoint_name is not None:
            self.sd_checkpoint_name = sd_checkpoint_name
        path = Path(path)
        buf = io.BytesIO()                  # serialised in memory, then one atomic write: a full
        torch.save(self.to_file_dict(), buf)  # disk is an OSError naming the file (DiskFullError)
        atomic_write_bytes(path, buf.getvalue())
        self.path = path
        return path

    def describe(self) -> dict:
        """What `ti-fast inspect` shows (see format.describe)."""
        s = self.structure
        return {
            "kind": "hypernetwork", "name": self.name, "step": self.step, "widths": self.widths,
            "layer_structure": [float(x) for x in s.layer_structure], "activation": s.activation,
            "layer_norm": s.layer_norm, "dropout_structure": [float(p) for p in s.dropout_structure],
            "use_dropout": s.use_dropout, "last_layer_dropout": s.last_layer_dropout,
            "activate_output": s.activate_output, "weight_initialization": s.weight_init,
            "parameters": self.num_parameters(), "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name, "optional_info": self.optional_info,
            "path": str(self.path) if self.path else None,
        }
