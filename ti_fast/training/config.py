"""TrainConfig: every setting of a training run (the CLI's flags map 1:1 onto its fields), and
reading it from a TOML file with each value's type checked. What the values may be is checked
in ti_fast.training.preflight, before anything is loaded."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, ConfigError, NonFiniteLossError, OutOfMemoryError  # noqa: F401
from ..fsutil import special_reason

TrainError = UserError          # the public name of the trainer's error base (ti_fast.TrainError)

PRECISIONS = ("auto", "bf16", "fp16", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
LATENT_MODES = ("once", "deterministic", "random")
RESIZE_MODES = ("crop", "squash")
ATTENTION = ("auto", "sdpa", "xformers", "math", "triton")
KERNELS = ("torch", "auto", "triton")


@dataclass
class TrainConfig:
    # --- what to train
    name: str | None = None              # embedding name = trigger word (sanitised as A1111)
    data: str | None = None              # folder of training images
    model: str | None = None             # checkpoint file or folder (anything load_model takes)
    vae: str | None = None               # separate VAE file
    tokenizer: str | None = None         # tokenizer folder (vocab.json + merges.txt)
    embedding: str | None = None         # start from this embedding file (keeps its step count)
    init_text: str = "*"                 # initial vectors from these tokens
    vectors: int = 1                     # vectors per token
    # --- data
    recursive: bool = False
    template: str = "style_filewords"    # built-in template name or a file
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    width: int = 512
    height: int = 512
    resize: str = "crop"                 # crop (centred) | squash
    buckets: bool = False                # aspect-ratio buckets (sizes multiple of 64)
    flip: bool = False                   # cache both horizontal orientations
    alpha_weight: bool = False           # alpha channel as per-pixel loss weight
    latents: str = "once"                # once | deterministic | random
    cache_dir: str | None = None         # keep latents on disk between runs
    # --- optimisation
    steps: int = 3000                    # TOTAL optimizer steps
    lr: str = "0.005"                    # A1111 schedule syntax "0.005:100, 1e-3:1000, 1e-5"
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "adamw"             # adamw | adamw8bit
    clip_grad: str | None = None         # value:X | norm:X (X may be a schedule)
    precision: str = "auto"              # auto | bf16 | fp16 | full
    gradient_checkpointing: bool = False
    attention: str = "auto"
    seed: int | None = None              # None: drawn at random, recorded in settings.json
    clip_skip: int = 1
    device: str = "auto"                 # auto = cuda if available, else cpu
    low_vram: bool = False               # checkpointing where it pays most, VAE off the GPU
    cuda_graph: bool = True              # on CUDA: the static step captured in a CUDA graph (not with
                                         # --offload, fp16 or adamw8bit: those run eagerly)
    kernels: str = "auto"                # fused GroupNorm+SiLU / GEGLU: auto (Triton on CUDA) | torch | triton
    offload: bool = False                # UNet blocks stream from pinned host memory (weights > VRAM)
    compile: bool = False                # torch.compile the UNet (minutes of compilation first)
    channels_last: bool = True           # on CUDA: UNet convs and activations in NHWC memory order
    # --- outputs
    out: str = "embeddings"
    log_dir: str | None = None           # default ./ti-logs/NAME
    save_every: int = 500
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    check_every: int = 10                # read loss / finiteness flag every N steps (no per-step sync)
    # --- previews (0 = off)
    preview_every: int = 0
    preview_prompt: str | None = None
    preview_negative: str = ""
    preview_seed: int = 1234
    preview_sampler: str = "euler_a"
    preview_steps: int = 20
    preview_cfg: float = 7.0
    png_embed: bool = False

    # --- process (applied by the CLI at its entry, never inside train(): no global state)
    threads: int | None = None           # torch CPU threads (None: the CLI's choice, see cli.py)
    allow_huge_lr: bool = False          # accept learning rates over 1 (else refused as a typo)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Settings from a TOML file (keys = flag names, '-' or '_'), each value type-checked;
        `overrides` (the command line's flags) win."""
        data = {k: check_value(k, v, str(path)) for k, v in read_toml(path).items()}
        data.update(overrides)
        return cls(**data)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings of the process, not of a run: runs trained together in one group (one model, one
# step) share them; a [[run]] table may not set them.
PROCESS_KEYS = ("model", "vae", "tokenizer", "device", "precision", "attention", "cuda_graph", "low_vram",
                "offload", "kernels", "channels_last", "compile", "threads", "gradient_checkpointing",
                "clip_skip", "check_every", "quiet")
# Schedules are text in A1111's syntax; a TOML number is the one-entry schedule.
_TEXT_OR_NUMBER = ("lr", "clip_grad")
MAX_TOML_BYTES = 1 << 20


def read_toml(path) -> dict:
    """A TOML file's top-level table with '-' in keys turned into '_'. ConfigError (one line,
    naming the file) when it is not a regular file, too big, or not TOML."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    why = special_reason(p)
    if why is not None:
        raise ConfigError(f"--config {p} is {why}: name a TOML file")
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    if p.stat().st_size > MAX_TOML_BYTES:
        raise ConfigError(f"--config {p}: {p.stat().st_size} bytes is too big for a settings file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {p}: not valid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def check_value(key: str, value, where: str):
    """`value` as the TrainConfig field `key` takes it, or ConfigError naming the key, the type it
    needs and what it got. TOML has no null: an optional field is simply left out."""
    if key not in FIELDS:
        near = [n for n in FIELDS if n.split("_")[0] == key.split("_")[0]][:3]
        hint = f" (did you mean {', '.join(near)}?)" if near else "; keys are the flag names"
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    kind = str(FIELDS[key].type).replace(" | None", "")
    if key in _TEXT_OR_NUMBER and isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value) if isinstance(value, float) else str(value)
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind]
    if not ok(value):
        need = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string"}[kind]
        raise ConfigError(f"{where}: {key.replace('_', '-')} must be {need}, got {type(value).__name__} {value!r}")
    return float(value) if kind == "float" else value
