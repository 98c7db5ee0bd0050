"""The command line: demo, create, make-tiny, bad input exit codes."""
from __future__ import annotations

import csv

import torch

from ti_fast.cli import main


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--demo", "--quiet", "--steps", "30"]) == 0
    base = tmp_path / "ti-demo"
    d = torch.load(base / "embeddings" / "demo-ring.pt", weights_only=True)
    assert d["step"] == 30 and d["string_to_param"]["*"].shape == (2, 32)
    rows = list(csv.DictReader(open(base / "logs" / "loss.csv")))
    assert len(rows) == 30 and (base / "logs" / "loss.png").exists()


def test_create_follows_a1111_init(tiny_single, tmp_path):
    from ti_fast.loading import load_model
    assert main(["create", "My Emb!", "--init-text", "a photo of a", "--vectors", "5", "--model", str(tiny_single),
                 "--out", str(tmp_path)]) == 0
    d = torch.load(tmp_path / "My Emb.pt", weights_only=True)          # "!" sanitised away, as A1111
    v = d["string_to_param"]["*"]
    m = load_model(tiny_single)
    ids = m.tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    table = m.text_encoder.token_table.detach()
    k = len(ids)
    for i in range(5):                                                  # row i takes token floor(i*k/N)
        assert torch.equal(v[i], table[ids[i * k // 5]])
    assert d["step"] == 0 and d["name"] == "My Emb"
    assert main(["create", "x", "--init-text", "", "--vectors", "2", "--model", str(tiny_single),
                 "--out", str(tmp_path)]) == 0
    assert torch.count_nonzero(torch.load(tmp_path / "x.pt", weights_only=True)["string_to_param"]["*"]) == 0
    assert main(["create", "x", "--model", str(tiny_single), "--out", str(tmp_path)]) == 2      # exists
    assert main(["create", "y", "--vectors", "0", "--model", str(tiny_single), "--out", str(tmp_path)]) == 2


def test_train_bad_input_exit_code(tmp_path, capsys):
    assert main(["train", "--name", "x", "--data", str(tmp_path / "missing"), "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ti-fast: error:") and "missing" in err and err.count("\n") == 1


def test_config_toml(tiny_single, tmp_path):
    from train_helpers import images
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'name = "tok"\ndata = "{images(tmp_path)}"\nmodel = "{tiny_single}"\nwidth = 64\nheight = 64\n'
                   f'steps = 2\nout = "{tmp_path / "o"}"\nlog-dir = "{tmp_path / "l"}"\nquiet = true\n')
    assert main(["train", "--config", str(cfg), "--steps", "3"]) == 0          # flags override the file
    assert torch.load(tmp_path / "o" / "tok.pt", weights_only=True)["step"] == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('nme = "x"\n')
    assert main(["train", "--config", str(bad)]) == 2


def test_make_tiny_cli(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "t"), "--layout", "diffusers"]) == 0
    assert (tmp_path / "t" / "model_index.json").exists()
