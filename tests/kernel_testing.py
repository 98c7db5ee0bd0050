"""Shared scaffolding of the kernel tests: tolerance floors, the interpreter switch, the child
pytest that runs the interpreted tests, and the sm_90 compile harness.

The sm_90 harness compiles (never launches) Triton kernels as their launchers call them, for an sm_90 GPU, on any
machine with triton's NVIDIA backend (bundled ptxas): catches what the interpreter cannot
(typing, constexpr use, layouts) and shows whether loads vectorise. It swaps in a fake driver
and a compile-only JITFunction.run, so it runs in a child process. Exit 3: the harness does not
fit this triton version (skip), not a kernel error."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}  # x max|truth|
# TRITON_INTERPRET must be set before `import triton` (triton 3.6 reads it when @triton.jit
# decorates): interpreted tests run only in a process started with it (see run_interpreted).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 from process "
                                 "start: run by test_interpreted_in_subprocess")


def kernel_module(name: str, cuda: bool = False):
    """ti_fast.kernels.<name> for a test; skips without triton. cuda=True (tests at SD shapes):
    also skips without a CUDA GPU, or when this process interprets (that would take hours)."""
    pytest.importorskip("triton")
    if cuda:
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        if INTERPRET:
            pytest.skip("TRITON_INTERPRET=1 set for the whole process: SD shapes would take hours")
    return importlib.import_module(f"ti_fast.kernels.{name}")


def run_interpreted(test_file: str) -> None:
    """Run the `interpreted` tests of test_file in a child pytest with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-m", "not gpu", "-k", "interpreted",
           "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::DeprecationWarning", "--tb=short"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"

AOT_HARNESS = r"""
import json, re, sys
import torch
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class FakeCUDA:
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(FakeCUDA())
    launch = JITFunction.run
except Exception as e:
    print(f"harness: {type(e).__name__}: {e}")
    sys.exit(3)
found = []

def compile_only(self, *args, grid, warmup, **kw):
    k = launch(self, *args, grid=grid, warmup=True, **kw)
    found.append({"kernel": self.fn.__name__, "grid": list(grid), "tag": TAG,
                  "loads": sorted(set(re.findall(r"ld\.global[.\w]*", k.asm["ptx"])))})
    return k

JITFunction.run = compile_only
TAG = None
exec(sys.argv[1])
print("FOUND " + json.dumps(found))
"""


def compile_for_sm90(calls: str) -> list[dict]:
    """Run `calls` (code launching kernels) under the harness; the kernels it compiled, with
    their grids, tags and the kinds of global loads in their PTX."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", AOT_HARNESS, calls], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, f"sm_90 compile failed:\n{r.stdout[-5000:]}\n{r.stderr[-10000:]}"
    return json.loads(r.stdout.split("FOUND ", 1)[1])


class count_compiles:
    """Context manager counting Triton JIT compilations (cache misses of any @triton.jit kernel)
    made inside it: `with count_compiles() as n: ...; n["compiles"]`."""

    def __enter__(self) -> dict:
        import triton.runtime.jit as J
        self.jit, self.orig, self.n = J.JITFunction, J.JITFunction._do_compile, {"compiles": 0}
        orig, n = self.orig, self.n

        def counted(fn, *a, **k):
            n["compiles"] += 1
            return orig(fn, *a, **k)
        self.jit._do_compile = counted
        return self.n

    def __exit__(self, *exc):
        self.jit._do_compile = self.orig
        return False
