"""New embeddings, initialised as A1111's create_embedding does (v1.10.1
modules/textual_inversion/textual_inversion.py):

    ids = tokenizer(init_text, max_length=n, add_special_tokens=False)   # truncated to n
    embedded = token_embedding(ids)                                      # [k, D], k <= n
    vec[i] = embedded[i * k // n]   for i in range(n)                    # spread over n rows
    (empty init text -> zeros)

so "a dog" (k=2) into n=4 vectors gives rows [a, a, dog, dog]. The caller tokenizes (no
BOS/EOS); this module needs only the token-embedding table. `create_embedding_file` is
`ti-fast create`: it refuses an existing output before reading anything, reads only the
model's token table (ti_fast.loading.tokens), and writes sd_checkpoint and sd_checkpoint_name
as None, as A1111's create_embedding does (nothing has been trained on any model yet).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ti_fast.embeddings.formats import Embedding, EmbeddingError, save_pt
from ti_fast.fsutil import check_writable_dir

# A 77-token CLIP window holds 75 prompt tokens; a longer embedding can never fit in one chunk.
MAX_VECTORS = 75


def sanitize_name(name: str) -> str:
    """A1111's rule for embedding names: keep alphanumerics and "._- ", drop the rest.
    The result is the trigger word and the file stem, so it must not be empty."""
    clean = "".join(ch for ch in str(name) if ch.isalnum() or ch in "._- ")
    if not clean.strip(" ."):
        raise EmbeddingError(f"embedding name {name!r}: nothing left after removing characters "
                             f"other than letters, digits and '._- '")
    return clean


@torch.no_grad()
def init_vectors(token_table: torch.Tensor, token_ids: list[int], n: int) -> torch.Tensor:
    """Initial vectors [n, D] float32 from the token-embedding table [V, D].

    token_ids: the init text's ids without BOS/EOS; only the first n are used (A1111 asks the
    tokenizer for max_length=n). Row i copies token ids[i * k // n], k = min(len(ids), n)."""
    if not 1 <= n <= MAX_VECTORS:
        raise ValueError(f"vectors per token must be 1..{MAX_VECTORS}, got {n}")
    if token_table.ndim != 2:
        raise ValueError(f"token table must be [vocab, width], got {list(token_table.shape)}")
    vocab, width = token_table.shape
    ids = [int(t) for t in token_ids][:n]
    out = torch.zeros(n, width, dtype=torch.float32)
    if not ids:
        return out
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad} outside the vocabulary of {vocab}")
    k = len(ids)
    rows = torch.tensor([ids[i * k // n] for i in range(n)], dtype=torch.long)
    # Index on the table's device first: moving the whole [49408, 768] table would copy 150 MB.
    out.copy_(token_table.detach()[rows.to(token_table.device)].to("cpu", torch.float32))
    return out


def create_embedding(name: str, token_table: torch.Tensor, token_ids: list[int], n: int) -> Embedding:
    """A fresh embedding at step 0 named by sanitize_name(name); not yet saved (path None)."""
    return Embedding(name=sanitize_name(name), vectors=init_vectors(token_table, token_ids, n), step=0)


def create_embedding_file(name: str, model, out_dir="embeddings", init_text: str = "*", vectors: int = 1,
                          tokenizer=None, overwrite: bool = False) -> Path:
    """Writes OUT_DIR/NAME.pt: a fresh A1111 embedding at step 0 from `model`'s token table.
    Every check that needs no model comes first (name, vector count, existing output, output
    folder); then only the token table and the tokenizer are read, never the whole model."""
    from ti_fast.loading.errors import ModelLoadError
    from ti_fast.loading.tokenizer import SD_VOCAB_SIZE, clip_token_ids, tokenizer_folder, tokenizer_for
    from ti_fast.loading.tokens import read_token_table
    name = sanitize_name(name)
    if not 1 <= int(vectors) <= MAX_VECTORS:
        raise EmbeddingError(f"--vectors must be 1..{MAX_VECTORS} (got {vectors})")
    path = Path(out_dir) / f"{name}.pt"
    if path.exists() and not overwrite:
        raise EmbeddingError(f"{path} exists (pass --overwrite to replace it)")
    check_writable_dir(out_dir, "--out")
    tt = read_token_table(model)
    found = None if tokenizer is not None and not isinstance(tokenizer, (str, Path)) else \
        tokenizer_folder(tt.model_dir, tokenizer)
    if found is not None:                    # a local folder: no transformers import (a second saved)
        ids, size = clip_token_ids(found[0], init_text, SD_VOCAB_SIZE if tt.rows >= SD_VOCAB_SIZE else 514)
        if size > tt.rows:
            raise ModelLoadError(f"{Path(tt.file).name}: tokenizer from {found[1]} has {size} tokens but the text "
                                 f"encoder's table has {tt.rows} rows: pass the model's own tokenizer (--tokenizer DIR)")
    else:
        tok, _ = tokenizer_for(tokenizer, tt.model_dir, tt.rows, tt.file)
        ids = tok(init_text, add_special_tokens=False)["input_ids"]
    return save_pt(Embedding(name=name, vectors=init_vectors(tt.table, ids, int(vectors)), step=0), path)
