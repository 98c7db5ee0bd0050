"""Prompts as A1111 reads them: emphasis, embeddings, 75-token chunks.

After AUTOMATIC1111's prompt_parser.parse_prompt_attention and sd_hijack_clip
(FrozenCLIPEmbedderWithCustomWords.tokenize_line / process_tokens, emphasis "Original"):
- emphasis: (word) x1.1, [word] /1.1, (word:1.3) x1.3, \\( \\) \\[ \\] literal, BREAK ends a chunk;
  each weighted piece is tokenized on its own (as A1111 does);
- an embedding is recognised by its trigger word's token sequence (longest match first) and
  expands to its N vectors, which take the piece's weight;
- chunks of 75 tokens, each BOS ... EOS, padded with EOS to 77; a full chunk is broken after the
  last comma when that comma is at most 20 tokens back (A1111's comma padding backtrack); an
  embedding never straddles two chunks;
- encoding: every chunk through the text encoder, then z *= weights and z is rescaled so its
  mean (over the batch's chunk) is what it was before weighting.
Vectors enter the text encoder through `vector_index` ([B, 77·chunks], -1 = a normal token,
i >= 0 = row i of the concatenated vectors), so the frozen token table is never touched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CHUNK = 75           # tokens per chunk between BOS and EOS
SEQ = CHUNK + 2      # 77
COMMA_BACKTRACK = 20

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[list]:
    """'a (b:1.5) [c]' -> [['a ', 1.0], ['b', 1.5], [' ', 1.0], ['c', 1/1.1]]; BREAK -> ['BREAK', -1]."""
    res: list[list] = []
    round_, square = [], []

    def multiply(start, m):
        for p in range(start, len(res)):
            res[p][1] *= m

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_.append(len(res))
        elif piece == "[":
            square.append(len(res))
        elif weight is not None and round_:
            multiply(round_.pop(), float(weight))
        elif piece == ")" and round_:
            multiply(round_.pop(), 1.1)
        elif piece == "]" and square:
            multiply(square.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_:                       # unbalanced brackets still count
        multiply(pos, 1.1)
    for pos in square:
        multiply(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0                                     # merge neighbours of equal weight
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


@dataclass
class Tokens:
    input_ids: torch.Tensor      # [B, chunks*77] long
    vector_index: torch.Tensor   # [B, chunks*77] long, -1 where the token table is used
    weights: torch.Tensor        # [B, chunks*77] float32 emphasis multipliers (1 = none)

    @property
    def chunks(self) -> int:
        return self.input_ids.shape[1] // SEQ

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


class PromptTokenizer:
    """Turns prompt strings into Tokens given embeddings' trigger words.

    slots: {trigger word: number of vectors}, in the order their vectors are concatenated.
    """

    def __init__(self, tokenizer, slots: dict[str, int] | None = None):
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        comma = tokenizer(",", add_special_tokens=False)["input_ids"]
        self.comma = comma[0] if len(comma) == 1 else None
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

    def _match(self, ids: list[int], i: int):
        """(word, tokens matched) of the embedding whose trigger starts at ids[i], or None."""
        for seq, word in self.triggers.get(ids[i], ()):
            if tuple(ids[i:i + len(seq)]) == seq:
                return word, len(seq)
        return None

    def pieces(self, text: str) -> list[tuple]:
        """Token ids and embeddings in order: (id, -1) or ("emb", first_row, n)."""
        out = []
        for piece, weight in parse_attention(text):
            if weight == -1:
                continue
            ids, i = self._ids(piece), 0
            while i < len(ids):
                hit = self._match(ids, i)
                if hit:
                    out.append(("emb", *self.rows[hit[0]]))
                    i += hit[1]
                else:
                    out.append((ids[i], -1))
                    i += 1
        return out

    def chunk(self, text: str) -> list[tuple[list[int], list[int], list[float]]]:
        """One prompt -> chunks of (ids[75], vidx[75], weights[75]) before BOS/EOS wrapping."""
        chunks: list = []
        ids: list[int] = []
        vidx: list[int] = []
        wts: list[float] = []
        last_comma = -1

        def close():
            nonlocal ids, vidx, wts, last_comma
            pad = CHUNK - len(ids)
            chunks.append((ids + [self.eos] * pad, vidx + [-1] * pad, wts + [1.0] * pad))
            ids, vidx, wts, last_comma = [], [], [], -1

        for piece, weight in parse_attention(text):
            if weight == -1:                      # BREAK
                close()
                continue
            toks, i = self._ids(piece), 0
            while i < len(toks):
                t = toks[i]
                if t == self.comma:
                    last_comma = len(ids)
                elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1          # move the words after the last comma to the next chunk
                    moved = ids[cut:], vidx[cut:], wts[cut:]
                    ids, vidx, wts = ids[:cut], vidx[:cut], wts[:cut]
                    close()
                    ids, vidx, wts = (list(m) for m in moved)
                if len(ids) == CHUNK:
                    close()
                hit = self._match(toks, i)
                if hit is None:
                    ids.append(t)
                    vidx.append(-1)
                    wts.append(weight)
                    i += 1
                    continue
                first, n = self.rows[hit[0]]
                n = min(n, CHUNK)
                if len(ids) + n > CHUNK:
                    close()
                ids += [self.eos] * n             # placeholder ids, replaced by the vectors
                vidx += list(range(first, first + n))
                wts += [weight] * n
                i += hit[1]
        if ids or not chunks:
            close()
        return chunks

    def __call__(self, prompts: list[str], chunks: int | None = None) -> Tokens:
        """Tokenize a batch. chunks=None: as many as the longest prompt needs (shorter ones are
        padded with chunks of the empty prompt); chunks=k: exactly k (longer prompts truncated)."""
        per = [self.chunk(p) for p in prompts]
        k = chunks or max(len(c) for c in per)
        empty = self.chunk("")[0]
        rows = ([], [], [])
        for c in per:
            row = ([], [], [])
            for cid, cv, cw in (c + [empty] * k)[:k]:
                row[0].extend([self.bos] + cid + [self.eos])
                row[1].extend([-1] + cv + [-1])
                row[2].extend([1.0] + cw + [1.0])
            for r, x in zip(rows, row):
                r.append(x)
        return Tokens(torch.tensor(rows[0], dtype=torch.long), torch.tensor(rows[1], dtype=torch.long),
                      torch.tensor(rows[2], dtype=torch.float32))

    def n_chunks(self, prompt: str) -> int:
        return len(self.chunk(prompt))


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk's encodings z [B, 77, D] with weights [B, 77]:
    z * w, rescaled so the mean over the whole tensor is unchanged. Computed in fp32."""
    zf = z.float()
    before = zf.mean()
    zf = zf * weights.to(zf.device, torch.float32)[..., None]
    return (zf * (before / zf.mean())).to(z.dtype)


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
    out = out.view(b, k, SEQ, -1)
    if tokens.weighted:                           # per chunk, as A1111 encodes chunk by chunk
        w = tokens.weights.view(b, k, SEQ)
        out = torch.stack([emphasize(out[:, j], w[:, j]) for j in range(k)], dim=1)
    return out.reshape(b, k * SEQ, -1)
