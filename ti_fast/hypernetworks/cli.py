"""`ti-fast create-hypernetwork`: argument parsing for A1111's "Create hypernetwork" (work in create.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from .names import ACTIVATION_NAMES, INITS


def add_hypernetwork_parsers(sub) -> None:
    """Register `create-hypernetwork` on the `ti-fast` subparsers."""
    c = sub.add_parser("create-hypernetwork", help="write a fresh A1111 hypernetwork (A1111's create hypernetwork)")
    c.add_argument("name", help="hypernetwork name = file stem and prompt tag name (sanitised as A1111)")
    c.add_argument("--model", required=True, help="SD1.x checkpoint whose attention widths it is made for")
    c.add_argument("--sizes", default=None, metavar="W,W,...",
                   help="widths to create modules for (default: the model's own, 768,320,640,1280 on SD1)")
    c.add_argument("--layer-structure", default="1,2,1", metavar="1,2,1",
                   help="width multipliers of the MLP, first and last 1 (default: 1,2,1)")
    # choices are checked by structure_from_options: a wrong value is one line, not argparse's usage block
    c.add_argument("--activation", default="linear", metavar="|".join(ACTIVATION_NAMES),
                   help="activation after every Linear but the last (default: linear = none; swish = Hardswish)")
    c.add_argument("--init", default="normal", metavar="|".join(INITS),
                   help="weight initialisation (default: normal = N(0, 0.01)); LayerNorm weights are N(0, 0.01) always")
    c.add_argument("--layer-norm", action="store_true", help="LayerNorm after every Linear (off)")
    c.add_argument("--dropout-structure", default=None, metavar="0,0.3,0",
                   help="dropout p after each layer, same length as --layer-structure, 0 at both ends")
    c.add_argument("--use-dropout", action="store_true",
                   help="A1111's legacy dropout: p 0.3 after each hidden layer but the last; with 1,2,1 "
                        "that is none, add --last-layer-dropout (off)")
    c.add_argument("--last-layer-dropout", action="store_true",
                   help="with --use-dropout: also after the last hidden layer (off)")
    c.add_argument("--activate-output", action="store_true", help="activation after the last Linear too (off)")
    c.add_argument("--seed", type=int, default=None, help="seed of the initial weights (default: random)")
    c.add_argument("--out", default="hypernetworks", help="output folder (default: hypernetworks)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT/NAME.pt")
    c.set_defaults(func=cmd_create_hypernetwork)


def cmd_create_hypernetwork(a) -> int:
    from ..fsutil import check_writable_dir
    from .create import check_widths, model_widths, new_hypernetwork, parse_numbers, sanitize_name, structure_from_options
    from .format import HypernetworkError
    try:
        if a.dropout_structure is not None and (a.use_dropout or a.last_layer_dropout):
            raise HypernetworkError("--dropout-structure and --use-dropout/--last-layer-dropout exclude each other")
        name = sanitize_name(a.name)
        sizes = None if a.sizes is None else parse_numbers(a.sizes, "--sizes")
        if sizes is not None and any(s != int(s) or s <= 0 for s in sizes):
            raise HypernetworkError(f"--sizes {a.sizes!r}: widths are positive whole numbers")
        structure = structure_from_options(a.layer_structure, a.activation, a.init, a.layer_norm, a.dropout_structure,
                                           a.use_dropout, a.last_layer_dropout, a.activate_output,
                                           sizes=[int(s) for s in sizes or ()])
        out = check_writable_dir(a.out, "--out")
        path = Path(out) / f"{name}.pt"
        if path.exists() and not a.overwrite:
            raise HypernetworkError(f"{path} exists (pass --overwrite to replace it)")
        widths = model_widths(a.model)
        sizes = check_widths(sizes, widths) if sizes is not None else widths
        hn = new_hypernetwork(name, sizes, structure, seed=a.seed)
        out.mkdir(parents=True, exist_ok=True)
        hn.save(path)
    except UserError as e:
        print(f"ti-fast: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
