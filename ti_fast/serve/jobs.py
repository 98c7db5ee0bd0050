"""Training jobs: a request's settings -> the run's TrainConfig keys; submitting; the public record.

Checked, paths resolved inside HOME; the conflicts between jobs; a job record as the API shows
it.

A job may set any per-run TrainConfig key. Process-wide keys (the model and how it runs) belong
to the server and are refused naming the key; `resume` is the job's own business (POST
.../resume). Paths: `data` names a folder under HOME/datasets, `embedding` a file under
HOME/embeddings, `hypernetwork` one under HOME/hypernetworks, `template` a built-in name or a file
under HOME/templates, `out` a folder under the library (HOME/embeddings or HOME/hypernetworks),
`log_dir` one under HOME/logs (default HOME/logs/JOB-ID), `cache_dir` one under HOME/cache;
absolute paths only inside HOME. A job without a seed gets one drawn now and kept, so that a job
restarted from scratch after a crash trains the same run.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from ..errors import ConfigError
from ..training.config import TrainConfig, check_value, config_class
from .errors import Conflict, HTTPRefusal
from .home import Home
from .settings import PROCESS_KEYS
from .store import ACTIVE

KINDS = ("embedding", "hypernetwork")
LIBRARY = {"embedding": "embeddings", "hypernetwork": "hypernetworks"}
# key -> (HOME sub-folder for relative paths, what must exist there: "file" | "folder" | None)
PATH_KEYS = {"data": ("datasets", "folder"), "embedding": ("embeddings", "file"),
             "hypernetwork": ("hypernetworks", "file"), "log_dir": ("logs", None), "cache_dir": ("cache", None)}


def _fields(kind: str) -> dict:
    return {f.name: f for f in dataclasses.fields(config_class(kind))}


def run_settings(home: Home, kind: str, raw, job_id: str) -> dict:
    """The run's TrainConfig keys from a request's `config` object. HTTPRefusal/ConfigError (400)
    naming the key for a process-wide key, an unknown key, a wrong type or a path outside HOME."""
    if kind not in KINDS:
        raise HTTPRefusal(f"kind {kind!r}: choose embedding or hypernetwork")
    if not isinstance(raw, dict):
        raise HTTPRefusal("config: expected an object of TrainConfig keys, e.g. {\"name\": \"mycat\", \"data\": \"cats\"}")
    out = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k == "quiet":                        # the server's runs are always quiet: it reports them itself
            continue
        if k in PROCESS_KEYS:
            raise HTTPRefusal(f"config: {k} is process-wide (the model loads once with it): set it when starting "
                              f"the server (ti-fast serve --{k.replace('_', '-')} ...), not per job")
        if k == "resume":
            raise HTTPRefusal("config: resume is not a job setting: POST /api/v1/jobs/ID/resume continues a stopped job")
        if value is None:                       # JSON null: the key's default
            continue
        out[k] = check_value(k, value, "config", _fields(kind))
    lib = LIBRARY[kind]
    for key, (sub, must) in PATH_KEYS.items():
        if key in out:
            out[key] = str(home.inside(sub, out[key], key, must_exist=must))
    if "template" in out and not _builtin_template(out["template"]):
        out["template"] = str(home.inside("templates", out["template"], "template", must_exist="file"))
    out["out"] = str(home.inside(lib, out["out"], "out")) if "out" in out else str(home.dir(lib))
    out.setdefault("log_dir", str(home.dir("logs") / job_id))
    if "data" not in out:
        raise HTTPRefusal("config: data is required (the name of an uploaded dataset, see /api/v1/datasets)")
    if out.get("seed") is None:
        out["seed"] = random.SystemRandom().randrange(2**31)
    return out


def _builtin_template(value: str) -> bool:
    from ..training.templates import TEMPLATES
    return value in TEMPLATES


def train_config(process: dict, run: dict, *, resume: bool = False, kind: str = "embedding") -> TrainConfig:
    """The TrainConfig (HypernetworkTrainConfig for a hypernetwork) a run is added to the group
    with (and, with run={}, the group's own): the process-wide keys always the server's, runs
    always quiet."""
    cfg = config_class(kind)(**{**run, **process, "quiet": True})
    if resume:
        cfg.resume, cfg.overwrite = True, False
    return cfg


def check_run(process: dict, run: dict, kind: str) -> str:
    """Every check of the run that needs no model (the trainer's preflight): ConfigError (400).
    Returns the run's name."""
    from ..training.preflight import plan
    return plan(train_config(process, run, kind=kind), warn=lambda *_: None).name


def output_files(run: dict, name: str) -> list[str]:
    out = Path(run["out"])
    return [str(out / f"{name}.pt"), str(out / f"{name}.safetensors")]   # a hypernetwork writes the first


def check_conflicts(store, run: dict, name: str) -> None:
    """Another queued or running job writing the same files or log folder -> Conflict (409)."""
    mine = set(output_files(run, name))
    for job in store.list(status=ACTIVE):
        if job["log_dir"] == run["log_dir"]:
            raise Conflict(f"log_dir {run['log_dir']}: job {job['id']} ({job['status']}) writes there")
        if mine & set(output_files(job["config"], job["name"])):
            raise Conflict(f"job {job['id']} ({job['status']}) already trains {name!r} into {run['out']}: "
                           "cancel it or choose another name or out")


def submit(state, *, kind: str, origin: str, job_id: str, run: dict, request: dict | None = None,
           ignored: list | None = None) -> dict:
    """Check a run (preflight, conflicts, queue length) and queue it; the worker is woken."""
    with state.submit_lock:
        if state.store.count(("queued",)) >= state.settings.max_queued:
            raise Conflict(f"{state.settings.max_queued} jobs are already waiting: try again later")
        name = check_run(state.settings.process, run, kind)
        check_conflicts(state.store, run, name)
        job = state.store.add(job_id=job_id, kind=kind, origin=origin, name=name, config=run, log_dir=run["log_dir"],
                              out_dir=run["out"], request=request, ignored=ignored)
    state.worker.poke()
    return job


def requeue(state, job: dict) -> dict:
    """A stopped job (cancelled, interrupted, failed) queued again, resuming from its save."""
    with state.submit_lock:
        if job["status"] not in ("cancelled", "interrupted", "failed"):
            raise Conflict(f"job {job['id']} is {job['status']}: only a cancelled, interrupted or failed job resumes")
        check_conflicts(state.store, job["config"], job["name"])
        if not state.store.transition(job["id"], ("cancelled", "interrupted", "failed"), "queued",
                                      resume=int(resumable(job)), finished=None, error=None):
            raise Conflict(f"job {job['id']} changed meanwhile: look again")
    state.worker.poke()
    return state.store.get(job["id"])


def ended_in_state(job: dict) -> int | None:
    """The step of a resumed job whose saved state is already at its last step (the previous
    process saved the end of the run and died before recording it: complete, not failed); else None."""
    if not job["resume"] or not resumable(job):
        return None
    from ..training.lr import parse_schedule
    from ..training.outputs import load_state
    cfg = job["config"]
    try:
        fields = _fields(job.get("kind", "embedding"))
        end = parse_schedule(cfg.get("lr", fields["lr"].default), int(cfg.get("steps", fields["steps"].default))).end_step
        step = int(load_state(Path(job["log_dir"]) / "state.pt")["step"])
    except (ConfigError, ValueError, KeyError, TypeError):
        return None
    return step if step >= end else None


def resumable(job: dict) -> bool:
    return (Path(job["log_dir"]) / "state.pt").is_file()


def public(job: dict, home: Home) -> dict:
    """A job as the API shows it: paths relative to HOME, links to its events and files."""
    def rel(v):
        try:
            return home.relative(Path(v)) if isinstance(v, str) and Path(v).is_absolute() else v
        except ValueError:
            return v
    jid = job["id"]
    base = f"/api/v1/jobs/{jid}"
    files = {role: f"{base}/files/{rel_path}" for role, rel_path in (job.get("files") or {}).items()}
    return {"id": jid, "kind": job["kind"], "origin": job["origin"], "name": job["name"], "status": job["status"],
            "step": job["step"], "end_step": job["end_step"], "loss": job["loss"], "lr": job["lr"],
            "error": job["error"], "group": job["group_id"], "groups": job["groups"], "peak_runs": job["peak_runs"],
            "co_batched": job["peak_runs"] > 1, "resume": bool(job["resume"]), "created": job["created"],
            "started": job["started"], "finished": job["finished"],
            "config": {k: rel(v) for k, v in job["config"].items()}, "ignored": job["ignored"], "files": files,
            "links": {"events": f"{base}/events", "files": f"{base}/files", "loss": f"{base}/loss",
                      "previews": f"{base}/previews", "cancel": f"{base}/cancel", "resume": f"{base}/resume"}}


__all__ = ["KINDS", "LIBRARY", "run_settings", "train_config", "check_run", "check_conflicts", "resumable",
           "public", "output_files", "ConfigError"]
