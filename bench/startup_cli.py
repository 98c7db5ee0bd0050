"""Where a user waits at the command line: `ti-fast --help`, `ti-fast create` on a 2 GB SD1.5 file,
a missing tokenizer without a network, and the demo on an idle and a busy machine (the CLI's
thread choice against torch's default).

    python -m bench.startup_cli                 # everything (writes a 2 GB file in a temp folder)
    python -m bench.startup_cli --compare       # also the old create path: load_model + hash (~6 GB RSS)
    python -m bench.startup_cli --tiny          # the harness on a tiny model, no demo (seconds)

Each figure comes from a fresh process started the way a user starts it (`python -m ti_fast.cli`);
wall time from launch to exit, peak RSS from wait4's rusage. The model file has SD1.5's
single-file layout (names and shapes from ti-fast's own SD1.5 configs), fp16, zeros except a
random token table, written straight to disk (it never sits in memory); a tokenizer of SD's size
sits beside it. `create` is timed with the file in the page cache (warm) and after evicting it
(posix_fadvise DONTNEED: cold, as after a reboot). Wall time depends on what else the machine
runs; CPU time (user + system) much less, so both are reported, with the load average. The
output is a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
F16 = 2


def run(argv: list[str], env: dict | None = None, cwd=None) -> dict:
    """Wall seconds, CPU seconds (user + system), peak RSS (MiB) and exit code of one child.
    Linux carries a process's peak RSS across exec, so this parent stays small (it never imports
    torch: the inputs are written by a child, see prepare) or every child would inherit its peak."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    err = p.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.stderr.close()
    return {"s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
            "rc": os.waitstatus_to_exitcode(status), "err": err[-300:]}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ti_fast.cli", *args]


def base_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


def write_sd15_file(path: Path, tiny: bool) -> Path:
    """SD1.5's single-file keys and shapes (fp16, ~2 GB), streamed to disk: zeros, and a random
    token table so that create's vectors are real rows."""
    import torch

    from ti_fast.loading.keys import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, expected_shapes
    from ti_fast.loading.tiny import TINY_CLIP, TINY_UNET, TINY_VAE
    from ti_fast.models import CLIPConfig, UNetConfig, VAEConfig
    cfgs = (TINY_UNET, TINY_VAE, TINY_CLIP) if tiny else (UNetConfig(), VAEConfig(), CLIPConfig())
    shapes = {}
    for prefix, kind, cfg in ((UNET_PREFIX, "unet", cfgs[0]), (VAE_PREFIX, "vae", cfgs[1]), (CLIP_PREFIX, "clip", cfgs[2])):
        shapes.update({prefix + k: s for k, s in expected_shapes(kind, cfg).items()})
    header, offset = {}, 0
    for k, s in shapes.items():
        n = 1
        for d in s:
            n *= d
        header[k] = {"dtype": "F16", "shape": list(s), "data_offsets": [offset, offset + n * F16]}
        offset += n * F16
    if tiny:
        from ti_fast.loading.tiny import config_json, tiny_models
        header["__metadata__"] = {"ti_fast_config": config_json(*tiny_models())}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    token_key = CLIP_PREFIX + "embeddings.token_embedding.weight"
    zeros = bytes(1 << 24)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k, ent in header.items():
            if k == "__metadata__":
                continue
            size = ent["data_offsets"][1] - ent["data_offsets"][0]
            if k == token_key:
                g = torch.Generator().manual_seed(0)
                f.write((torch.randn(*ent["shape"], generator=g) * 0.015).half().numpy().tobytes())
                continue
            while size > 0:
                f.write(zeros[: min(size, len(zeros))])
                size -= len(zeros)
        f.flush()
        os.fsync(f.fileno())
    return path


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages only; the file was fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _spin() -> None:
    while True:
        pass


def demo_rows(tmp: Path, env: dict) -> dict:
    """The demo with the CLI's thread choice (no --threads, no OMP_NUM_THREADS) on an idle
    machine and on a busy one (one spinning process per CPU), and with torch's default of one
    thread per CPU (--threads N) on the busy machine: the figure the CLI's choice exists for."""
    import multiprocessing
    demo_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    rows = {}
    for label, busy, extra in (("demo, idle, CLI's thread choice", False, ()),
                               ("demo, busy, CLI's thread choice", True, ()),
                               (f"demo, busy, --threads {os.cpu_count()} (torch's default)", True,
                                ("--threads", str(os.cpu_count())))):
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() if busy else 0)]
        for s in spinners:
            s.start()
        try:
            work = tmp / f"demo-{len(rows)}"
            work.mkdir()
            r = run(cli("train", "--demo", "--quiet", *extra), demo_env, cwd=work)
        finally:
            for s in spinners:
                s.terminate()
                s.join()
        assert r["rc"] == 0, r["err"]
        rows[label] = r
    return rows


def median_run(argv, env, n: int) -> dict:
    runs = [run(argv, env) for _ in range(n)]
    assert all(r["rc"] == 0 for r in runs), runs[0]["err"]
    return {"s": statistics.median(r["s"] for r in runs), "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "rss_mib": max(r["rss_mib"] for r in runs)}


def prepare(model_dir: Path, tiny: bool) -> None:
    """The model file and a tokenizer beside it (run in a child: it imports torch)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    write_sd15_file(model_dir / "model.safetensors", tiny)
    if tiny:
        from ti_fast.loading.tokenizer import write_tiny_tokenizer
        write_tiny_tokenizer(model_dir / "tokenizer")
    else:
        from bench.startup import sd_sized_tokenizer
        sd_sized_tokenizer(model_dir / "tokenizer")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of the 2 GB file; no demo")
    ap.add_argument("--compare", action="store_true", help="also time the old create path (load_model + hash, ~6 GB RSS)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each --help (median)")
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)       # the child that writes inputs
    a = ap.parse_args(argv)
    if a.prepare:
        prepare(Path(a.prepare), a.tiny)
        return {}
    env = base_env()
    rows = {}
    for args in (["--help"], ["train", "--help"]):
        rows["ti-fast " + " ".join(args)] = median_run(cli(*args), env, a.repeats)
    with tempfile.TemporaryDirectory(prefix="ti-fast-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "sd15"
        t0 = time.perf_counter()
        r = run([sys.executable, "-m", "bench.startup_cli", "--prepare", str(model_dir)] + ["--tiny"] * a.tiny,
                env, cwd=REPO)
        assert r["rc"] == 0, r["err"]
        write_s = time.perf_counter() - t0
        model = model_dir / "model.safetensors"
        size_gb = model.stat().st_size / 1e9
        create = cli("create", "benchtok", "--model", str(model), "--init-text", "a photo of", "--vectors", "4",
                     "--out", str(tmp / "emb"), "--overwrite")
        for label, cold in (("warm", False), ("cold", True)):
            if cold:
                evict(model)
            r = run(create, env)
            assert r["rc"] == 0, r["err"]
            rows[f"ti-fast create ({label} cache)"] = r
        if a.compare:
            evict(model)
            # what create did before: the whole model in fp32, and the file's hash for sd_checkpoint
            code = "import sys; from ti_fast.loading import load_model; load_model(sys.argv[1]).info.hash"
            r = run([sys.executable, "-c", code, str(model)], {**env, "TI_FAST_CACHE": str(tmp / "hashes")})
            assert r["rc"] == 0, r["err"]
            rows["old create path: load_model + hash (cold)"] = r
        # a missing tokenizer, no HF_HUB_OFFLINE, and a hub that accepts connections but never answers
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        bare = tmp / "bare"
        bare.mkdir()
        (bare / "model.safetensors").symlink_to(model)
        offline_env = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        offline_env.update(HF_HOME=str(tmp / "hf"), TI_FAST_CACHE=str(tmp / "cache"),
                           HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}")
        hide = "import sys; sys.modules['clip'] = sys.modules['open_clip'] = None; from ti_fast.cli import main; " \
               "sys.exit(main(sys.argv[1:]))"
        r = run([sys.executable, "-c", hide, "create", "x", "--model", str(bare),
                 "--out", str(tmp / "emb2")], offline_env)
        silent.close()
        assert r["rc"] == 2 and "no CLIP tokenizer" in r["err"], r
        rows["missing tokenizer, hub not answering"] = r
        if not a.tiny:
            rows.update(demo_rows(tmp, env))
    load = os.getloadavg()
    print(f"model file {size_gb:.2f} GB written in {write_s:.1f} s; {os.cpu_count()} CPUs; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'what':<48}{'wall s':>9}{'CPU s':>8}{'peak RSS MiB':>15}")
    for k, r in rows.items():
        print(f"{k:<48}{r['s']:>9.2f}{r['cpu_s']:>8.2f}{r['rss_mib']:>15.0f}")
    result = {"model_gb": round(size_gb, 3), "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load],
              "rows": {k: {"s": round(r["s"], 3), "cpu_s": round(r["cpu_s"], 3), "rss_mib": round(r["rss_mib"], 1)}
                       for k, r in rows.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
