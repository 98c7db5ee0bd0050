"""`ti-fast --help` and every subcommand's --help build their parsers without importing torch (or
any other heavy library), and `import ti_fast` stays lazy while every public name still works."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy", "PIL", "safetensors", "diffusers", "triton")


def imported_modules(*args: str) -> set[str]:
    """Top-level modules `python -X importtime ARGS` imports (a fresh interpreter)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mods = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":          # the header line
                mods.add(name.split(".")[0])
    return mods


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["create", "--help"], ["generate", "--help"],
                                  ["inspect", "--help"], ["convert", "--help"], ["make-tiny", "--help"],
                                  ["create-hypernetwork", "--help"], ["train-hypernetwork", "--help"],
                                  ["serve", "--help"], ["preprocess", "--help"]])
def test_help_imports_nothing_heavy(argv):
    mods = imported_modules("-m", "ti_fast.cli", *argv)
    assert "ti_fast" in mods and "argparse" in mods          # the instrument sees imports
    assert not mods & set(HEAVY), f"{' '.join(argv)} imports {sorted(mods & set(HEAVY))}"


def test_importtime_sees_torch():
    """The instrument itself: an import of torch shows up."""
    assert "torch" in imported_modules("-c", "import ti_fast; ti_fast.load_model")


def test_package_names_resolve_lazily():
    import ti_fast
    from ti_fast.loading import load_model
    from ti_fast.sample.generate import GenerateConfig
    for name in ti_fast.__all__:
        assert getattr(ti_fast, name) is not None and name in dir(ti_fast)
    assert ti_fast.load_model is load_model and ti_fast.GenerateConfig is GenerateConfig
    with pytest.raises(AttributeError, match="no_such_name"):
        ti_fast.no_such_name


def test_generate_sampler_choices_match_the_registry():
    from ti_fast.sample import cli as sample_cli
    from ti_fast.sample import generate as G
    assert sample_cli.SAMPLER_NAMES == tuple(G.S.SAMPLERS)


def test_generate_sets_threads_at_its_entry(tiny_single, tmp_path, monkeypatch):
    """`ti-fast generate` chooses torch's CPU thread count at the command's entry as train does:
    --threads N, else half the cores (OMP_NUM_THREADS unset); a bad count is refused first."""
    import torch
    from ti_fast.cli import main
    from ti_fast.devices import default_threads
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    base = ["generate", "--model", str(tiny_single), "--prompt", "a ring", "--out", str(tmp_path / "g"),
            "--device", "cpu", "--width", "64", "--height", "64", "--steps", "1", "--quiet"]
    assert main(base + ["--threads", "3"]) == 0 and calls == [3]
    assert main(base) == 0 and calls == [3, default_threads()]
    assert main(base + ["--threads", "0"]) == 2 and calls == [3, default_threads()]
