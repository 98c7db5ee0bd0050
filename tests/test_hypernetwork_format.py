"""Hypernetwork files against two readers written here from the spec (a1111-compat.md
"Hypernetworks"), not from ti-fast's code: A1111's HypernetworkModule/load/save rules and
ComfyUI's loader rules (comfy_extras/nodes_hypernetwork.py). Plus the file's exact contents,
A1111's initialisation, and every refusal of a bad file."""
from __future__ import annotations

import pickletools
import zipfile
from collections import OrderedDict

import pytest
import torch

from hypernetwork_refs import (A1111_ORDER, COMFY_ACTS, a1111_dropout, a1111_load, a1111_save, comfy_forward,
                               comfy_load)
from ti_fast.hypernetworks import (HypernetworkError, NotAHypernetworkError, describe, new_hypernetwork,
                                   read_hypernetwork, structure_from_options)

# ---------------------------------------------------------------- helpers
def ti_forward(hn, x, strength):
    mk, mv = hn.pair(x.shape[-1])
    return mk(x, strength), mv(x, strength)


def ref_forward(mods, x):
    return mods[0](x), mods[1](x)


def close(a, b):
    return all((p - q).abs().max().item() <= 1e-6 for p, q in zip(a, b))


TI_CASES = [dict(activation=a) for a in COMFY_ACTS] + [
    dict(activation="relu", layer_norm=True),
    dict(activation="tanh", layer_norm=True, activate_output=True),
    dict(activation="elu", layer_structure="1,1.5,2,1", dropout_structure="0,0.1,0.2,0"),
    dict(activation="mish", use_dropout=True, last_layer_dropout=True, layer_norm=True),
    dict(activation="sigmoid", use_dropout=True, last_layer_dropout=True),
    dict(activation="swish", layer_structure="1,2,2,1", use_dropout=True),
]


def make_ti(tmp_path, i, kw, widths=(24, 40)):
    s = structure_from_options(kw.get("layer_structure", "1,2,1"), kw.get("activation", "linear"),
                               kw.get("init", "xavier_normal"), kw.get("layer_norm", False),
                               kw.get("dropout_structure"), kw.get("use_dropout", False),
                               kw.get("last_layer_dropout", False), kw.get("activate_output", False))
    hn = new_hypernetwork(f"h{i}", widths, s, seed=i)
    with torch.no_grad():                    # LayerNorm weights start ~0 (A1111): make them count
        for p in hn.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return hn, hn.save(tmp_path / f"h{i}.pt", step=3, sd_checkpoint="0123456789", sd_checkpoint_name="m")


def test_ti_files_load_in_a1111_and_comfyui_with_the_same_forward(tmp_path):
    x = torch.randn(2, 5, 24)
    for i, kw in enumerate(TI_CASES):
        hn, path = make_ti(tmp_path, i, kw)
        ref, data = a1111_load(path, strength=0.7)
        assert list(ref) == [24, 40] == hn.widths
        for w in (24, 40):
            for m_ref, m_ti, sd in zip(ref[w], hn.pair(w), data[w]):
                assert list(m_ref.state_dict()) == list(sd) == list(m_ti.state_dict()), kw
        assert close(ref_forward(ref[24], x), ti_forward(hn, x, 0.7)), kw
        comfy = comfy_load(path)
        st = hn.structure
        # ComfyUI counts LayerNorm weights as layers: with layer norm its "last layer" is the last
        # LayerNorm, so it activates the last Linear too (and shifts dropout)
        if st.layer_norm and st.activation != "linear" and not st.activate_output:
            assert not close(comfy_forward(comfy, x, 0.7), ti_forward(hn, x, 0.7)), kw
        elif not st.use_dropout:
            assert close(comfy_forward(comfy, x, 0.7), ti_forward(hn, x, 0.7)), kw
        elif not st.layer_norm:
            # dropout stays on in ComfyUI (p 0.3 whatever the file says), at A1111's positions
            types = [type(m).__name__ for m in comfy[24][0]]
            assert types == [type(m).__name__.replace("HashDropout", "Dropout") for m in hn.pair(24)[0].linear], kw
            assert not close(comfy_forward(comfy, x, 0.7), ti_forward(hn, x, 0.7)), kw
            for seq in comfy[24]:
                seq.eval()
            assert close(comfy_forward(comfy, x, 0.7), ti_forward(hn, x, 0.7)), kw


A1111_CASES = [dict(ls=[1, 2, 1], act=a, ln=False, ao=False, ds=[0, 0, 0]) for a in COMFY_ACTS] + [
    dict(ls=[1, 2, 1], act="gelu", ln=True, ao=True, ds=[0, 0, 0]),        # A1111-only activation
    dict(ls=[1, 2, 1], act="relu", ln=True, ao=True, ds=[0, 0.3, 0]),
    dict(ls=[1, 1.5, 2, 1], act="leakyrelu", ln=True, ao=False, ds=[0, 0.1, 0.25, 0]),
    dict(ls=[1, 2, 2, 1], act="sigmoid", ln=False, ao=True, ds=[0, 0.3, 0, 0]),
    dict(ls=[1, 2, 1], act=None, ln=False, ao=False, ds=[0, 0, 0]),         # None = linear
]


def test_a1111_files_load_into_ti_fast_with_the_same_forward(tmp_path):
    x = torch.randn(3, 4, 16)
    for i, c in enumerate(A1111_CASES):
        path = tmp_path / f"a{i}.pt"
        a1111_save(path, [16, 8], c["ls"], c["act"], c["ln"], c["ao"], c["ds"], seed=i)
        ref, _ = a1111_load(path, strength=0.6)
        hn = read_hypernetwork(path)
        assert hn.widths == [16, 8] and hn.step == 7 and hn.structure.activation == (c["act"] or "linear")
        assert close(ref_forward(ref[16], x), ti_forward(hn, x, 0.6)), c
        assert close(ref_forward(ref[8], x[..., :8]), ti_forward(hn, x[..., :8], 0.6)), c


def test_legacy_files_load_with_a1111_defaults(tmp_path):
    x = torch.randn(2, 3, 16)
    # old file: width keys only, linear1/linear2 names -> [1,2,1], no activation, no dropout
    a1111_save(tmp_path / "old.pt", [16], [1, 2, 1], None, False, False, [0, 0, 0], legacy=True)
    ref, _ = a1111_load(tmp_path / "old.pt")
    hn = read_hypernetwork(tmp_path / "old.pt")
    assert hn.name == "old" and hn.step == 0 and hn.structure.layer_structure == (1.0, 2.0, 1.0)
    assert close(ref_forward(ref[16], x), ti_forward(hn, x, 1.0))
    # no dropout_structure / activate_output: A1111 reads activate_output True, dropout from use_dropout
    a1111_save(tmp_path / "mid.pt", [16], [1, 2, 2, 1], "relu", False, True, a1111_dropout(4, True, True))
    d = torch.load(tmp_path / "mid.pt", weights_only=True)
    for k in ("dropout_structure", "activate_output"):
        del d[k]
    torch.save(d, tmp_path / "mid.pt")
    ref, _ = a1111_load(tmp_path / "mid.pt")
    hn = read_hypernetwork(tmp_path / "mid.pt")
    assert hn.structure.dropout_structure == (0, 0.3, 0.3, 0) and hn.structure.activate_output
    assert close(ref_forward(ref[16], x), ti_forward(hn, x, 1.0))
    # ...which ComfyUI reads as activate_output False: why ti-fast always writes the key
    comfy = comfy_load(tmp_path / "mid.pt")
    for seq in comfy[16]:
        seq.eval()
    assert not close(comfy_forward(comfy, x, 1.0), ti_forward(hn, x, 1.0))


def test_file_holds_exactly_what_a1111_writes(tmp_path):
    hn, path = make_ti(tmp_path, 0, dict(activation="linear", use_dropout=True, last_layer_dropout=True),
                       widths=(32, 16))
    d = torch.load(path, weights_only=True)
    assert list(d) == [32, 16] + A1111_ORDER
    assert d["activation_func"] == "linear" and d["layer_structure"] == [1.0, 2.0, 1.0]
    assert d["dropout_structure"] == [0.0, 0.3, 0.0] and d["use_dropout"] is True and d["last_layer_dropout"] is True
    assert d["activate_output"] is False and d["step"] == 3 and d["sd_checkpoint"] == "0123456789"
    for w in (32, 16):
        assert type(d[w]) is tuple and len(d[w]) == 2
        for sd in d[w]:
            assert type(sd) is OrderedDict and list(sd) == ["linear.0.weight", "linear.0.bias",
                                                            "linear.2.weight", "linear.2.bias"]
            assert all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert globals_ <= {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage"}


def test_new_weights_follow_a1111_init():
    def stats(init, act="relu", ln=True):
        hn = new_hypernetwork("x", [256], structure_from_options("1,2,1", act, init, ln), seed=0)
        lin0, norm0 = hn.pair(256)[0].linear[0], hn.pair(256)[0].linear[2]
        return lin0, norm0
    lin, norm = stats("normal")
    assert abs(lin.weight.std().item() - 0.01) < 1e-3 and not lin.bias.any()
    for init, want in (("xavier_normal", (2 / (256 + 512)) ** 0.5), ("kaiming_normal", (2 / 256) ** 0.5)):
        for act in ("relu", "leakyrelu"):
            lin, norm = stats(init, act)
            assert abs(lin.weight.std().item() / want - 1) < 0.05 and not lin.bias.any()
            # LayerNorm weights N(0, 0.01) under every init (A1111's quirk), zero bias
            assert abs(norm.weight.std().item() - 0.01) < 2e-3 and not norm.bias.any()
    lin, _ = stats("xavier_uniform")
    assert lin.weight.abs().max().item() <= (6 / (256 + 512)) ** 0.5 and not lin.bias.any()
    a = new_hypernetwork("x", [8], structure_from_options(), seed=5).snapshot()
    b = new_hypernetwork("x", [8], structure_from_options(), seed=5).snapshot()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_describe(tmp_path):
    _, path = make_ti(tmp_path, 1, dict(activation="relu", layer_norm=True, dropout_structure="0,0.1,0"))
    d = describe(path)
    assert d["kind"] == "hypernetwork" and d["name"] == "h1" and d["step"] == 3 and d["widths"] == [24, 40]
    assert d["layer_structure"] == [1.0, 2.0, 1.0] and d["activation"] == "relu" and d["layer_norm"] is True
    assert d["dropout_structure"] == [0.0, 0.1, 0.0] and d["activate_output"] is False
    assert d["parameters"] == sum(2 * (w * 2 * w + 2 * w + 2 * w * w + w + 2 * (2 * w) + 2 * w) for w in (24, 40))
    assert d["sd_checkpoint"] == "0123456789" and d["comfyui"]


def _bad(tmp_path, name, data):
    path = tmp_path / name
    torch.save(data, path)
    return path


def test_bad_files_are_refused_with_one_line(tmp_path):
    _, good = make_ti(tmp_path, 2, dict(activation="relu"))
    raw = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    d = torch.load(good, weights_only=True)
    w = torch.randn(4, 8)
    cases = {
        tmp_path / "trunc.pt": "truncated or corrupt",
        tmp_path / "empty.pt": "empty file",
        tmp_path / "text.pt": "not a torch file",
        _bad(tmp_path, "emb.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": w}, "name": "e"}): "embedding",
        _bad(tmp_path, "kohya.pt", {"emb_params": w}): "embedding",
        _bad(tmp_path, "ls.pt", {**d, "layer_structure": [1, 2, 2]}): "start and end with 1",
        _bad(tmp_path, "neg.pt", {**d, "layer_structure": [1, -2, 1]}): "non-positive",
        _bad(tmp_path, "act.pt", {**d, "activation_func": "frobnicate"}): "unknown activation",
        _bad(tmp_path, "dlen.pt", {**d, "dropout_structure": [0, 0.3]}): "must have 3 entries",
        _bad(tmp_path, "dp.pt", {**d, "dropout_structure": [0, 1.0, 0]}): r"\[0, 1\)",
        _bad(tmp_path, "dends.pt", {**d, "dropout_structure": [0.2, 0, 0.1]}): "start and end with 0",
        _bad(tmp_path, "shape.pt", {**d, 24: (d[40][0], d[24][1])}): "shape",
        _bad(tmp_path, "keys.pt", {**d, "is_layer_norm": True}): "keys do not fit",
        _bad(tmp_path, "nan.pt", {**d, 24: ({k: v * float("nan") for k, v in d[24][0].items()}, d[24][1])}): "NaN",
        _bad(tmp_path, "list.pt", [1, 2]): "not a hypernetwork",
        _bad(tmp_path, "nowidth.pt", {"step": 1}): "no integer width keys",
    }
    from safetensors.torch import save_file
    save_file({"emb_params": w}, str(tmp_path / "e.safetensors"))
    cases[tmp_path / "e.safetensors"] = "embedding"
    for path, msg in cases.items():
        with pytest.raises(HypernetworkError, match=msg) as ei:
            read_hypernetwork(path)
        assert "\n" not in str(ei.value) and str(path) in str(ei.value), path
    with pytest.raises(NotAHypernetworkError):
        read_hypernetwork(tmp_path / "emb.pt")


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_nothing_in_a_file_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _bad(tmp_path, "evil.pt", {768: ({}, {}), "x": _Boom()})
    with pytest.raises(HypernetworkError, match="refused unsafe pickle"):
        read_hypernetwork(path)
    assert not (tmp_path / "PWNED").exists()


def test_embedding_reader_names_a_hypernetwork(tmp_path):
    from ti_fast.embeddings import EmbeddingError, read_embedding
    from ti_fast.hypernetworks import is_hypernetwork_dict
    _, path = make_ti(tmp_path, 3, dict())
    assert is_hypernetwork_dict(torch.load(path, weights_only=True))
    with pytest.raises(EmbeddingError, match="hypernetwork, not an embedding"):
        read_embedding(path)


def test_cli_names_match_the_modules():
    """The torch-free names the CLI offers are exactly the activations the module builds."""
    from ti_fast.hypernetworks.module import ACTIVATIONS
    from ti_fast.hypernetworks.names import ACTIVATION_NAMES
    assert tuple(ACTIVATIONS) == ACTIVATION_NAMES
