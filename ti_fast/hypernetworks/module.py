"""A1111's hypernetwork MLP: structure rules, activations, initialisation, recompute-safe dropout.

After AUTOMATIC1111 v1.10.1 modules/hypernetworks/hypernetwork.py (HypernetworkModule) and
shared/spec/a1111-compat.md "Hypernetworks". One module maps a context c [..., dim] to

    H(c) = c + MLP(c) * strength

where MLP is the nn.Sequential `linear`. For each consecutive pair (a, b) of layer_structure:
Linear(dim*a -> dim*b); an activation unless it is "linear" or this is the last pair without
activate_output; LayerNorm(dim*b) when layer_norm; Dropout(p) when dropout_structure[pair+1] > 0.
Activation and dropout modules take a Sequential index too, so the state-dict keys
`linear.<i>.weight/bias` skip them (A1111 and ComfyUI rely on that numbering).

Dropout here is not nn.Dropout: its mask is a hash of (seed tensor, call-site salt, element
index), so a block recomputed by gradient checkpointing draws the same mask as its forward,
and a CUDA graph replays a fresh mask whenever the seed tensor is advanced in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .names import INITS  # noqa: F401  (re-exported)

# Loaded by both A1111 and ComfyUI; what create offers. "swish" is Hardswish in both (not SiLU).
ACTIVATIONS = {
    "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish,
}
# A1111 also builds any torch.nn activation by its lower-case class name; these are the ones
# without parameters, arguments or randomness. Read, never created; ComfyUI refuses them.
A1111_ONLY_ACTIVATIONS = {
    "gelu": nn.GELU, "silu": nn.SiLU, "celu": nn.CELU, "selu": nn.SELU, "relu6": nn.ReLU6,
    "hardtanh": nn.Hardtanh, "hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish,
    "logsigmoid": nn.LogSigmoid, "softplus": nn.Softplus, "softshrink": nn.Softshrink,
    "hardshrink": nn.Hardshrink, "tanhshrink": nn.Tanhshrink,
}
DEFAULT_DROPOUT = 0.3       # A1111's p when a file has use_dropout but no dropout_structure
_M32 = 0xFFFFFFFF


def legacy_dropout_structure(n: int, use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """A1111's parse_dropout_structure for files without dropout_structure (n = len(layer_structure)):
    zeros without use_dropout, else [0] + [0.3]*(n-3) + [0.3 if last_layer_dropout else 0] + [0]."""
    if not use_dropout:
        return (0.0,) * n
    return (0.0,) + (DEFAULT_DROPOUT,) * (n - 3) + (DEFAULT_DROPOUT if last_layer_dropout else 0.0, 0.0)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Structure:
    """Everything that shapes a module besides its width (the file's metadata)."""
    layer_structure: tuple = (1.0, 2.0, 1.0)   # width multipliers, first and last 1
    activation: str = "linear"                 # ACTIVATIONS or A1111_ONLY_ACTIVATIONS key
    layer_norm: bool = False                   # LayerNorm after every Linear
    dropout_structure: tuple = (0.0, 0.0, 0.0)  # p after pair i-1's layers; same length as layer_structure
    activate_output: bool = False              # activation after the last Linear too
    weight_init: str = "Normal"                # how new weights were drawn (file spelling)

    @property
    def use_dropout(self) -> bool:
        return any(p > 0 for p in self.dropout_structure)

    @property
    def last_layer_dropout(self) -> bool:
        return len(self.dropout_structure) >= 2 and self.dropout_structure[-2] != 0

    def problem(self, widths=(), creating: bool = False) -> str | None:
        """Why this structure cannot be built (one phrase), or None. creating: also require what
        A1111's create UI implies (an activation both tools load, a known init, dropout 0 at
        both ends)."""
        ls, ds = self.layer_structure, self.dropout_structure
        if len(ls) < 2 or not all(_is_number(x) for x in ls):
            return f"layer structure {list(ls)} must be at least two numbers"
        if any(x <= 0 for x in ls):
            return f"layer structure {list(ls)} has a non-positive entry"
        if ls[0] != 1 or ls[-1] != 1:
            return f"layer structure {list(ls)} must start and end with 1"
        known = ACTIVATIONS if creating else {**ACTIVATIONS, **A1111_ONLY_ACTIVATIONS}
        if self.activation not in known:
            return f"unknown activation {self.activation!r} (choose {', '.join(known)})"
        if creating and self.weight_init not in INITS.values():
            return f"unknown weight initialization {self.weight_init!r}"
        if len(ds) != len(ls):
            return f"dropout structure {list(ds)} must have {len(ls)} entries, one per layer-structure entry"
        if not all(_is_number(p) and 0 <= p < 1 for p in ds):
            return f"dropout structure {list(ds)}: every p must be in [0, 1)"
        if ds[0] != 0 or ds[-1] != 0:         # A1111's module asserts it when it loads a file too
            return f"dropout structure {list(ds)} must start and end with 0"
        for w in widths:
            if any(int(w * x) < 1 for x in ls):
                return f"layer structure {list(ls)} gives a layer of width 0 at width {w}"
        return None


class HashDropout(nn.Module):
    """Inverted dropout whose mask is a function of (seed, salt, element index): the same call
    draws the same mask when recomputed (gradient checkpointing), a new seed a new mask. Keeps
    an element with probability 1-p, scaling it by 1/(1-p), as nn.Dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor, seed: torch.Tensor, salt: int) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = hash_uniform(x.shape, seed, salt, x.device) >= self.p      # [*x.shape] bool
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def hash_uniform(shape, seed: torch.Tensor, salt: int, device) -> torch.Tensor:
    """Uniform [0, 1) float32 of `shape` from a 32-bit integer hash (murmur-style finaliser) of
    the element index, seed (int64 [1], kept below 2**31) and salt. Pure tensor ops: no host
    sync, capturable in a CUDA graph. Multipliers stay below 2**31 so products of 32-bit values
    never overflow int64."""
    n = math.prod(shape)
    idx = torch.arange(n, device=device, dtype=torch.int64)
    base = (seed.to(device) * 0x1B873593 + (int(salt) & 0x7FFFFFFF) * 0x7FEB352D) & _M32
    h = ((idx * 0x5BD1E995) & _M32) ^ base
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x1B873593) & _M32
    h = h ^ (h >> 16)
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(shape)


class HypernetworkModule(nn.Module):
    """One residual MLP (for k or for v) at context width `dim`; parameters in fp32."""

    def __init__(self, dim: int, s: Structure):
        super().__init__()
        act = {**ACTIVATIONS, **A1111_ONLY_ACTIVATIONS}[s.activation]
        ls, n = s.layer_structure, len(s.layer_structure)
        layers: list[nn.Module] = []
        for i in range(n - 1):
            layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            if act is not None and not (i >= n - 2 and not s.activate_output):
                layers.append(act())
            if s.layer_norm:
                layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
            if s.dropout_structure[i + 1] > 0:
                layers.append(HashDropout(s.dropout_structure[i + 1]))
        self.dim = dim
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, strength: float = 1.0, seed: torch.Tensor | None = None,
                salt: int = 0) -> torch.Tensor:
        """x [..., dim] fp32 -> x + MLP(x) * strength. seed/salt feed the dropout layers
        (train mode only); salt tells call sites apart, each dropout layer adds its index."""
        if seed is None:
            seed = torch.zeros(1, dtype=torch.int64, device=x.device)
        h = x
        for i, layer in enumerate(self.linear):
            if isinstance(layer, HashDropout):
                h = layer(h, seed, salt * 64 + i)
            else:
                h = layer(h)
        return x + h * strength

    @torch.no_grad()
    def initialize(self, weight_init: str, activation: str, generator: torch.Generator) -> None:
        """A1111's init of new weights: Linear by weight_init ("Normal": N(0, 0.01); Xavier;
        Kaiming with the leaky_relu gain for leakyrelu, else relu — with torch's default
        slope 0 both are sqrt(2)), zero biases; LayerNorm weights N(0, 0.01) under every init."""
        nonlin = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            w, b = layer.weight, layer.bias
            if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(w, 0.0, 0.01, generator=generator)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(w, generator=generator)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(w, generator=generator)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=nonlin, generator=generator)
            elif weight_init == "KaimingNormal":
                nn.init.kaiming_normal_(w, nonlinearity=nonlin, generator=generator)
            else:
                raise ValueError(f"unknown weight initialization {weight_init!r}")
            nn.init.zeros_(b)
