"""What an embedding or hypernetwork file holds, as stored, before anyone interprets it.

`read_raw(path)` returns a `RawFile`: the loaded object (the dict torch.load gives, the tensors a
.safetensors file holds, or the JSON dict inside an image), the safetensors metadata, and facts
that decide whether each tool will load the file (its real container, whether it pickles the
original TI repo's nn.ParameterDict, which image encodings are present). Reading is safe:
special files are refused before opening, pickles are read weights-only, images are bounded by
their header's pixel count before decoding, and big checkpoints are named, not loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..embeddings.formats import EmbeddingError, load_torch_dict
from ..errors import UserError
from ..fsutil import kind_of, require_file

TENSOR_EXTS = (".pt", ".bin", ".safetensors", ".ckpt", ".pth")
# A1111 reads embeddings from these images; Pillow decodes PNG and WebP (JXL/AVIF need plugins).
IMAGE_EXTS = (".png", ".webp", ".jxl", ".avif")
# Embeddings are kilobytes and A1111 hypernetworks at most a few hundred MB; bigger files are
# model checkpoints and are named without being loaded.
MAX_TORCH_BYTES = 1 << 30
MAX_SAFETENSORS_TENSORS = 64


@dataclass
class RawFile:
    path: Path
    container: str              # what the bytes are: torch-zip, torch-legacy, safetensors, png, webp, ...
    data: object                # the loaded object (usually a dict)
    metadata: dict = field(default_factory=dict)     # safetensors __metadata__ (strings)
    encodings: tuple = ()       # images: the embedding encodings present, "chunk" and/or "pixels"
    parameter_dict: bool = False  # string_to_param is a pickled torch.nn.ParameterDict (original TI repo)
    size: int = 0               # bytes on disk

    @property
    def ext(self) -> str:
        return self.path.suffix.lower()

    @property
    def is_image(self) -> bool:
        return self.container not in ("torch-zip", "torch-legacy", "safetensors")


class NotAnEmbedding(UserError):
    """A readable file that holds neither an embedding nor a hypernetwork."""


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise EmbeddingError(f"{path}: empty file")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from ..loading import ModelLoadError, open_weights
    try:
        wf = open_weights(path)
    except ModelLoadError as e:
        raise EmbeddingError(str(e)) from None
    if len(wf.shapes) > MAX_SAFETENSORS_TENSORS:
        raise NotAnEmbedding(f"{path}: {len(wf.shapes)} tensors: a model checkpoint, not an embedding or "
                             "hypernetwork")
    return {k: wf.get(k) for k in wf.keys()}, dict(wf.metadata)


def _read_image(path: Path, container: str) -> tuple[dict, tuple]:
    import warnings

    from PIL import Image

    from ..embeddings.png import embedding_data_from_image, extract_data_from_pixels
    from ..images import MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:                              # the header only
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise EmbeddingError(f"{path}: {im.size[0]}x{im.size[1]} pixels, over the "
                                         f"{MAX_PIXELS / 1e6:.0f} MP limit; not read")
                im.load()
                data, encoding = embedding_data_from_image(im, path)
                if data is None:
                    raise NotAnEmbedding(f"{path}: an image without an embedding (no sd-ti-embedding chunk, "
                                         "no data in its pixels)")
                encodings = (encoding,)
                if encoding == "chunk" and extract_data_from_pixels(im, where=path) is not None:
                    encodings += ("pixels",)
    except UserError:
        raise
    except Exception as e:                      # Pillow raises many types on corrupt files
        raise EmbeddingError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return data, encodings


def read_raw(path) -> RawFile:
    """The stored object of an embedding/hypernetwork file of any format ti-fast reads.
    Raises a UserError subclass (one line naming the file) for what cannot be read."""
    path = Path(path)
    if kind_of(path) == "missing":
        raise EmbeddingError(f"{path}: no such file")
    if kind_of(path) == "folder":
        raise EmbeddingError(f"{path} is a folder: name the embedding files (e.g. {path}/*.pt)")
    require_file(path, "embedding file")
    size = path.stat().st_size
    container = _sniff(path)
    if container in ("torch-zip", "torch-legacy"):
        if size > MAX_TORCH_BYTES:
            raise NotAnEmbedding(f"{path}: {size / 2**30:.1f} GiB: a model checkpoint, not an embedding "
                                 "or hypernetwork")
        data = load_torch_dict(path)
        params = data.get("string_to_param") if isinstance(data, dict) else None
        return RawFile(path, container, data, size=size,
                       parameter_dict=type(params).__name__ == "ParameterDict")
    if container == "safetensors":
        data, meta = _read_safetensors(path)
        return RawFile(path, container, data, meta, size=size)
    if container in ("png", "webp") or path.suffix.lower() in IMAGE_EXTS:
        data, encodings = _read_image(path, container)
        return RawFile(path, container if container != "unknown" else path.suffix.lower()[1:], data,
                       encodings=encodings, size=size)
    raise NotAnEmbedding(f"{path}: not an embedding file (neither a torch pickle, safetensors nor an image)")


__all__ = ["RawFile", "NotAnEmbedding", "read_raw", "TENSOR_EXTS", "IMAGE_EXTS"]
