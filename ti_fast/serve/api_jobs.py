"""Native API, the training half (/api/v1/jobs): jobs, their progress as Server-Sent Events, their files.

Submit, list, get, cancel, resume and delete jobs; each job's events, files, loss curve and
previews."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from . import jobs as J
from .errors import Conflict, NotFound
from .events import sse
from .store import TERMINAL

KEEPALIVE_S = 15.0
_PREVIEW = re.compile(r"^(?P<name>.+)-(?P<step>\d+)\.png$")


class JobRequest(BaseModel):
    kind: str = Field("embedding", description="embedding | hypernetwork")
    config: dict[str, Any] = Field(description="per-run TrainConfig keys (the `ti-fast train` flags with '_'), "
                                               "e.g. {\"name\": \"mycat\", \"data\": \"cats\", \"steps\": 2000}")


def router(state) -> APIRouter:
    r = APIRouter(prefix="/api/v1/jobs")
    home, store = state.home, state.store

    def get(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r}: no such job")
        return job

    def shown(job: dict) -> dict:
        """The public record, with a running job's step, loss and lr as of its last event (the
        database row is written at most once a second)."""
        if job["status"] == "running":
            ev = state.worker.last.get(job["id"], {})
            job = {**job, **{k: ev[k] for k in ("step", "end_step", "loss", "lr") if ev.get(k) is not None}}
        return J.public(job, home)

    @r.post("", status_code=201, summary="Submit a training job (joins the group at its next step, or queues)")
    def submit(body: JobRequest):
        job_id = store.new_id()
        run = J.run_settings(home, body.kind, body.config, job_id)
        job = J.submit(state, kind=body.kind, origin="api", job_id=job_id, run=run, request=body.model_dump())
        return J.public(job, home)

    @r.get("", summary="All jobs, oldest first (status=queued,running to filter)")
    def list_jobs(status: str | None = None, limit: int = 1000):
        wanted = tuple(s for s in (status or "").split(",") if s) or None
        return [shown(j) for j in store.list(status=wanted, limit=limit)]

    @r.get("/{job_id}", summary="One job")
    def one(job_id: str):
        return shown(get(job_id))

    @r.post("/{job_id}/cancel", summary="Cancel: a queued job is dropped, a running one saves and leaves at the next step")
    def cancel(job_id: str):
        job = get(job_id)
        if store.transition(job_id, ("queued",), "cancelled"):
            state.hub.publish(job_id, {"job": job_id, "status": "cancelled", "step": job["step"]}, "end")
        elif job["status"] == "running":
            state.worker.cancel(job_id)
        elif job["status"] in TERMINAL:
            raise Conflict(f"job {job_id} already {job['status']}")
        return J.public(get(job_id), home)

    @r.post("/{job_id}/resume", summary="Queue a cancelled, interrupted or failed job again (from its last save)")
    def resume(job_id: str):
        return J.public(J.requeue(state, get(job_id)), home)

    @r.delete("/{job_id}", summary="Forget a finished job (its files stay)")
    def delete(job_id: str):
        job = get(job_id)
        if not store.delete(job_id):
            raise Conflict(f"job {job_id} is {job['status']}: cancel it first")
        return {"deleted": job_id}

    @r.get("/{job_id}/events", summary="Progress as Server-Sent Events: step, loss, lr, ETA, preview URLs")
    async def events(job_id: str, request: Request):
        get(job_id)
        try:
            after = int(request.headers.get("last-event-id") or 0)
        except ValueError:
            after = 0
        return StreamingResponse(_stream(state, job_id, after, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @r.get("/{job_id}/files", summary="The job's files: outputs (out/...) and its log folder")
    def files(job_id: str):
        job = get(job_id)
        base = f"/api/v1/jobs/{job_id}/files"
        out, log = Path(job["out_dir"]), Path(job["log_dir"])
        listed = [(f"out/{p.name}", p) for p in (out / f"{job['name']}.pt", out / f"{job['name']}.safetensors")
                  if p.is_file() and not p.is_symlink()]
        if log.is_dir() and not log.is_symlink():
            listed += [(p.relative_to(log).as_posix(), p) for p in sorted(log.rglob("*"))
                       if p.is_file() and not p.is_symlink() and not p.name.startswith(".")]
        return [{"path": rel, "size": p.stat().st_size, "url": f"{base}/{rel}"} for rel, p in listed]

    @r.get("/{job_id}/files/{path:path}", summary="Download one of the job's files")
    def file(job_id: str, path: str):
        job = get(job_id)
        if path.startswith("out/"):
            rest = path[4:]
            p = home.below(Path(job["out_dir"]), rest, "path", must_exist="file")
            if "/" in rest or p.stem != job["name"]:
                raise NotFound(f"{path}: not one of this job's outputs")
        else:
            p = home.below(Path(job["log_dir"]), path, "path", must_exist="file")
            if p.name.startswith("."):
                raise NotFound(f"{path}: not one of this job's files")
        inline = p.suffix.lower() in (".png", ".jpg", ".webp", ".csv", ".json")
        return FileResponse(p, filename=p.name, content_disposition_type="inline" if inline else "attachment")

    @r.get("/{job_id}/loss", summary="The loss curve: loss.csv's rows, then the steps logged since its last save")
    def loss(job_id: str):
        job = get(job_id)
        rows = _csv_rows(Path(job["log_dir"]) / "loss.csv")
        last = rows[-1][0] if rows else -1
        for _, event, d in state.hub.since(job_id, 0):
            if event == "progress" and d.get("step") is not None and d["step"] > last and d.get("loss") is not None:
                rows.append([d["step"], d.get("epoch"), None, d["loss"], d.get("lr")])
                last = d["step"]
        return {"columns": ["step", "epoch", "epoch_step", "loss", "lr"], "rows": rows}

    @r.get("/{job_id}/previews", summary="Preview images written so far, in step order")
    def previews(job_id: str):
        job = get(job_id)
        folder = Path(job["log_dir"]) / "images"
        found = []
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.glob("*.png"):
                m = _PREVIEW.match(p.name)
                if m and not p.is_symlink():
                    found.append({"step": int(m["step"]), "url": f"/api/v1/jobs/{job_id}/files/images/{p.name}"})
        return sorted(found, key=lambda d: d["step"])

    return r


def _csv_rows(path: Path) -> list[list]:
    if not path.is_file() or path.is_symlink():
        return []
    rows = []
    for row in list(csv.reader(io.StringIO(path.read_text(encoding="utf-8", errors="replace"))))[1:]:
        try:
            rows.append([int(row[0]), int(row[1]), int(row[2]), float(row[3]), float(row[4])])
        except (ValueError, IndexError):
            continue
    return rows


async def _stream(state, job_id: str, after: int, request: Request):
    """A job's SSE stream: its record first (event `job`), then its events as they come, ending
    with event `end` (the job finished, or the server is stopping); `: keep-alive` comments while
    nothing happens."""
    hub = state.hub
    waiter = hub.waiter(job_id)
    try:
        job = state.store.get(job_id)
        yield sse("job", J.public(job, state.home), None)
        if not after and job["status"] not in TERMINAL:
            # a resumed job: a fresh stream starts after its earlier run's `end` (which would end it at once)
            after = max((seq for seq, event, _ in hub.since(job_id, 0) if event == "end"), default=0)
        if job["status"] in TERMINAL and not hub.since(job_id, after):
            yield sse("end", {"job": job_id, "status": job["status"], "step": job["step"], "error": job["error"]})
            return
        while True:
            for seq, event, data in hub.since(job_id, after):
                after = seq
                yield sse(event, data, seq)
                if event == "end":
                    return
            if hub.closed:
                yield sse("end", {"job": job_id, "status": "server stopping", "error": None})
                return
            job = state.store.get(job_id)
            if job is None or (job["status"] in TERMINAL and not hub.since(job_id, after)):
                yield sse("end", {"job": job_id, "status": job["status"] if job else "deleted",
                                  "step": job and job["step"], "error": job and job["error"]})
                return
            if not await waiter.wait(KEEPALIVE_S):
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
    finally:
        waiter.close()
