"""`ti-fast inspect`: what a file is, one dict per file.

The dispatch point is `KINDS`: each kind says whether it recognises a file's stored object and
how to describe it. Today there are two, tried in order:
  hypernetwork  an A1111 hypernetwork .pt (a dict whose int keys — context widths — map to a
                tuple of two state dicts, for to_k and to_v), read by ti_fast.hypernetworks
  embedding     every embedding layout ti-fast reads (A1111/original-TI .pt, kohya/OneTrainer,
                diffusers {token: tensor}, SDXL {clip_l, clip_g}, PNG/WebP chunk or pixels)
Every description carries path, kind, format, name, step, vectors, width (None where they do
not apply) and family (the model the width belongs to).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..embeddings.formats import KOHYA_KEY, ONETRAINER_KEY, EmbeddingError, embedding_from_data
from ..hypernetworks.format import HypernetworkError, comfyui_differences, hypernetwork_from_dict, is_hypernetwork_dict
from .raw import NotAnEmbedding, RawFile, read_raw

FAMILIES = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL (clip_g only)"}
HYPERNETWORK_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}     # by the text encoder's width


def file_shorthash(path) -> str:
    """First 12 hex of the file's sha256: A1111's `TI hashes` value."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- embeddings
def embedding_layout(raw: RawFile) -> tuple[str, object]:
    """(layout, key of the vectors): a1111, original-ti, sdxl, kohya, onetrainer, diffusers
    ({token: tensor}), single-tensor (one tensor beside other entries), multi-tensor (several,
    none of them named as an embedding: tools disagree on which one to take), or unknown."""
    d = raw.data
    if not isinstance(d, dict) or not d:
        return "unknown", None
    if "string_to_param" in d:
        params = getattr(d["string_to_param"], "_parameters", d["string_to_param"])
        key = next(iter(params), None) if isinstance(params, dict) else None
        return ("original-ti" if raw.parameter_dict else "a1111"), key
    if "clip_l" in d and "clip_g" in d:
        return "sdxl", None
    tensors = [k for k, v in d.items() if torch.is_tensor(v)]
    for key, layout in ((KOHYA_KEY, "kohya"), (ONETRAINER_KEY, "onetrainer")):
        if key in tensors:
            return layout, key
    if len(tensors) == 1:
        return ("diffusers" if len(d) == 1 else "single-tensor"), tensors[0]
    return ("multi-tensor", None) if tensors else ("unknown", None)


def format_name(raw: RawFile, layout: str) -> str:
    """e.g. a1111-pt, kohya-safetensors, diffusers-bin, png-chunk, webp-pixels."""
    if raw.is_image:
        return f"{raw.container}-{raw.encodings[0]}"
    if raw.container == "safetensors":
        return f"{layout}-safetensors"
    return f"{layout}-{raw.ext[1:] if raw.ext in ('.pt', '.bin', '.ckpt', '.pth') else 'pt'}"


def trigger_name(raw: RawFile) -> str:
    """The name A1111 registers: an image's stored `name`, else the file stem."""
    if raw.is_image and isinstance(raw.data, dict) and isinstance(raw.data.get("name"), str) and raw.data["name"]:
        return raw.data["name"]
    return raw.path.stem


def _norms(v: torch.Tensor) -> list[float]:
    v = v.detach().to(torch.float32)
    return [float(x) for x in torch.linalg.vector_norm(v.reshape(-1, v.shape[-1]), dim=1)]


def _stored(d: dict, key):
    return d.get(key) if isinstance(d, dict) else None


def describe_embedding(raw: RawFile) -> dict:
    layout, key = embedding_layout(raw)
    d = raw.data
    name = trigger_name(raw)
    out = {"path": str(raw.path), "kind": "embedding", "format": format_name(raw, layout), "name": name,
           "stored_name": _stored(d, "name") if isinstance(_stored(d, "name"), str) else raw.metadata.get("name"),
           "step": None, "vectors": None, "width": None, "family": None, "dtype": None, "key": key,
           "sd_checkpoint": None, "sd_checkpoint_name": None, "norms": None, "encodings": list(raw.encodings),
           "size": raw.size, "hash": file_shorthash(raw.path)}
    try:
        out.update(_vectors(raw, layout, key, name))
    except EmbeddingError as e:             # described as far as it goes; --verify still runs
        out["error"] = str(e)
    return out


def _vectors(raw: RawFile, layout: str, key, name: str) -> dict:
    d, out = raw.data, {}
    if layout == "sdxl":
        parts = {k: d[k] for k in ("clip_l", "clip_g")}
        if not all(torch.is_tensor(t) and t.ndim == 2 for t in parts.values()):
            raise EmbeddingError(f"{raw.path}: SDXL embedding whose clip_l/clip_g are not [N, width] tensors")
        out.update(vectors=int(parts["clip_l"].shape[0]), width=[int(parts["clip_l"].shape[1]),
                   int(parts["clip_g"].shape[1])], family="SDXL", dtype=str(parts["clip_l"].dtype).removeprefix("torch."),
                   norms={k: _norms(t) for k, t in parts.items()})
        step = d.get("step")
    else:
        emb = embedding_from_data(d if raw.container != "safetensors" else {**raw.metadata, **d}, raw.path, name)
        stored = d["string_to_param"] if layout in ("a1111", "original-ti") else d
        stored = getattr(stored, "_parameters", stored)[key]
        out.update(vectors=emb.num_vectors, width=emb.width, family=FAMILIES.get(emb.width),
                   dtype="json" if raw.is_image else str(stored.dtype).removeprefix("torch."),
                   sd_checkpoint=emb.sd_checkpoint, sd_checkpoint_name=emb.sd_checkpoint_name,
                   norms=_norms(emb.vectors))
        step = emb.step
    out["step"] = step if isinstance(step, int) and not isinstance(step, bool) else None
    return out


def is_embedding(raw: RawFile) -> bool:
    return embedding_layout(raw)[0] != "unknown"


# ---------------------------------------------------------------- hypernetworks
def is_hypernetwork(raw: RawFile) -> bool:
    """A1111's layout: int keys (widths) -> (state_dict_k, state_dict_v)."""
    return is_hypernetwork_dict(raw.data)


def describe_hypernetwork(raw: RawFile) -> dict:
    """The file read by ti_fast.hypernetworks with A1111's rules (its defaults for missing keys,
    the module numbering checked against the structure): name (the file stem: the prompt tag),
    the structure under the file's own key names, the parameter count, and `comfyui`, where
    ComfyUI's loader would build another forward. A file A1111 could not load keeps its raw
    facts and an `error`."""
    d = raw.data
    widths = sorted(k for k in d if isinstance(k, int) and not isinstance(k, bool))
    step = d.get("step")
    out = {"path": str(raw.path), "kind": "hypernetwork", "format": f"a1111-hypernetwork-{raw.ext[1:] or 'pt'}",
           "name": raw.path.stem, "stored_name": d.get("name") if isinstance(d.get("name"), str) else None,
           "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
           "vectors": None, "width": None, "widths": widths,
           # the text encoder's width says the model (the others are the UNet's self-attention widths)
           "family": next((HYPERNETWORK_FAMILIES[w] for w in widths if w in HYPERNETWORK_FAMILIES), None),
           "size": raw.size, "hash": file_shorthash(raw.path)}
    try:
        hn = hypernetwork_from_dict(d, raw.path, name=raw.path.stem)
    except HypernetworkError as e:
        return {**out, "error": str(e)}
    s = hn.structure
    return {**out, "layer_structure": [float(x) for x in s.layer_structure], "activation_func": s.activation,
            "is_layer_norm": s.layer_norm, "use_dropout": s.use_dropout,
            "dropout_structure": [float(p) for p in s.dropout_structure], "last_layer_dropout": s.last_layer_dropout,
            "activate_output": s.activate_output, "weight_initialization": s.weight_init,
            "parameters": hn.num_parameters(), "sd_checkpoint": hn.sd_checkpoint,
            "sd_checkpoint_name": hn.sd_checkpoint_name, "optional_info": hn.optional_info,
            "comfyui": comfyui_differences(s)}


# ---------------------------------------------------------------- the dispatch point
@dataclass(frozen=True)
class Kind:
    name: str
    recognises: Callable[[RawFile], bool]
    describe: Callable[[RawFile], dict]


# Tried in order.
KINDS = (
    Kind("hypernetwork", is_hypernetwork, describe_hypernetwork),
    Kind("embedding", is_embedding, describe_embedding),
)


def kind_of(raw: RawFile) -> Kind:
    for kind in KINDS:
        if kind.recognises(raw):
            return kind
    keys = list(raw.data)[:6] if isinstance(raw.data, dict) else []
    raise NotAnEmbedding(f"{raw.path}: neither an embedding nor a hypernetwork "
                         f"({type(raw.data).__name__}{' with keys ' + ', '.join(map(str, keys)) if keys else ''})")


def describe(path, model_norm: dict | None = None, model_width: int | None = None) -> dict:
    """The description of one file; model_norm/model_width (from the model's token table) add
    the model's typical token norm and whether the width fits."""
    raw = read_raw(path)
    info = kind_of(raw).describe(raw)
    if model_norm is not None:
        info["model_token_norm"] = model_norm
        info["fits_model"] = info["width"] == model_width if info["kind"] == "embedding" else None
    return info


__all__ = ["KINDS", "Kind", "describe", "kind_of", "embedding_layout", "format_name", "trigger_name",
           "file_shorthash", "is_hypernetwork", "describe_hypernetwork", "describe_embedding"]
