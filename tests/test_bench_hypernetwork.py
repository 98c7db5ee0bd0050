"""`python -m bench.train_throughput --tiny --hypernetwork`: every hypernetwork row in one run on
the CPU (the graphed rows skipped there), a table, one JSON line and a results file. Checks the
harness, not speed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ["hypernetwork graphed", "hypernetwork eager", "embedding graphed", "hypernetwork A1111-style"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-hn")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--tiny", "--hypernetwork", "--quiet",
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout, out


def test_every_row_in_one_run(tiny_run):
    result, stdout, out = tiny_run
    rows = {(r["name"], r["batch"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((n, b) for n in NAMES for b in (1, 2))
    for b in (1, 2):
        for name in ("hypernetwork graphed", "embedding graphed"):
            assert rows[name, b]["status"] == "skipped: needs CUDA"
        eager, a1111 = rows["hypernetwork eager", b], rows["hypernetwork A1111-style", b]
        for r in (eager, a1111):
            assert r["status"] == "ok" and r["ms_per_step"] > 0 and r["samples_per_s"] > 0 and r["finite"], r
        # the same modules, data and draws: on the CPU (fp32, no autocast) the same loss
        assert eager["loss"] == pytest.approx(a1111["loss"], rel=1e-4)
        assert eager["peer_row"] == "hypernetwork A1111-style"
        assert eager["ratio_vs_peer"] == pytest.approx(eager["samples_per_s"] / a1111["samples_per_s"])
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("| setting") and sum(ln.startswith("{") for ln in lines) == 1
    (saved,) = out.glob("*-hypernetwork.json")
    assert result["results_file"] == str(saved) and json.loads(saved.read_text())["rows"] == result["rows"]
