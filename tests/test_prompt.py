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


def test_parse_attention_matches_a1111_examples():
    from ti_fast.prompt import parse_attention
    assert parse_attention("normal text") == [["normal text", 1.0]]
    assert parse_attention("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert parse_attention("(unbalanced") == [["unbalanced", 1.1]]
    assert parse_attention("\\(literal\\]") == [["(literal]", 1.0]]
    assert parse_attention("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [["a ", 1.0], ["house", 1.1 * 1.1 * 1.3], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
            [", sun, ", 1.1], ["sky", 1.1 ** 4], [".", 1.1]]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want])
    assert parse_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert parse_attention("(x : 1.5 )") == [["x ", 1.5]]


def test_emphasis_weights_break_and_comma_backtrack(model):
    pt = PromptTokenizer(model.tokenizer, {"zzq": 2})
    t = pt(["a (cat:1.5) and (zzq:0.5)"])
    w = t.weights[0].tolist()
    assert 1.5 in w and w.count(0.5) == 2 and w[0] == 1.0 and w[-1] == 1.0
    assert [v for v in t.vector_index[0].tolist() if v >= 0] == [0, 1]
    assert pt(["a BREAK b"]).chunks == 2
    # a chunk filled past a comma less than 20 tokens back is cut after the comma
    n = len(model.tokenizer("a", add_special_tokens=False)["input_ids"])
    assert n == 1
    text = "a " * 70 + ", " + "a " * 10
    ids = pt([text]).input_ids.view(-1, SEQ)
    comma = model.tokenizer(",", add_special_tokens=False)["input_ids"][0]
    first = ids[0].tolist()
    assert first[71] == comma and first[72:76] == [model.tokenizer.eos_token_id] * 4   # cut after the comma
    assert ids[1, 1:11].tolist() == [ids[0, 1].item()] * 10                               # the rest moved on


def test_emphasis_keeps_the_mean_and_scales_tokens(model):
    from ti_fast.prompt import emphasize
    pt = PromptTokenizer(model.tokenizer)
    plain, strong = pt(["a cat"]), pt(["a (cat:1.5)"])
    assert torch.equal(plain.input_ids, strong.input_ids)
    z = encode(model.text_encoder, plain)
    zs = encode(model.text_encoder, strong)
    assert zs.mean().item() == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-6)
    ref = emphasize(z, strong.weights)
    assert torch.allclose(zs, ref)
    assert not torch.allclose(zs, z)
