"""Tokenizers: SD's from OpenAI's BPE file (ids from sd15.md), the generated tiny one, and the
resolution order load_model uses."""
from __future__ import annotations

import json

import pytest
from transformers import CLIPTokenizer

from ti_fast.loading import ModelLoadError, TINY_VOCAB_SIZE, build_tokenizer_from_bpe, resolve_tokenizer
from ti_fast.loading import tokenizer as T

BPE = T.find_bpe_file()
needs_bpe = pytest.mark.skipif(BPE is None, reason="OpenAI's BPE file not installed: pip install --no-deps clip-anytorch")


@pytest.fixture(scope="module")
def sd_tok_dir(tmp_path_factory):
    if BPE is None:
        pytest.skip("OpenAI's BPE file not installed: pip install --no-deps clip-anytorch")
    return build_tokenizer_from_bpe(BPE, tmp_path_factory.mktemp("sdtok"))


def test_sd_tokenizer_from_bpe(sd_tok_dir):
    vocab = json.loads((sd_tok_dir / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368 and vocab["!"] == 0 and vocab["!</w>"] == 256
    merges = (sd_tok_dir / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    tok = T.load_tokenizer_dir(sd_tok_dir, min_size=49408)
    ids = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [49407] * 73 and len(ids) == 77
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407
    # The two ways transformers builds it agree (its old vocab_file=/merges_file= names are ignored in 5.x).
    direct = CLIPTokenizer(vocab=str(sd_tok_dir / "vocab.json"), merges=str(sd_tok_dir / "merges.txt"))
    text = "A photo of a Cat, painting by greg rutkowski!! 1024px"
    assert direct(text).input_ids == tok(text).input_ids
    assert tok(text).input_ids[1:6] == [320, 1125, 539, 320, 2368]


def test_tiny_tokenizer(tmp_path):
    d = T.write_tiny_tokenizer(tmp_path / "a")
    T.write_tiny_tokenizer(tmp_path / "b")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (d / f).read_bytes() == (tmp_path / "b" / f).read_bytes()      # deterministic
    tok = T.load_tokenizer_dir(d)
    assert len(tok) == TINY_VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<|startoftext|>") == TINY_VOCAB_SIZE - 2
    assert tok.eos_token_id == tok.pad_token_id == TINY_VOCAB_SIZE - 1 and tok.model_max_length == 77
    for w in ("a", "photo", "of", "cat", "painting", "art", "by", "style", "the", "portrait"):
        assert tok.tokenize(w) == [w + "</w>"], (w, tok.tokenize(w))
    # Any text still tokenizes (every byte is a token), never to unknowns.
    ids = tok("Ünïcode 😀 zebra-42").input_ids
    assert ids[0] == TINY_VOCAB_SIZE - 2 and ids[-1] == TINY_VOCAB_SIZE - 1 and max(ids) < TINY_VOCAB_SIZE
    assert tok.unk_token_id not in ids[1:-1]
    assert len(CLIPTokenizer.from_pretrained(str(d))) == TINY_VOCAB_SIZE


def test_broken_tokenizer_dirs_are_refused(tmp_path):
    d = T.write_tiny_tokenizer(tmp_path / "t")
    (d / "merges.txt").rename(d / "merges.bak")
    with pytest.raises(ModelLoadError, match="vocab.json"):
        T.load_tokenizer_dir(d)
    # A tokenizer smaller than required (e.g. the tiny one for SD) is refused, not used.
    (d / "merges.bak").rename(d / "merges.txt")
    with pytest.raises(ModelLoadError, match="819 tokens"):
        T.load_tokenizer_dir(d, min_size=49408)


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TI_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(T, "HF_CLIP_REPO", "ti-fast-tests/no-such-repo")   # no HF cache hit
    tiny = T.write_tiny_tokenizer(tmp_path / "explicit")
    model = tmp_path / "model"
    T.write_tiny_tokenizer(model / "tokenizer")
    # 1. an explicit folder wins, 2. then the model's own tokenizer/
    assert resolve_tokenizer(model, tiny, min_size=514)[1] == str(tiny)
    assert resolve_tokenizer(model, None, min_size=514)[1] == str(model / "tokenizer")
    # 3./4. no HF cache -> OpenAI's BPE file from clip-anytorch, built once into the cache
    if BPE is not None:
        tok, src = resolve_tokenizer(tmp_path / "nothing-here")
        assert src == str(tmp_path / "cache" / "tokenizer") and len(tok) == 49408
        assert tok("a cat").input_ids == [49406, 320, 2368, 49407]
        monkeypatch.setattr(T, "find_bpe_file", lambda: None)            # second time: from the cache
        assert resolve_tokenizer(tmp_path / "nothing-here")[1] == src
    # 5. nothing anywhere and offline: a clear error saying what to do
    monkeypatch.setattr(T, "find_bpe_file", lambda: None)
    monkeypatch.setenv("TI_FAST_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ModelLoadError, match="--tokenizer DIR.*clip-anytorch"):
        resolve_tokenizer(tmp_path / "nothing-here")


@needs_bpe
def test_sd_model_without_tokenizer_uses_bpe(tmp_path, monkeypatch):
    """A tiny model with no tokenizer of its own: SD's (49408) does not fit its 819-row table."""
    from ti_fast import load_model, make_tiny
    monkeypatch.setenv("TI_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(T, "HF_CLIP_REPO", "ti-fast-tests/no-such-repo")
    d = make_tiny(tmp_path / "m")
    (d / "tokenizer").rename(tmp_path / "tok")
    with pytest.raises(ModelLoadError, match="49408 tokens but the text encoder's table has 819"):
        load_model(d)
    assert len(load_model(d, tokenizer=tmp_path / "tok").tokenizer) == TINY_VOCAB_SIZE


TEXTS = ["a photo of a cat", "", "  Hello,   WORLD!! ", "naïve café résumé", "it's 1999; don't stop",
         "(masterpiece:1.2), [blurry], <lora:x:1>", "emoji 🙂 and 漢字", "ringringring zzzzqqqq", "a\tb\nc"]


def test_create_s_light_tokenizer_equals_transformers(sd_tok_dir, tmp_path):
    """clip_token_ids (tokenizers alone, for `ti-fast create`) gives exactly transformers'
    CLIPTokenizer ids, on SD's real BPE and on the tiny one."""
    from ti_fast.loading.tiny import write_tiny_tokenizer
    tiny = tmp_path / "tiny"
    write_tiny_tokenizer(tiny)
    for folder in (sd_tok_dir, tiny):
        ref = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        for text in TEXTS:
            ids, size = T.clip_token_ids(folder, text)
            assert ids == ref(text, add_special_tokens=False)["input_ids"], (folder, text)
            assert size == len(ref)
