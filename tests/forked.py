"""A function run in a forked child process, optionally as the unprivileged user nobody: for the
tests of read-only folders (root writes anywhere) and of resource limits (which must not reach
pytest's own process). Forked, not exec'd: the interpreter may live where nobody cannot read
it, and every module the function needs is imported already (import it before calling). The
child must run no parallel torch op (OpenMP's threads do not survive a fork)."""
from __future__ import annotations

import io
import json
import os
import select
import sys
import time

import pytest

NOBODY = 65534


def in_child(fn, *, as_nobody: bool = False, timeout: float = 120.0):
    """fn() in a forked child, switched to uid/gid nobody when `as_nobody` and running as root;
    returns what fn returned (through JSON). An exception in the child, or no answer within
    `timeout` seconds (a hang), fails the test."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            if as_nobody and os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            out = {"result": fn()}
            code = 0
        except BaseException as e:                 # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(e).__name__}: {e}"}
        finally:
            try:
                data = json.dumps(out).encode()
                while data:
                    data = data[os.write(w, data):]
            finally:
                os._exit(code)
    os.close(w)
    chunks, end = [], time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        while True:
            if not select.select([f], [], [], max(0.0, end - time.monotonic()))[0]:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail(f"the child gave no answer within {timeout} s: a hang")
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b'{"error": "the child died without an answer"}')
    if "error" in out:
        pytest.fail(f"the child failed: {out['error']}")
    return out["result"]


def main_as_nobody(argv, timeout: float = 120.0) -> tuple[int, str]:
    """ti_fast.cli.main(argv) in a forked child as user nobody (when running as root) ->
    (exit code, stderr)."""
    from ti_fast.cli import main

    def run():
        sys.stderr = io.StringIO()
        try:
            rc = main(argv)
        except SystemExit as e:                    # argparse's refusals
            rc = e.code
        return [rc, sys.stderr.getvalue()]

    rc, err = in_child(run, as_nobody=True, timeout=timeout)
    return rc, err
