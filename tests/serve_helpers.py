"""Running `ti-fast serve` in tests: a live server in a thread or a child process, bounded waits.

Real uvicorn on a free loopback port, the tiny model on the CPU; helpers to wait for jobs and
read their event streams."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ci_helpers import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("completed", "cancelled", "interrupted", "failed")


def require_serve() -> None:
    """The [serve] extra; under CI=1 its absence fails the test instead of skipping it."""
    missing = [m for m in ("fastapi", "uvicorn", "httpx", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        skip_or_fail(f"the [serve] extra is missing ({', '.join(missing)}): pip install -e '.[serve]'")


class LiveServer:
    """ServerState + uvicorn in a thread on 127.0.0.1:<free port>."""

    def __init__(self, home: Path, model: Path, *, token: str | None = None, **settings):
        from ti_fast.serve.cli import bind, make_server
        from ti_fast.serve.settings import ServeSettings
        from ti_fast.serve.state import ServerState
        process = {"model": str(model), "device": "cpu"}
        self.settings = ServeSettings(model=str(model), home=str(home), token=token, port=0, process=process, **settings)
        self.lines: list[str] = []
        self.state = ServerState(self.settings, say=self.lines.append)      # the real TrainGroup
        self.state.start(timeout=120)
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.state)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"

    @property
    def home(self) -> Path:
        return self.state.home.root

    def client(self, **kw):
        import httpx
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def stop(self) -> None:
        self.state.begin_shutdown()
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not stop"


# ---------------------------------------------------------------------------- requests

def demo_files(n: int = 3, size: int = 64, captions: bool = True) -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) of n small PNGs (+ caption .txt files)."""
    from PIL import Image
    out = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (40 * i % 255, 120, 200 - 30 * i))
        for x in range(0, size, 8):
            for y in range(0, size, 8):
                if (x // 8 + y // 8 + i) % 3 == 0:
                    im.putpixel((x, y), (255, 255, 255))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append((f"img {i}.png", buf.getvalue(), "image/png"))
        if captions:
            out.append((f"img {i}.txt", f"a ring number {i}".encode(), "text/plain"))
    return out


def upload(client, name: str, files=None, **params):
    files = files if files is not None else demo_files()
    return client.post(f"/api/v1/datasets/{name}", params=params,
                       files=[("files", (n, data, ctype)) for n, data, ctype in files])


def job_config(name: str, data: str, **kw) -> dict:
    """A tiny run (64 px, a few steps) in the tiny model's vocabulary."""
    cfg = dict(name=name, data=data, width=64, height=64, steps=6, lr="0.01", save_every=0, seed=7, vectors=2,
               init_text="ring", template="subject")
    cfg.update(kw)
    return cfg


def submit(client, config: dict, kind: str = "embedding") -> dict:
    r = client.post("/api/v1/jobs", json={"kind": kind, "config": config})
    assert r.status_code == 201, r.text
    return r.json()


def wait_job(client, job_id: str, until=TERMINAL, timeout: float = 120, step: int | None = None) -> dict:
    """Poll the job until its status is in `until` (or its step reaches `step`); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in until or (step is not None and (job["step"] or 0) >= step):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} at step {job['step']}"
        time.sleep(0.05)


def read_events(client, job_id: str, timeout: float = 120) -> list[tuple[str, dict]]:
    """The job's SSE stream until its `end` event: [(event, data)]."""
    events, event = [], None
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
                if event == "end":
                    break
    return events


# ---------------------------------------------------------------------------- a child process

class ChildServer:
    """`ti-fast serve` in a child process (the command line itself); the port is read from its
    'listening on' line."""

    def __init__(self, home: Path, model: Path, *extra: str, timeout: float = 120):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ti_fast.cli", "serve", "--model", str(model),
                                      "--home", str(home), "--port", "0", "--device", "cpu", *extra],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.port = None
        deadline = time.monotonic() + timeout
        while self.port is None:
            line = self.proc.stderr.readline()
            assert line or self.proc.poll() is None, f"the server exited: {''.join(self.lines)[-2000:]}"
            self.lines.append(line)
            if "listening on http://127.0.0.1:" in line:
                self.port = int(line.split("127.0.0.1:")[1].split("/")[0])
            assert time.monotonic() < deadline, "the server did not start"
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def client(self, **kw):
        import httpx
        return httpx.Client(base_url=self.url, timeout=60, **kw)
