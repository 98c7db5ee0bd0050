"""The preflight: every check of a training run that needs no model, in one pure pass that loads
nothing heavy (no weights, no image pixels), so a bad setting fails in a second with one line
instead of after a minute of loading.

`validate(cfg)` checks the settings alone (no files). `plan(cfg)` also checks the files — the
data folder and captions, the template, a starting embedding, the output and log folders, the
resumable state — and returns the `Plan` every later part of the run reads: resolved names and
paths, parsed schedules, template lines, the image list, where the run starts. What only the
model can tell (its width, its tokenizer) is checked by the loaders and ti_fast.training.model.
A hypernetwork run (cfg.kind "hypernetwork") adds the checks of preflight_hypernetwork: the create
flags, the --hypernetwork file, the model's widths read from its header alone.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..devices import PRECISIONS, check_device_name, resolve_device, resolve_precision
from ..diffusion.samplers import sampler_key
from ..embeddings import MAX_VECTORS, Embedding, read_embedding, sanitize_name
from ..errors import ConfigError
from ..fsutil import check_writable_dir, kind_of, special_reason
from ..hypernetworks import sanitize_name as sanitize_hypernetwork_name
from ..images import caption_for
from ..loading.hashes import file_sha256
from ..loading.loader import single_model_file
from ..models.attention import BACKENDS as ATTENTION, resolve_backend
from ..models.ops import CHOICES as KERNELS
from .config import LATENT_MODES, OPTIMIZERS, RESIZE_MODES, TrainConfig
from .data import list_images
from .lr import Schedule, parse_clip_grad, parse_schedule
from .outputs import load_state, read_settings
from .preflight_hypernetwork import (HypernetworkPlan, hypernetwork_plan, resume_changes, start_hypernetwork,
                                     validate_hypernetwork)
from .templates import check_name_reachable, load_template

MAX_SEED = 2**64 - 1              # what torch.Generator.manual_seed takes
MAX_SIDE = 4096                   # px; A1111's training sizes stop at 2048
MAX_STEPS = 10**8
MAX_BATCH = 256
NAME_BYTES = 255                  # a file name's limit on every common file system
# The longest file a run writes for NAME: the temp file of LOG/images/NAME-STEP.png, i.e.
# ".NAME-STEP.safetensors.XXXXXXXX.tmp" -> NAME + STEP digits + 30 bytes.
_NAME_OVERHEAD = 30
# Settings a resumed run must keep: they decide the shape of what is trained.
SHAPE_KEYS = ("name", "vectors", "model", "kind")


@dataclass
class Plan:
    """Everything decided before the model loads."""
    cfg: TrainConfig
    kind: str                         # what is trained: "embedding" | "hypernetwork" (cfg.kind)
    name: str                         # trigger word and file stem (sanitised)
    out_dir: Path
    log_dir: Path
    lr: Schedule                      # learning-rate schedule
    clip: tuple[str, Schedule] | None   # (value | norm, threshold schedule)
    lines: list[str]                  # template lines
    images: list[Path]                # image files, in order
    start_step: int                   # completed steps when this segment starts
    seed: int
    preview_sampler: str              # our sampler key
    start: Embedding | None = None    # --embedding
    state: dict | None = None         # --resume: the resumable state
    hypernetwork: HypernetworkPlan | None = None   # a hypernetwork run: structure, widths, --hypernetwork
    notes: list[str] = field(default_factory=list)   # one-line notices to print

    @property
    def pt_path(self) -> Path:
        return self.out_dir / f"{self.name}.pt"

    @property
    def st_path(self) -> Path:
        return self.out_dir / f"{self.name}.safetensors"

    @property
    def state_path(self) -> Path:
        return self.log_dir / "state.pt"

    @property
    def end_step(self) -> int:
        return self.lr.end_step

    @property
    def previews(self) -> bool:
        return self.cfg.preview_every > 0


# ----------------------------------------------------------------------------- settings alone

def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _choice(value, allowed, flag: str) -> None:
    _need(value in allowed, f"{flag} {value!r}: choose one of {', '.join(allowed)}")


def _int_range(value, lo: int, hi: int, flag: str, hint: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    _need(ok, f"{flag} {value!r}: must be a whole number from {lo} to {hi}{hint}")


def validate(cfg: TrainConfig) -> None:
    """Every check of the settings themselves (no files, no devices): ConfigError naming the flag,
    the value and what it may be."""
    _need(cfg.data is not None, "--data DIR is required (a folder of training images; try --demo)")
    start_flag = "--hypernetwork" if cfg.kind == "hypernetwork" else "--embedding"
    start_file = getattr(cfg, start_flag[2:])
    _need(start_file is None or str(start_file).strip() != "", f"{start_flag}: the path is empty")
    _need(cfg.name is not None or start_file is not None, f"--name NAME is required (or {start_flag} FILE)")
    _choice(cfg.precision, PRECISIONS, "--precision")
    _choice(cfg.optimizer, OPTIMIZERS, "--optimizer")
    _choice(cfg.latents, LATENT_MODES, "--latents")
    _choice(cfg.resize, RESIZE_MODES, "--resize")
    _choice(cfg.kernels, KERNELS, "--kernels")
    _choice(cfg.attention, ATTENTION, "--attention")
    sampler_key(cfg.preview_sampler, "--preview-sampler")
    check_device_name(cfg.device)
    _int_range(cfg.vectors, 1, MAX_VECTORS, "--vectors", f" ({MAX_VECTORS} tokens fit in a prompt)")
    _int_range(cfg.steps, 1, MAX_STEPS, "--steps")
    _int_range(cfg.batch_size, 1, MAX_BATCH, "--batch-size")
    _int_range(cfg.grad_accum, 1, 1024, "--grad-accum")
    _int_range(cfg.save_every, 0, MAX_STEPS, "--save-every", " (0 = only the final save)")
    _int_range(cfg.check_every, 1, 10_000, "--check-every")
    _int_range(cfg.preview_every, 0, MAX_STEPS, "--preview-every", " (0 = no previews)")
    _int_range(cfg.preview_steps, 1, 1000, "--preview-steps")
    _int_range(cfg.clip_skip, 1, 12, "--clip-skip", " (A1111 numbering, 1 = off)")
    if cfg.seed is not None:
        _int_range(cfg.seed, 0, MAX_SEED, "--seed")
    _int_range(cfg.preview_seed, 0, MAX_SEED, "--preview-seed")
    if cfg.threads is not None:
        _int_range(cfg.threads, 1, 1024, "--threads")
    for flag, v in (("--width", cfg.width), ("--height", cfg.height)):
        ok = isinstance(v, int) and not isinstance(v, bool) and 64 <= v <= MAX_SIDE and v % 8 == 0
        near = max(64, min(MAX_SIDE, round(v / 8) * 8)) if isinstance(v, (int, float)) and math.isfinite(v) else 512
        _need(ok, f"{flag} {v!r}: training sizes are multiples of 8 from 64 to {MAX_SIDE} px "
                  f"(the VAE works on 8x8 pixel blocks): try {near}")
    _need(isinstance(cfg.tag_dropout, (int, float)) and 0.0 <= cfg.tag_dropout < 1.0,
          f"--tag-dropout {cfg.tag_dropout!r}: must be in [0, 1)")
    _need(isinstance(cfg.preview_cfg, (int, float)) and math.isfinite(cfg.preview_cfg) and 0 <= cfg.preview_cfg <= 100,
          f"--preview-cfg {cfg.preview_cfg!r}: must be a number from 0 to 100")
    _need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other: "
          "--resume continues the run in the log folder, --overwrite starts it again")
    _need(not (cfg.png_embed and cfg.preview_every <= 0),
          "--png-embed writes the vectors into the preview images: also set --preview-every N")
    _need(not (cfg.offload and str(cfg.device).split(":")[0] == "cpu"),
          "--offload needs a CUDA device (it streams the UNet's weights to the GPU)")
    _need(not (cfg.offload and cfg.compile), "--offload and --compile exclude each other "
          "(offload swaps the weights in Python hooks between blocks; a compiled UNet cannot follow)")
    for flag, v in (("--name", cfg.name), ("--init-text", cfg.init_text), ("--preview-prompt", cfg.preview_prompt)):
        _need(v is None or "\x00" not in v, f"{flag}: the text holds a NUL byte")
    if cfg.name is not None:
        check_name(cfg.name, cfg.steps, cfg.kind)
    lr = parse_schedule(cfg.lr, cfg.steps)
    huge = [r for r, _ in lr.entries if r > 1]
    _need(not huge or cfg.allow_huge_lr, f"--lr {cfg.lr!r}: a learning rate of {huge[0]:g} is over 1 "
          "(the usual range is 1e-4 to 0.05; a typo?): pass --allow-huge-lr to train with it anyway" if huge else "")
    parse_clip_grad(cfg.clip_grad, cfg.steps)
    if cfg.kind == "hypernetwork":
        validate_hypernetwork(cfg)


def check_name(raw: str, steps: int, kind: str = "embedding") -> str:
    """The sanitised name (A1111's rule); ConfigError when nothing is left or the files it names
    would not fit the 255-byte file-name limit."""
    name = sanitize_hypernetwork_name(raw) if kind == "hypernetwork" else sanitize_name(raw)
    limit = NAME_BYTES - _NAME_OVERHEAD - len(str(steps))
    size = len(name.encode("utf-8"))
    _need(size <= limit, f"--name: {size} bytes is too long for the file names it makes "
                         f"(NAME-STEP.safetensors); use at most {limit} bytes")
    return name


# ----------------------------------------------------------------------------- files

def _check_input_path(value, flag: str, want: str) -> None:
    """A path given on the command line: it exists, and is a `want` ('file', 'folder' or
    'file or folder'), never a FIFO/socket/device (those are refused, not opened)."""
    kind = kind_of(value)
    if kind == "missing":
        raise ConfigError(f"{flag} {value}: no such {want}")
    if kind not in want.split(" or "):
        raise ConfigError(f"{flag} {value} is a {kind}, not a {want}")


def _resolve_name(cfg: TrainConfig) -> tuple[str, object]:
    """The run's name and what it starts from: an Embedding (--embedding), a Hypernetwork
    (--hypernetwork; its file stem is the default name), or None."""
    start = None
    if cfg.kind == "hypernetwork":
        hn = start_hypernetwork(cfg)
        return check_name(cfg.name if cfg.name else hn.path.stem, cfg.steps, cfg.kind), hn
    if cfg.embedding:
        _check_input_path(cfg.embedding, "--embedding", "file")
        start = _read_start_embedding(cfg.embedding)
        _need(start.vectors.shape[0] <= MAX_VECTORS,
              f"--embedding {cfg.embedding}: {start.vectors.shape[0]} vectors do not fit in a prompt "
              f"(at most {MAX_VECTORS}): it could never be trained or used")
    return check_name(cfg.name if cfg.name else start.name, cfg.steps), start


def _read_start_embedding(path) -> Embedding:
    try:
        return read_embedding(path)
    except ConfigError as e:
        if "an A1111 hypernetwork, not an embedding" in str(e):      # the reader's wording
            raise ConfigError(f"--embedding {path}: an A1111 hypernetwork, not an embedding (train it with "
                              f"`ti-fast train-hypernetwork --hypernetwork {path}`)") from None
        raise


def _state_for_resume(cfg: TrainConfig, state_path: Path, name: str, start, hp: HypernetworkPlan | None
                      ) -> tuple[dict, list[str], HypernetworkPlan | None]:
    """The resumable state, checked: there, readable, and of a run of the same shape (name,
    vectors or the hypernetwork's widths and structure, model, what is trained). Returns it, a
    notice listing other changed settings, and the hypernetwork plan as the state has it."""
    why = special_reason(state_path)
    if why is not None:
        raise ConfigError(f"--resume: {state_path} is {why}")
    if not state_path.is_file():
        raise ConfigError(f"--resume: no resumable state at {state_path} (use the same --log-dir / --name)")
    state = load_state(state_path)
    last = read_settings(state_path.parent / "settings.json")
    prev = last.get("config", {}) if last else {}
    shape = []
    if state.get("name", name) != name:
        shape.append(f"name {state['name']!r} (now {name!r})")
    if state.get("kind", "embedding") != cfg.kind:
        shape.append(f"what is trained: {state.get('kind', 'embedding')} (now {cfg.kind})")
    elif hp is not None:
        changes, hp = resume_changes(state, hp, state_path)
        shape += changes
    else:
        vectors = start.vectors.shape[0] if start is not None else cfg.vectors
        if state["vectors"].shape[0] != vectors:
            shape.append(f"{state['vectors'].shape[0]} vectors (now {vectors})")
    model_change, moved = _model_change(prev.get("model"), (last or {}).get("model"), cfg.model)
    if model_change:
        shape.append(model_change)
    if shape:
        raise ConfigError(f"--resume: the run in {state_path.parent} was trained with {'; '.join(shape)}; "
                          "resume it with its own settings, or start a new run in another --log-dir")
    ignore = set(SHAPE_KEYS) | {"resume", "overwrite", "quiet"}
    changed = [k for k, v in cfg.to_dict().items() if k in prev and k not in ignore and prev[k] != v]
    notes = ["ti-fast: resuming with changed settings: " + ", ".join(
        f"--{k.replace('_', '-')} {prev[k]!r} -> {getattr(cfg, k)!r}" for k in changed)] if changed else []
    if moved:
        notes.append(f"ti-fast: resuming on the same model at a new path ({moved})")
    return state, notes, hp


def _model_change(old, recorded, model) -> tuple[str | None, str | None]:
    """Whether a resumed run's model is the one it was trained on: (why not, or None; how it
    moved, or None). A single-file model is compared by its A1111 hash where settings.json
    recorded one, so a moved or renamed copy (or make-tiny folder) resumes and a file replaced at the same path does
    not (the hash is cached on disk: the load that follows does not hash again); a folder, or
    settings without a hash, by its path."""
    if not old:
        return None, None
    was = recorded.get("hash") if isinstance(recorded, dict) else None
    file = single_model_file(str(model))
    if isinstance(was, str) and file is not None and kind_of(file) == "file":
        try:
            now = file_sha256(file)[:10]
        except OSError:
            now = None                  # unreadable: the loader names it, in one line
        if now is not None:
            if now != was:
                return f"model {old} of hash {was} (now {model} of hash {now})", None
            return None, (None if _same_path(old) == _same_path(model) else f"{old} -> {model}")
    if _same_path(old) != _same_path(model):
        return f"model {old} (now {model})", None
    return None, None


def _same_path(p) -> str:
    return str(Path(str(p)).expanduser().resolve())


def check_device(cfg: TrainConfig):
    """The device, and that what the settings ask of it can run there (--offload, --kernels
    triton, --attention xformers/triton need CUDA; the precision must be one it has). Before the
    model loads; the trainer's model loader asks again for the process-wide settings it gets."""
    device = resolve_device(cfg.device)
    if cfg.offload and device.type != "cuda":
        raise ConfigError("--offload needs a CUDA device (it streams the UNet's weights to the GPU)")
    if cfg.kernels == "triton" and device.type != "cuda":
        raise ConfigError("--kernels triton needs a CUDA device (use --kernels torch or auto)")
    resolve_backend(cfg.attention, device, verbose=False)
    resolve_precision(cfg.precision, device)
    return device


def plan(cfg: TrainConfig, warn=None) -> Plan:
    """validate(cfg), then every check that reads only small files; the run's Plan. `warn`
    receives one line per skipped image file (FIFOs and the like)."""
    validate(cfg)
    name, start = _resolve_name(cfg)
    hyper = cfg.kind == "hypernetwork"
    lines = load_template(cfg.template)
    images = list_images(cfg.data, recursive=cfg.recursive, warn=warn)
    if not hyper:                    # a hypernetwork's prompts need no trigger word
        check_name_reachable(lines, [caption_for(p) for p in images], name)
    _need(cfg.model is not None, "--model PATH is required (a .safetensors/.ckpt file or a diffusers folder; try --demo)")
    _check_input_path(cfg.model, "--model", "file or folder")
    if cfg.vae:
        _check_input_path(cfg.vae, "--vae", "file")
    if cfg.tokenizer:
        _check_input_path(cfg.tokenizer, "--tokenizer", "folder")
    check_device(cfg)
    hp = hypernetwork_plan(cfg, start) if hyper else None      # the model's widths from its header
    out_dir = check_writable_dir(cfg.out, "--out")
    log_dir = check_writable_dir(cfg.log_dir if cfg.log_dir else Path("ti-logs") / name, "--log-dir")
    if cfg.cache_dir:
        check_writable_dir(cfg.cache_dir, "--cache-dir")
    state_path = log_dir / "state.pt"
    state, notes, start_step = None, [], int(start.step or 0) if start is not None else 0
    if cfg.resume:
        state, notes, hp = _state_for_resume(cfg, state_path, name, start, hp)
        start_step = int(state["step"])
    else:
        if kind_of(state_path) != "missing" and not cfg.overwrite:
            raise ConfigError(f"{log_dir} holds a resumable run (state.pt): pass --resume to continue it "
                              "or --overwrite to start it again")
        outputs = [out_dir / f"{name}.pt"] + ([] if hyper else [out_dir / f"{name}.safetensors"])
        clash = [p for p in outputs if kind_of(p) != "missing"]
        if clash and not cfg.overwrite:
            raise ConfigError(f"{clash[0]} exists: pass --resume to continue it or --overwrite to replace it")
    lr = parse_schedule(cfg.lr, cfg.steps)
    # --resume at the last step trains nothing but still saves: it puts back the outputs of a run
    # killed inside its final save
    if start_step > lr.end_step or (start_step == lr.end_step and not cfg.resume):
        raise ConfigError(f"nothing to do: the {cfg.kind} already has {start_step} steps and training ends "
                          f"at {lr.end_step} (raise --steps)")
    seed = int(state["seed"]) if state else (cfg.seed if cfg.seed is not None
                                             else random.SystemRandom().randrange(2**31))
    return Plan(cfg=cfg, kind=cfg.kind, name=name, out_dir=out_dir, log_dir=log_dir, lr=lr,
                clip=parse_clip_grad(cfg.clip_grad, cfg.steps), lines=lines, images=images,
                start_step=start_step, seed=seed, preview_sampler=sampler_key(cfg.preview_sampler),
                start=None if hyper else start, state=state, notes=notes, hypernetwork=hp)

