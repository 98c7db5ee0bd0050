"""Prompt tokenization: embedding expansion, 75-token chunks, negative-prompt padding."""
from __future__ import annotations

import pytest
import torch

from ti_fast.prompt import PromptTokenizer, encode, SEQ


@pytest.fixture(scope="module")
def model(tiny_single):
    from ti_fast.loading import load_model
    return load_model(tiny_single)


def test_embedding_expands_to_its_vectors(model):
    tok = model.tokenizer
    pt = PromptTokenizer(tok, {"zzq": 3, "other": 2})
    t = pt(["a zzq and other"], chunks=1)
    vidx = t.vector_index[0].tolist()
    assert [v for v in vidx if v >= 0] == [0, 1, 2, 3, 4]
    assert t.input_ids[0, 0].item() == tok.bos_token_id
    # the rows are where the trigger words were, in order
    first = vidx.index(0)
    assert vidx[first:first + 3] == [0, 1, 2]
    # encoding places exactly our vectors: changing a vector changes the output only there (causal mask)
    vec = torch.randn(5, model.text_encoder.config.width)
    a = encode(model.text_encoder, t, vec)
    vec2 = vec.clone()
    vec2[3] += 1.0
    b = encode(model.text_encoder, t, vec2)
    pos = vidx.index(3)
    assert torch.equal(a[0, :pos], b[0, :pos]) and not torch.equal(a[0, pos], b[0, pos])


def test_long_prompts_chunk_and_pad(model):
    pt = PromptTokenizer(model.tokenizer)
    n = len(model.tokenizer("cat " * 10, add_special_tokens=False)["input_ids"])
    long = "cat " * (10 * (160 // n))                     # > 150 tokens: three chunks
    k = pt.n_chunks(long)
    assert k == 3
    t = pt([long, ""])
    assert t.input_ids.shape == (2, 3 * SEQ)
    ids = t.input_ids.view(2, 3, SEQ)
    assert (ids[:, :, 0] == model.tokenizer.bos_token_id).all()      # every chunk BOS ... EOS
    assert (ids[:, :, -1] == model.tokenizer.eos_token_id).all()
    # the empty prompt is padded with chunks of "" : all three chunks equal
    assert torch.equal(ids[1, 0], ids[1, 1]) and torch.equal(ids[1, 1], ids[1, 2])
    ctx = encode(model.text_encoder, t)
    assert ctx.shape == (2, 3 * SEQ, model.text_encoder.config.width)
    assert pt([long], chunks=1).input_ids.shape == (1, SEQ)             # training truncates


def test_embedding_never_straddles_chunks(model):
    pt = PromptTokenizer(model.tokenizer, {"zzq": 4})
    base = model.tokenizer("a", add_special_tokens=False)["input_ids"]
    assert len(base) == 1
    t = pt(["a " * 73 + "zzq"])                             # 73 tokens + 4 vectors > 75
    assert t.chunks == 2
    v = t.vector_index.view(2, SEQ)
    assert (v[0] == -1).all() and sorted(v[1][v[1] >= 0].tolist()) == [0, 1, 2, 3]
