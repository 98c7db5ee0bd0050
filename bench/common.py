"""Shared pieces of the training benchmark: device facts, fast random weights, timing, memory,
rows, the table and the results file.

Timing (nanoGPT's bench, style.md point 11): warm-up steps, one probe step to size the run, then
N steps between two CUDA events with one synchronisation at the end. The steps under test do not
synchronise with the host, so the events measure throughput as a training loop sees it,
including any time the GPU idles waiting for kernel launches (the launch-bound case).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from ti_fast.fsutil import atomic_write_text

# One TI sample at 512 px, SD1.5 (performance.md): text encoder fwd+bwd + UNet fwd + input-grad bwd.
SD15_FLOP_PER_SAMPLE = 1.72e12
GIB = 2 ** 30
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- facts

def git_commit() -> str:
    """HEAD here; on the device machine (a copy of the tree without .git) the caller passes it in
    TI_FAST_COMMIT (scripts/gpu_check.sh)."""
    if os.environ.get("TI_FAST_COMMIT"):
        return os.environ["TI_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def json_from_child(cmd: list[str], timeout: float) -> dict:
    """Run `cmd` (a fresh Python process, from the repository root) and parse the last line of
    its stdout that starts with '{'; RuntimeError with its stderr's tail when it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not last:
        raise RuntimeError(f"child exit {p.returncode}: {p.stderr.strip()[-300:]}")
    return json.loads(last[-1])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    env = {"gpu": device_name(device), "device": device.type, "torch": torch.__version__, "triton": triton_v,
           "cuda": torch.version.cuda, "python": platform.python_version(), "commit": git_commit(),
           "date": _dt.datetime.now().isoformat(timespec="seconds")}
    for mod in ("diffusers", "transformers", "xformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(p.total_memory / GIB, 2)
        env["sm_count"] = p.multi_processor_count
    return env


def cuda_context_bytes(device: torch.device) -> int | None:
    """Device memory in use before the caching allocator holds anything: the CUDA context (and
    any other process on the GPU). Must run before the first allocation; mem_get_info itself
    creates the context."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def outside_allocator_bytes(device: torch.device) -> int | None:
    """Device memory in use that the caching allocator does not hold (context, cuBLAS/cuDNN
    workspaces, Triton modules) — what max_memory_allocated never shows."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def matmul_peak_flops(device: torch.device, n: int | None = None, iters: int = 10) -> dict:
    """The MFU denominator measured in this run: a square matmul, bf16 8192^3 on CUDA
    (fp32 512^3 on the CPU, for --tiny)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    ms = time_fn(lambda: a @ b, device, warmup=3, iters=iters)
    del a, b
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "flops": 2 * n ** 3 / (ms / 1e3)}


# ----------------------------------------------------------------------------- weights

NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


@torch.no_grad()
def fast_init_(module: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Cheap random weights in place: N(0, std) weights, zero biases, unit norm scales. Seconds
    for SD1.5 on a GPU where PyTorch's default (kaiming) init costs ~20 s on the CPU; the numbers
    are meaningless, the shapes and the arithmetic are the real ones."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, NORMS):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
    return module


def build(ctor, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Construct on the meta device (no memory, no init), materialise on `device` in `dtype`,
    then fast_init_. Only for modules without buffers (ours have none): to_empty would leave a
    buffer's values undefined."""
    with torch.device("meta"):
        m = ctor()
    if any(True for _ in m.buffers()):
        raise ValueError(f"{type(m).__name__} has buffers: build it directly on the device instead")
    m = m.to(dtype).to_empty(device=device)
    return fast_init_(m).requires_grad_(False).eval()


# ----------------------------------------------------------------------------- timing, memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int, iters: int) -> float:
    """ms per call of fn after `warmup` calls; CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def time_steps(fn, device: torch.device, *, warmup: int, iters: int | None, target_s: float = 2.0,
               lo: int = 5, hi: int = 60) -> tuple[float, int]:
    """(ms per step, steps timed). iters None: sized from one probe step to take ~target_s."""
    for _ in range(warmup):
        fn()
    sync(device)
    if iters is None:
        t0 = time.perf_counter()
        fn()
        sync(device)
        one = time.perf_counter() - t0
        iters = int(min(hi, max(lo, target_s / max(one, 1e-4))))
    return time_fn(fn, device, warmup=0, iters=iters), iters


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def free_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class MemoryCap:
    """Limit this process's caching allocator to `gib` (the CUDA context is outside it); a no-op
    on the CPU, where nothing can be capped."""

    def __init__(self, device: torch.device, gib: float | None):
        self.device, self.gib = device, gib

    def _index(self) -> int:
        # set_per_process_memory_fraction refuses a torch.device without an index ("cuda")
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def __enter__(self):
        if self.gib is not None and self.device.type == "cuda":
            free_memory(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.gib * GIB / total), self._index())
        return self

    def __exit__(self, *exc):
        if self.gib is not None and self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self._index())
            free_memory(self.device)
        return False


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------- rows, table, file

def row(name: str, impl: str, mode: str, batch: int | None, **kw) -> dict:
    """One result line. status: ok | oom | skipped: why | not implemented: why | error: what."""
    r = {"name": name, "impl": impl, "mode": mode, "batch": batch, "status": "ok", "ms_per_step": None,
         "samples_per_s": None, "peak_gib": None, "mfu": None, "ratio_vs_peer": None, "peer_row": None,
         "cap_gib": None}
    r.update(kw)
    return r


def finish_rows(rows: list[dict], flop_per_sample: float, peak_flops: float) -> None:
    """Fill samples/s and MFU from ms/step, then each ti-fast row's ratio to the peer at the same
    batch: low-vram and offload (both recompute in backward) against the peer with gradient
    checkpointing, the rest against plain diffusers-TI. MFU counts useful FLOPs only
    (recomputation and the peer's per-step VAE encode are not credited)."""
    for r in rows:
        if r["status"] == "ok" and r["ms_per_step"]:
            r["samples_per_s"] = r["batch"] * 1e3 / r["ms_per_step"]
            r["mfu"] = flop_per_sample * r["samples_per_s"] / peak_flops
    peers = {(r["mode"], r["batch"]): r for r in rows if r["impl"] == "peer" and r["samples_per_s"]}
    for r in rows:
        if r["impl"] != "ti-fast" or not r["samples_per_s"]:
            continue
        p = peers.get(("checkpointing" if r["mode"] in ("low-vram", "offload") else "eager", r["batch"]))
        if p is not None:
            r["ratio_vs_peer"], r["peer_row"] = r["samples_per_s"] / p["samples_per_s"], p["name"]


COLUMNS = (("setting", 44), ("batch", 5), ("ms/step", 8), ("samples/s", 9), ("peak GiB", 8), ("MFU", 6),
           ("vs peer", 7))


def _cells(r: dict) -> list[str]:
    f = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
    return [r["name"], f(r["batch"], "d"), f(r["ms_per_step"], ".1f"), f(r["samples_per_s"], ".2f"),
            f(r["peak_gib"], ".2f"), "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            "-" if r["ratio_vs_peer"] is None else f"{r['ratio_vs_peer']:.2f}x"]


def format_table(rows: list[dict]) -> str:
    """Markdown table, one line per row; the status column says why a row has no numbers."""
    def line(cells):
        return "| " + " | ".join(c[:w].ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS))) + " | "
    out = [line([c for c, _ in COLUMNS]) + "status", "|" + "|".join("-" * (w + 2) for _, w in COLUMNS) + "|---"]
    out += [line(_cells(r)) + r["status"] for r in rows]
    return "\n".join(out)


def results_path(out_dir: Path, gpu: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")[:48] or "unknown"
    stem = f"{_dt.date.today().isoformat()}-{slug}"
    p = Path(out_dir) / f"{stem}.json"
    i = 2
    while p.exists():                 # several runs a day: keep them all
        p = Path(out_dir) / f"{stem}-{i}.json"
        i += 1
    return p


def write_results(out_dir, result: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = results_path(out_dir, result["env"]["gpu"])
    atomic_write_text(p, json.dumps(clean(result), indent=1, default=jsonable, allow_nan=False) + "\n")
    return p


def clean(v):
    """Strict JSON: NaN/inf (a diverged loss, an empty timing) become null."""
    if torch.is_tensor(v) and v.numel() == 1:
        v = v.item()
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def jsonable(v):
    """json.dumps default= for what rows may carry besides plain values."""
    if isinstance(v, (torch.dtype, torch.device, Path)):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


# ----------------------------------------------------------------------------- kernel benches

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


TIMING_COLUMNS = (  # title, width, row -> cell: what every kernel bench times
    ("fwd ms", 8, lambda r: num(r.get("fwd_ms"), ".4f")),
    ("f+b ms", 8, lambda r: num(r.get("fwd_bwd_ms"), ".4f")),
    ("graph fwd", 9, lambda r: num(r.get("fwd_graph_ms"), ".4f")),
    ("graph f+b", 9, lambda r: num(r.get("fwd_bwd_graph_ms"), ".4f")),
    ("fwd GB/s", 8, lambda r: num(r.get("fwd_GBps"), ".0f")),
)


def graph_ms(fn, device, warmup: int, iters: int, tag: str = "kernel") -> float | None:
    """ms per replay of fn captured in a CUDA graph; None when capture fails (or on CPU)."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up (allocations, autotune, compiles) off-graph
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_fn(graph.replay, device, warmup=warmup, iters=iters)
    except Exception as e:  # report, keep benchmarking
        print(f"bench_{tag}: CUDA graph capture failed ({type(e).__name__}: {e})", file=sys.stderr)
        return None


TIMINGS = ("fwd_ms", "fwd_bwd_ms", "fwd_graph_ms", "fwd_bwd_graph_ms")


def time_kernel(r: dict, fwd, fwd_bwd, device, warmup: int, iters: int, tag: str) -> None:
    """Fill row r with one implementation's TIMINGS: forward and forward+backward, eager and
    replayed from a CUDA graph (None where capture fails, and on the CPU). Written one by one,
    so a row that fails part-way keeps what was measured."""
    r["fwd_ms"] = time_fn(fwd, device, warmup=warmup, iters=iters)
    r["fwd_bwd_ms"] = time_fn(fwd_bwd, device, warmup=warmup, iters=iters)
    r["fwd_graph_ms"] = graph_ms(fwd, device, warmup, iters, tag=tag)
    r["fwd_bwd_graph_ms"] = graph_ms(fwd_bwd, device, warmup, iters, tag=tag)


def kernel_device(device, op: str) -> torch.device:
    """Where a kernel bench runs: the current CUDA device by default (an error without one), an
    int as a CUDA index; 'cpu' (TRITON_INTERPRET=1, tiny shapes) only checks the harness."""
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"bench_{op} needs a CUDA GPU")
        device = torch.cuda.current_device()
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def kernel_dtypes(dtypes, default) -> list[torch.dtype]:
    """Names ('bf16', 'fp16', 'fp32') or torch dtypes; `default` when None."""
    return [DTYPES[d] if isinstance(d, str) else d for d in (dtypes or default)]


def kernel_row(fields: dict, measure) -> dict:
    """One implementation's row: `fields`, status "ok", then whatever measure(row) writes. An
    exception becomes the status (its message's first line), so a backend or shape that cannot
    run is reported and the bench goes on."""
    r = {**fields, "status": "ok"}
    try:
        measure(r)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        r["status"] = f"error: {type(e).__name__}: {msg[:200]}"
    return r


def per_s(r: dict, key: str, amount: float, unit: float = 1.0) -> float | None:
    """amount / the row's `key` time (graph replay when captured, else eager), in `unit`s per
    second: e.g. per_s(r, "fwd", bytes, 1e9) is the forward's GB/s."""
    ms = r.get(f"{key}_graph_ms") or r.get(f"{key}_ms")
    return amount / (ms * 1e-3) / unit if ms else None


def add_speedups(rows: list[dict], baseline: dict) -> None:
    """speedup_<timing> = baseline's time / the row's, for each of TIMINGS (None if either is missing)."""
    for r in rows:
        for k in TIMINGS:
            t, t0 = r.get(k), baseline.get(k)
            r[f"speedup_{k}"] = t0 / t if t and t0 else None


def format_kernel_table(rows: list[dict], columns, n_text: int = 4) -> str:
    """Markdown table, the first n_text columns left-aligned. 'vs fp32 path' = torch_fp32 time
    / this time, forward+backward, from the CUDA-graph replay when captured."""
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i < n_text else c.rjust(w)
        for i, (c, (_, w, _)) in enumerate(zip(cells, columns)))
    out = [line([t for t, _, _ in columns]) + " | status",
           "|" + "|".join("-" * (w + 2) for _, w, _ in columns) + "|---"]
    out += [line([get(r) for _, _, get in columns]) + " | " + r["status"] for r in rows]
    return "\n".join(out)
