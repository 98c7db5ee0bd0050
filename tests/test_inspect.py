"""`ti-fast inspect` (text and --json) on every format ti-fast reads, built by the spec's writers in
tests/a1111_spec.py (not ti-fast's), on A1111 hypernetworks, with --model, and on bad input."""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

from a1111_spec import a1111_dict, write_png
from ti_fast.cli import main

W = 768


def vecs(n, width=W, seed=0, dtype=torch.float32):
    return (torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.3).to(dtype)


def norms(v):
    return [float(x) for x in v.float().norm(dim=1)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{file name: (expected fields, source vectors)} for every embedding layout ti-fast reads."""
    d = tmp_path_factory.mktemp("formats")
    out = {}

    def add(fname, fields, v):
        out[fname] = (fields, v)

    v = vecs(3)
    torch.save(a1111_dict(v, "mycat", 1500, "0123456789", "v1-5-pruned"), d / "mycat.pt")
    add("mycat.pt", dict(format="a1111-pt", name="mycat", step=1500, vectors=3, width=W, family="SD1.x",
                         sd_checkpoint="0123456789", sd_checkpoint_name="v1-5-pruned", dtype="float32"), v)
    v = vecs(2, seed=1)
    original = {"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(v)}),
                "name": "old", "step": 5000}
    torch.save(original, d / "old.pt")
    add("old.pt", dict(format="original-ti-pt", name="old", step=5000, vectors=2, width=W), v)
    v = vecs(4, seed=2, dtype=torch.float16)
    safetensors.torch.save_file({"emb_params": v}, str(d / "kohya.safetensors"), metadata={"step": "42"})
    add("kohya.safetensors", dict(format="kohya-safetensors", name="kohya", step=42, vectors=4, width=W,
                                  dtype="float16", key="emb_params"), v)
    v = vecs(2, seed=3)
    safetensors.torch.save_file({"emp_params": v}, str(d / "onet.safetensors"))
    add("onet.safetensors", dict(format="onetrainer-safetensors", name="onet", step=None, vectors=2), v)
    v = vecs(1, seed=4)[0]
    torch.save({"<cat-toy>": v}, d / "learned_embeds.bin")
    add("learned_embeds.bin", dict(format="diffusers-bin", name="learned_embeds", vectors=1, width=W,
                                   key="<cat-toy>"), v[None])
    v = vecs(2, seed=5)
    safetensors.torch.save_file({"toy": v}, str(d / "toy.safetensors"))
    add("toy.safetensors", dict(format="diffusers-safetensors", vectors=2, key="toy"), v)
    v = vecs(2, width=1024, seed=6)
    torch.save(a1111_dict(v, "sd2thing", 100), d / "sd2thing.pt")
    add("sd2thing.pt", dict(vectors=2, width=1024, family="SD2.x"), v)
    v = vecs(5, seed=7)
    write_png(d / "stored-42.png", a1111_dict(v, "inside", 42))           # chunk and pixels
    add("stored-42.png", dict(format="png-chunk", name="inside", stored_name="inside", step=42, vectors=5,
                              encodings=["chunk", "pixels"], dtype="json"), v)
    write_png(d / "px.png", a1111_dict(v, "pixonly", 7), chunk=False)
    add("px.png", dict(format="png-pixels", name="pixonly", step=7, encodings=["pixels"]), v)
    write_png(d / "px.webp", a1111_dict(v, "webpemb", 8), chunk=False, fmt="WEBP")
    add("px.webp", dict(format="webp-pixels", name="webpemb", step=8, vectors=5), v)
    return d, out


def run_json(capsys, *argv):
    rc = main(["inspect", "--json", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out), cap.err


def test_every_format_json(files, capsys):
    d, expected = files
    rc, got, err = run_json(capsys, *(d / f for f in expected))
    assert rc == 0 and err == ""
    assert [g["path"] for g in got] == [str(d / f) for f in expected]
    for g, (fname, (fields, v)) in zip(got, expected.items()):
        assert g["kind"] == "embedding", fname
        for key in ("path", "kind", "format", "name", "step", "vectors", "width"):
            assert key in g, (fname, key)
        for key, want in fields.items():
            assert g[key] == want, (fname, key, g[key], want)
        assert g["norms"] == pytest.approx(norms(v), rel=1e-6), fname
        assert len(g["hash"]) == 12 and g["size"] == (d / fname).stat().st_size


def test_text_output(files, capsys):
    d, _ = files
    assert main(["inspect", str(d / "mycat.pt"), str(d / "stored-42.png")]) == 0
    out = capsys.readouterr().out
    assert "embedding  a1111-pt  name mycat  step 1500  3 vectors × 768 (SD1.x)" in out
    assert "trained on v1-5-pruned [0123456789]" in out
    assert "png-chunk (also in pixels)  name inside  step 42  5 vectors" in out


def test_sdxl_and_hypernetwork(tmp_path, capsys):
    l, g = vecs(2, 768, 1), vecs(2, 1280, 2)
    safetensors.torch.save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "xl.safetensors"))
    # An A1111 hypernetwork as the spec lays it out: int widths -> (state_dict_k, state_dict_v)
    hn = {"step": 250, "name": "myhn", "layer_structure": [1, 2, 1], "activation_func": "relu",
          "is_layer_norm": True, "use_dropout": False, "activate_output": False, "weight_initialization": "Normal",
          "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "v1-5"}
    count = 0
    for w in (768, 320, 640, 1280):
        sd = {"linear.0.weight": torch.zeros(2 * w, w), "linear.0.bias": torch.zeros(2 * w),
              "linear.2.weight": torch.zeros(2 * w), "linear.2.bias": torch.zeros(2 * w),
              "linear.3.weight": torch.zeros(w, 2 * w), "linear.3.bias": torch.zeros(w),
              "linear.4.weight": torch.zeros(w), "linear.4.bias": torch.zeros(w)}
        hn[w] = (sd, {k: t.clone() for k, t in sd.items()})
        count += 2 * sum(t.numel() for t in sd.values())
    torch.save(hn, tmp_path / "myhn.pt")
    rc, (xl, h), _ = run_json(capsys, tmp_path / "xl.safetensors", tmp_path / "myhn.pt")
    assert rc == 0
    assert xl["format"] == "sdxl-safetensors" and xl["width"] == [768, 1280] and xl["family"] == "SDXL"
    assert xl["vectors"] == 2 and xl["norms"]["clip_g"] == pytest.approx(norms(g), rel=1e-6)
    assert h["kind"] == "hypernetwork" and h["format"] == "a1111-hypernetwork-pt" and h["name"] == "myhn"
    assert h["widths"] == [320, 640, 768, 1280] and h["layer_structure"] == [1.0, 2.0, 1.0]
    assert h["step"] == 250 and h["activation_func"] == "relu" and h["is_layer_norm"] is True
    assert h["parameters"] == count and h["family"] == "SD1.x" and h["vectors"] is None and h["width"] is None
    assert main(["inspect", str(tmp_path / "myhn.pt")]) == 0
    assert "hypernetwork  a1111-hypernetwork-pt  name myhn  step 250  widths 320, 640, 768, 1280" in capsys.readouterr().out


def test_model_typical_norm(files, tiny_single, capsys):
    from ti_fast.loading import load_model
    d, _ = files
    table = load_model(tiny_single).text_encoder.token_table.detach().float()
    torch.save(a1111_dict(vecs(2, 32), "tinyemb"), d / "tinyemb.pt")
    rc, got, _ = run_json(capsys, "--model", tiny_single, d / "tinyemb.pt", d / "mycat.pt")
    assert rc == 0
    assert got[0]["model_token_norm"]["median"] == pytest.approx(float(table.norm(dim=1).median()), rel=1e-6)
    assert got[0]["fits_model"] is True and got[1]["fits_model"] is False
    assert main(["inspect", str(d / "tinyemb.pt"), "--model", str(tiny_single)]) == 0
    assert "model's typical token norm" in capsys.readouterr().out
    assert main(["inspect", str(d / "tinyemb.pt"), "--model", str(d / "nothere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ti-fast: error:") and err.count("\n") == 1


def test_bad_files_are_named_and_the_rest_described(files, tmp_path, capsys):
    d, _ = files
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    from PIL import Image
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "photo.png")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04garbage")
    many = {f"model.diffusion_model.w{i}": torch.zeros(1) for i in range(100)}
    safetensors.torch.save_file(many, str(tmp_path / "model.safetensors"))
    torch.save({"a": "b"}, tmp_path / "nodict.pt")
    bad = [fifo, tmp_path / "missing.pt", tmp_path / "photo.png", tmp_path / "junk.pt",
           tmp_path / "model.safetensors", tmp_path / "nodict.pt", tmp_path]
    rc, got, err = run_json(capsys, d / "mycat.pt", *bad)
    assert rc == 2 and got[0]["name"] == "mycat"
    lines = err.splitlines()
    assert len(lines) == len(bad) and all(line.startswith("ti-fast: error: ") for line in lines)
    for g, path, word in zip(got[1:], bad, ("FIFO", "no such file", "without an embedding", "junk.pt",
                                            "model checkpoint", "neither an embedding nor a hypernetwork",
                                            "is a folder")):
        assert g["kind"] is None and g["path"] == str(path) and word in g["error"], g
