"""`ti-fast create` reads only the token table: ti_fast.loading.tokens on every layout, the bytes a
read costs (counted by the kernel in a child process), and create's checks before any reading."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ti_fast.cli import main
from ti_fast.loading import ModelLoadError, load_model
from ti_fast.loading.tokens import SINGLE_KEYS, read_token_table, token_norm_stats

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: counters from /proc/self (rchar = bytes through read() calls;
# VmHWM = peak resident memory, file-backed mmap pages included, reset through clear_refs).
PROBE = r"""
import json, sys
import torch, safetensors.torch
from ti_fast.loading.tokens import read_token_table

def counters():
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    st = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kb = lambda key: int(st[key].split()[0]) * 1024
    return int(io["rchar"]), kb("VmHWM"), kb("VmRSS")

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

read_token_table(sys.argv[1])               # warm-up on another file: lazy imports read .pyc files
reset_peak()
r0, _, rss0 = counters()
tt = read_token_table(sys.argv[2])
r1, peak1, _ = counters()
reset_peak()
_, _, rss2 = counters()
whole = safetensors.torch.load_file(sys.argv[3]) if sys.argv[3].endswith(".safetensors") else torch.load(sys.argv[3])
data = open(sys.argv[3], "rb").read()      # control: the counters do see whole-file reads
r3, peak3, _ = counters()
print(json.dumps({"read": r1 - r0, "peak": peak1 - rss0, "control_read": r3 - r1, "control_peak": peak3 - rss2,
                  "shape": list(tt.table.shape), "dtype": str(tt.table.dtype)}))
"""


def _write_model(path: Path, fmt: str, rows=4096, width=256, other_mb=48):
    """A checkpoint shaped like a single SD file for this purpose: the fp16 token table (2 MB here)
    under its real key, and `other_mb` MB of other tensors that must not be read."""
    g = torch.Generator().manual_seed(0)
    sd = {SINGLE_KEYS[0]: torch.randn(rows, width, generator=g).half(),
          "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(other_mb * 2**19, dtype=torch.float16),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(2**20, dtype=torch.float16)}
    if fmt == "safetensors":
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return sd


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_only_the_header_and_the_table_are_read(tmp_path, fmt):
    if not Path("/proc/self/io").exists():
        pytest.skip("needs Linux /proc counters")
    warm, big = tmp_path / f"warm.{fmt}", tmp_path / f"big.{fmt}"
    _write_model(warm, fmt, rows=16, width=8, other_mb=1)
    sd = _write_model(big, fmt)
    table_bytes = sd[SINGLE_KEYS[0]].numel() * 2
    size = big.stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(warm), str(big), str(big)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shape"] == [4096, 256] and got["dtype"] == "torch.float16"
    # the instruments work here: reading the whole file shows in both counters
    assert got["control_read"] >= size and got["control_peak"] >= size // 2, got
    # the header, the zip's pickle and the table and little else
    assert got["read"] <= table_bytes + 512 * 1024, got
    assert got["peak"] <= 2 * table_bytes + 4 * 2**20, got
    assert size > 20 * table_bytes


def test_token_table_on_every_layout(tiny_single, tiny_diffusers, tmp_path):
    want = load_model(tiny_single).text_encoder.token_table.detach().float()
    assert read_token_table(tiny_single).table.dtype == torch.float32              # as stored
    assert torch.equal(read_token_table(tiny_single).table, want)                 # make-tiny folder
    assert torch.equal(read_token_table(tiny_single / "model.safetensors").table, want)
    tt = read_token_table(tiny_diffusers)                                          # diffusers folder
    assert torch.equal(tt.table, want) and tt.file.parent.name == "text_encoder"
    ck = tmp_path / "m.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(str(tiny_single / "model.safetensors"))}, ck)
    assert torch.equal(read_token_table(ck).table, want) and read_token_table(ck).model_dir == tmp_path
    stats = token_norm_stats(want)
    assert stats["p5"] <= stats["median"] <= stats["p95"]
    assert stats["median"] == pytest.approx(float(want.norm(dim=1).median()), rel=1e-6)


def test_token_table_refusals(tmp_path):
    safetensors.torch.save_file({"model.diffusion_model.x": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ModelLoadError, match="unet.safetensors: no SD 1.x text-encoder token table"):
        read_token_table(tmp_path / "unet.safetensors")
    with pytest.raises(ModelLoadError, match="no such file"):
        read_token_table(tmp_path / "missing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="truncated"):
        read_token_table(tmp_path / "cut.safetensors")


def _rows(path):
    return torch.load(path, weights_only=True)


def test_create_on_diffusers_and_ckpt_writes_no_checkpoint(tiny_single, tiny_diffusers, tmp_path, capsys):
    want = load_model(tiny_single)
    ids = want.tokenizer("a photo", add_special_tokens=False)["input_ids"]
    table = want.text_encoder.token_table.detach()
    ck_dir = tmp_path / "ck"
    shutil.copytree(tiny_single / "tokenizer", ck_dir / "tokenizer")
    torch.save(safetensors.torch.load_file(str(tiny_single / "model.safetensors")), ck_dir / "m.ckpt")
    for i, model in enumerate((tiny_diffusers, ck_dir / "m.ckpt")):
        out = tmp_path / f"out{i}"
        assert main(["create", "tok", "--init-text", "a photo", "--vectors", "4", "--model", str(model),
                     "--out", str(out)]) == 0
        d = _rows(out / "tok.pt")
        k = len(ids)
        assert torch.equal(d["string_to_param"]["*"], torch.stack([table[ids[j * k // 4]] for j in range(4)]))
        # as A1111's create_embedding: nothing trained yet, so no checkpoint is named
        assert d["sd_checkpoint"] is None and d["sd_checkpoint_name"] is None and d["step"] == 0
        assert list(d) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                           "sd_checkpoint_name"]


def test_create_checks_before_reading_anything(tmp_path, capsys):
    bad_model = tmp_path / "garbage.safetensors"
    bad_model.write_bytes(b"not a model at all")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tok.pt").write_bytes(b"precious")
    # the existing output is named, not the unreadable model: nothing was read
    assert main(["create", "tok", "--model", str(bad_model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ti-fast: error:") and "tok.pt exists" in err and err.count("\n") == 1
    assert (tmp_path / "out" / "tok.pt").read_bytes() == b"precious"
    for argv, words in ((["--vectors", "0"], "--vectors must be 1..75"), (["--vectors", "76"], "--vectors"),
                        (["--overwrite"], "garbage.safetensors")):
        assert main(["create", "tok", "--model", str(bad_model), "--out", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert (tmp_path / "out" / "tok.pt").read_bytes() == b"precious"
    (tmp_path / "afile").write_text("x")
    assert main(["create", "tok", "--model", str(bad_model), "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err
