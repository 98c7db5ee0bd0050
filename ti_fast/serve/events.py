"""Progress events from the worker thread to the event loop, and Server-Sent Events.

Each job's recent events in memory (numbered, so a stream resumes with Last-Event-ID), and
waiters woken across threads with call_soon_threadsafe. One hub per server; it is closed at
shutdown, which ends every stream."""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import deque

KEEP = 2000          # events kept per job (a stream that falls further behind starts from the record)
KEEP_ENDED = 64      # jobs that ended whose events stay in memory (older ones: their record and files say it all)


class Waiter:
    """One asyncio waiter: `await waiter.wait(timeout)` returns when something was published for
    its job (or the hub closed), or after the timeout."""

    def __init__(self, hub: "Hub", job_id: str | None, loop: asyncio.AbstractEventLoop):
        self.hub, self.job_id, self.loop = hub, job_id, loop
        self.event = asyncio.Event()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:          # its loop has closed: nobody waits any more
            self.hub._drop(self)

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self.event.clear()

    def close(self) -> None:
        self.hub._drop(self)


class Hub:
    def __init__(self):
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._events: dict[str, deque] = {}
        self._ended: list[str] = []
        self._waiters: set[Waiter] = set()
        self.closed = False

    def publish(self, job_id: str, data: dict, event: str = "progress") -> int:
        with self._lock:
            seq = next(self._seq)
            self._events.setdefault(job_id, deque(maxlen=KEEP)).append((seq, event, data))
            if job_id in self._ended:           # a job that runs again (resumed) is live again
                self._ended.remove(job_id)
            if event == "end":
                self._ended.append(job_id)
                while len(self._ended) > KEEP_ENDED:
                    self._events.pop(self._ended.pop(0), None)
            waiters = [w for w in self._waiters if w.job_id in (job_id, None)]
        for w in waiters:
            w._wake()
        return seq

    def since(self, job_id: str, after: int) -> list[tuple[int, str, dict]]:
        with self._lock:
            return [e for e in self._events.get(job_id, ()) if e[0] > after]

    def last(self, job_id: str) -> int:
        with self._lock:
            q = self._events.get(job_id)
            return q[-1][0] if q else 0

    def waiter(self, job_id: str | None) -> Waiter:
        """A waiter for one job's events (None: every job's), on the running event loop."""
        w = Waiter(self, job_id, asyncio.get_running_loop())
        with self._lock:
            self._waiters.add(w)
        return w

    def _drop(self, w: Waiter) -> None:
        with self._lock:
            self._waiters.discard(w)

    def close(self) -> None:
        """Shutdown: every stream ends at its next wake-up."""
        with self._lock:
            self.closed = True
            waiters = list(self._waiters)
        for w in waiters:
            w._wake()


def sse(event: str, data: dict, seq: int | None = None) -> bytes:
    """One Server-Sent Event: `id:` (when numbered), `event:` and one `data:` line of JSON."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
