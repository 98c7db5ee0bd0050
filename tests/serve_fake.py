"""A stand-in for ti_fast.training.group.TrainGroup (the co-batching group of issue 14) until it
lands on main: the same interface, each run being ti_fast.train() in its own thread, held at
every step boundary by its callback so that `step()` advances every active run by exactly one
step. Used by the server tests only when the real group is missing (serve_helpers.group_factory)."""
from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

from ti_fast.errors import ConfigError, UserError, one_line
from ti_fast.serve.settings import PROCESS_KEYS


class _Run:
    def __init__(self, group, cfg, callback, plan):
        self.group, self.cfg, self.callback = group, cfg, callback
        self.name, self.end_step, self.step = plan.name, plan.end_step, plan.start_step
        self.start_step = plan.start_step
        self.log_dir = plan.log_dir
        self.loss = None
        self.status = "queued"
        self.stop: str | None = None          # "cancelled" | "interrupted"
        self.result = None
        self.error = None
        self.go, self.back = threading.Semaphore(0), threading.Semaphore(0)
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.t0 = None

    def _main(self):
        from ti_fast.training.loop import train
        try:
            self.result = train(self.cfg, callback=self._boundary)
            self.status = "interrupted" if self.stop == "interrupted" else self.result.status
        except UserError as e:
            self.status, self.error = "failed", str(e)
        except BaseException as e:             # a bug: failed with one line
            self.status, self.error = "failed", one_line(f"{type(e).__name__}: {e}")
        finally:
            self.back.release()

    def _boundary(self, info):
        """train()'s callback, before each step: report, then wait for the group's next step."""
        self.step, self.loss = info["step"], info["loss"]
        self.back.release()
        self.go.acquire()
        return self.stop is not None

    def advance(self) -> None:
        """One step (the first call also starts the run and lets it reach its first boundary)."""
        if self.status == "queued":
            self.status, self.t0 = "running", time.perf_counter()
            self.thread.start()
            self.back.acquire()
            if self.status != "running":
                return
        self.go.release()
        self.back.acquire()

    def info(self) -> dict:
        if self.result is not None:
            self.step, self.loss = self.result.steps, self.result.final_loss
        step = self.step
        preview = self.log_dir / "images" / f"{self.name}-{step}.png"
        done = step - self.start_step
        el = time.perf_counter() - self.t0 if self.t0 else 0
        files = {}
        if self.result is not None:
            files = {k: str(v) for k, v in self.result.files.items()}
            files.update(embedding=str(self.result.embedding), embedding_safetensors=str(self.result.embedding_safetensors))
        return {"name": self.name, "group": self.group.id, "status": self.status, "step": step,
                "end_step": self.end_step, "loss": self.loss, "lr": None, "epoch": None,
                "samples_per_s": None, "eta_s": (el / max(done, 1)) * (self.end_step - step) if el else None,
                "active_runs": len(self.group.active) or 1, "preview": str(preview) if preview.is_file() else None,
                "error": self.error, "files": files}


class FakeGroup:
    def __init__(self, process_cfg, *, say=print):
        from ti_fast.devices import resolve_device, resolve_precision
        from ti_fast.loading import load_model
        dev = resolve_device(process_cfg.device)
        self.process = process_cfg
        self.model = load_model(process_cfg.model, device=dev, dtype=resolve_precision(process_cfg.precision, dev),
                                vae=process_cfg.vae, tokenizer=process_cfg.tokenizer)
        self.id = "fake-" + secrets.token_hex(4)
        self._runs: dict[str, _Run] = {}
        self._kind = None

    def add(self, cfg, *, callback=None, kind="embedding") -> str:
        from ti_fast.training.preflight import plan
        for k in PROCESS_KEYS:
            if getattr(cfg, k) != getattr(self.process, k):
                raise ConfigError(f"{k} is process-wide: this group runs with {getattr(self.process, k)!r}")
        if self.active and kind != self._kind:
            raise ConfigError(f"a {kind} run cannot join a group of {self._kind} runs")
        if kind != "embedding":
            raise ConfigError("the stand-in group trains embeddings only")
        p = plan(cfg, warn=lambda *_: None)
        if p.name in self.active:
            raise ConfigError(f"a run named {p.name!r} is in the group already")
        self._kind = kind
        run = _Run(self, cfg, callback, p)
        self._runs[p.name] = run
        self._tell(run)
        return p.name

    @property
    def active(self) -> list[str]:
        return [n for n, r in self._runs.items() if r.status in ("queued", "running")]

    def step(self) -> bool:
        for name in self.active:
            run = self._runs[name]
            run.advance()
            self._tell(run)
        return bool(self.active)

    def _tell(self, run) -> None:
        if run.callback is not None and run.callback(run.info()):
            run.stop = run.stop or "cancelled"

    def cancel(self, name: str) -> None:
        self._runs[name].stop = "cancelled"

    def interrupt(self) -> None:
        for name in self.active:
            self._runs[name].stop = "interrupted"

    def result(self, name: str):
        r = self._runs.get(name)
        return r.result if r is not None and r.status not in ("queued", "running") else None

    def close(self) -> None:
        self.interrupt()
        while self.step():
            pass

