"""TrainConfig: every setting of a training run (the CLI's flags map 1:1 onto its fields),
validated BEFORE any model is loaded, and the typed errors the trainer raises."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path


from ..errors import UserError, ConfigError, NonFiniteLossError, OutOfMemoryError  # noqa: F401

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: cannot read config: {e}") from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - names)
        if bad:
            raise ConfigError(f"{p}: unknown key(s) {', '.join(bad)}; keys are the flag names")
        data.update(overrides)
        return cls(**data)


_CLIP_RE = re.compile(r"^\s*(value|norm)\s*:(.+)$", re.S)


def parse_clip_grad(spec: str | None, steps: int = 1):
    """'value:X' | 'norm:X', X a number or an A1111 schedule ('norm:0.1:500, 0.05') -> (mode, Schedule) or None."""
    if not spec:
        return None
    from .lr import parse_schedule, ScheduleError
    m = _CLIP_RE.match(spec)
    if not m:
        raise ConfigError(f"--clip-grad {spec!r}: use value:X or norm:X (X > 0, or a schedule like 0.1:500, 0.05)")
    try:
        return m.group(1), parse_schedule(m.group(2), max(1, steps), what="clip threshold")
    except ScheduleError as e:
        raise ConfigError(f"--clip-grad {spec!r}: {e}") from None


def validate(cfg: TrainConfig) -> None:
    """Cheap checks that need no model: a clear one-line error for each bad setting."""
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(cfg.vectors >= 1, f"--vectors must be at least 1 (got {cfg.vectors})")
    need(cfg.vectors <= 75, f"--vectors {cfg.vectors}: at most 75 fit in a prompt")
    need(cfg.steps >= 1, f"--steps must be at least 1 (got {cfg.steps})")
    need(cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})")
    need(cfg.grad_accum >= 1, f"--grad-accum must be at least 1 (got {cfg.grad_accum})")
    need(cfg.save_every >= 0, "--save-every must be >= 0 (0 = only the final save)")
    need(cfg.check_every >= 1, "--check-every must be at least 1")
    need(cfg.width % 8 == 0 and cfg.height % 8 == 0 and cfg.width > 0 and cfg.height > 0,
         f"--width/--height must be positive multiples of 8 (got {cfg.width}x{cfg.height})")
    need(cfg.precision in PRECISIONS, f"--precision {cfg.precision!r}: choose {', '.join(PRECISIONS)}")
    need(cfg.optimizer in OPTIMIZERS, f"--optimizer {cfg.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
    need(cfg.latents in LATENT_MODES, f"--latents {cfg.latents!r}: choose {', '.join(LATENT_MODES)}")
    need(cfg.resize in RESIZE_MODES, f"--resize {cfg.resize!r}: choose {', '.join(RESIZE_MODES)}")
    need(cfg.kernels in KERNELS, f"--kernels {cfg.kernels!r}: choose {', '.join(KERNELS)}")
    need(cfg.attention in ATTENTION, f"--attention {cfg.attention!r}: choose {', '.join(ATTENTION)}")
    need(0.0 <= cfg.tag_dropout < 1.0, f"--tag-dropout must be in [0, 1) (got {cfg.tag_dropout})")
    need(cfg.clip_skip >= 1, f"--clip-skip must be >= 1 (A1111 numbering, 1 = off; got {cfg.clip_skip})")
    need(cfg.preview_every >= 0, "--preview-every must be >= 0")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    need(cfg.data is not None, "--data DIR is required (a folder of training images)")
    need(cfg.name is not None or cfg.embedding is not None, "--name NAME is required (or --embedding FILE)")
    need(not (cfg.offload and str(cfg.device).split(":")[0] == "cpu"),
         "--offload needs a CUDA device (it streams the UNet's weights to the GPU)")
    need(not (cfg.offload and cfg.compile), "--offload and --compile exclude each other "
         "(offload swaps the weights in Python hooks between blocks; a compiled UNet cannot follow)")
    parse_clip_grad(cfg.clip_grad, cfg.steps)
