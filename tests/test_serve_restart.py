"""Nothing lost across restarts: SIGKILL then restart resumes the job; SIGTERM saves and exits in 30 s.

A server killed with SIGKILL leaves an intact database and files, and the next start resumes the
job from its last save and finishes it; SIGTERM saves every running job, ends the open event
streams and exits within 30 s. The server runs as a child process (`ti-fast serve` itself); bad
start settings exit 2 with one line."""
from __future__ import annotations

import csv

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from serve_helpers import ROOT, ChildServer, job_config, read_events, require_serve, submit, upload, wait_job


def db_rows(home):
    con = sqlite3.connect(home / "jobs.sqlite")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {r[0]: {"status": r[1], "step": r[2]} for r in con.execute("SELECT id, status, step FROM jobs")}
    finally:
        con.close()


def test_sigkill_then_restart_resumes_and_sigterm_saves(tiny_single, tmp_path):
    require_serve()
    import torch
    home = tmp_path / "home"
    a = ChildServer(home, tiny_single)
    try:
        with a.client() as c:
            assert upload(c, "rings").status_code == 201
            job = submit(c, job_config("killme", "rings", steps=60, save_every=5))
            wait_job(c, job["id"], step=12, timeout=120)
    finally:
        a.proc.kill()                                   # SIGKILL: no handler runs
        a.proc.wait(30)
    rows = db_rows(home)
    assert rows[job["id"]]["status"] == "running"
    log = home / "logs" / job["id"]
    saved = torch.load(log / "state.pt", weights_only=False)["step"]
    pt = torch.load(log / "embeddings" / f"killme-{saved}.pt", weights_only=True)
    assert saved >= 10 and saved % 5 == 0 and pt["step"] == saved        # the last save, whole and in agreement

    b = ChildServer(home, tiny_single)
    try:
        assert any("queued again" in line for line in b.lines), b.lines
        with b.client() as c:
            done = wait_job(c, job["id"], timeout=180)
            assert done["status"] == "completed" and done["step"] == 60 and done["resume"] is True, done
            assert torch.load(home / "embeddings" / "killme.pt", weights_only=True)["step"] == 60
            with open(log / "loss.csv", newline="") as f:
                assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 61))
            # SIGTERM with a job running (no periodic saves) and its event stream open
            long = submit(c, job_config("termme", "rings", steps=100000, save_every=0))
            wait_job(c, long["id"], step=3)
            streamed = {}
            t = threading.Thread(target=lambda: streamed.update(ev=read_events(b.client(), long["id"], timeout=60)))
            t.start()
            time.sleep(0.3)
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        rc = b.proc.wait(40)
        took = time.monotonic() - t0
    finally:
        if b.proc.poll() is None:
            b.proc.kill()
    assert rc == 0 and took < 30, (rc, took, "".join(b.lines)[-2000:])
    t.join(10)
    assert not t.is_alive() and streamed["ev"][-1][0] == "end"             # the stream was closed
    rows = db_rows(home)
    assert rows[long["id"]]["status"] == "interrupted"
    state = torch.load(home / "logs" / long["id"] / "state.pt", weights_only=False)
    pt = torch.load(home / "embeddings" / "termme.pt", weights_only=True)
    assert state["step"] >= 3 and pt["step"] == state["step"] == rows[long["id"]]["step"]


def _cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ti_fast.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args,word", [(["--host", "0.0.0.0"], "--token"), (["--host", "192.168.1.5"], "--token"),
                                       (["--max-running", "0"], "--max-running"), (["--token", "short"], "--token"),
                                       (["--precision", "fp64"], "--precision")])
def test_bad_start_settings_exit_2_with_one_line(tiny_single, tmp_path, args, word):
    r = _cli("--model", str(tiny_single), "--home", str(tmp_path / "h"), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ti-fast: error: ") and word in lines[0], r.stderr


def test_missing_model_exits_2(tmp_path):
    r = _cli("--model", str(tmp_path / "nope.safetensors"), "--home", str(tmp_path / "h"))
    assert r.returncode == 2 and "--model" in r.stderr and len(r.stderr.strip().splitlines()) == 1

