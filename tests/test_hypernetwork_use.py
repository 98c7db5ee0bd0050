"""Hypernetworks in the UNet and at the command line: the attention hook on the tiny model,
<hypernet:NAME:STRENGTH> in generate, create-hypernetwork, and every refusal (exit 2, one line,
before the model loads)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from hypernetwork_refs import a1111_load
from ti_fast.cli import main
from ti_fast.hypernetworks.hooks import attentions
from ti_fast.hypernetworks import (attach, attached, detach, model_widths, new_hypernetwork, parse_extra_networks,
                                   read_hypernetwork, structure_from_options)
from ti_fast.sample.generate import GenerateConfig, generate
from ti_fast.infotext import parse_infotext


@pytest.fixture(scope="module")
def model(tiny_single):
    from ti_fast.loading import load_model
    return load_model(tiny_single)


def strong(widths, seed=0, **kw):
    """A hypernetwork whose residual is large enough to move 8-bit pixels on the tiny model."""
    s = structure_from_options(kw.pop("layer_structure", "1,2,1"), kw.pop("activation", "relu"), "xavier_normal", **kw)
    return new_hypernetwork("h", widths, s, seed=seed)


def kv_inputs(unet, run):
    """{attention name: (its context, input of to_k, input of to_v)} seen while run() executes."""
    seen, handles = {}, []
    for name, m in attentions(unet):
        def pre(mod, args, name=name):
            seen.setdefault(name, {})["ctx"] = (args[1] if len(args) > 1 and args[1] is not None else args[0]).detach()
        handles.append(m.register_forward_pre_hook(pre))
        for part in ("to_k", "to_v"):
            def hook(mod, args, out, name=name, part=part):
                seen.setdefault(name, {})[part] = args[0].detach().clone()
            handles.append(getattr(m, part).register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: (d["ctx"], d["to_k"], d["to_v"]) for n, d in seen.items()}


def test_hook_changes_cross_attention_kv_not_the_text_encoder(model, tmp_path):
    unet, te = model.unet, model.text_encoder
    ids = model.tokenize(["a photo of a cat"])
    ctx = te(ids)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    hn = strong([32])                       # the tiny model's text width (its 768)
    path = hn.save(tmp_path / "h.pt")
    plain_out = unet(x, t, ctx)
    with attached(unet, [(hn, 0.8)]):
        ctx_hooked = te(ids)
        hooked = kv_inputs(unet, lambda: unet(x, t, ctx_hooked))
    assert torch.equal(ctx_hooked, ctx)     # the text encoder's output bitwise unchanged
    ref, _ = a1111_load(path, strength=0.8)
    cross = [n for n in hooked if n.endswith("attn2")]
    assert cross
    for n in cross:                         # cross-attention k/v inputs are H_k(c), H_v(c) as A1111 computes them
        c, k_in, v_in = hooked[n]
        assert torch.equal(c, ctx) and not torch.equal(k_in, c)
        torch.testing.assert_close(k_in, ref[32][0](ctx), rtol=0, atol=1e-5)
        torch.testing.assert_close(v_in, ref[32][1](ctx), rtol=0, atol=1e-5)
    assert all(a.kv_hook is None for _, a in attentions(unet))     # detached again
    assert torch.equal(unet(x, t, ctx), plain_out)


def test_each_width_acts_where_it_belongs(tmp_path):
    from ti_fast.loading import TINY_UNET
    from ti_fast.models import UNet
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(TINY_UNET, context_dim=48)).eval()   # text 48, blocks 32 / 64 (middle)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 7, 48)
    for width, acts_on in ((48, lambda n: n.endswith("attn2")),
                           (32, lambda n: n.endswith("attn1") and not n.startswith("middle")),
                           (64, lambda n: n.startswith("middle") and n.endswith("attn1"))):
        hn = strong([width], seed=width)
        ref, _ = a1111_load(hn.save(tmp_path / f"{width}.pt"))
        names = attach(unet, [hn])
        seen = kv_inputs(unet, lambda: unet(x, t, c))
        detach(unet)
        assert names == [n for n in seen if acts_on(n)] and names, width
        for n, (ctx, k_in, v_in) in seen.items():
            if acts_on(n):
                torch.testing.assert_close(k_in, ref[width][0](ctx), rtol=0, atol=1e-5)
                torch.testing.assert_close(v_in, ref[width][1](ctx), rtol=0, atol=1e-5)
            else:
                assert torch.equal(k_in, ctx) and torch.equal(v_in, ctx), (width, n)


def test_several_apply_in_order(tmp_path):
    from ti_fast.loading import TINY_UNET
    from ti_fast.models import UNet
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(TINY_UNET, context_dim=48)).eval()
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 7, 48)
    h1, h2, h3 = strong([48], seed=1), strong([48, 32], seed=2, activation="tanh"), strong([48], seed=3)
    r1, _ = a1111_load(h1.save(tmp_path / "1.pt"), strength=0.5)
    r2, _ = a1111_load(h2.save(tmp_path / "2.pt"), strength=1.5)
    attach(unet, [(h1, 0.5), (h3, 0.0), (h2, 1.5)])          # h3 at strength 0: left out
    seen = kv_inputs(unet, lambda: unet(x, t, c))
    detach(unet)
    for n in (n for n in seen if n.endswith("attn2")):       # A1111's apply_hypernetworks: k and v chains
        torch.testing.assert_close(seen[n][1], r2[48][0](r1[48][0](c)), rtol=0, atol=1e-5)
        torch.testing.assert_close(seen[n][2], r2[48][1](r1[48][1](c)), rtol=0, atol=1e-5)


def test_hook_under_checkpointing_dropout_and_half_precision():
    from ti_fast.loading import TINY_UNET
    from ti_fast.models import UNet
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval().requires_grad_(False)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 5, 32)
    hn = strong([32, 64], layer_structure="1,2,2,1", dropout_structure="0,0.3,0.3,0", layer_norm=True)
    hn.train()
    attach(unet, [(hn, 1.0)])

    def grads(checkpointing):
        unet.set_gradient_checkpointing(checkpointing)
        hn.zero_grad()
        unet(x, t, c).square().mean().backward()
        return [p.grad.clone() for p in hn.parameters()]
    eager, ckpt = grads(False), grads(True)
    # the recomputed blocks drew the same dropout masks: the same gradients
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(eager, ckpt))
    hn.advance_dropout()
    assert not all(torch.equal(a, b) for a, b in zip(eager, grads(False)))   # a new seed, new masks
    snap = hn.snapshot()
    with torch.no_grad():
        for p in hn.parameters():
            p.add_(1.0)
    hn.restore(snap)
    assert all(torch.equal(v, hn.state_dict()[k]) for k, v in snap.items())
    unet.set_gradient_checkpointing(False)
    hn.eval()
    ref = unet(x, t, c)
    unet.to(memory_format=torch.channels_last)
    torch.testing.assert_close(unet(x.to(memory_format=torch.channels_last), t, c), ref, rtol=1e-4, atol=1e-4)
    unet.to(torch.bfloat16)                 # the hook computes in fp32 and casts back to the UNet's dtype
    out = unet(x, t, c)
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in hn.parameters())
    assert (out.float() - ref).abs().max() < 0.1
    detach(unet)


def test_generate_strength_zero_is_bitwise_the_plain_model(model, tmp_path):
    hn = strong([32, 64])
    hn.save(tmp_path / "hn" / "sub" / "style one.pt")
    kw = dict(model="unused", steps=3, width=64, height=64, device="cpu", quiet=True, seed=5, sampler="euler",
              hypernetworks=[str(tmp_path / "hn")])
    plain = generate(GenerateConfig(prompt="a cat", negative_prompt="blurry", out=str(tmp_path / "a"), **kw), model=model)
    zero = generate(GenerateConfig(prompt="a cat<hypernet:style one:0>", negative_prompt="blurry",
                                   out=str(tmp_path / "b"), **kw), model=model)
    one = generate(GenerateConfig(prompt="a cat <hypernet:style one>", negative_prompt="blurry <lora:x:1>",
                                  out=str(tmp_path / "c"), **kw), model=model)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(zero.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(one.images[0]))
    info = parse_infotext(one.infotexts[0])          # the prompt as written, tags and all
    assert info["Prompt"] == "a cat <hypernet:style one>" and info["Negative prompt"] == "blurry <lora:x:1>"
    assert "Hypernet" not in info
    assert all(a.kv_hook is None for _, a in attentions(model.unet))


def test_extra_network_tags_parse_as_a1111():
    text, tags = parse_extra_networks("a <hypernet:foo:0.5>cat, <lora:bar:1:2> <hypernet:baz> <x y:1> <hypernet::3>")
    assert text == "a cat,   <x y:1> "
    assert [(t.kind, t.items) for t in tags] == [("hypernet", ("foo", "0.5")), ("lora", ("bar", "1", "2")),
                                                 ("hypernet", ("baz",)), ("hypernet", ("", "3"))]


@pytest.fixture
def no_model_load(monkeypatch):
    import ti_fast.loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(ti_fast.loading, "load_model", refuse)


def run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_generate_bad_input_exits_2_before_the_model_loads(tiny_single, tmp_path, capsys, no_model_load):
    from ti_fast.embeddings import Embedding, save_pt
    lib = tmp_path / "hn"
    strong([32]).save(lib / "good.pt")
    strong([768, 320]).save(lib / "sd1.pt")                      # widths the tiny model lacks
    save_pt(Embedding(name="emb", vectors=torch.randn(1, 32)), lib / "emb.pt")
    raw = (lib / "good.pt").read_bytes()
    (lib / "cut.pt").write_bytes(raw[: len(raw) // 3])
    os.mkfifo(tmp_path / "fifo.pt")
    base = ["generate", "--model", str(tiny_single), "--steps", "1", "--width", "64", "--height", "64",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "o"), "--hypernetworks", str(lib)]
    cases = [
        (["--prompt", "a <hypernet:nope:1>"], "no hypernetwork named 'nope' (known: cut, emb, good, sd1)"),
        (["--prompt", "a", "--negative-prompt", "<hypernet:nope>"], "no hypernetwork named 'nope'"),
        (["--prompt", "a <hypernet:good:strong>"], "strength 'strong' is not a number"),
        (["--prompt", "a <hypernet:emb:1>"], "embedding, not a hypernetwork"),
        (["--prompt", "a <hypernet:cut:1>"], "truncated or corrupt"),
        (["--prompt", "a <hypernet:sd1:1>"], "made for another model"),
    ]
    for extra, msg in cases:
        rc, err = run_cli(base + extra, capsys)
        assert rc == 2 and msg in err and err.count("\n") == 0 and err.startswith("ti-fast: error: "), (extra, err)
    rc, err = run_cli(base[:-1] + [str(tmp_path / "fifo.pt"), "--prompt", "a"], capsys)
    assert rc == 2 and "FIFO" in err and err.count("\n") == 0


def test_embedding_reader_refuses_a_hypernetwork_in_generate(model, tmp_path):
    strong([32]).save(tmp_path / "e" / "h.pt")
    warnings = []
    from ti_fast.embeddings import load_library
    assert load_library([tmp_path / "e"], width=32, warn=warnings.append) == {}
    assert len(warnings) == 1 and "hypernetwork, not an embedding" in warnings[0]


def test_create_hypernetwork_defaults(tiny_single, tiny_diffusers, tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    assert model_widths(tiny_single) == model_widths(tiny_diffusers) == [32, 64]
    rc, _ = run_cli(["create-hypernetwork", "my style?!", "--model", str(tiny_single), "--seed", "1"], capsys)
    assert rc == 0
    path = tmp_path / "hypernetworks" / "my style.pt"
    d = torch.load(path, weights_only=True)
    assert list(d)[:2] == [32, 64] and d["layer_structure"] == [1.0, 2.0, 1.0] and d["activation_func"] == "linear"
    assert d["weight_initialization"] == "Normal" and d["is_layer_norm"] is False and d["use_dropout"] is False
    assert d["activate_output"] is False and d["dropout_structure"] == [0.0, 0.0, 0.0] and d["step"] == 0
    assert d["name"] == "my style"
    hn = read_hypernetwork(path)
    assert hn.pair(32)[0].linear[0].weight.std().item() == pytest.approx(0.01, rel=0.2)
    rc, err = run_cli(["create-hypernetwork", "my style", "--model", str(tiny_single)], capsys)
    assert rc == 2 and "exists (pass --overwrite" in err
    rc, _ = run_cli(["create-hypernetwork", "b", "--model", str(tiny_diffusers), "--sizes", "64", "--out", "x",
                     "--layer-structure", "1,1.5,1", "--activation", "swish", "--init", "kaiming_uniform",
                     "--layer-norm", "--dropout-structure", "0,0.2,0", "--activate-output"], capsys)
    assert rc == 0
    d = torch.load(tmp_path / "x" / "b.pt", weights_only=True)
    assert list(d)[0] == 64 and d["activation_func"] == "swish" and d["weight_initialization"] == "KaimingUniform"
    assert d["dropout_structure"] == [0.0, 0.2, 0.0] and d["use_dropout"] and d["last_layer_dropout"]
    assert d["activate_output"] and d["is_layer_norm"] and d[64][0]["linear.0.weight"].shape == (96, 64)


def test_create_hypernetwork_bad_input_exits_2(tiny_single, tmp_path, capsys, no_model_load):
    base = ["create-hypernetwork", "x", "--model", str(tiny_single), "--out", str(tmp_path)]
    cases = [
        (["--layer-structure", "1,2,2"], "must start and end with 1"),
        (["--layer-structure", "2,2,1"], "must start and end with 1"),
        (["--layer-structure", "1,-2,1"], "non-positive"),
        (["--layer-structure", "1,0,1"], "non-positive"),
        (["--layer-structure", "1,a,1"], "expected comma-separated numbers"),
        (["--activation", "gelu"], "unknown activation 'gelu'"),
        (["--init", "orthogonal"], "--init 'orthogonal'"),
        (["--sizes", "768,320"], "no attention of width 768"),
        (["--sizes", "32.5"], "positive whole numbers"),
        (["--dropout-structure", "0,0.3"], "must have 3 entries"),
        (["--dropout-structure", "0,1,0"], "[0, 1)"),
        (["--dropout-structure", "0,-0.1,0"], "[0, 1)"),
        (["--dropout-structure", "0.1,0.1,0"], "start and end with 0"),
        (["--dropout-structure", "0,0.1,0", "--use-dropout"], "exclude each other"),
        (["--last-layer-dropout"], "needs --use-dropout"),
    ]
    for extra, msg in cases:
        rc, err = run_cli(base + extra, capsys)
        assert rc == 2 and msg in err and err.count("\n") == 0, (extra, err)
    rc, err = run_cli(["create-hypernetwork", "?!", "--model", str(tiny_single)], capsys)
    assert rc == 2 and "nothing left" in err
    assert not list(tmp_path.glob("*.pt"))
