"""Reading A1111 hypernetwork .pt files safely; telling them apart from embeddings; describe().

Reading follows A1111 v1.10.1 Hypernetwork.load: integer keys are widths mapping to (k, v)
state dicts (a list of two works too); missing layer_structure -> [1, 2, 1]; missing or None
activation_func -> "linear"; missing activate_output -> True (A1111's default; ComfyUI's is
False, which is why we always write it); dropout from dropout_structure, else from use_dropout
and last_layer_dropout; old `linear1.*`/`linear2.*` keys are indices 0 and 1. Unlike A1111 the
pickle is loaded weights-only with no extra globals allowed, so nothing in a file runs, and
every refusal is one line naming the file.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..fsutil import require_file
from .hypernetwork import Hypernetwork
from .module import Structure, legacy_dropout_structure

# Globals a hypernetwork pickle may name beyond torch's weights-only defaults (tensor rebuild
# functions, storages, OrderedDict): none. Kept explicit so that widening it is a visible change.
EXTRA_SAFE_GLOBALS: list = []
LEGACY_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
# Top-level keys that mark a textual-inversion embedding (A1111, kohya, OneTrainer, SDXL).
_EMBEDDING_KEYS = ("string_to_param", "emb_params", "emp_params", "clip_l", "clip_g")


class HypernetworkError(UserError):
    """A hypernetwork file or setting ti-fast will not use: one line naming it and what to do."""


class NotAHypernetworkError(HypernetworkError):
    """The file is something else (an embedding, a model, a LoRA) or not a torch file at all."""


class EmbeddingNotHypernetworkError(NotAHypernetworkError):
    """The file is a textual-inversion embedding (callers may name the command that takes it)."""


def _error(path, problem: str, cls=HypernetworkError) -> HypernetworkError:
    text = str(problem).strip()
    first = text.splitlines()[0] if text else "unreadable"
    return cls(f"{path}: {first}")


def _width_keys(data: dict) -> list[int]:
    return [k for k in data if isinstance(k, int) and not isinstance(k, bool)]


def is_hypernetwork_dict(data) -> bool:
    """True for a loaded A1111 hypernetwork dict: at least one int key mapping to a pair of
    dicts. Lets an embedding reader say "this is a hypernetwork" instead of "no tensor"."""
    if not isinstance(data, dict):
        return False
    ws = _width_keys(data)
    return bool(ws) and all(isinstance(data[w], (tuple, list)) and len(data[w]) == 2
                            and all(isinstance(sd, dict) for sd in data[w]) for w in ws)


def looks_like_embedding(data) -> bool:
    """True for the dict of a textual-inversion embedding file (.pt or .safetensors)."""
    if not isinstance(data, dict) or _width_keys(data):
        return False
    if any(k in data for k in _EMBEDDING_KEYS):
        return True
    return sum(isinstance(v, torch.Tensor) for v in data.values()) == 1


def _safetensors_kind(path: Path) -> str:
    """What a .safetensors file passed as a hypernetwork is, from its tensor names only."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception:
        return "not a torch file"
    if any(k in keys for k in _EMBEDDING_KEYS) or len(keys) == 1:
        return "a textual-inversion embedding, not a hypernetwork: pass it with --embeddings"
    if any("lora" in k for k in keys):
        return "a LoRA, not a hypernetwork (ti-fast does not apply LoRAs)"
    return "a safetensors file, not an A1111 hypernetwork (.pt)"


def load_pickle(path) -> object:
    """torch.load(weights_only=True) with EXTRA_SAFE_GLOBALS; refuses special files, empty,
    truncated, corrupt and unsafe pickles with one line naming the file."""
    path = require_file(path, "hypernetwork")
    if not path.exists():
        raise _error(path, "no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise _error(path, "empty file")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        if len(head) > 8 and head[8:9] == b"{":
            kind = _safetensors_kind(path)
            raise _error(path, kind, EmbeddingNotHypernetworkError if "embedding" in kind else NotAHypernetworkError)
        raise _error(path, "not a torch file (an A1111 hypernetwork is a torch.save .pt)", NotAHypernetworkError)
    try:
        with torch.serialization.safe_globals(EXTRA_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # mmap: a multi-GB checkpoint passed by mistake is refused without being read whole
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as e:
        refused = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported global" in ln), None)
        raise _error(path, f"refused unsafe pickle ({refused or 'weights-only load failed'}); nothing in it was run") from e
    except Exception as e:   # zip / EOF / format errors: a truncated or corrupt file
        raise _error(path, f"truncated or corrupt torch file ({type(e).__name__}: {e})") from e


def _floats(value, what: str, path) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in value):
        raise _error(path, f"{what} must be a list of numbers, got {value!r:.80}")
    return tuple(float(x) for x in value)


def structure_from_dict(data: dict, path) -> Structure:
    """The Structure A1111 would build from a file's metadata (its defaults for missing keys)."""
    ls = _floats(data.get("layer_structure") or [1, 2, 1], "layer_structure", path)
    act = data.get("activation_func")
    act = "linear" if act is None else act
    if not isinstance(act, str):
        raise _error(path, f"activation_func must be a string, got {type(act).__name__}")
    ds = data.get("dropout_structure")
    if ds is None:
        ds = legacy_dropout_structure(len(ls), bool(data.get("use_dropout", False)),
                                      bool(data.get("last_layer_dropout", False)))
    init = data.get("weight_initialization")
    s = Structure(layer_structure=ls, activation=act,
                  layer_norm=bool(data.get("is_layer_norm", False)),
                  dropout_structure=_floats(ds, "dropout_structure", path),
                  activate_output=bool(data.get("activate_output", True)),
                  weight_init=init if isinstance(init, str) and init else "Normal")
    widths = _width_keys(data)
    bad = [w for w in widths if w <= 0]
    if bad:
        raise _error(path, f"width key {bad[0]} is not positive")
    why = s.problem(widths)
    if why:
        raise _error(path, why)
    return s


def _state_dict(sd, width: int, which: str, path) -> dict:
    if not isinstance(sd, dict):
        raise _error(path, f"width {width} {which}: expected a state dict, got {type(sd).__name__}")
    sd = {LEGACY_KEYS.get(k, k): v for k, v in sd.items()}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise _error(path, f"width {width} {which}: entry {k!r} is not a floating-point tensor")
        if not torch.isfinite(v).all():
            raise _error(path, f"width {width} {which}: {k} contains NaN or inf values (a diverged training run)")
    return sd


def hypernetwork_from_dict(data, path, name: str | None = None) -> Hypernetwork:
    """Builds a Hypernetwork (eval mode, fp32, CPU) from a loaded dict; refuses what A1111
    could not load and embeddings passed by mistake. name: default for a file without one."""
    path = Path(path) if path is not None else None
    if looks_like_embedding(data):
        raise _error(path, "a textual-inversion embedding, not a hypernetwork: pass it with --embeddings",
                     EmbeddingNotHypernetworkError)
    if not isinstance(data, dict):
        raise _error(path, f"not a hypernetwork (the file holds a {type(data).__name__}, not a dict)",
                     NotAHypernetworkError)
    widths = _width_keys(data)
    if not widths:
        sample = ", ".join(map(str, list(data)[:4])) or "nothing"
        raise _error(path, f"not a hypernetwork: no integer width keys (found {sample})", NotAHypernetworkError)
    for w in widths:
        pair = data[w]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise _error(path, f"width {w}: expected a (k, v) pair of state dicts, got {type(pair).__name__}")
    s = structure_from_dict(data, path)
    step = data.get("step", 0)
    stored = data.get("name")
    hn = Hypernetwork(stored if isinstance(stored, str) and stored else (name or (path.stem if path else "hypernetwork")),
                      widths, s, step=step if isinstance(step, int) and not isinstance(step, bool) else 0,
                      sd_checkpoint=data.get("sd_checkpoint") if isinstance(data.get("sd_checkpoint"), str) else None,
                      sd_checkpoint_name=(data.get("sd_checkpoint_name")
                                          if isinstance(data.get("sd_checkpoint_name"), str) else None),
                      optional_info=data.get("optional_info") if isinstance(data.get("optional_info"), str) else None,
                      path=path)
    for w in widths:
        for which, module, sd in zip(("k", "v"), hn.pair(w), data[w]):
            sd = _state_dict(sd, w, which, path)
            want = module.state_dict()
            missing = [k for k in want if k not in sd]
            extra = [k for k in sd if k not in want]
            if missing or extra:
                part = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
                raise _error(path, f"width {w} {which}: keys do not fit layer_structure "
                                   f"{list(s.layer_structure)} / layer norm {s.layer_norm} ({part})")
            shapes = [k for k in want if tuple(sd[k].shape) != tuple(want[k].shape)]
            if shapes:
                k = shapes[0]
                raise _error(path, f"width {w} {which}: {k} has shape {list(sd[k].shape)}, "
                                   f"the structure needs {list(want[k].shape)}")
            module.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return hn


def read_hypernetwork(path) -> Hypernetwork:
    """Reads an A1111 hypernetwork .pt (any name; A1111 lists *.pt). Raises HypernetworkError
    (NotAHypernetworkError for embeddings and other files) with one line naming the file."""
    path = Path(path)
    return hypernetwork_from_dict(load_pickle(path), path, name=path.stem)


def describe(path) -> dict:
    """A hypernetwork file's structure for `ti-fast inspect`: kind "hypernetwork", name, step,
    widths, layer_structure, activation, layer_norm, dropout_structure (+ use_dropout,
    last_layer_dropout), activate_output, weight_initialization, parameters (count),
    sd_checkpoint, sd_checkpoint_name, optional_info, path, and `comfyui`: what ComfyUI's loader
    does differently with this file (empty list when it builds the same forward)."""
    hn = read_hypernetwork(path)
    d = hn.describe()
    d["comfyui"] = comfyui_differences(hn.structure)
    return d


def comfyui_differences(s: Structure) -> list[str]:
    """Where ComfyUI (comfy_extras/nodes_hypernetwork.py) would not reproduce A1111's forward."""
    from .module import ACTIVATIONS
    out = []
    if s.activation not in ACTIVATIONS:
        out.append(f"refuses activation {s.activation!r}")
    # it counts LayerNorm weights as layers, so "the last layer" is the last LayerNorm
    if s.layer_norm and s.activation != "linear" and not s.activate_output:
        out.append("activates the last Linear too (layer norm shifts its layer count)")
    if s.use_dropout:
        out.append("keeps dropout on while generating (p 0.3 from use_dropout/last_layer_dropout)")
        if s.layer_norm:
            out.append("places dropout differently (layer norm shifts its layer count)")
    return out


load_hypernetwork = read_hypernetwork          # the public name (ti_fast.load_hypernetwork)
