"""train() and generate() leave the process as they found it: the fused-op choice (per model, no
mode in ti_fast.models.ops), torch's thread count, the CUDA allocator settings (set only at the
CLI's entry), the signal handlers (also when a run fails), the working directory, the
environment and every global random generator."""
from __future__ import annotations

import errno
import importlib
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch

from ti_fast.errors import DiskFullError, RunCrashed
from ti_fast.training import step as step_mod
from ti_fast.training import trainable as trainable_mod
from ti_fast.training.loop import train
from train_helpers import quick_config

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _sentinel(signum, frame):
    """A handler of the test's own: train() must put back exactly this one."""


@pytest.fixture
def handlers():
    old = {s: signal.signal(s, _sentinel) for s in SIGNALS}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def _process_state() -> dict:
    from ti_fast.models import ops
    return {
        "ops": dict(vars(ops)),                   # compared by identity: nothing rebound
        "threads": torch.get_num_threads(),
        "signals": {s: signal.getsignal(s) for s in SIGNALS},
        "cwd": os.getcwd(),
        "environ": dict(os.environ),
        "torch_rng": torch.random.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
        "grad": torch.is_grad_enabled(),
        "dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul": torch.get_float32_matmul_precision(),
        "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "logging": (logging.root.level, list(logging.root.handlers)),
    }


def _assert_same(before: dict, after: dict) -> None:
    before, after = dict(before), dict(after)
    assert before["ops"].keys() == after["ops"].keys()
    changed = [k for k, v in before["ops"].items() if after["ops"][k] is not v]
    assert not changed, f"ti_fast.models.ops globals rebound: {changed}"
    assert torch.equal(before.pop("torch_rng"), after.pop("torch_rng"))
    assert np.array_equal(before.pop("np_rng"), after.pop("np_rng"))
    for k in before:
        if k != "ops":
            assert before[k] == after[k], k


def _fused_ops_untouched(model) -> bool:
    return all(getattr(m, "fused_ops", None) is None for m in model.modules())


def test_train_and_generate_leave_the_process_as_they_found_it(tiny_single, tmp_path, monkeypatch, handlers):
    from ti_fast.cli import process_settings
    from ti_fast.loading import load_model
    from ti_fast.sample.generate import GenerateConfig, generate
    calls = []                          # process-wide settings: recorded, not made
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: calls.append(("allocator", s)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: calls.append(("interop", n)))
    # as if a GPU were there: the allocator setting must still not come from train()/generate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    importlib.import_module("torch._dynamo")     # its import sets TORCHINDUCTOR_CACHE_DIR (AdamW imports it)
    earlier = load_model(tiny_single)
    before = _process_state()
    res = train(quick_config(tiny_single, tmp_path, steps=2, low_vram=True, kernels="auto", threads=1),
                handle_signals=True)
    assert res.status == "completed"
    _assert_same(before, _process_state())
    out = generate(GenerateConfig(model=str(tiny_single), prompt="a tok", steps=2, width=64, height=64,
                                  seed=1, out=str(tmp_path / "gen"), device="cpu", quiet=True))
    assert len(out.paths) == 1
    _assert_same(before, _process_state())
    assert calls == []
    assert _fused_ops_untouched(earlier.unet) and _fused_ops_untouched(load_model(tiny_single).unet)
    # the CLI's entry is where they belong (and the recorders see them there)
    process_settings(quick_config(tiny_single, tmp_path, low_vram=True, threads=1))
    assert calls == [("threads", 1), ("allocator", "expandable_segments:True")]


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_handlers_restored_when_the_run_fails_before_its_loop(tiny_single, tmp_path, monkeypatch, handlers):
    train(quick_config(tiny_single, tmp_path, steps=2))
    (tmp_path / "out" / "tok.safetensors").unlink()       # --resume rewrites the pair ...
    monkeypatch.setattr(trainable_mod, "save_safetensors", _no_space)   # ... onto a full disk
    with pytest.raises(DiskFullError):
        train(quick_config(tiny_single, tmp_path, steps=4, resume=True), handle_signals=True)
    assert all(signal.getsignal(s) is _sentinel for s in SIGNALS)


def test_handlers_restored_when_the_run_crashes(tiny_single, tmp_path, monkeypatch, handlers):
    def crash(self, mbs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(step_mod.GroupStep, "__call__", crash)
    with pytest.raises(RunCrashed):
        train(quick_config(tiny_single, tmp_path, steps=2), handle_signals=True)
    assert all(signal.getsignal(s) is _sentinel for s in SIGNALS)
