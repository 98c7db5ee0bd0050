"""`ti-fast`: the command line, a thin argparse layer over the Python API.

  ti-fast train ...        train an embedding (ti-fast train --demo: the tiny built-in demo)
  ti-fast create NAME ...  write a fresh embedding from init text (A1111's "create embedding")
  ti-fast generate ...     txt2img with embeddings
  ti-fast create-hypernetwork NAME --model M ...   write a fresh A1111 hypernetwork
  ti-fast train-hypernetwork --name NAME --model M --data D ...   train an A1111 hypernetwork
  ti-fast preprocess SRC DST  images -> training-ready PNGs + captions (A1111's Preprocess images)
  ti-fast make-tiny DIR    write a tiny random SD1-shaped model (tests, demo)
  ti-fast inspect FILE...  what embedding files hold; --verify: which tools load them
  ti-fast convert IN OUT   an embedding in another format (a1111, kohya, diffusers, png)
  ti-fast serve --model M  HTTP server: training jobs and txt2img on one loaded model (A1111 API too)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import traceback

from .errors import RunCrashed, UserError, one_line

# (section, field, help). Defaults come from TrainConfig; booleans are switches.
TRAIN_FLAGS = [
    ("what to train", "name", "embedding name = trigger word (sanitised as A1111)"),
    ("what to train", "data", "folder of training images (png/jpg/jpeg/webp/bmp)"),
    ("what to train", "model", "SD1.x checkpoint: .safetensors, .ckpt, or a diffusers folder"),
    ("what to train", "vae", "separate VAE file (with or without prefix)"),
    ("what to train", "tokenizer", "tokenizer folder (vocab.json + merges.txt) when the model has none"),
    ("what to train", "embedding", "start from this embedding file (keeps its step count)"),
    ("what to train", "init_text", "initial vectors from these tokens' embeddings"),
    ("what to train", "vectors", "vectors per token"),
    ("data", "recursive", "also read images in sub-folders"),
    ("data", "template", "prompt template: subject, subject_filewords, style, style_filewords, none, or a file"),
    ("data", "shuffle_tags", "shuffle the comma-separated tags of each caption"),
    ("data", "tag_dropout", "drop each caption tag with this probability"),
    ("data", "width", "training width in px (multiple of 8)"),
    ("data", "height", "training height in px (multiple of 8)"),
    ("data", "resize", "crop (centred) or squash (A1111)"),
    ("data", "buckets", "aspect-ratio buckets (sizes multiple of 64, batches within a bucket)"),
    ("data", "flip", "also train on horizontally mirrored images (both cached)"),
    ("data", "alpha_weight", "use the alpha channel as a per-pixel loss weight (else composite on white)"),
    ("data", "latents", "once (one sample), deterministic (the mean), random (re-sampled each step)"),
    ("data", "cache_dir", "keep encoded latents on disk here, keyed by image content and settings"),
    ("optimisation", "steps", "TOTAL optimizer steps (an --embedding's earlier steps count)"),
    ("optimisation", "lr", "learning rate or A1111 schedule, e.g. '0.005:100, 1e-3:1000, 1e-5'"),
    ("optimisation", "batch_size", "images per micro-batch"),
    ("optimisation", "grad_accum", "micro-batches per optimizer step"),
    ("optimisation", "optimizer", "adamw or adamw8bit (bitsandbytes, 8-bit state)"),
    ("optimisation", "clip_grad", "gradient clipping on unscaled gradients: value:X or norm:X; X may be a schedule (norm:0.1:500, 0.05)"),
    ("optimisation", "precision", "auto (bf16 if supported, else fp16; full on CPU), bf16, fp16, full"),
    ("optimisation", "gradient_checkpointing", "recompute every UNet block in backward (less memory, slower)"),
    ("optimisation", "attention", "attention backend: auto, sdpa, xformers, math, triton"),
    ("optimisation", "seed", "random seed (None: drawn, recorded in settings.json)"),
    ("optimisation", "clip_skip", "CLIP skip, A1111 numbering (1 = off)"),
    ("optimisation", "device", "auto (cuda if available, else cpu), cuda, cuda:1, cpu"),
    ("optimisation", "low_vram", "checkpoint the high-resolution blocks, VAE off the GPU (4-6 GB cards)"),
    ("optimisation", "cuda_graph", "CUDA: capture the static training step in a CUDA graph (eager with "
     "--offload, fp16, adamw8bit); --no-cuda-graph turns it off"),
    ("optimisation", "kernels", "fused GroupNorm+SiLU / GEGLU: torch, auto (Triton if it runs), triton"),
    ("optimisation", "offload", "stream the UNet's blocks from pinned CPU memory (GPUs too small for its 1.7 GB)"),
    ("optimisation", "compile", "torch.compile the UNet (faster steps after minutes of compiling; time in settings)"),
    ("optimisation", "channels_last", "CUDA: UNet convs and activations in NHWC memory order; "
     "--no-channels-last turns it off"),
    ("optimisation", "threads", "CPU threads for torch (default: OMP_NUM_THREADS if set, else half the cores "
     "this process may use; set by the CLI, never inside train())"),
    ("optimisation", "allow_huge_lr", "accept learning rates over 1 (refused otherwise: usually a typo)"),
    ("outputs", "out", "folder for NAME.pt and NAME.safetensors"),
    ("outputs", "log_dir", "log folder (None: ./ti-logs/NAME)"),
    ("outputs", "save_every", "save embeddings/NAME-STEP.pt and the resumable state every N steps (0 = end only)"),
    ("outputs", "resume", "continue from the log dir's resumable state"),
    ("outputs", "overwrite", "replace an existing NAME.pt / NAME.safetensors"),
    ("outputs", "quiet", "no progress bar or messages"),
    ("outputs", "check_every", "read the loss and the NaN flag every N steps on GPU (no per-step sync)"),
    ("previews", "preview_every", "write a preview image every N steps (0 = off)"),
    ("previews", "preview_prompt", "preview prompt (None: a training prompt)"),
    ("previews", "preview_negative", "preview negative prompt"),
    ("previews", "preview_seed", "preview seed (fixed, so previews compare across steps)"),
    ("previews", "preview_sampler", "euler_a, euler, ddim, dpmpp_2m, or A1111's label ('Euler a', 'DPM++ 2M')"),
    ("previews", "preview_steps", "preview sampling steps"),
    ("previews", "preview_cfg", "preview CFG scale"),
    ("previews", "png_embed", "at each preview step also write image_embeddings/NAME-STEP.png carrying the vectors "
     "(needs --preview-every; refused alone)"),
]


# train-hypernetwork: the shared flags whose help says something else there (the embedding-only
# ones, training.config.EMBEDDING_ONLY, are not offered), and the hypernetwork's own flags.
HYPERNETWORK_HELP = {
    "name": "hypernetwork name = file stem, the NAME in `<hypernet:NAME>` (default: --hypernetwork's stem)",
    "steps": "TOTAL optimizer steps (a --hypernetwork's earlier steps count)",
    "template": "prompt template: hypernetwork (style-like lines, A1111's default), subject, style, ..., or a file",
    "out": "folder for NAME.pt",
    "save_every": "save hypernetworks/NAME-STEP.pt and the resumable state every N steps (0 = end only)",
    "overwrite": "replace an existing NAME.pt",
}
HYPERNETWORK_FLAGS = [("hypernetwork", "hypernetwork", "start from this A1111 hypernetwork file (keeps its step "
                                                       "count and structure; the create flags are then refused)")]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_train_args(p: argparse.ArgumentParser, kind: str = "embedding"):
    """Every training flag on `p`: `train`'s, or with kind "hypernetwork" train-hypernetwork's
    (the shared ones with that command's defaults, then --hypernetwork and the create flags)."""
    from .training.config import EMBEDDING_ONLY, config_class
    fields = {f.name: f for f in dataclasses.fields(config_class(kind))}
    hyper = kind == "hypernetwork"
    flags = [(sec, name, HYPERNETWORK_HELP.get(name, help_)) for sec, name, help_ in TRAIN_FLAGS
             if name not in EMBEDDING_ONLY] if hyper else TRAIN_FLAGS
    groups = {}
    for section, name, help_ in flags:
        g = groups.setdefault(section, p.add_argument_group(section))
        f = fields[name]
        default = f.default
        if f.type in ("bool", bool) or isinstance(default, bool):
            if default:      # on by default: --X / --no-X
                g.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_} (on)")
            else:
                g.add_argument(_flag(name), action="store_true", default=argparse.SUPPRESS, help=f"{help_} (off)")
            continue
        typ = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
        g.add_argument(_flag(name), type=typ, default=argparse.SUPPRESS, metavar=name.upper(),
                       help=f"{help_} (default: {default})")
    p.add_argument("--no-half", action="store_true", default=argparse.SUPPRESS, help="same as --precision full")
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (keys = flag names); flags override it")
    if hyper:
        from .hypernetworks.cli import add_structure_args
        g = p.add_argument_group("the hypernetwork (created from these flags when no --hypernetwork is given)")
        g.add_argument("--hypernetwork", metavar="FILE", default=argparse.SUPPRESS, help=HYPERNETWORK_FLAGS[0][2])
        add_structure_args(g, suppress=True)
        p.set_defaults(kind=kind, demo=False)
    else:
        p.add_argument("--demo", action="store_true", help="train on the built-in tiny demo (tiny random model, synthetic images)")


def cmd_train(a) -> int:
    """`ti-fast train` and `ti-fast train-hypernetwork` (a.kind): settings -> train()."""
    from .training.config import config_class
    from .training.loop import train
    from .training.preflight import validate
    over = {k: v for k, v in vars(a).items() if k not in ("cmd", "config", "demo", "no_half", "func", "kind")}
    if getattr(a, "no_half", False):
        over["precision"] = "full"
    cls = config_class(getattr(a, "kind", "embedding"))
    if a.config and not a.demo:
        from .training.runs_config import read_runs
        runs = read_runs(a.config, over, cls)
        if runs is not None:                    # [[run]] tables or a [sweep]: runs trained together
            return train_group(runs)
    if a.demo:
        from .training.demo import demo_config
        cfg = demo_config(**over)
    elif a.config:
        cfg = cls.from_toml(a.config, **over)
    else:
        cfg = cls(**over)
    validate(cfg)                 # the settings first: --threads 0 must not reach torch
    process_settings(cfg)
    res = train(cfg, handle_signals=True)
    return 0 if res.status == "completed" else 130


def train_group(runs) -> int:
    """Several runs co-batched over one model; a summary table (stdout) and CSV at the end.
    Exit 2 when a run failed (its one line is printed), 130 when interrupted, else 0."""
    import datetime
    from pathlib import Path
    from .fsutil import atomic_write_text
    from .training.group import naming_run, train_many
    from .training.preflight import validate
    from .training.runs_config import summary
    for cfg in runs:
        with naming_run(cfg.name, len(runs) > 1):
            validate(cfg)
    process_settings(runs[0])
    results = train_many(runs, handle_signals=True)
    text, csv_text = summary(runs, results)
    print(text, flush=True)
    first = runs[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(first.log_dir or Path("ti-logs") / first.name).parent / f"summary-{stamp}.csv"
    atomic_write_text(path, csv_text)
    print(f"summary: {path}", flush=True)
    for r in results:
        if r.status == "failed":
            _say(f"ti-fast: error: {r.name}: {r.error}")
    if any(r.status == "failed" for r in results):
        return 2
    return 130 if any(r.status == "interrupted" for r in results) else 0


def process_settings(cfg) -> None:
    """What a run changes for the whole process, done here at the CLI's entry and never inside
    train(): torch's CPU thread count (--threads, else OMP_NUM_THREADS as torch read it, else
    default_threads()) and, for --low-vram/--offload on CUDA, expandable allocator segments."""
    import torch
    from .devices import set_cpu_threads
    set_cpu_threads(cfg.threads)
    if (cfg.low_vram or cfg.offload) and torch.cuda.is_available():
        from .training.lowvram import lean_allocator
        lean_allocator()


def cmd_make_tiny(a) -> int:
    from .fsutil import check_writable_dir, make_dir
    from .loading import make_tiny
    make_dir(check_writable_dir(a.out_dir, "make-tiny DIR"), "make-tiny DIR")
    path = make_tiny(a.out_dir, layout=a.layout, seed=a.seed)
    print(path)
    return 0


def cmd_create(a) -> int:
    from .embeddings import create_embedding_file
    from .errors import UserError
    try:
        path = create_embedding_file(a.name, a.model, a.out, init_text=a.init_text, vectors=a.vectors,
                                     tokenizer=a.tokenizer, overwrite=a.overwrite)
    except UserError as e:
        print(f"ti-fast: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv=None) -> int:
    p = Parser(prog="ti-fast", description="Fast, lean textual-inversion training for SD 1.x")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train an embedding")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("create", help="write a fresh embedding (A1111's create-embedding)")
    c.add_argument("name", help="embedding name (trigger word)")
    c.add_argument("--init-text", default="*", help="initial vectors from these tokens (default: *)")
    c.add_argument("--vectors", type=int, default=1, help="vectors per token (default: 1)")
    c.add_argument("--out", default="embeddings", help="output folder (default: embeddings)")
    c.add_argument("--model", required=True, help="model whose token table initialises the vectors")
    c.add_argument("--tokenizer", default=None, help="tokenizer folder when the model has none")
    c.add_argument("--overwrite", action="store_true", help="replace an existing file")
    c.set_defaults(func=cmd_create)

    m = sub.add_parser("make-tiny", help="write a tiny random SD1-shaped model (tests, demo)")
    m.add_argument("out_dir")
    m.add_argument("--layout", choices=("single", "diffusers"), default="single")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_tiny)

    try:
        from .sample.cli import add_generate_parser
        add_generate_parser(sub)
    except ImportError:
        pass
    from .hypernetworks.cli import add_hypernetwork_parsers
    add_hypernetwork_parsers(sub)
    h = sub.add_parser("train-hypernetwork", help="train an A1111 hypernetwork (created from the create flags, "
                                                  "or --hypernetwork FILE)")
    add_train_args(h, kind="hypernetwork")
    h.set_defaults(func=cmd_train)
    from .preprocessing.cli import add_preprocess_parser
    add_preprocess_parser(sub)
    from .interop.cli import add_interop_parsers
    add_interop_parsers(sub)                               # inspect, convert
    from .serve.cli import add_serve_parser
    add_serve_parser(sub, process_settings=process_settings)

    a = p.parse_args(argv)
    if a.cmd == "train" and not hasattr(a, "demo"):
        a.demo = False
    return run_command(a.func, a)


def run_command(func, a) -> int:
    """Run a command's function; every way it can fail becomes ONE line on stderr: a UserError
    (bad input, a stopped run) exits 2; a bug exits 1 with the path of its full traceback
    (the trainer writes it into the log folder, elsewhere a temporary file); Ctrl-C exits 130."""
    try:
        return func(a)
    except UserError as e:
        _say(f"ti-fast: error: {e}")
        return e.exit_code
    except RunCrashed as e:
        _say(f"ti-fast: {e}")
        return 1
    except KeyboardInterrupt:
        _say("ti-fast: interrupted")
        return 130
    except Exception as e:
        fd, path = tempfile.mkstemp(prefix="ti-fast-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(e)))
        _say(one_line(f"ti-fast: internal error: {type(e).__name__}: {e} (full traceback in {path}; "
                      "please report it)", 2000))
        return 1


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in ONE line on stderr and exits 2 (argparse's own error
    prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"ti-fast: error: {one_line(message)} (see `{self.prog} --help`)\n")


if __name__ == "__main__":
    sys.exit(main())
