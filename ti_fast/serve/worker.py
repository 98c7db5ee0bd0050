"""The worker thread: the one owner of the model and the GPU.

It holds the training group (ti_fast.training.group.TrainGroup: the model loads once, with the
server's process-wide settings), and loops: run the calls queued by requests (txt2img, ...) —
between two group steps, one per boundary while training, all of them when idle — then admit
queued jobs up to --max-running (each joins the group at its next step boundary), then one
group step for every active run. Nothing else touches the model, so requests never race a step.

Kinds: embedding runs co-batch in the group; a hypernetwork run trains alone (its modules change
the UNet every row sees). So while the group trains embeddings, a hypernetwork job waits at the
head of the queue until the group is empty, and while a hypernetwork trains everything waits; the
model stays loaded throughout (a finished hypernetwork's hooks leave the UNet).

Stopping (SIGINT/SIGTERM, or the server's end): group.interrupt(), then steps until every run has
saved and left (status "interrupted", resumable); queued calls are refused.
"""
from __future__ import annotations

import collections
import datetime
import threading
import time
import traceback
from concurrent.futures import Future
from functools import partial
from pathlib import Path

from ..errors import UserError, one_line
from ..fsutil import atomic_write_text
from . import jobs as J
from .errors import Conflict, Unavailable
from .store import TERMINAL

DB_EVERY_S = 1.0          # progress rows are written at most this often per job (status changes at once)


class Worker:
    def __init__(self, *, settings, home, store, hub, group_factory, say=print):
        self.settings, self.home, self.store, self.hub = settings, home, store, hub
        self.group_factory, self.say = group_factory, say
        self.group = None
        self.kind: str | None = None           # the kind of the runs the current group has held
        self.runs: dict[str, str] = {}         # job id -> run name, in the current group
        self.last: dict[str, dict] = {}        # job id -> its last progress event
        self._written: dict[str, float] = {}   # job id -> when its progress row was last written
        self._calls: collections.deque = collections.deque()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._main, name="ti-fast-worker", daemon=True)

    # ------------------------------------------------------------------ from other threads
    def start(self) -> None:
        self._thread.start()

    def call(self, fn) -> Future:
        """Run fn(model) on the worker between two steps; the Future holds its result."""
        fut: Future = Future()
        if self._stop.is_set() or self.error:
            fut.set_exception(Unavailable(self.error or "the server is shutting down"))
            return fut
        with self._lock:
            self._calls.append((fn, fut))
        self._wake.set()
        return fut

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)
        self._wake.set()

    def poke(self) -> None:
        """A job was queued: look at the queue now rather than at the next idle tick."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> dict:
        g = self.group
        return {"ready": self.ready.is_set() and self.error is None, "error": self.error,
                "group": getattr(g, "id", None), "kind": self.kind, "running": len(self.runs),
                "queued_calls": len(self._calls), "stopping": self._stop.is_set()}

    # ------------------------------------------------------------------ the loop
    def _main(self) -> None:
        try:
            self.group = self.group_factory(J.train_config(self.settings.process, {}), say=self._say)
        except BaseException as e:               # a bad model: the CLI reports it and exits 2
            self.error = one_line(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self._stop.is_set():
                busy = bool(self.runs)
                self._run_calls(1 if busy else None)
                self._apply_cancels()
                self._admit()
                if self.runs and not self._stop.is_set():
                    try:
                        self._step()
                    except Exception as e:             # a bug in the group: its runs fail, a new group serves on
                        self._crash(e)
                        self._new_group(self.kind or "embedding")
                elif not self._calls:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException as e:               # a bug in the loop itself: record it, save the runs
            self._crash(e)
            self.error = self.error or "the worker stopped after an internal error (see the server's log)"
        finally:
            self._drain()

    def _say(self, *parts) -> None:
        self.say(" ".join(str(p) for p in parts))

    def _run_calls(self, limit: int | None) -> None:
        n = 0
        while limit is None or n < limit:
            with self._lock:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            n += 1
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if self.kind == "hypernetwork" and self.runs:
                    raise Conflict("a hypernetwork is training on this model (its hooks are attached): "
                                   "generate when it has finished")
                fut.set_result(fn(self.group.model))
            except BaseException as e:             # the caller sees it (UserError: 4xx, else 500)
                fut.set_exception(e)

    def _apply_cancels(self) -> None:
        with self._lock:
            ids, self._cancel = self._cancel, set()
        for job_id in ids:
            name = self.runs.get(job_id)
            if name is not None:
                self.group.cancel(name)

    def _admit(self) -> None:
        free = self.settings.max_running - len(self.runs)
        if free <= 0 or self._stop.is_set():
            return
        for job in self.store.list(status=("queued",), limit=free):
            if self.runs and (job["kind"] != self.kind or job["kind"] == "hypernetwork"):
                return                             # waits for the group to empty (see the top)
            if not self.store.transition(job["id"], ("queued",), "running", started=job["started"] or time.time()):
                continue                           # cancelled meanwhile
            self._add(job)

    def _new_group(self, kind: str) -> None:
        """After a bug in the group: a fresh one (the model loads again) serves on."""
        self._say("ti-fast serve: a new training group (the model loads again)")
        try:
            self.group.close()
        except Exception:
            pass
        self.runs.clear()
        self.group = None
        self.group = self.group_factory(J.train_config(self.settings.process, {}), say=self._say)
        self.kind = None

    def _add(self, job: dict) -> None:
        cfg = J.train_config(self.settings.process, job["config"], resume=bool(job["resume"]), kind=job["kind"])
        try:
            name = self.group.add(cfg, callback=partial(self._progress, job["id"]), kind=job["kind"])
        except UserError as e:
            done = J.ended_in_state(job)
            if done is not None:
                return self._finish(job["id"], "completed", info={"step": done})
            return self._finish(job["id"], "failed", error=str(e))
        except Exception as e:
            return self._finish(job["id"], "failed", error=self._traceback(e, job))
        self.kind = job["kind"]
        self.runs[job["id"]] = name
        groups = job["groups"] + ([self.group.id] if self.group.id not in job["groups"] else [])
        self.store.update(job["id"], group_id=self.group.id, groups=groups, error=None)
        self.hub.publish(job["id"], {"job": job["id"], "status": "running", "group": self.group.id}, "status")

    def _step(self) -> None:
        self.group.step()
        # a run that left without a terminal callback: its result says how it ended
        active = set(self.group.active)
        for job_id, name in list(self.runs.items()):
            res = self.group.result(name) if name not in active else None
            if res is not None:                    # (None: still joining, or its callback ended it)
                status = getattr(res, "status", None)
                self._finish(job_id, status if status in TERMINAL else "failed", result=res)

    # ------------------------------------------------------------------ progress from the group
    def _progress(self, job_id: str, info: dict):
        """The group's callback (on this thread, during group.step())."""
        status = info.get("status")
        job = self.store.get(job_id)
        if job is None:
            return True
        active = info.get("active_runs") or len(self.group.active)     # the runs of this step
        preview = self._preview_url(job, info.get("preview"))
        if preview is not None and preview == self.last.get(job_id, {}).get("last_preview"):
            preview_new = None                                           # an event names each preview once
        else:
            preview_new = preview
        ev = {"job": job_id, "status": status, "group": info.get("group") or self.group.id, "step": info.get("step"),
              "end_step": info.get("end_step"), "loss": info.get("loss"), "lr": info.get("lr"),
              "epoch": info.get("epoch"), "samples_per_s": info.get("samples_per_s"), "eta_s": info.get("eta_s"),
              "active_runs": active, "preview": preview_new, "error": info.get("error")}
        self.last[job_id] = {**ev, "last_preview": preview or self.last.get(job_id, {}).get("last_preview")}
        peak = max(job["peak_runs"] or 0, int(active or 0))
        if status in TERMINAL:
            self._finish(job_id, status, info=info, result=self.group.result(info.get("name") or self.runs.get(job_id)))
        else:
            fields = {k: ev[k] for k in ("step", "end_step", "loss", "lr") if ev[k] is not None}
            now = time.time()
            if peak != job["peak_runs"] or now - self._written.get(job_id, 0) >= DB_EVERY_S:
                self.store.update(job_id, peak_runs=peak, **fields)
                self._written[job_id] = now
            self.hub.publish(job_id, ev)
        with self._lock:
            return job_id in self._cancel

    def _preview_url(self, job: dict, path) -> str | None:
        if not path:
            return None
        try:
            rel = Path(path).relative_to(job["log_dir"])
        except ValueError:
            return None
        return f"/api/v1/jobs/{job['id']}/files/{rel.as_posix()}"

    def _finish(self, job_id: str, status: str, *, info: dict | None = None, result=None, error: str | None = None):
        job = self.store.get(job_id)
        if job is None or job["status"] in TERMINAL:
            self.runs.pop(job_id, None)
            return
        info = info or {}
        files = _files(job, {**(getattr(result, "files", None) or {}), **(info.get("files") or {})}, result)
        step = info.get("step", getattr(result, "steps", None))
        loss = info.get("loss", getattr(result, "final_loss", None))
        fields = {"finished": time.time(), "files": files, "error": self.home.public(info.get("error") or error)}
        fields.update({k: v for k, v in (("step", step), ("loss", loss), ("end_step", info.get("end_step"))) if v is not None})
        peak = max(job["peak_runs"] or 0, int(info.get("active_runs") or 0))
        self.store.transition(job_id, ("running", "queued"), status, peak_runs=peak, **fields)
        self.runs.pop(job_id, None)
        self._written.pop(job_id, None)
        last = self.last.pop(job_id, {})
        last.pop("last_preview", None)
        ev = {**last, "job": job_id, "status": status, "error": fields["error"],
              "step": fields.get("step"), "files": {k: f"/api/v1/jobs/{job_id}/files/{v}" for k, v in files.items()}}
        self.hub.publish(job_id, ev, "end")

    # ------------------------------------------------------------------ endings
    def _drain(self) -> None:
        """Every running job saves and leaves (interrupted, resumable); queued calls are refused."""
        with self._lock:
            calls, self._calls = list(self._calls), collections.deque()
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(Unavailable("the server is shutting down"))
        if self.group is None:
            return
        try:
            if self.runs:
                self.group.interrupt()
                for _ in range(1000):              # each step lets the runs save and leave
                    if not self.group.step() or not self.group.active:
                        break
                for job_id, name in list(self.runs.items()):
                    res = self.group.result(name)
                    self._finish(job_id, "interrupted", result=res)
        except BaseException as e:
            self._crash(e)
        finally:
            for job_id in list(self.runs):         # whatever is left: resumable at the next start
                self._finish(job_id, "interrupted", error="the server stopped")
            try:
                self.group.close()
            except Exception:
                pass

    def _crash(self, e: BaseException) -> None:
        """A bug outside any one run: its traceback to a file, the running jobs failed (each keeps
        its last save and can be resumed)."""
        msg = self._traceback(e, None)
        self._say(f"ti-fast serve: {msg}")
        for job_id in list(self.runs):
            self._finish(job_id, "failed", error=msg)

    def _traceback(self, e: BaseException, job: dict | None) -> str:
        folder = Path(job["log_dir"]) if job else self.home.dir("logs")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = folder / f"server-traceback-{stamp}.txt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(traceback.format_exception(e)))
            where = f" (traceback in {self.home.relative(path)})"
        except OSError:
            where = ""
        return one_line(f"internal error: {type(e).__name__}: {e}{where}")


def _files(job: dict, files: dict, result) -> dict:
    """Output paths -> the job's file routes: 'out/NAME.pt' for the library files, the rest
    relative to its log folder."""
    out, log = Path(job["out_dir"]), Path(job["log_dir"])
    paths = dict(files)
    for role, attr in (("embedding", "embedding"), ("safetensors", "embedding_safetensors")):
        if getattr(result, attr, None) is not None:
            paths.setdefault(role, getattr(result, attr))
    rel = {}
    for role, p in paths.items():
        p = Path(str(p))
        if not p.is_file():
            continue
        if p.parent == out and p.stem == job["name"]:
            rel[role] = f"out/{p.name}"
        else:
            try:
                rel[role] = p.relative_to(log).as_posix()
            except ValueError:
                continue
    for p in (out / f"{job['name']}.pt", out / f"{job['name']}.safetensors"):
        if p.is_file() and f"out/{p.name}" not in rel.values():
            rel["embedding" if p.suffix == ".pt" else "safetensors"] = f"out/{p.name}"
    return rel
