"""load_model: any SD 1.x checkpoint layout -> our three modules + tokenizer + ModelInfo.

Flow (nothing is built before the file is classified and every key/shape is checked):
  1. open the weight file(s) (files.py: headers only for safetensors, mmap for torch zips)
  2. classify / refuse (detect.py), choose the architecture (ti_fast_config metadata,
     diffusers config.json, or SD 1.5 with in-channels / vocab read from tensor shapes)
  3. map every file key to our canonical name (keys.py) and compare names and shapes with a
     meta-device model of that config: the first missing / unexpected / mis-shaped keys
     are named in one line
  4. build each model on the meta device and fill it with load_state_dict(assign=True),
     reading and casting one tensor at a time (peak memory = model + largest tensor)
Tensors whose dtype and device already match stay memory-mapped (private, copy-on-write).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import UNet, UNetConfig, VAE, VAEConfig, CLIPTextEncoder, CLIPConfig
from . import configs as C
from .detect import classify_single, classify_diffusers, has_vae, has_text_encoder, unet_in_channels
from .errors import ModelLoadError, refuse
from .files import WeightFile, open_weights
from .hashes import file_hashes, folder_sha256
from .keys import (meta_model, UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, CLIP_PREFIX_OLD, expected_shapes,
                   from_diffusers_map, clip_canonical, is_vae_attn_matrix)
from .tokenizer import tokenizer_for

_MODELS = {"unet": (UNet, "UNet"), "vae": (VAE, "VAE"), "clip": (CLIPTextEncoder, "text encoder")}
# Old diffusers VAE attention names (before 0.14), still found in some folders.
_OLD_VAE_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


@dataclass
class ModelInfo:
    variant: str                 # "sd1" | "sd1-inpainting"
    config: dict                 # {"unet": UNetConfig dict, "vae": ..., "clip": ...}
    dtype: torch.dtype           # dtype the modules were loaded in
    name: str                    # file stem, or folder name
    path: str                    # what was passed (resolved)
    layout: str                  # "single" | "diffusers"
    file_dtype: str              # most common floating dtype stored in the weight files
    ema: bool = False            # UNet weights came from model_ema.* copies
    vae_path: str | None = None  # separate VAE file/folder, when given
    tokenizer_source: str = ""
    weight_files: list = field(default_factory=list)   # hashed files (folder: unet, text_encoder, vae)
    _hashes: tuple | None = field(default=None, repr=False)

    def _compute(self):
        if self._hashes is None:
            if self.layout == "diffusers":
                h = folder_sha256([Path(p) for p in self.weight_files])
                self._hashes = (h[:10], h[:8])
            else:
                self._hashes = file_hashes(self.weight_files[0])
        return self._hashes

    @property
    def hash(self) -> str:
        """A1111 model hash: 10 hex of the file's sha256 (folder: of unet+text_encoder+vae bytes).
        Computed on first use (seconds for a 2-4 GB file), then cached on disk."""
        return self._compute()[0]

    @property
    def legacy_hash(self) -> str:
        """A1111's old 8-hex hash (sha256 of 64 KiB at 1 MiB); for a folder, the folder hash's first 8."""
        return self._compute()[1]

    def to_dict(self) -> dict:
        return {"variant": self.variant, "config": self.config, "dtype": str(self.dtype).removeprefix("torch."),
                "name": self.name, "path": self.path, "layout": self.layout, "file_dtype": self.file_dtype,
                "ema": self.ema, "vae_path": self.vae_path, "hash": self.hash, "legacy_hash": self.legacy_hash}


class SDModel:
    """The loaded model: .unet, .vae, .text_encoder (eval, frozen), .tokenizer, .info."""

    def __init__(self, unet: UNet, vae: VAE, text_encoder: CLIPTextEncoder, tokenizer, info: ModelInfo):
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.info = unet, vae, text_encoder, tokenizer, info

    def to(self, device=None, dtype=None) -> "SDModel":
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        if dtype is not None:
            self.info.dtype = dtype
        return self

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """SD1 ids [B, 77]: BOS ... EOS, padded with EOS, truncated to 77 (no chunking here)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids
        return torch.tensor(ids, dtype=torch.long)

    def __repr__(self):
        return f"SDModel({self.info.name!r}, {self.info.variant}, {self.info.dtype})"


# ---------------------------------------------------------------- filling one module
def _check_keys(kind: str, cfg, wf: WeightFile, src_of: dict[str, str], extra: list[str], where: Path):
    """Names and shapes against a meta model of cfg; one line naming the first problems."""
    C.check_config(kind, cfg, where)              # before anything is built from it
    exp = expected_shapes(kind, cfg)
    missing = [k for k in exp if k not in src_of]
    unexpected = extra + [src_of[k] for k in src_of if k not in exp]
    shapes = [f"{src_of[k]} {list(wf.shapes[src_of[k]])} vs {list(s)}" for k, s in exp.items()
              if k in src_of and not _shape_ok(kind, k, tuple(wf.shapes[src_of[k]]), s)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:2])}")
        raise refuse(where, f"key mismatch in the {_MODELS[kind][1]}: " + "; ".join(parts))


def _shape_ok(kind: str, key: str, got: tuple, want: tuple) -> bool:
    """Equal, or the one allowed reshape: VAE mid-attention Linear [C,C] -> 1x1 conv [C,C,1,1]."""
    return got == want or (kind == "vae" and is_vae_attn_matrix(key) and got == want[:2])


def _fill(kind: str, cfg, wf: WeightFile, src_of: dict[str, str], device, dtype):
    """Build `kind` on meta and assign tensors read one at a time, cast to dtype on device."""
    exp = expected_shapes(kind, cfg)
    model = meta_model(kind, cfg)
    sd = {}
    for k, shape in exp.items():
        t = wf.get(src_of[k])
        if tuple(t.shape) != shape:
            t = t.reshape(shape)                  # VAE attention Linear [C,C] -> 1x1 conv [C,C,1,1]
        sd[k] = t.to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _file_dtype(wfs: list[WeightFile]) -> str:
    count: dict[torch.dtype, int] = {}
    for wf in wfs:
        for k, dt in wf.dtypes.items():
            if dt.is_floating_point:
                count[dt] = count.get(dt, 0) + wf.numel(k)
    return str(max(count, key=count.get)).removeprefix("torch.") if count else "unknown"


# ---------------------------------------------------------------- single files
def _single_maps(wf: WeightFile, use_ema: bool) -> tuple[dict, dict, dict, bool]:
    """canonical -> file key, for unet / vae / clip of an original-layout file."""
    unet, vae, clip = {}, {}, {}
    for k in wf.keys():
        if k.endswith("position_ids"):
            continue                              # always arange(77); stored ones are often wrong
        if k.startswith(UNET_PREFIX):
            unet[k[len(UNET_PREFIX):]] = k
        elif k.startswith(VAE_PREFIX):
            vae[k[len(VAE_PREFIX):]] = k
        elif k.startswith(CLIP_PREFIX):
            clip[clip_canonical(k[len(CLIP_PREFIX):])] = k
        elif k.startswith(CLIP_PREFIX_OLD):
            clip[clip_canonical(k[len(CLIP_PREFIX_OLD):])] = k
    n_ema = sum(k.startswith("model_ema.") for k in wf.keys())
    ema = use_ema and n_ema > 100                 # diffusers' rule for "this file has EMA copies"
    if ema:
        flat = {"model_ema." + ("diffusion_model." + k).replace(".", ""): k for k in unet}
        missing = [f for f in flat if f not in wf.shapes]
        if missing:
            raise refuse(wf.path, f"use_ema: the file's EMA copies are incomplete (no {missing[0]})")
        unet = {k: f for f, k in flat.items()}
    return unet, vae, clip, ema


def _single_configs(wf: WeightFile, unet: dict, clip: dict) -> tuple[UNetConfig, VAEConfig, CLIPConfig]:
    raw = wf.metadata.get("ti_fast_config")
    if raw:
        try:
            d = json.loads(raw)
            return UNetConfig.from_dict(d["unet"]), VAEConfig.from_dict(d["vae"]), CLIPConfig.from_dict(d["clip"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise refuse(wf.path, f"corrupt ti_fast_config metadata ({e})") from None
    conv_in = unet.get("input_blocks.0.0.weight")
    ucfg = UNetConfig(in_channels=wf.shapes[conv_in][1]) if conv_in else UNetConfig()   # 4, or 9 (inpainting)
    tok = clip.get("embeddings.token_embedding.weight")
    pos = clip.get("embeddings.position_embedding.weight")
    ccfg = CLIPConfig(vocab_size=wf.shapes[tok][0] if tok else 49408, max_positions=wf.shapes[pos][0] if pos else 77)
    return ucfg, VAEConfig(), ccfg


def _load_single(file: Path, device, dtype, use_ema: bool, has_vae_arg: bool):
    wf = open_weights(file)
    variant = classify_single(wf.shapes, wf.metadata, file)
    unet, vae, clip, ema = _single_maps(wf, use_ema)
    if not has_text_encoder(wf.keys()):
        raise refuse(file, "has no text encoder (cond_stage_model.*): a UNet-only file cannot be used for TI")
    if not has_vae(wf.keys()) and not has_vae_arg:
        raise refuse(file, "has no VAE (first_stage_model.*): pass a separate VAE with vae= / --vae")
    ucfg, vcfg, ccfg = _single_configs(wf, unet, clip)
    _check_keys("unet", ucfg, wf, unet, [], file)
    _check_keys("clip", ccfg, wf, clip, [], file)
    if not has_vae_arg:
        _check_keys("vae", vcfg, wf, vae, [], file)
    parts = {"unet": _fill("unet", ucfg, wf, unet, device, dtype),
             "clip": _fill("clip", ccfg, wf, clip, device, dtype),
             "vae": None if has_vae_arg else _fill("vae", vcfg, wf, vae, device, dtype)}
    return parts, {"unet": ucfg, "vae": vcfg, "clip": ccfg}, variant, ema, [wf]


# ---------------------------------------------------------------- diffusers folders
def _pick(sub: Path, stems: tuple[str, ...], dtype) -> Path:
    """The weight file of one component: safetensors before .bin; the .fp16 variant when
    loading in half precision or when it is the only one."""
    half = dtype in (torch.float16, torch.bfloat16)
    order = []
    for ext in ("safetensors", "bin"):
        for stem in stems:
            full, fp16 = sub / f"{stem}.{ext}", sub / f"{stem}.fp16.{ext}"
            order += [fp16, full] if half else [full, fp16]
    for p in order:
        if p.is_file():
            return p
    if any(sub.glob("*.index.json")):
        raise refuse(sub, "sharded weights (*.index.json) are not supported; save the component unsharded")
    raise refuse(sub, f"no weights file ({stems[0]}[.fp16].safetensors or .bin)")


def _diffusers_map(kind: str, cfg, wf: WeightFile) -> tuple[dict, list]:
    inv = from_diffusers_map(kind, cfg) if kind != "clip" else None
    src_of, extra = {}, []
    for k in wf.keys():
        if k.endswith("position_ids"):
            continue
        if kind == "clip":
            src_of[clip_canonical(k)] = k
            continue
        name = k
        if kind == "vae":
            for old, new in _OLD_VAE_ATTN.items():
                name = name.replace(old, new) if ".mid_block.attentions." in name else name
        if name in inv:
            src_of[inv[name]] = k
        else:
            extra.append(k)
    return src_of, extra


def _load_diffusers(folder: Path, device, dtype, has_vae_arg: bool):
    index = C.read_json(folder / "model_index.json")
    sched = folder / "scheduler" / "scheduler_config.json"
    classify_diffusers(folder, index, C.read_json(sched) if sched.is_file() else None)
    ucfg = C.unet_from_diffusers(C.read_json(folder / "unet" / "config.json"), f"{folder.name}/unet/config.json")
    ccfg = C.clip_from_transformers(C.read_json(folder / "text_encoder" / "config.json"),
                                    f"{folder.name}/text_encoder/config.json")
    files = {"unet": _pick(folder / "unet", ("diffusion_pytorch_model",), dtype),
             "clip": _pick(folder / "text_encoder", ("model", "pytorch_model"), dtype)}
    vcfg, vae_file = VAEConfig(), None
    if not has_vae_arg or (folder / "vae" / "config.json").is_file():
        vcfg = C.vae_from_diffusers(C.read_json(folder / "vae" / "config.json"), f"{folder.name}/vae/config.json")
        vae_file = _pick(folder / "vae", ("diffusion_pytorch_model",), dtype)
    if not has_vae_arg:
        files["vae"] = vae_file
    cfgs = {"unet": ucfg, "vae": vcfg, "clip": ccfg}
    wfs = {kind: open_weights(p) for kind, p in files.items()}
    variant = "sd1-inpainting" if unet_in_channels(wfs["unet"].shapes, "conv_in.weight", files["unet"]) == 9 else "sd1"
    maps = {}
    for kind, wf in wfs.items():
        maps[kind] = _diffusers_map(kind, cfgs[kind], wf)
        _check_keys(kind, cfgs[kind], wf, maps[kind][0], maps[kind][1], files[kind])
    parts = {kind: _fill(kind, cfgs[kind], wf, maps[kind][0], device, dtype) for kind, wf in wfs.items()}
    parts.setdefault("vae", None)
    hashed = [files["unet"], files["clip"]] + ([vae_file] if vae_file else [])   # the folder's own VAE
    return parts, cfgs, variant, hashed, list(wfs.values())


# ---------------------------------------------------------------- separate VAE
def _load_vae(path: Path, model_cfg: VAEConfig, device, dtype) -> tuple[VAE, VAEConfig, WeightFile]:
    """A standalone VAE: a file with or without `first_stage_model.`, original or diffusers
    names (`loss.*` and EMA bookkeeping dropped), shaped like the model's own VAE (model_cfg),
    or a diffusers vae/ folder (its config.json)."""
    if path.is_dir():
        cfg = C.vae_from_diffusers(C.read_json(path / "config.json"), f"{path.name}/config.json")
        wf = open_weights(_pick(path, ("diffusion_pytorch_model",), dtype))
        src_of, extra = _diffusers_map("vae", cfg, wf)
    else:
        wf = open_weights(path)
        cfg = model_cfg
        keys = [k for k in wf.keys() if not k.startswith("loss.") and k not in ("model_ema.decay", "model_ema.num_updates")]
        if any(k.startswith(UNET_PREFIX) for k in keys):
            keys = [k for k in keys if k.startswith(VAE_PREFIX)]   # a full checkpoint: take its VAE
        if any(".down_blocks." in k or ".up_blocks." in k for k in keys):
            src_of, extra = _diffusers_map("vae", cfg, wf)
        else:
            src_of = {k.removeprefix(VAE_PREFIX): k for k in keys}
            extra = []
    if not src_of:
        raise refuse(path, "not a VAE (no encoder./decoder. weights)")
    _check_keys("vae", cfg, wf, src_of, extra, path)
    return _fill("vae", cfg, wf, src_of, device, dtype), cfg, wf


# ---------------------------------------------------------------- public entry point
def single_model_file(path) -> Path | None:
    """The one weight file of a single-file model or of a make-tiny folder (model.safetensors +
    tokenizer/); None for a diffusers folder or anything else. Reads no file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return None
        path = path / "model.safetensors"
    return path if path.is_file() else None


def load_model(path, *, device="cpu", dtype=torch.float32, vae=None, tokenizer=None, use_ema=False) -> SDModel:
    """Load an SD 1.x model: single .safetensors/.ckpt file, diffusers folder, or make-tiny
    folder. vae: separate VAE file/folder. tokenizer: folder (vocab.json + merges.txt) or a
    CLIPTokenizer. use_ema: UNet from the model_ema.* copies when the file has them.
    Raises ModelLoadError (one line) for anything it will not load."""
    path = Path(path).expanduser().resolve()
    device = torch.device(device)
    if not path.exists():
        raise refuse(path, "no such file or folder")
    has_vae_arg = vae is not None
    model_dir = path if path.is_dir() else path.parent
    if path.is_dir() and (path / "model_index.json").is_file():
        parts, cfgs, variant, hashed, wfs = _load_diffusers(path, device, dtype, has_vae_arg)
        layout, ema, name = "diffusers", False, path.name
    else:
        file, name = path, path.stem
        if path.is_dir():
            file, name = path / "model.safetensors", path.name
            if not file.is_file():
                raise refuse(path, "folder is neither a diffusers folder (model_index.json) nor a make-tiny "
                                   "folder (model.safetensors + tokenizer/)")
        parts, cfgs, variant, ema, wfs = _load_single(file, device, dtype, use_ema, has_vae_arg)
        layout, hashed = "single", [file]
    vae_path = None
    if has_vae_arg:
        vae_path = Path(vae).expanduser().resolve()
        parts["vae"], cfgs["vae"], vwf = _load_vae(vae_path, cfgs["vae"], device, dtype)
        wfs.append(vwf)
    tok, tok_src = tokenizer_for(tokenizer, model_dir, cfgs["clip"].vocab_size, path)
    info = ModelInfo(variant=variant, config={k: v.to_dict() for k, v in cfgs.items()}, dtype=dtype, name=name,
                     path=str(path), layout=layout, file_dtype=_file_dtype(wfs), ema=ema,
                     vae_path=str(vae_path) if vae_path else None, tokenizer_source=tok_src,
                     weight_files=[str(p) for p in hashed])
    return SDModel(parts["unet"], parts["vae"], parts["clip"], tok, info)


__all__ = ["load_model", "single_model_file", "SDModel", "ModelInfo", "ModelLoadError"]
