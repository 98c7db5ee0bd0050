"""bench/train_throughput.py --tiny: the harness produces every row, valid JSON, ratios, MFU and a
results file (CPU, tiny models, 64 px; checks the plumbing, not speed). Plus the pure helpers
that turn timings into samples/s, MFU and peer ratios."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from bench import common as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--tiny", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    return json.loads(lines[-1]), p.stdout, out


def _rows(result, name, batch):
    return [r for r in result["rows"] if r["name"].startswith(name) and r["batch"] == batch]


def test_every_row_is_there_with_numbers(tiny_run):
    result, _, _ = tiny_run
    ran = [("ti-fast eager", 1), ("ti-fast eager", 2), ("ti-fast low-vram", 1), ("ti-fast offload", 1),
           ("diffusers-TI", 1), ("diffusers-TI", 2), ("diffusers-TI + grad. checkpointing", 1)]
    for name, b in ran:
        (r,) = [r for r in _rows(result, name, b) if name != "diffusers-TI" or r["mode"] == "eager"]
        assert r["status"] == "ok", (name, b, r["status"])
        assert r["ms_per_step"] > 0 and r["samples_per_s"] > 0 and 0 < r["mfu"] < 1, r
        assert r["first_step_s"] > 0 and r["steps_timed"] >= 1
    for b in (1, 2):
        graphs = _rows(result, "ti-fast cuda-graph", b)
        assert sorted(g["name"] for g in graphs) == ["ti-fast cuda-graph", "ti-fast cuda-graph + channels_last (default)"]
        assert all(g["status"].startswith("skipped") and "CUDA" in g["status"] for g in graphs)
    (off,) = _rows(result, "ti-fast offload", 1)
    # the tiny UNet streams 12 blocks (input_blocks.1-5, middle, 6 output), each copied twice a step
    assert off["streamed_gb"] > 0 and off["copies_per_step"] == 2 * 12, off
    assert all(r["finite"] for r in result["rows"] if r["impl"] == "ti-fast" and r["status"] == "ok")


def test_ratios_compare_like_with_like(tiny_run):
    result, _, _ = tiny_run
    for b in (1, 2):
        (ours,) = _rows(result, "ti-fast eager", b)
        (peer,) = [r for r in _rows(result, "diffusers-TI", b) if r["mode"] == "eager"]
        assert ours["peer_row"] == "diffusers-TI"
        assert ours["ratio_vs_peer"] == pytest.approx(ours["samples_per_s"] / peer["samples_per_s"])
    for name in ("ti-fast low-vram", "ti-fast offload"):    # both recompute in backward
        (r,) = _rows(result, name, 1)
        assert r["peer_row"] == "diffusers-TI + grad. checkpointing" and r["ratio_vs_peer"] > 0


def test_startup_parts_and_flops(tiny_run):
    result, _, _ = tiny_run
    s = result["startup"]
    assert s["launch"]["status"] == "completed" and s["launch"]["launch_to_first_step_s"] > 0
    assert s["launch"]["train_call_s"] >= s["launch"]["launch_to_first_step_s"]
    assert s["load_rss"]["status"] == "ok" and s["load_rss"]["peak_rss_anon_gib"] > 0
    assert s["generation"]["status"] == "ok" and s["generation"]["finite"]
    assert result["flop_per_sample_counted"] > 0 and result["flop_per_sample"] == result["flop_per_sample_counted"]
    assert result["matmul_peak"]["flops"] > 0
    assert set(result["kernels"]) == {"bench_group_norm_silu", "bench_geglu"}


def test_table_then_one_json_line_and_results_file(tiny_run):
    result, stdout, out = tiny_run
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("| setting") and "ti-fast eager" in stdout
    assert sum(1 for ln in lines if ln.startswith("{")) == 1
    files = list(out.glob("*.json"))
    assert len(files) == 1 and result["results_file"] == str(files[0])
    saved = json.loads(files[0].read_text())
    for k in ("gpu", "torch", "triton", "commit", "date"):
        assert saved["env"][k], k
    assert saved["rows"] == result["rows"]


def test_finish_rows_fills_rates_mfu_and_ratios():
    rows = [C.row("ti-fast eager", "ti-fast", "eager", 2, ms_per_step=100.0),
            C.row("ti-fast low-vram", "ti-fast", "low-vram", 1, ms_per_step=50.0),
            C.row("ti-fast cuda-graph", "ti-fast", "cuda-graph", 1, status="oom"),
            C.row("peer", "peer", "eager", 2, ms_per_step=400.0),
            C.row("peer ckpt", "peer", "checkpointing", 1, ms_per_step=200.0),
            C.row("peer", "peer", "eager", 1, ms_per_step=10.0)]
    C.finish_rows(rows, flop_per_sample=1e9, peak_flops=1e12)
    assert rows[0]["samples_per_s"] == pytest.approx(20.0) and rows[0]["mfu"] == pytest.approx(0.02)
    assert rows[0]["ratio_vs_peer"] == pytest.approx(4.0) and rows[0]["peer_row"] == "peer"
    assert rows[1]["ratio_vs_peer"] == pytest.approx(4.0) and rows[1]["peer_row"] == "peer ckpt"
    assert rows[2]["samples_per_s"] is None and rows[2]["ratio_vs_peer"] is None
    table = C.format_table(rows)
    assert "4.00x" in table and "oom" in table and len(table.splitlines()) == len(rows) + 2


def test_results_path_keeps_earlier_runs(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3"}
    a = C.write_results(tmp_path, {"env": env, "rows": []})
    b = C.write_results(tmp_path, {"env": env, "rows": []})
    assert a != b and a.exists() and b.exists() and "nvidia-h100-80gb-hbm3" in a.name


def test_profile_step_tiny_runs():
    """python -m bench.profile_step --tiny: the step profiler builds the trainer's step and runs."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "bench.profile_step", "--tiny"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["kernels"] == "torch" and out["profiles"]
    assert all(r.get("kernels_per_step", 0) > 0 for r in out["profiles"]), out["profiles"]


def test_runs_rows_tiny():
    """--runs --tiny: co-batched and sequential rows for K = 1, 2 with numbers and a `runs` field."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--tiny", "--runs", "--quiet"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])["rows"]}
    for k in (1, 2):
        for kind in ("co-batched", "sequential"):
            r = rows[f"{kind} K={k}"]
            assert r["status"] == "ok" and r["runs"] == k and r["samples_per_s"] > 0 and r["wall_s"] > 0, r
