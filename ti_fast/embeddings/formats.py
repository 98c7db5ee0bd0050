"""Textual-inversion embedding files: the in-memory `Embedding`, reading every tensor-file
layout users have (A1111 .pt, original-TI .pt, diffusers learned_embeds, kohya, OneTrainer)
and writing A1111 .pt and kohya .safetensors.

Reading follows A1111 v1.10.1 `EmbeddingDatabase.load_from_file` (see
shared/spec/a1111-compat.md): `string_to_param` with exactly one entry, else a dict with
exactly one tensor (1-D -> [1, D]); SDXL `{clip_l, clip_g}` files are recognised and refused
with `WrongModelEmbedding`. Unlike A1111 we never unpickle arbitrary objects: `torch.load`
runs with weights_only=True and only `torch.nn.ParameterDict` is allowed beyond plain data.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ti_fast.errors import ConfigError
from ti_fast.fsutil import atomic_write_bytes

# A1111 writes this fixed token id under string_to_token; nothing reads it back.
A1111_TOKEN_ID = 265
# kohya sd-scripts and OneTrainer single-key names for SD1.x embeddings.
KOHYA_KEY = "emb_params"
ONETRAINER_KEY = "emp_params"
# Widths seen in the wild, to name the model an embedding was probably made for.
_KNOWN_WIDTHS = {768: "SD1.x / CLIP ViT-L", 1024: "SD2.x / OpenCLIP ViT-H", 1280: "SDXL clip_g"}


class EmbeddingError(ConfigError):
    """One line naming the file and what is wrong with it."""


class WrongModelEmbedding(EmbeddingError):
    """A readable embedding made for another model (SD2 1024-wide, SDXL clip_l/clip_g)."""


def _error(path, problem: str, cls=EmbeddingError) -> EmbeddingError:
    # Underlying exceptions (torch's unpickler, zlib) carry multi-line messages; the library
    # promises one warning line per bad file, so keep only the first line.
    first = str(problem).strip().splitlines()[0] if str(problem).strip() else "unreadable"
    where = str(path) if path is not None else "<embedding>"
    return cls(f"{where}: {first}")


@dataclass(eq=False)  # identity equality: comparing tensors with == has no single truth value
class Embedding:
    """One trigger word's learned vectors.

    vectors: float32 [N, width] on CPU without grad (N vectors replace the N prompt tokens).
    step: completed optimizer steps (None when the file does not say).
    sd_checkpoint: 10-hex A1111 shorthash of the model trained on; sd_checkpoint_name: its stem.
    path: the file it was read from / last saved to (None for a fresh one).
    """

    name: str
    vectors: torch.Tensor = field(repr=False)
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    path: Path | None = None

    def __post_init__(self):
        v = self.vectors
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"embedding {self.name!r}: vectors must be a tensor, got {type(v).__name__}")
        if v.ndim == 1:
            v = v.unsqueeze(0)
        if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(f"embedding {self.name!r}: vectors must be [N, width], got {list(v.shape)}")
        # Own the data: a view into a training parameter would alias it (and torch.save would
        # write the whole underlying storage).
        self.vectors = v.detach().to("cpu", torch.float32).contiguous().clone()
        if self.path is not None:
            self.path = Path(self.path)

    def __repr__(self) -> str:
        return (f"Embedding(name={self.name!r}, vectors=[{self.num_vectors}, {self.width}], step={self.step}, "
                f"sd_checkpoint={self.sd_checkpoint!r}, path={str(self.path) if self.path else None!r})")

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def shorthash(self) -> str | None:
        """First 12 hex of the file's sha256: what A1111 writes under "TI hashes"."""
        if self.path is None or not self.path.is_file():
            return None
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:12]


def embedding_to_a1111_dict(emb: Embedding) -> dict:
    """The exact dict A1111's Embedding.save writes (key order matters for the PNG JSON)."""
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": emb.vectors.detach().to("cpu", torch.float32).contiguous().clone()},
        "name": emb.name,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def _as_int(value) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _as_str(value) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def embedding_from_data(data, path, name: str, width: int | None = None) -> Embedding:
    """Interprets a loaded dict (from .pt, .safetensors or a PNG's JSON) as one embedding.

    name: the trigger word (file stem, or the stored name for image embeddings).
    width: expected vector width (768 for SD1); a mismatch raises WrongModelEmbedding.
    """
    if not isinstance(data, dict) or not data:
        raise _error(path, f"not an embedding (top level is {type(data).__name__}, expected a dict)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        # Original-TI files pickle an nn.ParameterDict; its entries live in _parameters.
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else "no"
            raise _error(path, f"string_to_param must hold exactly one entry, found {count}")
        vec = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        raise _error(path, "SDXL embedding (clip_l + clip_g), not usable with SD1.x", WrongModelEmbedding)
    elif any(isinstance(k, int) and not isinstance(k, bool) for k in data):
        # integer width keys: ti_fast.hypernetworks.is_hypernetwork_dict's shape (not imported: same layer)
        raise _error(path, "an A1111 hypernetwork, not an embedding: pass it with --hypernetworks")
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if KOHYA_KEY in tensors or ONETRAINER_KEY in tensors:
            vec = tensors.get(KOHYA_KEY, tensors.get(ONETRAINER_KEY))
        elif len(tensors) == 1:
            vec = next(iter(tensors.values()))
        else:
            raise _error(path, f"expected exactly one tensor, found {len(tensors)} "
                               f"(keys: {', '.join(map(str, list(data)[:6]))})")
    if not isinstance(vec, torch.Tensor):
        raise _error(path, f"embedding value is {type(vec).__name__}, not a tensor")
    if not vec.is_floating_point():
        raise _error(path, f"embedding tensor has dtype {vec.dtype}, expected floating point")
    if vec.ndim == 1:
        vec = vec.unsqueeze(0)
    if vec.ndim != 2 or vec.shape[0] == 0:
        raise _error(path, f"embedding tensor has shape {list(vec.shape)}, expected [N, width]")
    if width is not None and vec.shape[1] != width:
        seen = _KNOWN_WIDTHS.get(int(vec.shape[1]), "unknown model")
        raise _error(path, f"width {vec.shape[1]} ({seen}), this model needs {width}", WrongModelEmbedding)
    vec = vec.detach().to("cpu", torch.float32)
    # A NaN/inf embedding is a training run that silently died; using it poisons every prompt.
    if not torch.isfinite(vec).all():
        raise _error(path, "embedding contains NaN or inf values")
    return Embedding(
        name=name,
        vectors=vec,
        step=_as_int(data.get("step")),
        sd_checkpoint=_as_str(data.get("sd_checkpoint")),
        sd_checkpoint_name=_as_str(data.get("sd_checkpoint_name")),
        path=Path(path) if path is not None else None,
    )


def _is_torch_file(head: bytes) -> bool:
    # torch.save writes a zip ("PK\x03\x04"); the legacy format is a raw pickle (protocol
    # opcode 0x80). Anything else with a .pt/.bin name is tried as safetensors.
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_torch_dict(path: Path):
    """torch.load with weights_only=True; the one extra class allowed is nn.ParameterDict
    (original-TI files). A malicious pickle is refused before anything in it runs."""
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)       # "Detected pickle protocol 4 ..." (legacy files)
            # A file object, not the path: torch.load reads a path named *.safetensors with safetensors.
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        # torch's message names the refused global on a line "Unsupported global: GLOBAL x.y".
        refused = next((ln.strip() for ln in msg.splitlines() if "Unsupported global" in ln
                        or "GLOBAL" in ln), None)
        raise _error(path, f"refused unsafe pickle ({refused or 'weights_only load failed'})") from e
    except Exception as e:  # zip/EOF/format errors: a corrupt or truncated file
        raise _error(path, f"cannot read torch file ({type(e).__name__}: {e})") from e


def load_safetensors_dict(path: Path) -> dict:
    """All tensors of a .safetensors file plus its string metadata (name, step, ...) merged
    in, so the same interpretation as a .pt dict applies. Tensors win over metadata keys."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise _error(path, f"cannot read safetensors file ({type(e).__name__}: {e})") from e
    data: dict = {k: v for k, v in meta.items() if k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")}
    data.update(tensors)
    return data


def read_tensor_file(path, width: int | None = None) -> Embedding:
    """Reads a .pt / .bin / .safetensors embedding; the trigger word is the file stem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise _error(path, f"cannot open ({e.strerror or e})") from e
    if not head:
        raise _error(path, "empty file")
    data = load_torch_dict(path) if _is_torch_file(head) else load_safetensors_dict(path)
    return embedding_from_data(data, path, name=path.stem, width=width)


def pt_bytes(emb: Embedding) -> bytes:
    """The bytes of A1111's .pt for `emb` (torch.save output is deterministic)."""
    buf = io.BytesIO()
    torch.save(embedding_to_a1111_dict(emb), buf)
    return buf.getvalue()


def pt_shorthash(emb: Embedding) -> str:
    """A1111's TI hash (first 12 hex of the file's sha256) of the .pt that save_pt writes."""
    return hashlib.sha256(pt_bytes(emb)).hexdigest()[:12]


def save_pt(emb: Embedding, path) -> Path:
    """Writes A1111's .pt dict exactly (CPU float32 vectors, no grad), atomically."""
    path = Path(path)
    atomic_write_bytes(path, pt_bytes(emb))
    emb.path = path
    return path


def save_safetensors(emb: Embedding, path) -> Path:
    """Writes kohya's layout: one tensor `emb_params` [N, width]; name/step/checkpoint as
    string metadata (keys whose value is None are left out). Loads in A1111, ComfyUI and
    diffusers' load_textual_inversion (pass token=...)."""
    path = Path(path)
    meta = {"name": emb.name, "step": emb.step, "sd_checkpoint": emb.sd_checkpoint,
            "sd_checkpoint_name": emb.sd_checkpoint_name}
    meta = {k: str(v) for k, v in meta.items() if v is not None}
    tensors = {KOHYA_KEY: emb.vectors.detach().to("cpu", torch.float32).contiguous().clone()}
    # bytes first, then an ordinary write: a full disk raises OSError (save_file's is not one)
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))
    emb.path = path
    return path
