"""`ti-fast create-hypernetwork` (A1111's "Create hypernetwork"; work in create.py) and the create flags it shares.

`train-hypernetwork` takes the same STRUCTURE_FLAGS (registered by ti_fast.cli.add_train_args).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .names import ACTIVATION_NAMES, INITS


# (flag field, metavar, help): what shapes a new hypernetwork; `create-hypernetwork` and
# `train-hypernetwork` share them (defaults: ti_fast.training.config.HypernetworkTrainConfig).
# Choices are checked by structure_from_options: a wrong value is one line, not argparse's usage.
STRUCTURE_FLAGS = [
    ("sizes", "W,W,...", "context widths to make modules for (default: the model's own: its text width and "
                         "each block width, 768,320,640,1280 on SD1); a width the model lacks is refused"),
    ("layer_structure", "1,2,1", "width multipliers of the MLP, first and last 1, every entry > 0"),
    ("activation", "|".join(ACTIVATION_NAMES), "activation after every Linear but the last (linear = none; "
                                               "swish = Hardswish, as A1111)"),
    ("init", "|".join(INITS), "weight initialisation (normal = N(0, 0.01)); biases 0; LayerNorm weights "
                              "N(0, 0.01) under every init, as A1111"),
    ("layer_norm", None, "LayerNorm after every Linear, the last one included"),
    ("dropout_structure", "0,0.3,0", "dropout p after each layer, as many entries as --layer-structure, 0 at "
                                     "both ends, each in [0, 1)"),
    ("use_dropout", None, "A1111's legacy dropout: p 0.3 after each hidden layer but the last (with 1,2,1 "
                          "that is none: add --last-layer-dropout)"),
    ("last_layer_dropout", None, "with --use-dropout: also after the last hidden layer"),
    ("activate_output", None, "the activation after the last Linear too"),
]
STRUCTURE_DEFAULTS = {"sizes": None, "layer_structure": "1,2,1", "activation": "linear", "init": "normal",
                      "layer_norm": False, "dropout_structure": None, "use_dropout": False,
                      "last_layer_dropout": False, "activate_output": False}


def add_structure_args(p, suppress: bool = False) -> None:
    """The STRUCTURE_FLAGS on parser or group `p`. suppress: leave unset flags out of the
    namespace (train-hypernetwork: a --config TOML file's values must not be overridden)."""
    for field, metavar, help_ in STRUCTURE_FLAGS:
        default = STRUCTURE_DEFAULTS[field]
        kw = {"default": argparse.SUPPRESS} if suppress else {"default": default}
        flag = "--" + field.replace("_", "-")
        if metavar is None:
            p.add_argument(flag, action="store_true", help=f"{help_} (off)", **kw)
        else:
            shown = "" if default is None else f" (default: {default})"
            p.add_argument(flag, metavar=metavar, help=help_ + shown, **kw)


def add_hypernetwork_parsers(sub) -> None:
    """Register `create-hypernetwork` on the `ti-fast` subparsers."""
    c = sub.add_parser("create-hypernetwork", help="write a fresh A1111 hypernetwork (A1111's create hypernetwork)")
    c.add_argument("name", help="hypernetwork name = file stem and prompt tag name (sanitised as A1111)")
    c.add_argument("--model", required=True, help="SD1.x checkpoint whose attention widths it is made for")
    add_structure_args(c)
    c.add_argument("--seed", type=int, default=None, help="seed of the initial weights (default: random)")
    c.add_argument("--out", default="hypernetworks", help="output folder (default: hypernetworks)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT/NAME.pt")
    c.set_defaults(func=cmd_create_hypernetwork)


def cmd_create_hypernetwork(a) -> int:
    from ..fsutil import check_writable_dir, make_dir
    from .create import check_widths, model_widths, new_hypernetwork, options_structure, sanitize_name
    from .format import HypernetworkError
    try:
        name = sanitize_name(a.name)
        structure, sizes = options_structure(**{f: getattr(a, f) for f, _, _ in STRUCTURE_FLAGS})
        out = check_writable_dir(a.out, "--out")
        path = Path(out) / f"{name}.pt"
        if path.exists() and not a.overwrite:
            raise HypernetworkError(f"{path} exists (pass --overwrite to replace it)")
        widths = model_widths(a.model)
        sizes = check_widths(sizes, widths) if sizes is not None else widths
        why = structure.problem(sizes, creating=True)       # now with the model's widths
        if why:
            raise HypernetworkError(f"--layer-structure: {why}")
        hn = new_hypernetwork(name, sizes, structure, seed=a.seed)
        make_dir(out, "--out")
        hn.save(path)
    except UserError as e:
        print(f"ti-fast: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
