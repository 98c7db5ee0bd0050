"""`ti-fast train-hypernetwork` on the tiny model (CPU): the same loop, step and checkpointer as
embeddings with a hypernetwork as the trainable. Its files load in the A1111 and ComfyUI readers
re-implemented from the spec (tests/hypernetwork_refs.py), the loss on fixed (noise, t) pairs
falls, resume after kill -9 is bitwise, Ctrl-C saves a loadable file, a NaN rolls back to the
last good weights, generate at strength 0 is the plain image; the step's dropout seed and the
CUDA-graph eligibility on CPU, and (`gpu` marker) the graphed step against the eager one."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hypernetwork_refs import A1111_ORDER, a1111_load, comfy_load, comfy_forward
from ti_fast.errors import ConfigError, NonFiniteLossError
from ti_fast.hypernetworks import new_hypernetwork, read_hypernetwork, structure_from_options
from ti_fast.training.config import HypernetworkTrainConfig
from ti_fast.training.loop import train
from ti_fast.training.outputs import load_state
from train_helpers import images, interrupt_when

ROOT = Path(__file__).resolve().parents[1]
# relu + layer norm + activate_output: a structure where ComfyUI's forward agrees with A1111's
STRUCTURE = dict(activation="relu", layer_norm=True, activate_output=True, dropout_structure="0,0.3,0")


def hn_config(model: Path, tmp: Path, **kw) -> HypernetworkTrainConfig:
    """A few steps at 64 px on the tiny model (widths 32 = its text width, 64), quiet, on the CPU."""
    d = dict(name="hn", data=str(images(tmp)), model=str(model), width=64, height=64, steps=4, lr="0.002",
             save_every=0, seed=7, out=str(Path(tmp) / "out"), log_dir=str(Path(tmp) / "log"), quiet=True,
             device="cpu")
    d.update(kw)
    return HypernetworkTrainConfig(**d)


def weights(path) -> dict:
    return {k: v for k, v in read_hypernetwork(path).state_dict().items() if k != "dropout_seed"}


@pytest.fixture(scope="module")
def trained(tiny_single, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hn-trained")
    cfg = hn_config(tiny_single, tmp, lr="0.01", save_every=2, grad_accum=2, preview_every=4, preview_steps=2,
                    **STRUCTURE)
    return train(cfg), cfg


def test_outputs_are_a1111_files(trained, tiny_single):
    res, cfg = trained
    assert res.status == "completed" and res.steps == 4 and res.kind == "hypernetwork"
    assert res.hypernetwork == Path(cfg.out) / "hn.pt" and res.embedding is None and res.embedding_safetensors is None
    assert sorted(p.name for p in Path(cfg.out).iterdir()) == ["hn.pt"]
    d = torch.load(res.hypernetwork, weights_only=True)
    assert [k for k in d if not isinstance(k, int)] == A1111_ORDER
    assert sorted(k for k in d if isinstance(k, int)) == [32, 64]
    settings = json.loads((res.log_dir / "settings.json").read_text())
    assert d["step"] == 4 and d["name"] == "hn" and d["sd_checkpoint"] == settings["model"]["hash"]
    assert d["sd_checkpoint_name"] == settings["model"]["name"]
    assert d["activation_func"] == "relu" and d["activate_output"] is True
    assert d["dropout_structure"] == [0.0, 0.3, 0.0] and d["use_dropout"] is True and d["last_layer_dropout"] is True
    tensors = [t for w in (32, 64) for sd in d[w] for t in sd.values()]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
    for step in (2, 4):                   # periodic copies: NAME-STEP.pt, stored name NAME (as A1111)
        p = res.log_dir / "hypernetworks" / f"hn-{step}.pt"
        assert torch.load(p, weights_only=True)["step"] == step and read_hypernetwork(p).name == "hn"
    assert settings["kind"] == "hypernetwork" and "vectors" not in settings and "vectors" not in settings["config"]
    assert settings["hypernetwork"]["widths"] == [32, 64] and settings["config"]["lr"] == "0.01"
    assert [int(r["step"]) for r in csv.DictReader(open(res.log_dir / "loss.csv"))] == [1, 2, 3, 4]
    state = load_state(res.log_dir / "state.pt")
    assert state["kind"] == "hypernetwork" and state["step"] == 4
    start = new_hypernetwork("hn", [32, 64], structure_from_options(**STRUCTURE), seed=7)
    trained = weights(res.hypernetwork)
    moved = [k for k, v in start.state_dict().items() if k != "dropout_seed" and not torch.equal(v, trained[k])]
    assert len(moved) == len(trained)                      # every weight trained


def test_previews_carry_the_tag_and_no_ti_hashes(trained):
    from PIL import Image
    res, _ = trained
    info = Image.open(res.log_dir / "images" / "hn-4.png").text["parameters"]
    assert "<hypernet:hn:1>" in info.splitlines()[0] and "TI hashes" not in info
    assert (res.log_dir / "images" / "hn-grid.png").exists() and not (res.log_dir / "image_embeddings").exists()


def test_loads_in_a1111_and_comfyui_with_the_same_forward(trained):
    res, _ = trained
    ours = read_hypernetwork(res.hypernetwork).eval()
    ref, d = a1111_load(res.hypernetwork)
    comfy = comfy_load(res.hypernetwork)
    for mods in comfy.values():
        for m in mods:
            m.eval()                      # ComfyUI keeps dropout on; compare the deterministic forward
    g = torch.Generator().manual_seed(0)
    for w in (32, 64):
        x = torch.randn(2, 5, w, generator=g)
        mk, mv = ours.pair(w)
        with torch.no_grad():
            k, v = mk(x), mv(x)
            torch.testing.assert_close(ref[w][0](x), k, rtol=0, atol=1e-6)
            torch.testing.assert_close(ref[w][1](x), v, rtol=0, atol=1e-6)
            ck, cv = comfy_forward(comfy, x, 1.0)
            torch.testing.assert_close(ck, k, rtol=0, atol=1e-6)
            torch.testing.assert_close(cv, v, rtol=0, atol=1e-6)
        assert not torch.allclose(k, x, atol=1e-3)        # trained: not the identity


def test_generate_strength_zero_is_plain_and_one_differs(trained, tiny_single, tmp_path):
    from ti_fast.loading import load_model
    from ti_fast.sample.generate import GenerateConfig, generate
    res, _ = trained
    model = load_model(tiny_single)
    kw = dict(model=str(tiny_single), steps=3, width=64, height=64, device="cpu", quiet=True, seed=5,
              sampler="euler", hypernetworks=[str(res.hypernetwork.parent)])
    plain = generate(GenerateConfig(prompt="a ring", out=str(tmp_path / "a"), **kw), model=model)
    zero = generate(GenerateConfig(prompt="a ring <hypernet:hn:0>", out=str(tmp_path / "b"), **kw), model=model)
    one = generate(GenerateConfig(prompt="a ring <hypernet:hn:1>", out=str(tmp_path / "c"), **kw), model=model)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(zero.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(one.images[0]))


def test_inspect_shows_the_structure(trained, capsys):
    from ti_fast.cli import main
    res, _ = trained
    assert main(["inspect", "--json", str(res.hypernetwork)]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["kind"] == "hypernetwork" and info["name"] == "hn" and info["step"] == 4
    assert info["vectors"] is None and info["width"] is None and info["widths"] == [32, 64]
    assert info["layer_structure"] == [1.0, 2.0, 1.0] and info["activation_func"] == "relu"
    assert info["is_layer_norm"] is True and info["dropout_structure"] == [0.0, 0.3, 0.0]
    assert info["parameters"] == read_hypernetwork(res.hypernetwork).num_parameters() and info["comfyui"]
    assert main(["inspect", str(res.hypernetwork)]) == 0
    text = capsys.readouterr().out
    assert "activation relu  layer norm on  dropout [0.0, 0.3, 0.0]  activate output on" in text
    assert "ComfyUI: keeps dropout on while generating" in text


def test_loss_falls_on_fixed_pairs(tiny_single, tmp_path):
    """The training loss of a fixed set of (noise, t) pairs, the hypernetwork in eval mode,
    before (A1111's init from the run's seed) and after 30 steps."""
    from ti_fast.loading import load_model
    from ti_fast.models.vae import LATENT_SCALE
    from ti_fast.prompt import PromptTokenizer
    from ti_fast.training.data import prepare_dataset
    from ti_fast.training.step import MicroBatch, TrainStep, ti_loss
    from ti_fast.training.trainable_hypernetwork import HypernetworkTrainable
    cfg = hn_config(tiny_single, tmp_path, steps=30, batch_size=4, template="hypernetwork")
    res = train(cfg)
    m = load_model(tiny_single)
    ds = prepare_dataset(cfg.data, width=64, height=64, resize="crop", buckets=False, flip=False, alpha_weight=False)
    with torch.no_grad():
        lat = torch.stack([m.vae.encode(it.image[None]).mean[0] for it in ds.items]) * LATENT_SCALE
    tok = PromptTokenizer(m.tokenizer, {})([f"a painting of {it.caption}" for it in ds.items], chunks=1)
    mb = MicroBatch(latents=lat, input_ids=tok.input_ids, vector_index=tok.vector_index)
    g = torch.Generator().manual_seed(123)
    pairs = [(torch.randn(lat.shape, generator=g), torch.randint(50, 950, (lat.shape[0],), generator=g))
             for _ in range(8)]
    coef = TrainStep(m.unet, m.text_encoder, torch.zeros(1), None, generator=g)

    def fixed_loss(hn):
        t = HypernetworkTrainable(hn, "hn").attach(m.unet)
        with torch.no_grad(), t.previewing():
            out = sum(ti_loss(m.unet, m.text_encoder, t, mb, n, ts, coef.sqrt_a, coef.sqrt_1ma).item()
                      for n, ts in pairs) / len(pairs)
        t.close()
        return out

    before = fixed_loss(new_hypernetwork("hn", [32, 64], structure_from_options(), seed=cfg.seed))
    after = fixed_loss(read_hypernetwork(res.hypernetwork))
    assert after < before * 0.97, (before, after)


def _cli_args(cfg: HypernetworkTrainConfig, steps: int, *extra) -> list[str]:
    return [sys.executable, "-m", "ti_fast.cli", "train-hypernetwork", "--name", cfg.name, "--data", cfg.data,
            "--model", cfg.model, "--width", "64", "--height", "64", "--steps", str(steps), "--out", cfg.out,
            "--log-dir", cfg.log_dir, "--device", "cpu", "--seed", str(cfg.seed), "--lr", cfg.lr, "--threads", "1",
            *extra]


@pytest.fixture
def one_thread():
    """CPU results are bitwise only at the same thread count as the child processes (1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_after_kill_is_bitwise(tiny_single, tmp_path, one_thread):
    kw = dict(grad_accum=2, dropout_structure="0,0.3,0", activation="relu")
    a = train(hn_config(tiny_single, tmp_path / "a", steps=8, **kw))
    cfg = hn_config(tiny_single, tmp_path / "b", steps=8, save_every=3, **kw)
    args = _cli_args(cfg, 100000, "--save-every", "3", "--grad-accum", "2", "--dropout-structure", "0,0.3,0",
                     "--activation", "relu", "--quiet")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    second = Path(cfg.log_dir) / "hypernetworks" / "hn-6.pt"      # the state of step 3 is complete by then
    deadline = time.time() + 240
    while not second.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.kill()                                                     # kill -9: no handler, no final save
    _, err = p.communicate(timeout=60)
    assert second.exists(), err[-2000:]
    assert not (Path(cfg.out) / "hn.pt").exists()
    cfg.resume = True
    b = train(cfg)
    assert b.steps == 8 and load_state(Path(cfg.log_dir) / "state.pt")["step"] == 8
    wa, wb = weights(a.hypernetwork), weights(b.hypernetwork)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert list(csv.reader(open(a.log_dir / "loss.csv"))) == list(csv.reader(open(b.log_dir / "loss.csv")))


def test_sigint_saves_a_loadable_file(tiny_single, tmp_path):
    cfg = hn_config(tiny_single, tmp_path)
    returncode, log = interrupt_when(_cli_args(cfg, 100000, "--template", "hypernetwork"), "5/100000")
    assert returncode == 130 and "interrupted" in log, log[-2000:]
    hn = read_hypernetwork(Path(cfg.out) / "hn.pt")
    assert hn.step >= 5 and all(torch.isfinite(t).all() for t in hn.state_dict().values())
    state = load_state(Path(cfg.log_dir) / "state.pt")
    assert state["step"] == hn.step
    assert all(torch.equal(state["hypernetwork"][k], v) for k, v in weights(Path(cfg.out) / "hn.pt").items())


def test_nan_rolls_back_to_the_last_good_weights(tiny_single, tmp_path):
    with pytest.raises(NonFiniteLossError, match="restored the hypernetwork of step"):
        train(hn_config(tiny_single, tmp_path, steps=30, lr="1e30", allow_huge_lr=True))
    state = load_state(tmp_path / "log" / "state.pt")
    saved = weights(tmp_path / "out" / "hn.pt")
    assert read_hypernetwork(tmp_path / "out" / "hn.pt").step == state["step"] < 30
    assert all(torch.isfinite(v).all() and torch.equal(state["hypernetwork"][k], v) for k, v in saved.items())
    rows = list(csv.DictReader(open(tmp_path / "log" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, state["step"] + 1))


def test_start_from_a_file_keeps_its_step_and_structure(tiny_single, tmp_path):
    s = structure_from_options("1,1.5,1", "tanh", "xavier_normal")
    start = new_hypernetwork("start", [32], s, seed=3).save(tmp_path / "start.pt", step=5)
    res = train(hn_config(tiny_single, tmp_path, name=None, hypernetwork=str(start), steps=7))
    hn = read_hypernetwork(res.hypernetwork)
    assert res.name == "start" and hn.step == 7 and hn.widths == [32] and hn.structure == s
    assert len(list(csv.reader(open(res.log_dir / "loss.csv")))) == 1 + 2     # steps 6 and 7


def test_checkpointing_recomputes_the_same_dropout(tiny_single, tmp_path):
    """--gradient-checkpointing recomputes every block in backward, hooks and dropout included:
    the run is bitwise the one without it."""
    kw = dict(steps=3, grad_accum=2, dropout_structure="0,0.3,0", activation="relu")
    a = train(hn_config(tiny_single, tmp_path / "a", **kw))
    b = train(hn_config(tiny_single, tmp_path / "b", gradient_checkpointing=True, **kw))
    wa, wb = weights(a.hypernetwork), weights(b.hypernetwork)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_another_structure(tiny_single, tmp_path):
    train(hn_config(tiny_single, tmp_path, steps=2, activation="relu"))
    with pytest.raises(ConfigError, match=r"activation 'relu' \(now 'linear'\)"):
        train(hn_config(tiny_single, tmp_path, steps=4, resume=True))
    with pytest.raises(ConfigError, match=r"what is trained: hypernetwork \(now embedding\)"):
        from train_helpers import quick_config
        train(quick_config(tiny_single, tmp_path, steps=4, resume=True, log_dir=str(tmp_path / "log")))


# ----------------------------------------------------------------------------- the step

def _tiny_step(dropout="0,0.3,0", device="cpu", dtype=torch.float32, scaler=None, models=None):
    from ti_fast.models import CLIPConfig, CLIPTextEncoder, UNet, UNetConfig
    from ti_fast.training.step import TrainStep
    from ti_fast.training.trainable_hypernetwork import HypernetworkTrainable
    if models is None:
        torch.manual_seed(0)
        ucfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False),
                          num_heads=2, context_dim=32, norm_groups=8)
        models = (UNet(ucfg).to(device, dtype).requires_grad_(False),
                  CLIPTextEncoder(CLIPConfig(vocab_size=100, width=32, layers=2, heads=4, mlp=64)).to(device, dtype)
                  .requires_grad_(False))
    unet, te = models
    hn = new_hypernetwork("h", [32], structure_from_options("1,2,1", "relu", "xavier_normal",
                                                            dropout_structure=dropout), seed=1)
    tr = HypernetworkTrainable(hn.to(device), "h").attach(unet)
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(3)
    return TrainStep(unet, te, tr, opt, generator=gen, scaler=scaler), models


def _mbs(n, device="cpu", seed=0):
    from ti_fast.training.step import MicroBatch
    g = torch.Generator().manual_seed(seed)
    return [MicroBatch(latents=torch.randn(1, 4, 8, 8, generator=g).to(device),
                       input_ids=torch.randint(0, 98, (1, 77), generator=g).to(device),
                       vector_index=torch.full((1, 77), -1, device=device)) for _ in range(n)]


def test_step_advances_the_dropout_seed_per_micro_batch_and_trains_only_the_modules():
    step, (unet, te) = _tiny_step()
    hn = step.trainable.hn
    seed0 = int(hn.dropout_seed)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    loss, finite = step(_mbs(2))
    assert bool(finite) and int(hn.dropout_seed) == seed0 + 2
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())      # the UNet is frozen
    assert all(p.grad is not None for p in step.params) and not any(p.requires_grad for p in unet.parameters())
    nodrop, _ = _tiny_step(dropout=None)
    s = int(nodrop.trainable.hn.dropout_seed)
    nodrop(_mbs(2))
    assert int(nodrop.trainable.hn.dropout_seed) == s                               # nothing reads it
    step.trainable.close()
    assert all(a.kv_hook is None for a in unet.modules() if hasattr(a, "kv_hook"))


def test_graph_eligibility_accepts_the_hypernetwork_step_on_cpu():
    """The CUDA-graph module's configuration checks (CUDA-only parts aside) accept the step:
    torch AdamW over the fp32 module weights, no loss scaling; fp16 scaling is refused."""
    from ti_fast.training.graph import configuration_reason, ineligible_reason, maybe_graphed
    from ti_fast.training.step import LossScaler
    step, models = _tiny_step()
    assert configuration_reason(step) is None
    assert "CUDA" in ineligible_reason(step)
    lines = []
    assert maybe_graphed(step, say=lines.append) is step and "eagerly" in lines[0]
    scaled, _ = _tiny_step(scaler=LossScaler(), models=models)
    assert "fp16" in configuration_reason(scaled)


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_graphed_hypernetwork_step_equals_eager_on_gpu():
    """Same start, same batches: losses, weights, optimizer step count, generator and dropout
    seed agree (the warm-up's seed advances are undone by the capture)."""
    from ti_fast.training.graph import GraphedStep
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager, models = _tiny_step(device=dev)
    inner, _ = _tiny_step(device=dev, models=models)
    graphed = GraphedStep(inner, warmup=2, say=lambda *a: None)
    groups = [_mbs(1, dev, 1), _mbs(2, dev, 2), _mbs(1, dev, 3), _mbs(2, dev, 4), _mbs(1, dev, 5)]
    for i, mbs in enumerate(groups):
        for s in (eager, inner):
            for g in s.optimizer.param_groups:
                g["lr"] = 1e-2 / (i + 1)
        # both attach to the same UNet: each step runs with its own hypernetwork hooked in
        eager.trainable.attach(models[0])
        le, fe = eager(mbs)
        inner.trainable.attach(models[0])
        lg, fg = graphed(mbs)
        torch.testing.assert_close(lg, le, rtol=1e-4, atol=1e-6)
        assert bool(fe) and bool(fg)
        for pe, pg in zip(eager.params, inner.params):
            torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-6)
        assert torch.equal(eager.trainable.hn.dropout_seed, inner.trainable.hn.dropout_seed)
    assert len(graphed.graphs) == 2
    assert torch.equal(eager.gen.get_state(), inner.gen.get_state())


@pytest.mark.gpu
@needs_cuda
def test_train_hypernetwork_graphed_and_eager_agree_on_cuda(tiny_single, tmp_path):
    kw = dict(device="cuda", precision="full", steps=8, lr="0.002", dropout_structure="0,0.3,0", activation="relu")
    a = train(hn_config(tiny_single, tmp_path / "a", cuda_graph=False, **kw))
    b = train(hn_config(tiny_single, tmp_path / "b", cuda_graph=True, **kw))
    wa, wb = weights(a.hypernetwork), weights(b.hypernetwork)
    # see test_gpu_train.py: a captured graph may round differently; a fault moves everything by ~lr
    d = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert d.mean() < 0.01 * 0.002 and d.max() < 0.2 * 0.002, (d.mean(), d.max())
    bf = train(hn_config(tiny_single, tmp_path / "c", **{**kw, "precision": "bf16", "cuda_graph": True}))
    assert bf.status == "completed" and json.loads((bf.log_dir / "settings.json").read_text())["ran"]["cuda_graph"]
