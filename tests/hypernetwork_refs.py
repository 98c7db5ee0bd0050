"""Two hypernetwork readers written from the spec (shared/spec/a1111-compat.md "Hypernetworks"),
not from ti-fast's code: A1111's HypernetworkModule / Hypernetwork.load / save rules, and
ComfyUI's loader rules (comfy_extras/nodes_hypernetwork.py load_hypernetwork_patch)."""
from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
import torch.nn as nn

# ---------------------------------------------------------------- A1111, from the spec's facts
A1111_ACTS = {name.lower(): cls for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
              if cls.__module__ == "torch.nn.modules.activation"}
A1111_ACTS.update({"linear": nn.Identity, "swish": nn.Hardswish})
A1111_ORDER = ["step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
               "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
               "last_layer_dropout", "optional_info"]


class RefA1111Module(nn.Module):
    """Per pair (a, b): Linear; activation unless none or last pair without activate_output;
    LayerNorm if set; Dropout(p) if dropout_structure[pair+1] > 0. forward: x + MLP(x) * m."""

    def __init__(self, dim, ls, act, layer_norm, activate_output, dropout):
        super().__init__()
        seq = []
        for i in range(len(ls) - 1):
            seq.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            last = i >= len(ls) - 2
            if act not in (None, "linear") and not (last and not activate_output):
                seq.append(A1111_ACTS[act]())
            if layer_norm:
                seq.append(nn.LayerNorm(int(dim * ls[i + 1])))
            if dropout[i + 1] > 0:
                seq.append(nn.Dropout(dropout[i + 1]))
        self.linear = nn.Sequential(*seq)
        self.multiplier = 1.0

    def forward(self, x):
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


def a1111_dropout(n, use, last):
    return [0] * n if not use else [0] + [0.3] * (n - 3) + [0.3 if last else 0] + [0]


def a1111_load(path, strength=1.0):
    d = torch.load(path, map_location="cpu", weights_only=True)
    ls = d.get("layer_structure", [1, 2, 1])
    ds = d.get("dropout_structure")
    use = True if ds is not None and any(ds) else d.get("use_dropout", False)
    if ds is None:
        ds = a1111_dropout(len(ls), use, d.get("last_layer_dropout", False))
    out = {}
    for w, pair in d.items():
        if type(w) is int:
            mods = []
            for sd in pair:
                sd = dict(sd)
                for old, new in (("linear1", "linear.0"), ("linear2", "linear.1")):
                    for p in ("weight", "bias"):
                        if f"{old}.{p}" in sd:
                            sd[f"{new}.{p}"] = sd.pop(f"{old}.{p}")
                m = RefA1111Module(w, ls, d.get("activation_func"), d.get("is_layer_norm", False),
                                   d.get("activate_output", True), ds)
                m.load_state_dict(sd)
                m.eval()
                m.multiplier = strength
                mods.append(m)
            out[w] = mods
    return out, d


def a1111_save(path, widths, ls, act, layer_norm, activate_output, ds, seed=0, legacy=False):
    """A file as A1111 writes it (random weights so the forward is not ~identity); legacy=True
    writes an old file: width keys only, linear1/linear2 names (needs ls [1,2,1], no act/LN)."""
    g = torch.Generator().manual_seed(seed)
    d = {}
    for w in widths:
        pair = []
        for _ in range(2):
            m = RefA1111Module(w, ls, act, layer_norm, activate_output, ds)
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            sd = m.state_dict()
            if legacy:
                sd = OrderedDict((k.replace("linear.0", "linear1").replace("linear.1", "linear2"), v) for k, v in sd.items())
            pair.append(sd)
        d[w] = tuple(pair)
    if not legacy:
        d.update({"step": 7, "name": "ref", "layer_structure": ls, "activation_func": act, "is_layer_norm": layer_norm,
                  "weight_initialization": "Normal", "sd_checkpoint": None, "sd_checkpoint_name": None,
                  "activate_output": activate_output, "use_dropout": any(ds), "dropout_structure": ds,
                  "last_layer_dropout": ds[-2] != 0, "optional_info": None})
    torch.save(d, path)


# ---------------------------------------------------------------- ComfyUI's loader rules
COMFY_ACTS = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
              "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish}


def comfy_load(path):
    """Linears from the `.weight` keys in file order, activation unless last (or activate_output,
    default False), a LayerNorm = the next weight when is_layer_norm, Dropout(0.3) from
    use_dropout/last_layer_dropout. Modules stay in training mode (ComfyUI never calls eval)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    act = sd.get("activation_func", "linear")
    ln, use = sd.get("is_layer_norm", False), sd.get("use_dropout", False)
    ao, lld = sd.get("activate_output", False), sd.get("last_layer_dropout", False)
    if act not in COMFY_ACTS:
        return None
    out = {}
    for key in sd:
        try:
            dim = int(key)
        except (TypeError, ValueError):
            continue
        pair = []
        for w in sd[key]:
            names = [k[:-len(".weight")] for k in w if k.endswith(".weight")]
            layers, i = [], 0
            while i < len(names):
                last, penult = i == len(names) - 1, i == len(names) - 2
                lin = nn.Linear(w[names[i] + ".weight"].shape[1], w[names[i] + ".weight"].shape[0])
                lin.load_state_dict({"weight": w[names[i] + ".weight"], "bias": w[names[i] + ".bias"]})
                layers.append(lin)
                if act != "linear" and (not last or ao):
                    layers.append(COMFY_ACTS[act]())
                if ln:
                    i += 1
                    norm = nn.LayerNorm(w[names[i] + ".weight"].shape[0])
                    norm.load_state_dict({"weight": w[names[i] + ".weight"], "bias": w[names[i] + ".bias"]})
                    layers.append(norm)
                if use and not last and (not penult or lld):
                    layers.append(nn.Dropout(p=0.3))
                i += 1
            pair.append(nn.Sequential(*layers))
        out[dim] = pair
    return out


def comfy_forward(out, x, strength):
    hn = out[x.shape[-1]]
    return x + hn[0](x) * strength, x + hn[1](x) * strength
