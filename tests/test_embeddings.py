"""Embedding file formats, the folder library and new-embedding initialisation."""
import hashlib
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch

from ti_fast.embeddings import (Embedding, EmbeddingError, WrongModelEmbedding, create_embedding,
                                init_vectors, load_library, read_embedding, sanitize_name,
                                save_png_embedding, save_pt, save_safetensors)

A1111_KEYS = ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"]


def make_emb(name="tok", n=3, width=768, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return Embedding(name=name, vectors=torch.randn(n, width, generator=g), **kw)


class Warnings(list):
    def __call__(self, line):
        assert "\n" not in line, f"warning spans lines: {line!r}"
        self.append(line)


# ------------------------------------------------------------------ A1111 .pt
def test_save_pt_is_exactly_a1111_dict(tmp_path):
    big = torch.randn(10, 768, requires_grad=True)
    emb = Embedding("tok", big[2:5], step=120, sd_checkpoint="6ce0161689", sd_checkpoint_name="v1-5")
    path = save_pt(emb, tmp_path / "tok.pt")
    data = torch.load(path, weights_only=True)
    assert list(data) == A1111_KEYS
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    t = data["string_to_param"]["*"]
    assert t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad
    assert t.shape == (3, 768)
    # A view of a bigger tensor must not drag the whole storage into the file.
    assert t.untyped_storage().nbytes() == 3 * 768 * 4
    torch.testing.assert_close(t, big[2:5].detach(), rtol=0, atol=0)
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == \
        ("tok", 120, "6ce0161689", "v1-5")
    assert emb.path == path
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pt_round_trip_names_by_file_stem(tmp_path):
    emb = make_emb("inner-name", step=7, sd_checkpoint="abcdef0123", sd_checkpoint_name="model")
    save_pt(emb, tmp_path / "trigger.pt")
    back = read_embedding(tmp_path / "trigger.pt")
    assert back.name == "trigger"  # A1111: the trigger word is the file stem
    assert torch.equal(back.vectors, emb.vectors)
    assert (back.step, back.sd_checkpoint, back.sd_checkpoint_name) == (7, "abcdef0123", "model")
    assert back.path == tmp_path / "trigger.pt"


def test_shorthash_is_sha256_prefix_of_file(tmp_path):
    emb = make_emb()
    assert emb.shorthash is None
    save_pt(emb, tmp_path / "tok.pt")
    assert emb.shorthash == hashlib.sha256((tmp_path / "tok.pt").read_bytes()).hexdigest()[:12]


# ------------------------------------------------------------------ safetensors / diffusers / kohya
def test_safetensors_round_trip_kohya_layout(tmp_path):
    emb = make_emb("tok", n=4, step=250, sd_checkpoint="6ce0161689", sd_checkpoint_name="v1-5")
    path = save_safetensors(emb, tmp_path / "tok.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert f.metadata() == {"name": "tok", "step": "250", "sd_checkpoint": "6ce0161689",
                                "sd_checkpoint_name": "v1-5"}
        assert f.get_tensor("emb_params").dtype == torch.float32
    back = read_embedding(path)
    assert torch.equal(back.vectors, emb.vectors)
    assert (back.name, back.step, back.sd_checkpoint, back.sd_checkpoint_name) == \
        ("tok", 250, "6ce0161689", "v1-5")


@pytest.mark.parametrize("key", ["emb_params", "emp_params", "<cat-toy>"])
def test_single_key_safetensors(tmp_path, key):
    t = torch.randn(2, 768, dtype=torch.float16)
    safetensors.torch.save_file({key: t}, str(tmp_path / "thing.safetensors"))
    back = read_embedding(tmp_path / "thing.safetensors")
    assert back.name == "thing" and back.step is None
    assert back.vectors.dtype == torch.float32 and torch.equal(back.vectors, t.float())


def test_diffusers_bin_and_one_dim_vector(tmp_path):
    t = torch.randn(768)
    torch.save({"<cat-toy>": t}, tmp_path / "learned_embeds.bin")
    back = read_embedding(tmp_path / "learned_embeds.bin")
    assert back.name == "learned_embeds"
    assert back.vectors.shape == (1, 768) and torch.equal(back.vectors[0], t)


def test_misnamed_safetensors_with_bin_extension(tmp_path):
    t = torch.randn(2, 768)
    safetensors.torch.save_file({"<x>": t}, str(tmp_path / "x.bin"))
    assert torch.equal(read_embedding(tmp_path / "x.bin").vectors, t)


def test_original_textual_inversion_parameterdict(tmp_path):
    vec = torch.randn(2, 768)
    pd = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": pd}, tmp_path / "orig.pt")
    back = read_embedding(tmp_path / "orig.pt")
    assert back.name == "orig" and torch.equal(back.vectors, vec) and not back.vectors.requires_grad


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_refused_without_running(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"string_to_param": {"*": _Evil(marker)}}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(EmbeddingError, match=r"evil\.pt: refused unsafe pickle.*system"):
        read_embedding(path)
    assert not marker.exists()


def test_malformed_contents_are_named(tmp_path):
    torch.save({"string_to_param": {"a": torch.randn(1, 768), "b": torch.randn(1, 768)}}, tmp_path / "two.pt")
    with pytest.raises(EmbeddingError, match=r"two\.pt: string_to_param must hold exactly one"):
        read_embedding(tmp_path / "two.pt")
    torch.save({"a": torch.randn(1, 768), "b": torch.randn(1, 768)}, tmp_path / "many.pt")
    with pytest.raises(EmbeddingError, match=r"many\.pt: expected exactly one tensor, found 2"):
        read_embedding(tmp_path / "many.pt")
    torch.save({"x": torch.full((1, 768), float("nan"))}, tmp_path / "dead.pt")
    with pytest.raises(EmbeddingError, match=r"dead\.pt: .*NaN"):
        read_embedding(tmp_path / "dead.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(EmbeddingError, match=r"junk\.pt: cannot read torch file"):
        read_embedding(tmp_path / "junk.pt")


def test_wrong_models_raise_distinct_error(tmp_path):
    safetensors.torch.save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
                                str(tmp_path / "xl.safetensors"))
    with pytest.raises(WrongModelEmbedding, match=r"xl\.safetensors: SDXL"):
        read_embedding(tmp_path / "xl.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 1024)}}, tmp_path / "sd2.pt")
    assert read_embedding(tmp_path / "sd2.pt").width == 1024  # readable without an expectation
    with pytest.raises(WrongModelEmbedding, match=r"sd2\.pt: width 1024 .*needs 768"):
        read_embedding(tmp_path / "sd2.pt", width=768)


# ------------------------------------------------------------------ library
def test_load_library_folder(tmp_path):
    lib = tmp_path / "embeddings"
    (lib / "sub" / "deeper").mkdir(parents=True)
    a, b, c = make_emb("Alpha", seed=1), make_emb("beta", seed=2), make_emb("gamma", n=2, seed=3)
    save_pt(a, lib / "Alpha.pt")
    save_safetensors(b, lib / "sub" / "beta.safetensors")
    save_png_embedding(c, lib / "sub" / "deeper" / "gamma-card.png")
    # Noise that must be ignored silently: a preview, a picture without data, other files.
    save_png_embedding(make_emb("prev", seed=9), lib / "Alpha.preview.png")
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 10, 10)).save(lib / "sample.png")
    (lib / "notes.txt").write_text("hello")
    # Must each cost exactly one warning naming the file.
    safetensors.torch.save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)},
                                str(lib / "xl.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 1024)}}, lib / "sd2.pt")
    (lib / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    (lib / "empty.bin").write_bytes(b"")
    save_pt(make_emb("dupe", seed=5), lib / "sub" / "Alpha.pt")  # same trigger word, later

    warns = Warnings()
    found = load_library([lib], width=768, warn=warns)
    assert list(found) == ["Alpha", "beta", "gamma"]
    assert torch.equal(found["Alpha"].vectors, a.vectors)  # the first one wins
    assert found["gamma"].path == lib / "sub" / "deeper" / "gamma-card.png"
    assert found["gamma"].vectors.shape == (2, 768)
    assert len(warns) == 5, warns
    for fname in ["xl.safetensors", "sd2.pt", "broken.safetensors", "empty.bin", "sub/Alpha.pt"]:
        assert sum(str(lib / fname) in w for w in warns) == 1, (fname, warns)
    assert any("SDXL" in w for w in warns) and any("1024" in w for w in warns)


def test_load_library_single_files_and_missing_paths(tmp_path):
    save_pt(make_emb("one"), tmp_path / "one.pt")
    (tmp_path / "x.txt").write_text("x")
    warns = Warnings()
    found = load_library([tmp_path / "one.pt", tmp_path / "x.txt", tmp_path / "nope"], warn=warns)
    assert list(found) == ["one"]
    assert len(warns) == 2 and "x.txt" in warns[0] and "nope" in warns[1]


# ------------------------------------------------------------------ create
def test_sanitize_name():
    assert sanitize_name("my/cat:toy <v2>.x") == "mycattoy v2.x"
    assert sanitize_name("Ünïcode-ok_1") == "Ünïcode-ok_1"
    with pytest.raises(EmbeddingError):
        sanitize_name("<>/:")


def test_init_vectors_spreads_tokens_like_a1111():
    table = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 4)  # row v = [v, v, v, v]
    rows = lambda ids, n: init_vectors(table, ids, n)[:, 0].tolist()  # noqa: E731
    assert rows([3, 7], 4) == [3, 3, 7, 7]                 # vec[i] = emb[i * k // n]
    assert rows([3, 7, 5], 5) == [3, 3, 7, 7, 5]           # 0,0,1,1,2 for k=3, n=5
    assert rows([3, 7, 5, 9], 2) == [3, 7]                 # truncated to n tokens first
    assert rows([4], 3) == [4, 4, 4]
    assert rows([], 2) == [0, 0]                           # empty init text -> zeros
    v = init_vectors(table.double(), [1], 1)
    assert v.dtype == torch.float32 and v.shape == (1, 4)
    with pytest.raises(ValueError):
        init_vectors(table, [10], 1)
    with pytest.raises(ValueError):
        init_vectors(table, [1], 0)


def test_create_embedding_is_step_zero_and_detached():
    table = torch.randn(20, 768, requires_grad=True)
    emb = create_embedding("new/one", table, [5, 6], 3)
    assert emb.name == "newone" and emb.step == 0 and emb.path is None
    assert not emb.vectors.requires_grad
    assert torch.equal(emb.vectors, table.detach()[[5, 5, 6]])


# ------------------------------------------------------------------ interop
def test_diffusers_state_dict_loader_accepts_our_files(tmp_path):
    ti = pytest.importorskip("diffusers.loaders.textual_inversion")
    emb = make_emb("tok", n=2)
    save_pt(emb, tmp_path / "tok.pt")
    save_safetensors(emb, tmp_path / "tok.safetensors")

    class Vocab:  # the helper only asks whether the token is already in the vocabulary
        def get_vocab(self):
            return {}

    for weight_name, token in [("tok.pt", None), ("tok.safetensors", "tok")]:
        dicts = ti.load_textual_inversion_state_dicts([str(tmp_path)], weight_name=weight_name,
                                                      local_files_only=True)
        tokens, vecs = ti.TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([token], dicts, Vocab())
        assert tokens == ["tok"]
        assert torch.equal(vecs[0], emb.vectors)


def test_same_embedding_in_two_formats_loads_quietly(tmp_path):
    from ti_fast.embeddings import Embedding, save_pt, save_safetensors, load_library
    e = Embedding(name="twin", vectors=torch.randn(2, 768))
    save_pt(e, tmp_path / "twin.pt")
    save_safetensors(e, tmp_path / "twin.safetensors")
    said = []
    lib = load_library([tmp_path], warn=said.append)
    assert list(lib) == ["twin"] and said == []
