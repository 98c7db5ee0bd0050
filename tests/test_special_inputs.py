"""FIFOs, a socket, a device, a broken link and PNG bombs inside the folders train and generate
read (training images, the embeddings library): each skipped with one `ti-fast:` line naming it,
never opened, and the job still runs. In child processes with a timeout, so a hang fails."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess_helpers import png_bomb
from train_helpers import images

ROOT = Path(__file__).resolve().parents[1]
CHILD = "import sys; from ti_fast.cli import main; sys.exit(main(sys.argv[1:]))"
# name -> a word its one line must hold
SPECIALS = {"pipe.{ext}": "FIFO", "sock.{ext}": "socket", "zero.{ext}": "character device",
            "broken.{ext}": "broken symbolic link"}


def _plant(folder: Path, ext: str) -> socket.socket:
    """The special files of SPECIALS (with suffix ext) in folder; the socket must stay open."""
    os.mkfifo(folder / f"pipe.{ext}")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / f"sock.{ext}"))
    os.symlink("/dev/zero", folder / f"zero.{ext}")
    os.symlink(folder / "missing", folder / f"broken.{ext}")
    return sock


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def _one_line_each(stderr: str, expected: dict[str, str]) -> None:
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    for name, word in expected.items():
        hits = [ln for ln in lines if name in ln]
        assert len(hits) == 1 and word in hits[0] and hits[0].startswith("ti-fast:"), (name, lines)


def test_training_images_folder(tiny_single, tmp_path):
    data = images(tmp_path, n=2)
    sock = _plant(data, "png")
    png_bomb(data / "bomb.png", 10_000, 10_000)           # over ti-fast's pixel bound, under Pillow's guard
    png_bomb(data / "huge.png", 100_000, 100_000)         # over Pillow's own guard too
    try:
        r = _run(["train", "--model", str(tiny_single), "--data", str(data), "--name", "tok", "--width", "64",
                  "--height", "64", "--steps", "2", "--device", "cpu", "--template", "subject",
                  "--threads", "1", "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "log")], tmp_path)
    finally:
        sock.close()
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "tok.pt").is_file()
    _one_line_each(r.stderr, {**{k.format(ext="png"): v for k, v in SPECIALS.items()},
                              "bomb.png": "megapixels", "huge.png": "bomb"})


def test_embeddings_library_folder(tiny_single, tmp_path):
    from ti_fast.embeddings import Embedding, save_pt
    import torch
    lib = tmp_path / "lib"
    lib.mkdir()
    save_pt(Embedding(name="good", vectors=torch.randn(1, 32), step=1), lib / "good.pt")
    sock = _plant(lib, "pt")
    png_bomb(lib / "bomb.png", 100_000, 100_000)          # a PNG embedding's carrier that is a bomb
    try:
        r = _run(["generate", "--model", str(tiny_single), "--prompt", "a good ring", "--embeddings", str(lib),
                  "--out", str(tmp_path / "gen"), "--device", "cpu", "--width", "64", "--height", "64",
                  "--steps", "1"], tmp_path)
    finally:
        sock.close()
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1
    _one_line_each(r.stderr, {**{k.format(ext="pt"): v for k, v in SPECIALS.items()}, "bomb.png": "bomb"})


@pytest.fixture(autouse=True)
def _no_traceback_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))       # an internal error's traceback file stays here
