"""Stopping a run and owning its log folder.

Stopper: SIGINT/SIGTERM (only when the caller asks — the CLI — and only on the main thread), a
threading.Event, or a callback returning True all end in the same path: the loop stops at the
next step boundary and saves. A second signal interrupts a step at once (KeyboardInterrupt; the
run still saves its last checked state), but never a save: inside `shield()` signals only make
the run stop afterwards, so the state, NAME.pt/.safetensors and loss.csv always agree.

RunLock: an exclusive flock on LOG/.lock for the run's life. A second trainer on the same log
folder is refused with one line; the kernel drops the lock when its process dies (kill -9
included), so a crashed run never leaves the folder locked.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import make_dir

try:
    import fcntl
except ImportError:          # Windows: no advisory locks here; the folder is not guarded
    fcntl = None


class Stopper:
    def __init__(self, cancel: threading.Event | None = None, callback=None, handle_signals: bool = False):
        self.cancel, self.callback = cancel, callback
        self.reason: str | None = None       # None | "interrupted" | "cancelled"
        self.signals = 0
        self._shielded = 0
        self._old = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signals += 1
        self.reason = "interrupted"
        if self.signals >= 2 and not self._shielded:
            raise KeyboardInterrupt       # the second one: stop the step now (the run still saves)

    @contextmanager
    def shield(self):
        """A save runs to its end whatever signals arrive meanwhile."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1

    def should_stop(self, info: dict) -> bool:
        if self.reason:
            return True
        if self.cancel is not None and self.cancel.is_set():
            self.reason = "cancelled"
        elif self.callback is not None and self.callback(info):
            self.reason = "cancelled"
        return self.reason is not None

    def restore(self) -> None:
        """Put the previous signal handlers back (train() leaves no global state behind)."""
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}


class RunLock:
    """Held while a run writes into `log_dir` (created here, before anything heavy loads)."""

    def __init__(self, log_dir: Path):
        self.path = Path(log_dir) / ".lock"
        self.fd = None
        make_dir(log_dir, "--log-dir")
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise ConfigError(f"--log-dir {log_dir} is in use by another ti-fast run{who}: wait for it to "
                              "finish, or choose another --log-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    @classmethod
    def for_plan(cls, plan) -> "RunLock":
        """Create the run's folders (--out, --log-dir, --cache-dir: a place that cannot hold one
        is refused here, before the model loads, not at the first save) and lock the log folder."""
        lock = cls(plan.log_dir)          # first: a refused second trainer creates nothing
        try:
            make_dir(plan.out_dir, "--out")
            if plan.cfg.cache_dir:
                make_dir(plan.cfg.cache_dir, "--cache-dir")
        except BaseException:
            lock.release()
            raise
        return lock

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
