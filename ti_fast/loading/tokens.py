"""The text encoder's token-embedding table alone, read without loading the model.

`ti-fast create` needs one [49408, 768] table (76 MB in fp16) out of a 2 GB checkpoint, and
`ti-fast inspect --model` its typical row norm. `read_token_table` reads what that takes and
nothing more:
  .safetensors    the JSON header, then exactly the table's bytes (plain reads, no mmap);
  .ckpt/.pt/.bin  torch.load(weights_only=True, mmap=True): the pickle is read, the storages are
                  mapped, and only the table's pages are touched (legacy non-zip pickles cannot
                  be mapped and are read whole);
  diffusers folder  the same from text_encoder/model[.fp16].safetensors (or pytorch_model.bin);
  make-tiny folder  model.safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import refuse
from .files import _safetensors_header, open_weights, read_safetensors_tensor

TOKEN_KEY = "embeddings.token_embedding.weight"
# Where the table sits: single files (current and older text-encoder prefixes), then diffusers'
# text_encoder/ (transformers < 5.6 nests it under text_model., 5.6+ does not).
SINGLE_KEYS = ("cond_stage_model.transformer.text_model." + TOKEN_KEY, "cond_stage_model.transformer." + TOKEN_KEY)
TEXT_ENCODER_KEYS = ("text_model." + TOKEN_KEY, TOKEN_KEY)
TEXT_ENCODER_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")


@dataclass
class TokenTable:
    table: torch.Tensor      # [vocab, width] on CPU, in the file's floating dtype (fp16 in most SD files)
    file: Path               # the weight file it was read from
    key: str                 # its name in that file
    model_dir: Path          # the folder whose tokenizer/ belongs to this model

    @property
    def rows(self) -> int:
        return int(self.table.shape[0])

    @property
    def width(self) -> int:
        return int(self.table.shape[1])


def _weight_file(path: Path) -> tuple[Path, tuple[str, ...], Path]:
    """(file holding the table, candidate keys, model folder) for a file or folder."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            te = path / "text_encoder"
            for name in TEXT_ENCODER_FILES:
                if (te / name).is_file():
                    return te / name, TEXT_ENCODER_KEYS, path
            raise refuse(path, "diffusers folder without text_encoder/model.safetensors or pytorch_model.bin")
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors", SINGLE_KEYS, path
        raise refuse(path, "folder is neither a diffusers folder (model_index.json) nor a make-tiny folder "
                           "(model.safetensors + tokenizer/)")
    if not path.is_file():
        raise refuse(path, "no such file or folder")
    return path, SINGLE_KEYS, path.parent


def read_token_table(path) -> TokenTable:
    """The token-embedding table [vocab, width] of an SD 1.x checkpoint (file or folder) in its
    stored dtype (create casts only the rows it uses; a float32 copy would be 152 MB more),
    reading only the file's header and that tensor. ModelLoadError when there is none."""
    path = Path(path).expanduser().resolve()
    file, keys, model_dir = _weight_file(path)
    with open(file, "rb") as f:
        head = f.read(16)
    if file.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{"):
        header, _ = _safetensors_header(file)
        key = next((k for k in keys if k in header), None)
        if key is None:
            raise _no_table(file)
        table = read_safetensors_tensor(file, key, header)
    else:
        wf = open_weights(file)                        # mmap: storages are mapped, not read
        key = next((k for k in keys if k in wf.shapes), None)
        if key is None:
            raise _no_table(file)
        table = wf.get(key).clone()                   # owned: the file's mapping is not kept open
    if table.ndim != 2 or not table.is_floating_point():
        raise refuse(file, f"{key} is {list(table.shape)} {table.dtype}, not a [vocab, width] float table")
    return TokenTable(table, file, key, model_dir)


def _no_table(file: Path):
    return refuse(file, "no SD 1.x text-encoder token table (cond_stage_model.transformer...."
                        f"{TOKEN_KEY}): not an SD 1.x checkpoint with its text encoder")


def token_norm_stats(table: torch.Tensor) -> dict:
    """L2 norms of the table's rows [vocab]: median (the 'typical token norm' an embedding's
    vectors are compared with), mean, and the 5th/95th percentiles."""
    norms = table.float().norm(dim=1)
    q = torch.quantile(norms, torch.tensor([0.05, 0.5, 0.95]))
    return {"median": float(q[1]), "mean": float(norms.mean()), "p5": float(q[0]), "p95": float(q[2])}


__all__ = ["TokenTable", "read_token_table", "token_norm_stats", "TOKEN_KEY"]
