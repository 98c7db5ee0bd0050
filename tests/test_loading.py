"""Every loading path of ti_fast.loading on tiny models: layouts, dtypes, key variants, EMA,
separate VAEs, .ckpt safety, each refusal, hashes. (Numerical parity: test_parity.py.)"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import sys
import time
import types

import pytest
import torch
from safetensors.torch import save_file, load_file

from ti_fast import load_model, make_tiny, ModelLoadError
from ti_fast.loading import hashes, peak_rss_anon_while, TINY_UNET, TINY_VAE, TINY_CLIP
from ti_fast.loading.tiny import tiny_models, write_single, write_diffusers, single_state_dict
from ti_fast.loading.keys import UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX

TE_TOK = CLIP_PREFIX + "embeddings.token_embedding.weight"


def refused(path, *words, **kw):
    """load_model(path) must raise one line < 400 chars naming the file and all `words`."""
    with pytest.raises(ModelLoadError) as ei:
        load_model(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 400, msg
    name = os.path.basename(str(path).rstrip("/"))
    assert name in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in: {msg}"
    return msg


def assert_same(mod_a, mod_b, dtype=None):
    a, b = mod_a.state_dict(), mod_b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        ref = b[k] if dtype is None else b[k].to(dtype).to(a[k].dtype)
        assert torch.equal(a[k], ref), k


@pytest.fixture(scope="module")
def models():
    return tiny_models(0)


def write_sd(path, sd, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def config_meta(unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP):
    return {"ti_fast_config": json.dumps({"unet": unet_cfg.to_dict(), "vae": vae_cfg.to_dict(), "clip": clip_cfg.to_dict()})}


# ---------------------------------------------------------------- make_tiny + layouts
def test_make_tiny_is_fast_and_deterministic(tmp_path):
    a = make_tiny(tmp_path / "a", "single", seed=0)
    t0 = time.perf_counter()
    b = make_tiny(tmp_path / "b", "single", seed=0)
    assert time.perf_counter() - t0 < 1.0                              # warm call (imports done)
    c = make_tiny(tmp_path / "c", "single", seed=1)
    fa = (a / "model.safetensors").read_bytes()
    assert fa == (b / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (a / "tokenizer" / f).read_bytes() == (c / "tokenizer" / f).read_bytes()
    d = make_tiny(tmp_path / "d", "diffusers", seed=0)
    for f in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (d / f).is_file(), f
    with pytest.raises(ValueError):
        make_tiny(tmp_path / "e", "folder")


def test_load_tiny_single_folder(tiny_single, models):
    m = load_model(tiny_single)
    info = m.info
    assert (info.variant, info.layout, info.name, info.dtype, info.file_dtype) == \
        ("sd1", "single", tiny_single.name, torch.float32, "float32")
    assert info.config == {"unet": TINY_UNET.to_dict(), "vae": TINY_VAE.to_dict(), "clip": TINY_CLIP.to_dict()}
    for mod in (m.unet, m.vae, m.text_encoder):
        assert not mod.training and not any(p.requires_grad for p in mod.parameters())
        assert all(p.device.type == "cpu" for p in mod.parameters())
    assert_same(m.unet, models[0]), assert_same(m.vae, models[1]), assert_same(m.text_encoder, models[2])
    assert len(m.tokenizer) == TINY_CLIP.vocab_size and m.tokenizer.model_max_length == 77
    assert m.tokenizer.pad_token == "<|endoftext|>"
    ids = m.tokenize(["a photo of a cat", "art"])
    assert ids.shape == (2, 77) and ids[0, 0] == 817 and ids[1, 2:].eq(818).all()
    out = m.unet(torch.randn(1, 4, 8, 8), 3.5, m.text_encoder(ids[:1]))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_single_file_path_and_half_dtype(tiny_single, models):
    m = load_model(tiny_single / "model.safetensors", dtype=torch.float16)   # tokenizer/ found beside it
    assert m.info.name == "model" and m.unet.dtype == torch.float16 and m.vae.dtype == torch.float16
    assert_same(m.unet, models[0], torch.float16)


def test_diffusers_folder_equals_single(tiny_single, tiny_diffusers):
    a, b = load_model(tiny_single), load_model(tiny_diffusers)
    assert b.info.layout == "diffusers" and b.info.name == tiny_diffusers.name
    assert b.info.config == a.info.config
    for x, y in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        assert_same(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, models, dtype):
    f = write_single(tmp_path / "m.safetensors", *models, dtype=dtype)
    shutil.copytree(make_tiny(tmp_path / "t").joinpath("tokenizer"), tmp_path / "tokenizer", dirs_exist_ok=True)
    m = load_model(f)
    assert m.info.file_dtype == str(dtype).removeprefix("torch.") and m.unet.dtype == torch.float32
    assert_same(m.unet, models[0], dtype), assert_same(m.text_encoder, models[2], dtype)


@pytest.mark.parametrize("fmt,variant,dtype", [("bin", None, None), ("safetensors", "fp16", torch.float16),
                                               ("bin", "fp16", torch.float16)])
def test_diffusers_variants(tmp_path, models, fmt, variant, dtype):
    d = write_diffusers(tmp_path / "pipe", *models, dtype=dtype, fmt=fmt, variant=variant)
    m = load_model(d)
    assert_same(m.unet, models[0], dtype), assert_same(m.vae, models[1], dtype)
    assert_same(m.text_encoder, models[2], dtype)


def test_diffusers_flat_text_keys_and_old_vae_attention_names(tmp_path, models):
    d = write_diffusers(tmp_path / "pipe", *models)
    f = d / "text_encoder" / "model.safetensors"
    sd = load_file(str(f))
    write_sd(f, {k.removeprefix("text_model."): v for k, v in sd.items()})    # transformers >= 5.6 layout
    v = d / "vae" / "diffusion_pytorch_model.safetensors"
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    vsd = load_file(str(v))
    for a, b in old.items():                                            # diffusers < 0.14 VAE names
        vsd = {k.replace(a, b): t for k, t in vsd.items()}
    assert any(".proj_attn." in k for k in vsd)
    write_sd(v, vsd)
    m = load_model(d)
    assert_same(m.text_encoder, models[2]), assert_same(m.vae, models[1])


def test_old_text_keys_position_ids_and_enlarged_table(tmp_path, models):
    sd = single_state_dict(*models)
    old = {(k.replace("transformer.text_model.", "transformer.") if k.startswith(CLIP_PREFIX) else k): v
           for k, v in sd.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.rand(1, 77) * 76     # float garbage
    table = old.pop("cond_stage_model.transformer.embeddings.token_embedding.weight")
    extra = torch.randn(3, table.shape[1])
    old["cond_stage_model.transformer.embeddings.token_embedding.weight"] = torch.cat([table, extra])
    clip_cfg = dataclasses.replace(TINY_CLIP, vocab_size=TINY_CLIP.vocab_size + 3)
    f = write_sd(tmp_path / "m.safetensors", old, config_meta(clip_cfg=clip_cfg))
    m = load_model(f, tokenizer=make_tiny(tmp_path / "t") / "tokenizer")
    assert m.text_encoder.token_table.shape[0] == TINY_CLIP.vocab_size + 3
    assert torch.equal(m.text_encoder.token_table[-3:], extra)
    ids = m.tokenize("a cat")
    ref = models[2](ids)
    assert torch.allclose(m.text_encoder(ids), ref, atol=1e-6)


def test_ema(tmp_path, models):
    sd = single_state_dict(*models)
    for k in list(sd):
        if k.startswith(UNET_PREFIX):
            sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] + 1.0
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    f = write_sd(tmp_path / "m.safetensors", sd, config_meta())
    tok = make_tiny(tmp_path / "t") / "tokenizer"
    raw, ema = load_model(f, tokenizer=tok), load_model(f, tokenizer=tok, use_ema=True)
    assert not raw.info.ema and ema.info.ema
    assert_same(raw.unet, models[0])
    w = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(ema.unet.state_dict()[w], models[0].state_dict()[w] + 1.0)
    assert_same(ema.text_encoder, models[2])
    # a file without EMA copies: use_ema falls back to its (already EMA or raw) weights
    assert not load_model(f.parent / "t", use_ema=True).info.ema


@pytest.mark.parametrize("legacy", [False, True])
def test_ckpt_zip_legacy_and_lightning_callback(tmp_path, models, monkeypatch, legacy):
    # Lightning's ModelCheckpoint as old SD .ckpt files pickle it: a class (dict key) and an instance.
    mc = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mc.__name__, "ModelCheckpoint"
    mc.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mc.__name__, mc)
    sd = single_state_dict(*models)
    payload = {"state_dict": {"state_dict": sd}, "global_step": 470000, "epoch": 3,
               "callbacks": {ModelCheckpoint: {"best": 1}}, "cb": ModelCheckpoint()}
    f, g = tmp_path / "m.ckpt", tmp_path / "cfg.ckpt"
    torch.save(payload, f, _use_new_zipfile_serialization=not legacy)
    torch.save({**payload, "ti_fast_config": config_meta()["ti_fast_config"]}, g,
               _use_new_zipfile_serialization=not legacy)
    monkeypatch.delitem(sys.modules, mc.__name__)                      # loading must not need Lightning
    tok = make_tiny(tmp_path / "t") / "tokenizer"
    # no architecture in the file: SD 1.5 is assumed, so this tiny .ckpt mismatches (and was read)
    refused(f, "key mismatch", "shape", "model.diffusion_model.", tokenizer=tok)
    m = load_model(g, tokenizer=tok)
    assert_same(m.unet, models[0]), assert_same(m.vae, models[1]), assert_same(m.text_encoder, models[2])


def test_separate_vae_ckpt_with_loss_keys(tmp_path, models):
    tiny = make_tiny(tmp_path / "t")
    other = tiny_models(3)[1]
    vsd = {"state_dict": {**other.state_dict(), "loss.logvar": torch.zeros(()),
                          "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4),
                          "model_ema.decay": torch.tensor(0.9), "model_ema.num_updates": torch.tensor(7)}}
    torch.save(vsd, tmp_path / "vae.ckpt")
    m = load_model(tiny, vae=tmp_path / "vae.ckpt")
    assert_same(m.vae, other)
    assert m.info.vae_path.endswith("vae.ckpt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle", "raw-pickle-4"])
def test_malicious_pickle_is_not_executed(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {UNET_PREFIX + "x": torch.zeros(2)}, "evil": _Evil(marker)}
    f = tmp_path / "evil.ckpt"
    if kind.startswith("raw-pickle"):
        # no tensors: plain pickle would store them through another global, refused first
        f.write_bytes(pickle.dumps({"evil": payload["evil"]}, protocol=4 if kind.endswith("4") else 2))
    else:
        torch.save(payload, f, _use_new_zipfile_serialization=(kind == "zip"))
    msg = refused(f, "refused", "nothing in it was executed")
    if kind != "raw-pickle-4":               # protocol 4 is refused at its first FRAME opcode
        assert "global posix.system" in msg or "global os.system" in msg
    assert not marker.exists()


# ---------------------------------------------------------------- separate VAE
@pytest.mark.parametrize("prefix", ["", VAE_PREFIX])
def test_separate_vae_file(tmp_path, tiny_single, models, prefix):
    other = tiny_models(7)[1]
    f = write_sd(tmp_path / "vae.safetensors", {prefix + k: v for k, v in other.state_dict().items()})
    m = load_model(tiny_single, vae=f)
    assert_same(m.vae, other), assert_same(m.unet, models[0])
    assert m.info.hash == load_model(tiny_single).info.hash          # the VAE does not change the model hash


def test_vae_folder_and_missing_vae(tmp_path, models, tiny_diffusers):
    sd = {k: v for k, v in single_state_dict(*models).items() if not k.startswith(VAE_PREFIX)}
    f = write_sd(tmp_path / "novae.safetensors", sd, config_meta())
    shutil.copytree(tiny_diffusers / "tokenizer", tmp_path / "tokenizer")
    refused(f, "no VAE", "vae=")
    m = load_model(f, vae=tiny_diffusers / "vae")                     # a diffusers vae/ folder
    assert_same(m.vae, models[1])


# ---------------------------------------------------------------- refusals
def test_refuse_sdxl_sd2_unclip(tmp_path):
    conv = {UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    xl = write_sd(tmp_path / "xl.safetensors", {**conv, "conditioner.embedders.0.transformer.x": torch.zeros(2)})
    refused(xl, "SDXL")
    sd2 = write_sd(tmp_path / "sd2.safetensors", {**conv, "cond_stage_model.model.token_embedding.weight": torch.zeros(4, 2)})
    refused(sd2, "SD 2.x", "OpenCLIP")
    k = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    wide = write_sd(tmp_path / "sd2v.safetensors", {**conv, k: torch.zeros(8, 1024)})
    refused(wide, "SD 2.x", "1024")
    un = write_sd(tmp_path / "unclip.safetensors", {**conv, UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(2, 2)})
    refused(un, "unCLIP")


def test_refuse_non_sd1_diffusers_folders(tmp_path, tiny_diffusers):
    def variant(name, path, edit):
        d = tmp_path / name
        shutil.copytree(tiny_diffusers, d)
        f = d / path
        cfg = json.loads(f.read_text())
        edit(cfg, d)
        f.write_text(json.dumps(cfg))
        return d
    refused(variant("sd2", "unet/config.json", lambda c, d: c.update(cross_attention_dim=1024)), "SD 2.x", "sd2/unet")
    refused(variant("sd2te", "text_encoder/config.json", lambda c, d: c.update(hidden_size=1024, hidden_act="gelu")),
            "SD 2.x", "OpenCLIP")
    refused(variant("xl", "model_index.json", lambda c, d: c.update(_class_name="StableDiffusionXLPipeline")), "SDXL")
    refused(variant("xl2", "model_index.json", lambda c, d: (d / "text_encoder_2").mkdir()), "SDXL")
    refused(variant("p2p", "model_index.json", lambda c, d: c.update(_class_name="StableDiffusionInstructPix2PixPipeline")),
            "instruct-pix2pix")


def test_refuse_v_prediction(tmp_path, tiny_single, models):
    f = write_single(tmp_path / "vkey.safetensors", *models, extra={"v_pred": torch.tensor(1.0)})
    refused(f, "v-prediction", "v_pred key")
    g = tmp_path / "vyaml.safetensors"
    shutil.copy(tiny_single / "model.safetensors", g)
    g.with_suffix(".yaml").write_text('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n'
                                      '  params:\n    parameterization: "v"\n')
    refused(g, "v-prediction", "vyaml.yaml")
    g.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "eps"\n')
    assert load_model(g, tokenizer=tiny_single / "tokenizer").info.variant == "sd1"
    meta = write_sd(tmp_path / "vmeta.safetensors", load_file(str(tiny_single / "model.safetensors")),
                    {**config_meta(), "modelspec.prediction_type": "v"})
    refused(meta, "v-prediction", "metadata")
    sched = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "num_train_timesteps": 1000}
    d = write_diffusers(tmp_path / "vpipe", *models, scheduler=sched)
    refused(d, "v-prediction", "scheduler_config.json")


def test_inpainting_and_pix2pix(tmp_path):
    for cin, ok in ((9, True), (8, False)):
        ms = tiny_models(0, unet_cfg=dataclasses.replace(TINY_UNET, in_channels=cin))
        f = write_single(tmp_path / f"in{cin}" / "model.safetensors", *ms)
        d = write_diffusers(tmp_path / f"pipe{cin}", *ms)
        if ok:
            shutil.copytree(d / "tokenizer", f.parent / "tokenizer")
            for p in (f.parent, d):
                m = load_model(p)
                assert m.info.variant == "sd1-inpainting" and m.unet.config.in_channels == 9
        else:
            refused(f, "instruct-pix2pix")
            refused(d, "instruct-pix2pix")


def test_refuse_not_a_checkpoint(tmp_path, models):
    t = tmp_path / "notes.safetensors"
    t.write_text("these are my notes, not weights\n" * 10)
    refused(t, "not a")
    p = tmp_path / "image.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    refused(p, "not a checkpoint")
    lora = write_sd(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)})
    refused(lora, "LoRA")
    emb = write_sd(tmp_path / "emb.safetensors", {"emb_params": torch.zeros(2, 768)})
    refused(emb, "embedding")
    vae = write_sd(tmp_path / "vae.safetensors", models[1].state_dict())
    refused(vae, "standalone VAE", "vae=")
    lst = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], lst)
    refused(lst, "not a checkpoint")
    refused(tmp_path / "missing.safetensors", "no such file")
    (tmp_path / "emptydir").mkdir()
    refused(tmp_path / "emptydir", "neither a diffusers folder")


def test_refuse_truncated_and_corrupt(tmp_path, tiny_single, models):
    data = (tiny_single / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    refused(cut, "truncated")
    n = int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"#" * 16 + data[24:])                  # header JSON destroyed
    refused(bad, "corrupt")
    ck = tmp_path / "cut.ckpt"
    torch.save({"state_dict": single_state_dict(*models)}, ck)
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    refused(ck, "truncated or corrupt")
    assert n > 16


def test_key_mismatch_names_keys_and_shapes(tmp_path, models):
    sd = single_state_dict(*models)
    gone = UNET_PREFIX + "out.2.bias"
    del sd[gone]
    sd[UNET_PREFIX + "input_blocks.1.0.bogus.weight"] = torch.zeros(2)
    k = UNET_PREFIX + "time_embed.0.weight"
    sd[k] = torch.zeros(128, 33)
    f = write_sd(tmp_path / "mm.safetensors", sd, config_meta())
    msg = refused(f, "key mismatch", "UNet", "out.2.bias", "input_blocks.1.0.bogus.weight", "time_embed.0.weight",
                  "[128, 33] vs [128, 32]", tokenizer=make_tiny(tmp_path / "t") / "tokenizer")
    assert "missing" in msg and "unexpected" in msg


# ---------------------------------------------------------------- hashes and memory
def test_file_hash_known_value_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TI_FAST_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "x.safetensors"
    f.write_bytes(bytes(range(256)) * 8192)                            # 2 MiB
    calls = []
    real = hashes._sha256_files
    monkeypatch.setattr(hashes, "_sha256_files", lambda ps: calls.append(ps) or real(ps))
    full = "91d3beb88a9b2f778a6c44a1c53b63d3c79931845a9aef84b3fb414610bd1938"
    assert hashes.file_hashes(f) == (full[:10], "7daca209")
    assert hashes.file_sha256(f) == full and len(calls) == 1           # second lookup: cache hit
    assert (tmp_path / "cache" / "hashes.json").is_file()
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))   # new mtime -> recomputed
    hashes.file_sha256(f)
    assert len(calls) == 2


def test_model_and_folder_hash(tmp_path, monkeypatch, tiny_single, tiny_diffusers):
    monkeypatch.setenv("TI_FAST_CACHE", str(tmp_path / "cache"))
    m = load_model(tiny_single)
    data = (tiny_single / "model.safetensors").read_bytes()
    assert m.info.hash == hashlib.sha256(data).hexdigest()[:10]
    assert m.info.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    d = load_model(tiny_diffusers)
    h = hashlib.sha256()
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        h.update((tiny_diffusers / part).read_bytes())
    assert d.info.hash == h.hexdigest()[:10] and d.info.name == tiny_diffusers.name
    assert d.info.to_dict()["hash"] == d.info.hash


def test_peak_rss_anon_while():
    def grab():
        t = torch.ones(64, 1024, 1024)        # 256 MiB, touched
        return float(t[0, 0, 0])
    r = peak_rss_anon_while(grab)
    assert r.result == 1.0 and r.peak - r.before > 200 * 2**20
