"""The job queue in SQLite (stdlib sqlite3, WAL): one row per training job.

Written by the worker thread and the request handlers through one connection and a lock.

WAL with synchronous=NORMAL survives kill -9 of the server without losing a committed row or
corrupting the file (only a power cut may drop the last commits). Every state change is one
conditional UPDATE, so a request cancelling a queued job and the worker claiming it cannot both
win. Status: queued -> running -> completed | cancelled | interrupted | failed; interrupted
(SIGTERM) and running (kill -9) jobs are queued again at the next start, resuming from their save.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

TERMINAL = ("completed", "cancelled", "interrupted", "failed")
ACTIVE = ("queued", "running")
_JSON = ("config", "ignored", "groups", "files", "request")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    id        TEXT UNIQUE NOT NULL,
    kind      TEXT NOT NULL,            -- embedding | hypernetwork
    origin    TEXT NOT NULL,            -- api | sdapi
    name      TEXT NOT NULL,            -- the run's name (trigger word / file stem)
    status    TEXT NOT NULL,
    config    TEXT NOT NULL,            -- JSON: the run's TrainConfig keys (paths resolved in HOME)
    request   TEXT,                     -- JSON: what the client sent
    ignored   TEXT,                     -- JSON: request fields ti-fast could not honour
    groups    TEXT NOT NULL DEFAULT '[]',  -- JSON: ids of the groups the job ran in, in order
    group_id  TEXT,                     -- the group it runs in now (or last ran in)
    peak_runs INTEGER NOT NULL DEFAULT 0,  -- most runs co-batched with it at once (itself included)
    resume    INTEGER NOT NULL DEFAULT 0,  -- 1: continue from its log folder's state.pt
    step      INTEGER,
    end_step  INTEGER,
    loss      REAL,
    lr        REAL,
    error     TEXT,
    files     TEXT,                     -- JSON: output files by role
    log_dir   TEXT NOT NULL,
    out_dir   TEXT NOT NULL,
    created   REAL NOT NULL,
    started   REAL,
    finished  REAL,
    updated   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
"""


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _row(row) -> dict | None:
        if row is None:
            return None
        d = dict(row)
        for k in _JSON:
            d[k] = json.loads(d[k]) if d.get(k) else ([] if k in ("ignored", "groups") else {})
        return d

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            return self._row(self._db.execute("SELECT * FROM jobs WHERE id=?", (str(job_id),)).fetchone())

    def list(self, *, status: tuple[str, ...] | None = None, origin: str | None = None, limit: int = 1000) -> list[dict]:
        q, args = "SELECT * FROM jobs WHERE 1=1", []
        if status:
            q += f" AND status IN ({','.join('?' * len(status))})"
            args += list(status)
        if origin:
            q += " AND origin=?"
            args.append(origin)
        q += " ORDER BY seq LIMIT ?"
        args.append(int(limit))
        with self._lock:
            return [self._row(r) for r in self._db.execute(q, args).fetchall()]

    def count(self, status: tuple[str, ...]) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({','.join('?' * len(status))})",
                                    status).fetchone()[0]

    # ------------------------------------------------------------------ writing
    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(6)

    def add(self, *, job_id: str, kind: str, origin: str, name: str, config: dict, log_dir: str, out_dir: str,
            request: dict | None = None, ignored: list | None = None) -> dict:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, origin, name, status, config, request, ignored, log_dir, out_dir, "
                "created, updated) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, origin, name, json.dumps(config), json.dumps(request or {}),
                 json.dumps(ignored or []), log_dir, out_dir, now, now))
        return self.get(job_id)

    def update(self, job_id: str, **fields) -> None:
        if not fields:
            return
        fields["updated"] = time.time()
        for k in _JSON:
            if k in fields:
                fields[k] = json.dumps(fields[k])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), str(job_id)))

    def transition(self, job_id: str, frm: tuple[str, ...], to: str, **fields) -> bool:
        """status frm -> to (and the fields) in one statement; False when the job was not in frm."""
        fields = {"status": to, "updated": time.time(), **fields}
        for k in _JSON:
            if k in fields:
                fields[k] = json.dumps(fields[k])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {cols} WHERE id=? AND status IN ({','.join('?' * len(frm))})",
                                   (*fields.values(), str(job_id), *frm))
            return cur.rowcount == 1

    def recover(self, resumable) -> list[str]:
        """At start: jobs a previous process left running or interrupted are queued again, with
        resume=1 where `resumable(job)` says their log folder holds a saved state. Returns their ids."""
        ids = []
        for job in self.list(status=("running", "interrupted")):
            if self.transition(job["id"], ("running", "interrupted"), "queued", resume=int(bool(resumable(job))),
                               group_id=None):
                ids.append(job["id"])
        return ids

    def delete(self, job_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(f"DELETE FROM jobs WHERE id=? AND status IN ({','.join('?' * len(TERMINAL))})",
                                   (str(job_id), *TERMINAL))
            return cur.rowcount == 1
