"""`ti-fast inspect --verify`: files built to pass and to fail each tool's loading rules (as read in
A1111's, ComfyUI's, diffusers' and InvokeAI's sources, cited in ti_fast/interop/verify.py), and the
diffusers verdicts checked against diffusers itself on the tiny pipeline."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from a1111_spec import a1111_dict, write_png
from ti_fast.cli import main
from ti_fast.interop.raw import read_raw
from ti_fast.interop.verify import verify

W = 768


def v(n=2, width=W, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.3


def verdicts(path, width=W, tokenizer=None):
    return {tool: (x.loads, x.trigger) for tool, x in verify(read_raw(path), width, tokenizer).items()}


def case(tmp_path, fname, writer):
    path = tmp_path / fname
    writer(path)
    return path


# (file name, writer, expected {tool: (loads, trigger)}), at SD1's width 768
CASES = [
    ("mycat.pt", lambda p: torch.save(a1111_dict(v(), "mycat"), p),
     dict(a1111=(True, "mycat"), comfyui=(True, "embedding:mycat"), diffusers=(True, "mycat"),
          invokeai=(True, "<mycat>"))),
    # a width of another model (SD2's 1024): skipped, ignored, refused, installed as SD2
    ("wide.pt", lambda p: torch.save(a1111_dict(v(2, 1024), "wide"), p),
     dict(a1111=(False, None), comfyui=(False, None), diffusers=(False, None), invokeai=(False, None))),
    # two tensors: A1111 "multiple terms", ComfyUI takes the first, diffusers' "state dictionary is
    # incorrect", InvokeAI reads dim 0 of the first (2) as the token width
    ("two.pt", lambda p: torch.save({"a": v(2), "b": v(2, seed=1)}, p),
     dict(a1111=(False, None), comfyui=(True, "embedding:two"), diffusers=(False, None), invokeai=(False, None))),
    # two terms under string_to_param: A1111 refuses; the others take "*" / the first entry
    ("terms.pt", lambda p: torch.save({**a1111_dict(v(), "terms"), "string_to_param": {"*": v(), "x": v()}}, p),
     dict(a1111=(False, None), comfyui=(True, "embedding:terms"), diffusers=(True, "terms"),
          invokeai=(True, "<terms>"))),
    # names that are not valid triggers: a space ends ComfyUI's embedding:NAME; InvokeAI types
    # <[a-zA-Z0-9., _-]+> only; a blank name gives A1111 no tokens
    ("my cat.pt", lambda p: torch.save(a1111_dict(v(), "my cat"), p),
     dict(a1111=(True, "my cat"), comfyui=(False, None), diffusers=(True, "my cat"), invokeai=(True, "<my cat>"))),
    ("my+cat.pt", lambda p: torch.save(a1111_dict(v(), "my+cat"), p),
     dict(a1111=(True, "my+cat"), comfyui=(True, "embedding:my+cat"), diffusers=(True, "my+cat"),
          invokeai=(False, None))),
    ("   .pt", lambda p: torch.save(a1111_dict(v(), None), p),
     dict(a1111=(False, None), comfyui=(False, None), diffusers=(False, None), invokeai=(True, "<   >"))),
    # kohya: diffusers registers the key as the token unless token= is passed
    ("ko.safetensors", lambda p: safetensors.torch.save_file({"emb_params": v()}, str(p)),
     dict(a1111=(True, "ko"), comfyui=(True, "embedding:ko"), diffusers=(True, "emb_params"),
          invokeai=(True, "<ko>"))),
    # the original TI repo's ParameterDict: only A1111 unpickles it; ComfyUI's raw-zip fallback reads it
    ("orig.pt", lambda p: torch.save({"string_to_token": {"*": 265}, "name": "orig",
                                      "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(v())})}, p),
     dict(a1111=(True, "orig"), comfyui=(True, "embedding:orig"), diffusers=(False, None), invokeai=(False, None))),
    # SDXL: A1111 skips it on SD1, ComfyUI uses its clip_l, InvokeAI installs it as SDXL
    ("xl.safetensors", lambda p: safetensors.torch.save_file({"clip_l": v(), "clip_g": v(2, 1280)}, str(p)),
     dict(a1111=(False, None), comfyui=(True, "embedding:xl"), diffusers=(False, None), invokeai=(False, None))),
    # diffusers files: one vector 1-D loads everywhere; a 2-D [2, 768] one reads as width 2 in InvokeAI
    ("one.bin", lambda p: torch.save({"<one>": v(1)[0]}, p),
     dict(a1111=(True, "one"), comfyui=(True, "embedding:one"), diffusers=(True, "<one>"), invokeai=(True, "<one>"))),
    ("twod.bin", lambda p: torch.save({"<twod>": v(2)}, p),
     dict(a1111=(True, "twod"), comfyui=(True, "embedding:twod"), diffusers=(True, "<twod>"),
          invokeai=(False, None))),
    # safetensors bytes under a .pt name: torch.load fails in A1111, ComfyUI and InvokeAI; diffusers
    # tries safetensors first whatever the suffix
    ("misnamed.pt", lambda p: safetensors.torch.save_file({"misnamed": v()}, str(p)),
     dict(a1111=(False, None), comfyui=(False, None), diffusers=(True, "misnamed"), invokeai=(False, None))),
    # images: A1111 only, by their stored name; *.preview.* images are thumbnails
    ("emb-100.png", lambda p: write_png(p, a1111_dict(v(), "emb", 100)),
     dict(a1111=(True, "emb"), comfyui=(False, None), diffusers=(False, None), invokeai=(False, None))),
    ("emb.preview.png", lambda p: write_png(p, a1111_dict(v(), "emb", 100)),
     dict(a1111=(False, None), comfyui=(False, None), diffusers=(False, None), invokeai=(False, None))),
]


@pytest.mark.parametrize("fname,writer,want", CASES, ids=[c[0].strip() or "blank" for c in CASES])
def test_each_tools_rules(tmp_path, fname, writer, want):
    assert verdicts(case(tmp_path, fname, writer)) == want


def test_vocabulary_clash_needs_the_tokenizer(tmp_path, tiny_single):
    from ti_fast.loading.tokenizer import load_tokenizer_dir
    tok = load_tokenizer_dir(tiny_single / "tokenizer")
    path = case(tmp_path, "a.pt", lambda p: torch.save(a1111_dict(v(2, 32), "a"), p))   # "a" is a CLIP token
    assert verdicts(path, 32)["diffusers"] == (True, "a")
    assert verdicts(path, 32, tok)["diffusers"] == (False, None)
    assert verdicts(path, 32, tok)["a1111"] == (True, "a")


def test_cli_verify_json_and_text(tmp_path, tiny_single, capsys):
    ok = case(tmp_path, "tiny.pt", lambda p: torch.save(a1111_dict(v(2, 32), "tiny"), p))
    wide = case(tmp_path, "wide.pt", lambda p: torch.save(a1111_dict(v(2, W), "wide"), p))
    assert main(["inspect", "--verify", "--json", "--model", str(tiny_single), str(ok), str(wide)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got[0]["verify"]["a1111"] == {"loads": True, "trigger": "tiny", "why": ""}
    assert got[1]["verify"]["comfyui"]["loads"] is False and "768 wide" in got[1]["verify"]["comfyui"]["why"]
    assert main(["inspect", "--verify", str(wide)]) == 0
    out = capsys.readouterr().out
    assert "A1111     loads  trigger: wide" in out and "InvokeAI  loads  trigger: <wide>" in out


# diffusers itself, on the tiny pipeline (text width 32): its verdicts must match ours
DIFFUSERS_CASES = {
    "ok.pt": lambda p: torch.save(a1111_dict(v(2, 32), "okname"), p),
    "wide.pt": lambda p: torch.save(a1111_dict(v(2, 48), "wide"), p),
    "two.pt": lambda p: torch.save({"a": v(2, 32), "b": v(2, 32)}, p),
    "clash.pt": lambda p: torch.save(a1111_dict(v(1, 32), "a"), p),
    "noname.pt": lambda p: torch.save(a1111_dict(v(1, 32), None), p),
    "ko.safetensors": lambda p: safetensors.torch.save_file({"emb_params": v(3, 32)}, str(p)),
    "orig.pt": lambda p: torch.save({"string_to_token": {"*": 265}, "name": "orig",
                                     "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(v(1, 32))})}, p),
    "one.bin": lambda p: torch.save({"<one>": v(1, 32)[0]}, p),
    "misnamed.pt": lambda p: safetensors.torch.save_file({"misnamed": v(2, 32)}, str(p)),
    "pickle.safetensors": lambda p: torch.save({"pk": v(1, 32)}, p),
}


def test_diffusers_verdicts_match_diffusers(tmp_path, tiny_diffusers):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_diffusers, safety_checker=None,
                                                             requires_safety_checker=False)
    for fname, writer in DIFFUSERS_CASES.items():
        path = case(tmp_path, fname, writer)
        ours = verify(read_raw(path), 32, pipe.tokenizer)["diffusers"]
        try:
            pipe.load_textual_inversion(str(path))
            added = [t for t in pipe.tokenizer.added_tokens_encoder if not t.startswith("<|")]
            loaded, trigger = True, min(added, key=len)
            pipe.unload_textual_inversion()
        except Exception:
            loaded, trigger = False, None
        assert (ours.loads, ours.trigger) == (loaded, trigger), (fname, ours, loaded, trigger)
