"""`ti-fast convert`: every readable source to every format, read back by the spec's A1111 rules
(tests/a1111_spec.py, not ti-fast's reader) with the right trigger word and bit-identical vectors;
round trips between every pair of formats; refusals."""
from __future__ import annotations

import itertools

import pytest
import safetensors.torch
import torch
from PIL import Image

from a1111_spec import a1111_dict, read_a1111, write_png
from ti_fast.cli import main

W = 768


def vecs(n, seed, dtype=torch.float32):
    return (torch.randn(n, W, generator=torch.Generator().manual_seed(seed)) * 0.3).to(dtype)


# name -> (writer(path, vectors), suffix, trigger name A1111 gives the source, vectors)
SOURCES = {
    "a1111": (lambda p, v: torch.save(a1111_dict(v, "src", 77, "0123456789", "v1-5"), p), ".pt", vecs(3, 0)),
    "original-ti": (lambda p, v: torch.save({"string_to_token": {"*": 265}, "name": "src", "step": 9,
                                             "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(v)})},
                                            p), ".pt", vecs(2, 1)),
    "kohya-fp16": (lambda p, v: safetensors.torch.save_file({"emb_params": v}, str(p)), ".safetensors",
                   vecs(4, 2, torch.float16)),
    "onetrainer-bf16": (lambda p, v: safetensors.torch.save_file({"emp_params": v}, str(p)), ".safetensors",
                        vecs(2, 3, torch.bfloat16)),
    "diffusers-1d": (lambda p, v: torch.save({"<tok>": v[0]}, p), ".bin", vecs(1, 4)),
    "diffusers-2d": (lambda p, v: safetensors.torch.save_file({"tok": v}, str(p)), ".safetensors", vecs(2, 5)),
    "png-chunk": (lambda p, v: write_png(p, a1111_dict(v, "src", 12)), ".png", vecs(2, 6)),
    "png-pixels": (lambda p, v: write_png(p, a1111_dict(v, "src", 12), chunk=False), ".png", vecs(3, 7)),
    "webp-pixels": (lambda p, v: write_png(p, a1111_dict(v, "src", 12), chunk=False, fmt="WEBP"), ".webp", vecs(2, 8)),
}
TARGETS = [("a1111", ".pt"), ("kohya", ".safetensors"), ("diffusers", ".bin"), ("diffusers", ".safetensors"),
           ("png", ".png")]


def source(tmp_path, kind):
    writer, suffix, v = SOURCES[kind]
    path = tmp_path / f"src{suffix}"
    writer(path, v)
    return path, v.to(torch.float32)


def convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_to_every_format(tmp_path, kind, capsys):
    src, want = source(tmp_path, kind)
    for fmt, suffix in TARGETS:
        out = tmp_path / f"out-{fmt}{suffix}"
        assert convert(src, out, "--format", fmt) == 0, capsys.readouterr().err
        name, got = read_a1111(out, width=W)
        assert got.dtype == torch.float32 and torch.equal(got, want), (kind, fmt, suffix)
        # tensor files are named by their stem, a PNG by its stored name (the source's trigger word)
        assert name == ("src" if fmt == "png" else out.stem), (kind, fmt, name)


def test_format_from_suffix_and_what_each_stores(tmp_path, capsys):
    src, want = source(tmp_path, "a1111")
    for suffix, check in ((".pt", lambda p: torch.load(p, weights_only=True)["step"] == 77),
                          (".safetensors", lambda p: list(safetensors.torch.load_file(str(p))) == ["emb_params"]),
                          (".bin", lambda p: list(torch.load(p, weights_only=True)) == ["mine"]),
                          (".png", lambda p: Image.open(p).text["sd-ti-embedding"])):
        out = tmp_path / f"mine{suffix}"
        assert convert(src, out) == 0 and check(out), suffix
    d = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert list(d) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"]
    assert (d["name"], d["sd_checkpoint"], d["sd_checkpoint_name"]) == ("mine", "0123456789", "v1-5")
    with safetensors.safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        assert f.metadata() == {"name": "mine", "step": "77", "sd_checkpoint": "0123456789",
                                "sd_checkpoint_name": "v1-5"}
    # one vector is written 1-D in the diffusers format, as diffusers' training script did
    one, _ = source(tmp_path, "diffusers-1d")
    assert convert(one, tmp_path / "d1.bin") == 0
    assert torch.load(tmp_path / "d1.bin", weights_only=True)["d1"].shape == (W,)
    assert "trigger word mine" in capsys.readouterr().out


@pytest.mark.parametrize("a,b", list(itertools.permutations(["a1111", "kohya", "diffusers", "png"], 2)))
def test_round_trip_each_pair(tmp_path, a, b):
    """A -> B -> A: the same vectors bit for bit; the trigger word by the naming rules (a PNG takes
    its source's trigger word, here mid's stem; a tensor file is named by its stem)."""
    suffix = {"a1111": ".pt", "kohya": ".safetensors", "diffusers": ".bin", "png": ".png"}
    v = vecs(3, 11)
    start = tmp_path / f"start{suffix[a]}"
    writers = {"a1111": lambda p: torch.save(a1111_dict(v, "start", 5), p),
               "kohya": lambda p: safetensors.torch.save_file({"emb_params": v}, str(p)),
               "diffusers": lambda p: torch.save({"start": v}, p),
               "png": lambda p: write_png(p, a1111_dict(v, "start", 5))}
    writers[a](start)
    mid, back = tmp_path / f"mid{suffix[b]}", tmp_path / "back" / f"start{suffix[a]}"
    assert convert(start, mid) == 0 and convert(mid, back) == 0
    n0, v0 = read_a1111(start)
    n1, v1 = read_a1111(back)
    assert torch.equal(v0, v) and torch.equal(v1, v0) and n0 == "start"
    assert n1 == ("mid" if a == "png" else "start")


def test_png_image_name_and_force(tmp_path, capsys):
    src, want = source(tmp_path, "kohya-fp16")
    pic = tmp_path / "pic.jpg"
    Image.new("RGB", (200, 120), (200, 40, 40)).save(pic)
    out = tmp_path / "card.png"
    assert convert(src, out, "--image", pic, "--name", "Red Cat!") == 0
    name, got = read_a1111(out)
    assert name == "Red Cat" and torch.equal(got, want)        # the name sanitised as A1111 does
    with Image.open(out) as im:
        assert im.size[1] == 120 and (im.size[0] - 200 - 2) % 2 == 0 and im.size[0] > 200
    before = out.read_bytes()
    assert convert(src, out) == 2                               # exists: refused, untouched
    err = capsys.readouterr().err
    assert err.startswith("ti-fast: error:") and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert convert(src, out, "--force") == 0 and read_a1111(out)[0] == "src"   # plain card, source's name
    with Image.open(out) as im:
        assert im.size[1] == 512


@pytest.mark.parametrize("argv,words", [
    (["{src}", "{tmp}/x.txt"], "cannot tell the format"),
    (["{src}", "{tmp}/x.pt", "--format", "png"], "must end in .png"),
    (["{src}", "{tmp}/x.pt", "--image", "{tmp}/pic.png"], "--image is for --format png"),
    (["{tmp}/missing.pt", "{tmp}/x.pt"], "no such file"),
    (["{xl}", "{tmp}/x.pt"], "SDXL"),
    (["{src}", "{tmp}/x.png", "--image", "{tmp}/nopic.png"], "nopic.png"),
    (["{src}", "{tmp}", "--format", "a1111"], "must end in"),
])
def test_refusals(tmp_path, capsys, argv, words):
    src, _ = source(tmp_path, "a1111")
    xl = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": vecs(1, 0), "clip_g": torch.zeros(1, 1280)}, str(xl))
    args = [a.format(src=src, tmp=tmp_path, xl=xl) for a in argv]
    assert convert(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ti-fast: error:") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.png").exists()
