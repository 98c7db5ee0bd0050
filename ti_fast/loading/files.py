"""Reading weight files safely, one tensor at a time.

`open_weights(path)` gives a uniform read-only view (`WeightFile`) of
  .safetensors    header parsed and checked here (truncation, corruption) before any tensor is
                  read; tensors come from safetensors' safe_open().get_tensor one at a time;
  .ckpt/.pt/.bin  torch.load(weights_only=True, mmap=True): only tensors, containers and one
                  stub class (Lightning's ModelCheckpoint, never executed) may be unpickled.
                  `state_dict` wrappers are unwrapped. mmap keeps the weights file-backed
                  (not anonymous memory) until each is cast; legacy (non-zip) pickles cannot
                  be mapped and are read whole.
The loader casts each tensor to the model dtype as it reads it, so peak anonymous memory is
the loaded model + the largest tensor (+ interpreter). `peak_rss_anon_while` measures that.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import ModelLoadError, refuse

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool,
             "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None)}
MAX_HEADER = 100 * 1024 * 1024      # safetensors' own limit on the JSON header


def cache_dir() -> Path:
    """ti-fast's cache folder (hashes, built tokenizer): $TI_FAST_CACHE or ~/.cache/ti-fast."""
    return Path(os.environ.get("TI_FAST_CACHE") or Path.home() / ".cache" / "ti-fast")


class WeightFile:
    """Names, shapes and dtypes of every tensor in a file, and `get(name)` for one tensor."""

    def __init__(self, path: Path, shapes: dict, dtypes: dict, metadata: dict, getter, fmt: str):
        self.path = path
        self.shapes: dict[str, tuple] = shapes      # name -> shape, in file order
        self.dtypes: dict[str, torch.dtype] = dtypes
        self.metadata: dict[str, str] = metadata    # safetensors __metadata__ ({} for pickles)
        self.format = fmt                           # "safetensors" | "torch-zip" | "torch-legacy"
        self._get = getter

    def keys(self):
        return self.shapes.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n


def _safetensors_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, metadata) from the header; refuses truncated/corrupt files up front."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise refuse(path, f"not a checkpoint ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n < 2:
            raise refuse(path, "not a safetensors checkpoint (bad header length; wrong extension, "
                               "or a corrupt file)")
        raw = f.read(n)
    if len(raw) < n:
        raise refuse(path, f"truncated: the safetensors header needs {n} bytes, the file has {size - 8} "
                           "(incomplete download? download it again)")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise refuse(path, f"corrupt: the safetensors header is not valid JSON ({type(e).__name__}: "
                           f"{str(e)[:120]}); download it again") from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise refuse(path, "corrupt: the safetensors __metadata__ is not a JSON object; download it again")
    end = 0
    for name, ent in header.items():
        try:
            dt = ST_DTYPES[ent["dtype"]]
            b, e = ent["data_offsets"]
            numel = 1
            for s in ent["shape"]:
                numel *= int(s)
            ok = (dt is not None and isinstance(b, int) and isinstance(e, int) and 0 <= b <= e
                  and all(isinstance(s, int) and s >= 0 for s in ent["shape"]) and e - b == numel * dt.itemsize)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise refuse(path, f"corrupt: bad safetensors entry for tensor {name!r}; download it again")
        end = max(end, e)
    if 8 + n + end > size:
        raise refuse(path, f"truncated: the header lists {8 + n + end} bytes of data, the file has {size} "
                           "(incomplete download? download it again)")
    return header, meta


def read_safetensors_tensor(path, name: str, header: dict | None = None) -> torch.Tensor:
    """One tensor of a .safetensors file by plain reads, no mmap: the header, then exactly that
    tensor's bytes (create and inspect --model need one [49408, 768] table out of a 2 GB file).
    header: the `_safetensors_header` entries when already parsed."""
    path = Path(path)
    if header is None:
        header, _ = _safetensors_header(path)
    ent = header.get(name)
    if ent is None:
        raise refuse(path, f"no tensor {name!r}")
    begin, end = ent["data_offsets"]
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n + begin)
        buf = bytearray(end - begin)
        if f.readinto(buf) != len(buf):
            raise refuse(path, "truncated while reading a tensor (incomplete download? download it again)")
    dtype = ST_DTYPES[ent["dtype"]]
    if not buf:                                   # frombuffer refuses an empty buffer
        return torch.empty(tuple(ent["shape"]), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(tuple(ent["shape"]))   # safetensors is little-endian


def _open_safetensors(path: Path) -> WeightFile:
    from safetensors import safe_open
    header, meta = _safetensors_header(path)
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: ST_DTYPES[v["dtype"]] for k, v in header.items()}
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise refuse(path, f"corrupt safetensors file ({e})") from None
    return WeightFile(path, shapes, dtypes, {str(k): str(v) for k, v in meta.items()}, handle.get_tensor, "safetensors")


# A stand-in for the one class some SD .ckpt files pickle (a Lightning callback, as a dict key
# or value): allowed under its real name, but nothing of Lightning is imported or run.
class ModelCheckpointStub:
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


LIGHTNING_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def _torch_error(path: Path, e: Exception) -> ModelLoadError:
    msg = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    if m or (isinstance(e, pickle.UnpicklingError) and "weights only load failed" in msg.lower()):
        what = f"global {m.group(1)}" if m else "non-tensor objects"
        return refuse(path, f"refused: this pickle wants to load {what}; only tensors (and Lightning's "
                            "ModelCheckpoint) are allowed and nothing in it was executed. Use a .safetensors "
                            "version of the model from a trusted source")
    if isinstance(e, EOFError) or "Ran out of input" in msg or "central directory" in msg or "zip archive" in msg:
        return refuse(path, "truncated or corrupt .ckpt (torch cannot read it; incomplete download?)")
    first = msg.strip().splitlines()[0][:150] if msg.strip() else type(e).__name__
    return refuse(path, f"not a checkpoint torch can read ({first})")


def _unwrap(obj, path: Path) -> dict:
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise refuse(path, f"not a checkpoint: the pickle holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def _open_torch(path: Path) -> WeightFile:
    is_zip = zipfile.is_zipfile(path)
    safe = [(ModelCheckpointStub, LIGHTNING_CHECKPOINT)]
    try:
        with torch.serialization.safe_globals(safe), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)          # "Detected pickle protocol 4 ..."
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        raise _torch_error(path, e) from None
    # Pickles have no metadata block; a top-level `ti_fast_config` string plays its part.
    meta = {"ti_fast_config": obj["ti_fast_config"]} if isinstance(obj, dict) and isinstance(
        obj.get("ti_fast_config"), str) else {}
    sd = _unwrap(obj, path)
    return WeightFile(path, {k: tuple(v.shape) for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()},
                      meta, sd.__getitem__, "torch-zip" if is_zip else "torch-legacy")


def open_weights(path) -> WeightFile:
    """Open a weights file by its content (not only its name); refuse what is not one."""
    path = Path(path)
    if not path.is_file():
        raise refuse(path, "no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        return _open_safetensors(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":          # torch zip, or a raw pickle
        return _open_torch(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _open_torch(path)                                   # let torch say what is wrong
    raise refuse(path, f"not a checkpoint (a {path.suffix or 'suffix-less'} file that is neither "
                       "safetensors nor a torch pickle)")


# ---------------------------------------------------------------- memory measurement
class RssPeak(NamedTuple):
    result: object       # what fn returned
    peak: int            # highest RssAnon seen while fn ran, bytes (whole process)
    before: int          # RssAnon just before fn started, bytes


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_anon_while(fn, *args, interval: float = 0.002, **kwargs) -> RssPeak:
    """Run fn(*args, **kwargs) while a thread samples RssAnon; the bench's memory check
    (loading must stay under model size + largest tensor + 0.5 GB)."""
    before = rss_anon()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        done.set()
        th.join()
    return RssPeak(result, max(peak[0], rss_anon()), before)
