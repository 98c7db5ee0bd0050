"""What other tools make of a file: inspect embeddings (and hypernetworks), verify which tools
load them, convert between formats.

    raw.py       read_raw: the stored object of any embedding/hypernetwork file, read safely
    describe.py  inspect: the per-kind describers (KINDS, the dispatch point)
    verify.py    --verify: A1111's, ComfyUI's, diffusers' and InvokeAI's loading rules
    convert.py   convert: any embedding to a1111 / kohya / diffusers / png
    cli.py       the `inspect` and `convert` subcommands


Nothing is imported here, so that building the CLI parsers (ti_fast.interop.cli) costs no
torch import: import the modules (`from ti_fast.interop.convert import convert`).
"""
