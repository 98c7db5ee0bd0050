"""`ti-fast generate`: argument parsing for txt2img (the work is in generate.py)."""
from __future__ import annotations

# The sampler registry's names, spelled out so that building the parser (`ti-fast --help`) needs
# no torch; tests/test_cli_startup.py checks it against the registry.
SAMPLER_NAMES = ("euler_a", "euler", "ddim", "dpmpp_2m")


def add_generate_parser(sub):
    g = sub.add_parser("generate", help="txt2img with embeddings; PNGs carry A1111 infotext")
    g.add_argument("--model", required=True, help="SD1.x checkpoint file or folder")
    g.add_argument("--prompt", required=True, help="prompt; an embedding's trigger word (its file stem) expands to its vectors")
    g.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    g.add_argument("--embeddings", nargs="*", default=[], metavar="DIR|FILE", help="embedding folders (recursive) or files")
    g.add_argument("--hypernetworks", nargs="*", default=[], metavar="DIR|FILE",
                   help="hypernetwork folders (recursive, *.pt) or files: <hypernet:NAME:STRENGTH> in a prompt applies NAME")
    g.add_argument("--sampler", default="euler_a", help=f"sampler: {', '.join(SAMPLER_NAMES)} or A1111's label, "
                   "e.g. 'Euler a', 'DPM++ 2M' (default: euler_a)")
    g.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (dpmpp_2m uses them by default)")
    g.add_argument("--no-karras", dest="karras", action="store_false", help="the sampler's uniform schedule, also for dpmpp_2m")
    g.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    g.add_argument("--cfg", type=float, default=7.0, help="CFG scale (default: 7)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; image i gets seed+i (default: random)")
    g.add_argument("--width", type=int, default=512, help="width in px, multiple of 8 (default: 512)")
    g.add_argument("--height", type=int, default=512, help="height in px, multiple of 8 (default: 512)")
    g.add_argument("--batch", type=int, default=1, help="images (default: 1)")
    g.add_argument("--clip-skip", type=int, default=1, help="CLIP skip, A1111 numbering (default: 1 = off)")
    g.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    g.add_argument("--device", default="auto", help="auto, cuda, cpu (default: auto)")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "full"), help="(default: auto)")
    g.add_argument("--vae", default=None, help="separate VAE file")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder when the model has none")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS, else half the cores)")
    g.add_argument("--quiet", action="store_true", help="print nothing")
    g.set_defaults(func=cmd_generate)


def cmd_generate(a) -> int:
    """Refusals (ti_fast.errors.UserError) become one line and exit 2 in ti_fast.cli.run_command."""
    from ..devices import set_cpu_threads
    from ..errors import ConfigError
    from .generate import GenerateConfig, generate
    cfg = GenerateConfig(**{k: v for k, v in vars(a).items() if k not in ("cmd", "func", "threads")})
    if a.threads is not None and not 1 <= a.threads <= 1024:
        raise ConfigError(f"--threads {a.threads}: from 1 to 1024")
    set_cpu_threads(a.threads)          # at the command's entry, as `train` does: generate() sets nothing
    generate(cfg)
    return 0
