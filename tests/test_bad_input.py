"""Malformed input, found by trying: every case goes through `ti_fast.cli.main(argv)` in-process
(a few through the `ti-fast` program in a subprocess) and must end with exit 2, ONE line on
stderr naming the file or flag, no traceback, no hang, and nothing written outside the output
folders. Files and flags of every category of the trainer-parts issue: enum settings, names,
devices, seeds, TOML types, sizes, learning rates, settings that would silently do nothing,
unwritable or wrong-kind output paths, damaged states and checkpoints, FIFOs and other special
files, and generation sizes that cannot fit."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ti_fast.cli import main
from ti_fast.training.demo import make_demo_images

TIMEOUT_S = 30          # per case: a hang fails the test instead of stalling CI


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_single, tiny_diffusers):
    """A workspace: images, a model, and every malformed file the cases point at."""
    w = tmp_path_factory.mktemp("bad")
    make_demo_images(w / "imgs", n=3, size=64)
    shutil.copytree(tiny_single, w / "model")
    (w / "empty").mkdir()
    (w / "afile.txt").write_text("not a folder")
    os.mkfifo(w / "fifo")
    (w / "fifo-imgs").mkdir()
    os.mkfifo(w / "fifo-imgs" / "a.png")
    # models
    shutil.copytree(tiny_diffusers, w / "diff-fifo")
    (w / "diff-fifo" / "unet" / "config.json").unlink()
    os.mkfifo(w / "diff-fifo" / "unet" / "config.json")
    shutil.copytree(tiny_diffusers, w / "diff-folder")
    (w / "diff-folder" / "vae" / "config.json").unlink()
    (w / "diff-folder" / "vae" / "config.json").mkdir()
    (w / "garbage.safetensors").write_bytes(b"garbage")
    good = (w / "model" / "model.safetensors").read_bytes()
    (w / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    _header_file(w / "deep.safetensors", b'{"a":' * 200_000 + b"1" + b"}" * 200_000)
    _header_file(w / "notdict.safetensors", b'[1, 2, 3]')
    _header_file(w / "badentry.safetensors", json.dumps({"x": {"dtype": "F32", "shape": [2, 3],
                                                             "data_offsets": [0, 4]}}).encode())
    _with_config(w, "impossible", lambda c: c["unet"].update(model_channels=-32))
    _with_config(w, "zero-heads", lambda c: c["unet"].update(num_heads=0))
    _with_config(w, "missing-keys", lambda c: c.pop("clip"))
    _with_config(w, "huge", lambda c: c["unet"].update(model_channels=10**9))
    _with_config(w, "wrong-shapes", lambda c: c["unet"].update(model_channels=48))
    # tokenizers
    (w / "tok-broken").mkdir()
    (w / "tok-broken" / "vocab.json").write_text("{not json")
    (w / "tok-broken" / "merges.txt").write_text("#version\n")
    # templates
    (w / "noname.txt").write_text("a painting\n")
    (w / "blank.txt").write_text("\n\n")
    # embeddings
    (w / "garbage.pt").write_bytes(b"\x80\x02garbage")
    torch.save({"string_to_param": {"*": torch.zeros(80, 32)}, "name": "long"}, w / "long.pt")
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "wide"}, w / "wide.pt")
    # TOML
    (w / "bad.toml").write_text("steps = [\n")
    (w / "types.toml").write_text('steps = "many"\n')
    (w / "unknown.toml").write_text("stpes = 3\n")
    (w / "nested.toml").write_text("[model]\npath = 'x'\n")
    runs = (f'model = "{w / "model"}"\ndata = "{w / "imgs"}"\ndevice = "cpu"\nwidth = 64\nheight = 64\n'
            f'template = "subject"\nout = "{w / "out"}"\n')
    (w / "runs-same-file.toml").write_text(runs + '[[run]]\nname = "x"\n[[run]]\nname = "x"\n')
    (w / "runs-same-name.toml").write_text(runs + f'[[run]]\nname = "x"\nout = "{w / "out" / "a"}"\n'
                                           f'log_dir = "{w / "log" / "a"}"\n[[run]]\nname = "x"\n'
                                           f'out = "{w / "out" / "b"}"\nlog_dir = "{w / "log" / "b"}"\n')
    (w / "runs-bad-value.toml").write_text(runs + '[[run]]\nname = "x"\n[[run]]\nname = "y"\nvectors = 0\n')
    (w / "runs-process-key.toml").write_text(runs + '[[run]]\nname = "x"\nprecision = "bf16"\n')
    (w / "runs-empty.toml").write_text(runs + "run = []\n")
    (w / "runs-unknown-key.toml").write_text(runs + '[[run]]\nname = "x"\nlearning_rate = 0.1\n')
    (w / "sweep-unknown-key.toml").write_text(runs + 'name = "x"\n[sweep]\nlearning_rate = [0.1]\n')
    (w / "sweep-empty.toml").write_text(runs + 'name = "x"\n[sweep]\nlr = []\n')
    (w / "sweep-and-runs.toml").write_text(runs + 'name = "x"\n[sweep]\nlr = ["0.1"]\n[[run]]\nname = "y"\n')
    # states
    (w / "states" / "corrupt").mkdir(parents=True)
    (w / "states" / "corrupt" / "state.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (w / "states" / "truncated").mkdir()
    torch.save({"step": 3, "seed": 1, "vectors": torch.zeros(2, 32), "optimizer": {}, "order": {},
                "gen": torch.zeros(8, dtype=torch.uint8), "py_rng": (3, (1,) * 625, None)},
               w / "states" / "truncated" / "state.pt")
    blob = (w / "states" / "truncated" / "state.pt").read_bytes()
    (w / "states" / "truncated" / "state.pt").write_bytes(blob[: len(blob) // 3])
    (w / "states" / "notastate").mkdir()
    torch.save({"step": "three"}, w / "states" / "notastate" / "state.pt")
    (w / "states" / "fifo").mkdir()
    os.mkfifo(w / "states" / "fifo" / "state.pt")
    (w / "states" / "exists").mkdir()
    (w / "states" / "exists" / "state.pt").write_bytes(b"anything")
    (w / "outs").mkdir()
    (w / "outs" / "tok.pt").write_bytes(b"an earlier embedding")
    _hypernetwork_files(w)
    return w


def _hypernetwork_files(w: Path) -> None:
    """Hypernetwork inputs: a good one for the tiny model (widths 32, 64), one for SD1 (768), a
    malformed, a truncated one, an embedding the tiny model could train, a TOML with an
    embedding-only setting."""
    from ti_fast.hypernetworks import new_hypernetwork, structure_from_options
    s = structure_from_options()
    new_hypernetwork("good", [32, 64], s, seed=0).save(w / "hn-good.pt")
    new_hypernetwork("sd1", [768], s, seed=0).save(w / "hn-sd1.pt")
    torch.save({32: ({"linear.0.weight": "not a tensor"}, {}), "layer_structure": [1, 2, 1]}, w / "hn-malformed.pt")
    blob = (w / "hn-good.pt").read_bytes()
    (w / "hn-truncated.pt").write_bytes(blob[: len(blob) // 2])
    torch.save({**torch.load(w / "hn-good.pt", weights_only=True), "dropout_structure": [0.2, 0, 0.1]},
               w / "hn-dropout-ends.pt")
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}, "name": "emb"}, w / "emb32.pt")
    (w / "hn-vectors.toml").write_text("vectors = 3\n")


def _header_file(path: Path, header: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def _with_config(w: Path, name: str, change) -> None:
    """The tiny model with its architecture metadata changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    src = w / "model" / "model.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["ti_fast_config"])
    change(cfg)
    meta["ti_fast_config"] = json.dumps(cfg)
    save_file(tensors, str(w / f"{name}.safetensors"), metadata=meta)


def _train(w: Path, *extra) -> list[str]:
    return ["train", "--data", str(w / "imgs"), "--model", str(w / "model"), "--name", "tok",
            "--out", str(w / "out"), "--log-dir", str(w / "log"), "--device", "cpu", "--width", "64",
            "--height", "64", "--steps", "2", "--template", "subject", "--quiet", *extra]


def _hn(w: Path, *extra) -> list[str]:
    return ["train-hypernetwork", "--data", str(w / "imgs"), "--model", str(w / "model"), "--name", "hn",
            "--out", str(w / "out"), "--log-dir", str(w / "log"), "--device", "cpu", "--width", "64",
            "--height", "64", "--steps", "2", "--quiet", *extra]


def _gen(w: Path, *extra) -> list[str]:
    return ["generate", "--model", str(w / "model"), "--prompt", "a ring", "--out", str(w / "gen-out"),
            "--device", "cpu", "--width", "64", "--height", "64", "--steps", "2", "--quiet", *extra]


# (id, argv builder, a fragment the one line must contain)
CASES = [
    # --- flags argparse refuses
    ("steps-not-int", lambda w: _train(w, "--steps", "abc"), "--steps"),
    ("unknown-flag", lambda w: _train(w, "--stpes", "3"), "--stpes"),
    ("unknown-command", lambda w: ["trian"], "trian"),
    # --- numbers out of range
    ("steps-zero", lambda w: _train(w, "--steps", "0"), "--steps"),
    ("steps-negative", lambda w: _train(w, "--steps", "-5"), "--steps"),
    ("vectors-zero", lambda w: _train(w, "--vectors", "0"), "--vectors"),
    ("vectors-too-many", lambda w: _train(w, "--vectors", "76"), "--vectors"),
    ("batch-zero", lambda w: _train(w, "--batch-size", "0"), "--batch-size"),
    ("accum-zero", lambda w: _train(w, "--grad-accum", "0"), "--grad-accum"),
    ("width-odd", lambda w: _train(w, "--width", "65"), "--width"),
    ("height-huge", lambda w: _train(w, "--height", "100000"), "--height"),
    ("width-zero", lambda w: _train(w, "--width", "0"), "--width"),
    ("seed-negative", lambda w: _train(w, "--seed", "-1"), "--seed"),
    ("seed-too-big", lambda w: _train(w, "--seed", str(2**64)), "--seed"),
    ("preview-seed-negative", lambda w: _train(w, "--preview-seed", "-3"), "--preview-seed"),
    ("tag-dropout-one", lambda w: _train(w, "--tag-dropout", "1.0"), "--tag-dropout"),
    ("tag-dropout-nan", lambda w: _train(w, "--tag-dropout", "nan"), "--tag-dropout"),
    ("clip-skip-zero", lambda w: _train(w, "--clip-skip", "0"), "--clip-skip"),
    ("threads-zero", lambda w: _train(w, "--threads", "0"), "--threads"),
    ("preview-cfg-inf", lambda w: _train(w, "--preview-cfg", "inf"), "--preview-cfg"),
    # --- learning rates and schedules
    ("lr-word", lambda w: _train(w, "--lr", "abc"), "abc"),
    ("lr-entry", lambda w: _train(w, "--lr", "0.005:100, abc"), "abc"),
    ("lr-nan", lambda w: _train(w, "--lr", "nan"), "rate"),
    ("lr-inf", lambda w: _train(w, "--lr", "inf"), "rate"),
    ("lr-huge", lambda w: _train(w, "--lr", "5"), "--allow-huge-lr"),
    ("lr-negative", lambda w: _train(w, "--lr", "-0.1"), "rate"),
    ("lr-decreasing", lambda w: _train(w, "--lr", "0.1:50, 0.01:20, 0.001"), "increase"),
    ("clip-grad-word", lambda w: _train(w, "--clip-grad", "foo"), "--clip-grad"),
    ("clip-grad-negative", lambda w: _train(w, "--clip-grad", "norm:-1"), "--clip-grad"),
    # --- enum-like settings, the allowed values listed
    ("precision", lambda w: _train(w, "--precision", "fp8"), "bf16"),
    ("optimizer", lambda w: _train(w, "--optimizer", "sgd"), "adamw"),
    ("latents", lambda w: _train(w, "--latents", "maybe"), "deterministic"),
    ("resize", lambda w: _train(w, "--resize", "stretch"), "squash"),
    ("kernels", lambda w: _train(w, "--kernels", "cuda"), "triton"),
    ("attention", lambda w: _train(w, "--attention", "flash"), "sdpa"),
    ("preview-sampler", lambda w: _train(w, "--preview-sampler", "Heun"), "Euler a"),
    ("device-garbage", lambda w: _train(w, "--device", "gpu0"), "--device"),
    ("device-no-cuda", lambda w: _train(w, "--device", "cuda"), "--device"),
    ("offload-cpu", lambda w: _train(w, "--offload"), "--offload"),
    ("kernels-triton-cpu", lambda w: _train(w, "--kernels", "triton"), "--kernels"),
    ("attention-xformers-cpu", lambda w: _train(w, "--attention", "xformers"), "xformers"),
    # /proc: os.access says writable to root, but no folder can be made there
    ("out-in-proc", lambda w: _train(w, "--out", "/proc/ti-fast-out"), "--out"),
    ("log-dir-in-proc", lambda w: _train(w, "--log-dir", "/proc/ti-fast-log"), "--log-dir"),
    ("cache-dir-in-proc", lambda w: _train(w, "--cache-dir", "/proc/ti-fast-cache"), "--cache-dir"),
    # --- names
    ("name-empty", lambda w: _train(w, "--name", ""), "name"),
    ("name-only-symbols", lambda w: _train(w, "--name", "///"), "name"),
    ("name-too-long", lambda w: _train(w, "--name", "x" * 300), "--name"),
    # --- settings that would do nothing
    ("resume-and-overwrite", lambda w: _train(w, "--resume", "--overwrite"), "--overwrite"),
    ("png-embed-alone", lambda w: _train(w, "--png-embed"), "--preview-every"),
    ("template-no-name", lambda w: _train(w, "--template", str(w / "noname.txt")), "[name]"),
    ("template-none-captions", lambda w: _train(w, "--template", "none"), "[name]"),
    ("template-blank", lambda w: _train(w, "--template", str(w / "blank.txt")), "template"),
    ("template-unknown", lambda w: _train(w, "--template", "nosuch"), "template"),
    ("template-fifo", lambda w: _train(w, "--template", str(w / "fifo")), "template"),
    ("embedding-too-long", lambda w: _train(w, "--embedding", str(w / "long.pt")), "vectors"),
    ("vectors-do-not-fit-the-template", lambda w: _train(w, "--vectors", "74"), "75 tokens"),
    # --- data, model, tokenizer, embedding files
    ("data-missing", lambda w: _train(w, "--data", str(w / "nope")), "--data"),
    ("data-is-file", lambda w: _train(w, "--data", str(w / "afile.txt")), "--data"),
    ("data-empty", lambda w: _train(w, "--data", str(w / "empty")), "no images"),
    ("data-only-fifo", lambda w: _train(w, "--data", str(w / "fifo-imgs")), "no images"),
    ("data-is-fifo", lambda w: _train(w, "--data", str(w / "fifo")), "FIFO"),
    ("model-missing", lambda w: _train(w, "--model", str(w / "nope")), "--model"),
    ("model-fifo", lambda w: _train(w, "--model", str(w / "fifo")), "FIFO"),
    ("attention-triton-cpu", lambda w: _train(w, "--attention", "triton"), "triton"),
    ("model-diffusers-config-fifo", lambda w: _train(w, "--model", str(w / "diff-fifo")), "unet/config.json"),
    ("model-diffusers-config-folder", lambda w: _train(w, "--model", str(w / "diff-folder")), "vae/config.json"),
    ("model-empty-folder", lambda w: _train(w, "--model", str(w / "empty")), "empty"),
    ("model-garbage", lambda w: _train(w, "--model", str(w / "garbage.safetensors")), "garbage"),
    ("model-truncated", lambda w: _train(w, "--model", str(w / "truncated.safetensors")), "truncated"),
    ("model-deep-header", lambda w: _train(w, "--model", str(w / "deep.safetensors")), "deep"),
    ("model-header-not-dict", lambda w: _train(w, "--model", str(w / "notdict.safetensors")), "notdict"),
    ("model-bad-entry", lambda w: _train(w, "--model", str(w / "badentry.safetensors")), "badentry"),
    ("model-impossible-config", lambda w: _train(w, "--model", str(w / "impossible.safetensors")), "impossible"),
    ("model-zero-heads", lambda w: _train(w, "--model", str(w / "zero-heads.safetensors")), "zero-heads"),
    ("model-missing-config-keys", lambda w: _train(w, "--model", str(w / "missing-keys.safetensors")), "missing-keys"),
    ("model-huge-config", lambda w: _train(w, "--model", str(w / "huge.safetensors")), "huge"),
    ("model-wrong-shapes", lambda w: _train(w, "--model", str(w / "wrong-shapes.safetensors")), "wrong-shapes"),
    ("tokenizer-broken", lambda w: _train(w, "--tokenizer", str(w / "tok-broken")), "tok-broken"),
    ("tokenizer-fifo", lambda w: _train(w, "--tokenizer", str(w / "fifo")), "FIFO"),
    ("vae-fifo", lambda w: _train(w, "--vae", str(w / "fifo")), "FIFO"),
    ("embedding-garbage", lambda w: _train(w, "--embedding", str(w / "garbage.pt")), "garbage.pt"),
    ("embedding-fifo", lambda w: _train(w, "--embedding", str(w / "fifo")), "FIFO"),
    ("embedding-wrong-width", lambda w: _train(w, "--embedding", str(w / "wide.pt")), "wide"),
    ("clip-skip-beyond-layers", lambda w: _train(w, "--clip-skip", "12"), "--clip-skip"),
    # --- output folders
    ("out-is-file", lambda w: _train(w, "--out", str(w / "afile.txt")), "--out"),
    ("log-dir-is-file", lambda w: _train(w, "--log-dir", str(w / "afile.txt")), "--log-dir"),
    ("cache-dir-is-file", lambda w: _train(w, "--cache-dir", str(w / "afile.txt")), "--cache-dir"),
    ("out-under-file", lambda w: _train(w, "--out", str(w / "afile.txt" / "sub")), "--out"),
    ("make-tiny-onto-file", lambda w: ["make-tiny", str(w / "afile.txt")], "make-tiny"),
    # --- TOML
    ("config-missing", lambda w: _train(w, "--config", str(w / "nope.toml")), "--config"),
    ("config-not-toml", lambda w: _train(w, "--config", str(w / "bad.toml")), "TOML"),
    ("config-wrong-type", lambda w: _train(w, "--config", str(w / "types.toml")), "steps"),
    ("config-unknown-key", lambda w: _train(w, "--config", str(w / "unknown.toml")), "stpes"),
    ("config-table", lambda w: _train(w, "--config", str(w / "nested.toml")), "model"),
    ("config-fifo", lambda w: _train(w, "--config", str(w / "fifo")), "FIFO"),
    # --- several runs in one file ([[run]] tables, [sweep])
    ("runs-same-file", lambda w: ["train", "--config", str(w / "runs-same-file.toml")], "both write"),
    ("runs-same-name", lambda w: ["train", "--config", str(w / "runs-same-name.toml")], "named 'x'"),
    ("runs-bad-value", lambda w: ["train", "--config", str(w / "runs-bad-value.toml")], "run 'y': --vectors"),
    ("runs-process-key", lambda w: ["train", "--config", str(w / "runs-process-key.toml")], "process-wide"),
    ("runs-empty", lambda w: ["train", "--config", str(w / "runs-empty.toml")], "empty"),
    ("runs-unknown-key", lambda w: ["train", "--config", str(w / "runs-unknown-key.toml")], "learning_rate"),
    ("sweep-unknown-key", lambda w: ["train", "--config", str(w / "sweep-unknown-key.toml")], "learning_rate"),
    ("sweep-empty-list", lambda w: ["train", "--config", str(w / "sweep-empty.toml")], "non-empty list"),
    ("sweep-and-runs", lambda w: ["train", "--config", str(w / "sweep-and-runs.toml")], "exclude"),
    # --- resumable state and earlier outputs
    ("resume-nothing", lambda w: _train(w, "--resume", "--log-dir", str(w / "no-run")), "--resume"),
    ("resume-corrupt", lambda w: _train(w, "--resume", "--log-dir", str(w / "states" / "corrupt")), "damaged"),
    ("resume-truncated", lambda w: _train(w, "--resume", "--log-dir", str(w / "states" / "truncated")), "damaged"),
    ("resume-not-a-state", lambda w: _train(w, "--resume", "--log-dir", str(w / "states" / "notastate")), "state"),
    ("resume-fifo", lambda w: _train(w, "--resume", "--log-dir", str(w / "states" / "fifo")), "FIFO"),
    ("rerun-over-state", lambda w: _train(w, "--log-dir", str(w / "states" / "exists")), "--resume"),
    ("existing-output", lambda w: _train(w, "--out", str(w / "outs")), "--overwrite"),
    # --- train-hypernetwork: the create flags, the files, the model's widths
    ("hn-layers-ends", lambda w: _hn(w, "--layer-structure", "2,2,1"), "start and end with 1"),
    ("hn-layers-nonpositive", lambda w: _hn(w, "--layer-structure", "1,0,1"), "non-positive"),
    ("hn-layers-words", lambda w: _hn(w, "--layer-structure", "one,two"), "--layer-structure"),
    ("hn-activation", lambda w: _hn(w, "--activation", "gelu2"), "--activation"),
    ("hn-init", lambda w: _hn(w, "--init", "he"), "--init"),
    ("hn-width-missing", lambda w: _hn(w, "--sizes", "32,768"), "width 768"),
    ("hn-sizes-words", lambda w: _hn(w, "--sizes", "wide"), "--sizes"),
    ("hn-dropout-length", lambda w: _hn(w, "--dropout-structure", "0,0.3"), "--dropout-structure"),
    ("hn-dropout-p", lambda w: _hn(w, "--dropout-structure", "0,1.0,0"), "[0, 1)"),
    ("hn-dropout-ends", lambda w: _hn(w, "--dropout-structure", "0.3,0.3,0"), "--dropout-structure"),
    ("hn-dropout-both", lambda w: _hn(w, "--dropout-structure", "0,0.3,0", "--use-dropout"), "exclude"),
    ("hn-last-layer-alone", lambda w: _hn(w, "--last-layer-dropout"), "--use-dropout"),
    ("hn-embedding-given", lambda w: _hn(w, "--hypernetwork", str(w / "emb32.pt")), "ti-fast train --embedding"),
    ("hn-given-as-embedding", lambda w: _train(w, "--embedding", str(w / "hn-good.pt")), "train-hypernetwork"),
    ("hn-malformed", lambda w: _hn(w, "--hypernetwork", str(w / "hn-malformed.pt")), "hn-malformed.pt"),
    ("hn-file-dropout-ends", lambda w: _hn(w, "--hypernetwork", str(w / "hn-dropout-ends.pt")), "end with 0"),
    ("hn-create-width-zero", lambda w: ["create-hypernetwork", "x", "--model", str(w / "model"), "--out",
                                        str(w / "out"), "--layer-structure", "1,0.001,1"], "--layer-structure"),
    ("gen-embeddings-names-a-hypernetwork", lambda w: _gen(w, "--embeddings", str(w / "hn-good.pt")),
     "hypernetwork, not an embedding"),
    ("gen-hypernetworks-names-an-embedding", lambda w: _gen(w, "--hypernetworks", str(w / "emb32.pt")), "emb32.pt"),
    ("gen-hypernetworks-truncated", lambda w: _gen(w, "--hypernetworks", str(w / "hn-truncated.pt")), "truncated"),
    ("hn-truncated", lambda w: _hn(w, "--hypernetwork", str(w / "hn-truncated.pt")), "truncated"),
    ("hn-garbage", lambda w: _hn(w, "--hypernetwork", str(w / "garbage.pt")), "garbage.pt"),
    ("hn-fifo", lambda w: _hn(w, "--hypernetwork", str(w / "fifo")), "FIFO"),
    ("hn-missing", lambda w: _hn(w, "--hypernetwork", str(w / "nope.pt")), "no such file"),
    ("hn-empty-path", lambda w: _hn(w, "--hypernetwork", "", "--name", "x"), "empty"),
    ("hn-empty-path-no-name", lambda w: [a for a in _hn(w, "--hypernetwork", "") if a not in ("--name", "hn")],
     "empty"),
    ("embedding-empty-path", lambda w: [a for a in _train(w, "--embedding", "") if a not in ("--name", "tok")],
     "empty"),
    ("hn-other-model", lambda w: _hn(w, "--hypernetwork", str(w / "hn-sd1.pt")), "another model"),
    ("hn-file-and-create-flags", lambda w: _hn(w, "--hypernetwork", str(w / "hn-good.pt"), "--layer-norm"),
     "--layer-norm"),
    ("hn-embedding-setting", lambda w: _hn(w, "--config", str(w / "hn-vectors.toml")), "--vectors"),
    ("hn-vectors-flag", lambda w: _hn(w, "--vectors", "2"), "--vectors"),
    ("hn-model-garbage", lambda w: _hn(w, "--model", str(w / "garbage.safetensors")), "garbage"),
    ("hn-model-missing", lambda w: _hn(w, "--model", str(w / "nope")), "--model"),
    ("hn-name-symbols", lambda w: _hn(w, "--name", "///"), "name"),
    ("hn-lr-huge", lambda w: _hn(w, "--lr", "5"), "--allow-huge-lr"),
    ("hn-png-embed", lambda w: _hn(w, "--png-embed"), "--png-embed"),
    # --- generation
    ("gen-width", lambda w: _gen(w, "--width", "60"), "multiples of 8"),
    ("gen-steps", lambda w: _gen(w, "--steps", "0"), "--steps"),
    ("gen-batch", lambda w: _gen(w, "--batch", "0"), "--batch"),
    ("gen-sampler", lambda w: _gen(w, "--sampler", "lms"), "lms"),
    ("gen-model-missing", lambda w: _gen(w, "--model", str(w / "nope")), "nope"),
    ("gen-embeddings-fifo", lambda w: _gen(w, "--embeddings", str(w / "fifo")), "FIFO"),
    ("gen-side-too-big", lambda w: _gen(w, "--width", "65536", "--height", "65536"), "16384"),
    ("gen-too-big", lambda w: _gen(w, "--width", "16384", "--height", "16384", "--batch", "64"), "memory"),
    ("gen-device", lambda w: _gen(w, "--device", "tpu"), "--device"),
]


# Refusals that need the model (its files, tokenizer, width or layer count): the loader makes them.
LOADER_CASES = ("model-", "gen-model-", "tokenizer-", "embedding-wrong-width", "clip-skip-beyond-layers",
                "vectors-do-not-fit-the-template", "gen-too-big")


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the refusal")


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("no answer within the time limit: a hang")


def _tree(root: Path, skip: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] in skip:
            continue
        out[rel] = p.lstat().st_mtime
    return out


OUTPUTS = ("out", "log", "gen-out", "no-run", "states", "outs")


def test_case_ids_are_unique_and_many():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 50


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_in_process_one_line_exit_2(ws, case, capsys, monkeypatch):
    name, argv, fragment = case
    if not name.startswith(LOADER_CASES):   # refused before the model loads: loading it is a bug (exit 1)
        import ti_fast.loading
        import ti_fast.training.group as group
        monkeypatch.setattr(group, "load_for_training", _no_model)
        monkeypatch.setattr(ti_fast.loading, "load_model", _no_model)      # generate's
    before = _tree(ws, OUTPUTS)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        try:
            rc = main(argv(ws))
        except SystemExit as e:          # argparse's refusals exit through SystemExit
            rc = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("ti-fast: error:") and "Traceback" not in err, err
    assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    assert _tree(ws, OUTPUTS) == before, "something was written outside the output folders"


SUBPROCESS_CASES = ["steps-not-int", "model-fifo", "data-only-fifo", "resume-truncated", "model-deep-header",
                    "gen-too-big", "embedding-fifo", "config-wrong-type"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_as_a_program(ws, name):
    """The same through the installed `ti-fast` program: exit 2, one line, no traceback."""
    (_, argv, fragment), = [c for c in CASES if c[0] == name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "ti_fast.cli", *argv(ws)], capture_output=True, text=True,
                       timeout=60, env=env, cwd=ws)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert fragment.lower() in lines[0].lower()
