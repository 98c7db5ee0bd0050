"""Prompt tokenization with textual-inversion embeddings, and encoding in 75-token chunks (A1111).

An embedding is recognised by its trigger word's token sequence (longest match first, as
A1111's EmbeddingDatabase) and expands to its N vectors. Prompts are split into chunks of 75
tokens, each wrapped BOS ... EOS and padded with EOS to 77; an embedding never straddles two
chunks (the chunk is closed early instead). Vectors enter the text encoder through
`vector_index` ([B, 77·chunks], -1 = a normal token, i ≥ 0 = row i of the concatenated vectors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 75           # tokens per chunk between BOS and EOS
SEQ = CHUNK + 2      # 77


@dataclass
class Tokens:
    input_ids: torch.Tensor      # [B, chunks*77] long
    vector_index: torch.Tensor   # [B, chunks*77] long, -1 where the token table is used

    @property
    def chunks(self) -> int:
        return self.input_ids.shape[1] // SEQ


class PromptTokenizer:
    """Turns prompt strings into (input_ids, vector_index) given embeddings' trigger words.

    slots: {trigger word: number of vectors}, in the order their vectors are concatenated.
    """

    def __init__(self, tokenizer, slots: dict[str, int] | None = None):
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self._cache: dict[str, list[int]] = {}
        self.rows: dict[str, tuple[int, int]] = {}      # word -> (first row, n)
        self.triggers: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        row = 0
        for word, n in (slots or {}).items():
            if n < 1:
                raise ValueError(f"embedding {word!r} has no vectors")
            ids = tuple(self._ids(word))
            if not ids:
                continue
            self.rows[word] = (row, n)
            row += n
            self.triggers.setdefault(ids[0], []).append((ids, word))
        for cands in self.triggers.values():
            cands.sort(key=lambda c: -len(c[0]))       # longest trigger first
        self.total_rows = row

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            if len(self._cache) >= 8192:         # shuffled/dropped tags make prompts unique: stay bounded
                self._cache.clear()
            self._cache[text] = self.tok(text, add_special_tokens=False, truncation=False)["input_ids"]
        return self._cache[text]

    def pieces(self, text: str) -> list[tuple[int, int] | tuple[str, int, int]]:
        """Token ids and embeddings in order: (id, -1) or ("emb", first_row, n)."""
        ids = self._ids(text)
        out, i = [], 0
        while i < len(ids):
            hit = None
            for seq, word in self.triggers.get(ids[i], ()):
                if tuple(ids[i:i + len(seq)]) == seq:
                    hit = (seq, word)
                    break
            if hit:
                first, n = self.rows[hit[1]]
                out.append(("emb", first, n))
                i += len(hit[0])
            else:
                out.append((ids[i], -1))
                i += 1
        return out

    def chunk(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Split one prompt into 75-token chunks: list of (ids[75], vidx[75]) before wrapping."""
        chunks, ids, vidx = [], [], []

        def close():
            nonlocal ids, vidx
            chunks.append((ids + [self.eos] * (CHUNK - len(ids)), vidx + [-1] * (CHUNK - len(vidx))))
            ids, vidx = [], []

        for p in self.pieces(text):
            if p[0] == "emb":
                _, first, n = p
                n = min(n, CHUNK)
                if len(ids) + n > CHUNK:
                    close()
                ids += [self.eos] * n                   # placeholder ids, replaced by the vectors
                vidx += list(range(first, first + n))
            else:
                if len(ids) == CHUNK:
                    close()
                ids.append(p[0])
                vidx.append(-1)
        if ids or not chunks:
            close()
        return chunks

    def __call__(self, prompts: list[str], chunks: int | None = None) -> Tokens:
        """Tokenize a batch. chunks=None: as many as the longest prompt needs (shorter ones are
        padded with chunks of the empty prompt); chunks=k: exactly k (longer prompts truncated)."""
        per = [self.chunk(p) for p in prompts]
        k = chunks or max(len(c) for c in per)
        empty = self.chunk("")[0]
        rows_ids, rows_idx = [], []
        for c in per:
            c = (c + [empty] * k)[:k]
            ids, vidx = [], []
            for cid, cv in c:
                ids += [self.bos] + cid + [self.eos]
                vidx += [-1] + cv + [-1]
            rows_ids.append(ids)
            rows_idx.append(vidx)
        return Tokens(torch.tensor(rows_ids, dtype=torch.long), torch.tensor(rows_idx, dtype=torch.long))

    def n_chunks(self, prompt: str) -> int:
        return len(self.chunk(prompt))


def encode(text_encoder, tokens: Tokens, vectors: torch.Tensor | None = None, clip_skip: int = 1) -> torch.Tensor:
    """Encode every 77-token chunk and concatenate: [B, chunks*77, width].

    vectors: [rows, width] (the embeddings' vectors, concatenated in slot order) or None."""
    dev = text_encoder.token_table.device
    ids = tokens.input_ids.to(dev, non_blocking=True)
    vidx = tokens.vector_index.to(dev, non_blocking=True)
    b, k = ids.shape[0], tokens.chunks
    # Chunks ride the batch axis: one text-encoder call for all of them.
    ids = ids.view(b, k, SEQ).reshape(b * k, SEQ)
    vidx = vidx.view(b, k, SEQ).reshape(b * k, SEQ)
    out = text_encoder(ids, clip_skip=clip_skip, vectors=vectors, vector_index=vidx if vectors is not None else None)
    return out.view(b, k * SEQ, -1)
