"""New hypernetworks as A1111's create_hypernetwork makes them, and the widths a model offers.

A1111 v1.10.1 semantics: the name keeps alphanumerics and "._- "; the file is OUT/NAME.pt;
defaults sizes 768,320,640,1280 (here: the model's own widths), layer structure 1,2,1, no
activation ("linear"), Normal init, no layer norm, no dropout. Weights are drawn from a seeded
generator (A1111 uses the global RNG), so the same seed gives the same file.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..loading import ModelLoadError, open_weights
from ..loading.configs import read_json, unet_from_diffusers
from ..loading.detect import classify_single
from ..loading.keys import UNET_PREFIX
from .format import HypernetworkError
from .hypernetwork import Hypernetwork
from .module import INITS, Structure, legacy_dropout_structure


def sanitize_name(name: str) -> str:
    """A1111's rule (as for embeddings): keep alphanumerics and "._- "; must not end up empty."""
    clean = "".join(ch for ch in str(name) if ch.isalnum() or ch in "._- ")
    if not clean.strip(" ."):
        raise HypernetworkError(f"hypernetwork name {name!r}: nothing left after removing characters "
                                "other than letters, digits and '._- '")
    return clean


def parse_numbers(text, flag: str) -> tuple[float, ...]:
    """'1, 2, 1' (or a list) -> (1.0, 2.0, 1.0); a one-line error naming the flag otherwise."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        out = tuple(float(str(x).strip()) for x in items)
    except ValueError:
        raise HypernetworkError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1,2,1") from None
    if not out or not all(math.isfinite(x) for x in out):
        raise HypernetworkError(f"{flag} {text!r}: expected comma-separated finite numbers")
    return out


def structure_from_options(layer_structure="1,2,1", activation: str = "linear", init: str = "normal",
                           layer_norm: bool = False, dropout_structure=None, use_dropout: bool = False,
                           last_layer_dropout: bool = False, activate_output: bool = False,
                           sizes=()) -> Structure:
    """The create flags -> a validated Structure (pure: reads no file). dropout_structure wins
    over use_dropout; use_dropout alone gives A1111's [0, 0.3, ..., 0.3 if last_layer_dropout, 0]."""
    ls = parse_numbers(layer_structure, "--layer-structure")
    if init not in INITS:
        raise HypernetworkError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    if dropout_structure is not None and str(dropout_structure).strip() != "":
        ds = parse_numbers(dropout_structure, "--dropout-structure")
    else:
        if last_layer_dropout and not use_dropout:
            raise HypernetworkError("--last-layer-dropout needs --use-dropout")
        ds = legacy_dropout_structure(len(ls), use_dropout, last_layer_dropout) if len(ls) >= 2 else (0.0,) * len(ls)
    s = Structure(layer_structure=ls, activation=str(activation), layer_norm=bool(layer_norm),
                  dropout_structure=ds, activate_output=bool(activate_output), weight_init=INITS[init])
    why = s.problem(sizes, creating=True)
    if why:
        flag = ("--activation" if "activation" in why else "--dropout-structure" if "dropout" in why
                else "--layer-structure")
        raise HypernetworkError(f"{flag}: {why}")
    return s


def parse_sizes(sizes) -> list[int] | None:
    """--sizes '768,320' (or a list) -> [768, 320]; None stays None (the model's own widths)."""
    if sizes is None:
        return None
    out = parse_numbers(sizes, "--sizes")
    if any(s != int(s) or s <= 0 for s in out) or len(set(out)) != len(out):
        raise HypernetworkError(f"--sizes {sizes!r}: widths are distinct positive whole numbers")
    return [int(s) for s in out]


def options_structure(sizes=None, layer_structure="1,2,1", activation: str = "linear", init: str = "normal",
                      layer_norm: bool = False, dropout_structure=None, use_dropout: bool = False,
                      last_layer_dropout: bool = False, activate_output: bool = False
                      ) -> tuple[Structure, list[int] | None]:
    """The create flags (as create-hypernetwork and train-hypernetwork take them) -> (Structure,
    sizes or None): every check that needs no file, one line naming the flag."""
    if dropout_structure is not None and (use_dropout or last_layer_dropout):
        raise HypernetworkError("--dropout-structure and --use-dropout/--last-layer-dropout exclude each other")
    widths = parse_sizes(sizes)
    s = structure_from_options(layer_structure, activation, init, layer_norm, dropout_structure, use_dropout,
                               last_layer_dropout, activate_output, sizes=widths or ())
    return s, widths


def new_hypernetwork(name: str, widths, structure: Structure, seed: int | None = None) -> Hypernetwork:
    """A fresh hypernetwork at step 0 with A1111's initialisation, drawn from `seed` (None: a
    random seed). Not saved (path None); eval mode."""
    widths = [int(w) for w in widths]
    if not widths or any(w <= 0 for w in widths) or len(set(widths)) != len(widths):
        raise HypernetworkError(f"--sizes {widths}: expected distinct positive widths")
    why = structure.problem(widths)
    if why:
        raise HypernetworkError(why)
    hn = Hypernetwork(sanitize_name(name), widths, structure, step=0)
    seed = random.SystemRandom().randrange(2**63) if seed is None else int(seed)
    g = torch.Generator().manual_seed(seed)
    for w in widths:
        for m in hn.pair(w):
            m.initialize(structure.weight_init, structure.activation, g)
    hn.seed_dropout(seed)
    return hn


def unet_widths_from_keys(shapes: dict) -> list[int]:
    """[context width] + block widths ascending, from attention weight shapes (original or
    diffusers names): attn2.to_k [dim, context], attn1.to_k [dim, dim]."""
    ctx = sorted({s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2})
    blocks = sorted({s[1] for k, s in shapes.items() if k.endswith("attn1.to_k.weight") and len(s) == 2})
    return list(dict.fromkeys(ctx + blocks))


def model_widths(model) -> list[int]:
    """The widths whose attention inputs a hypernetwork can transform in this model, read from
    the checkpoint's header / config without building it: [768, 320, 640, 1280] for SD 1.x.
    Raises ModelLoadError (one line) for what load_model would refuse to classify."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "model_index.json").is_file():
        cfg = unet_from_diffusers(read_json(path / "unet" / "config.json"), f"{path.name}/unet/config.json")
        # levels with a SpatialTransformer, and the middle block's (always one, at the last width)
        blocks = sorted({cfg.model_channels * m for m, a in zip(cfg.channel_mult, cfg.attention_levels) if a}
                        | {cfg.model_channels * cfg.channel_mult[-1]})
        return list(dict.fromkeys([cfg.context_dim] + blocks))
    file = path / "model.safetensors" if path.is_dir() else path
    wf = open_weights(file)
    classify_single(wf.shapes, wf.metadata, file)
    widths = unet_widths_from_keys({k: v for k, v in wf.shapes.items() if k.startswith(UNET_PREFIX)})
    if not widths:
        raise ModelLoadError(f"{file.name}: no UNet attention weights found")
    return widths


def check_widths(sizes, available, flag: str = "--sizes") -> list[int]:
    """sizes as ints, each one the model has; one line naming the first that is not."""
    sizes = [int(s) for s in sizes]
    missing = [s for s in sizes if s not in available]
    if missing:
        raise HypernetworkError(f"{flag}: the model has no attention of width {missing[0]} "
                                f"(its widths: {', '.join(map(str, available))})")
    return sizes
