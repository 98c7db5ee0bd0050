"""Several training runs over ONE loaded model, co-batched: each group step is one forward and
backward over every active run's micro-batches (step.GroupStep), while each run keeps its own
schedule, steps, data, seed and random streams, accumulation, clipping, saves and previews
(run.Run). `train()` is a group of one; `train_many`, `ti-fast train --config` with [[run]] or
[sweep] tables, and `ti-fast serve` drive larger ones.

    group = TrainGroup(process_cfg)       the model loads once (process-wide settings)
    name = group.add(cfg, callback=...)   checked at once; joins at the next step boundary
    while group.step(): ...               one step for every active run
    group.result(name)

Membership changes (a run added, finished, cancelled or failed) take effect at step boundaries;
the step of a new membership is built afresh, so its CUDA graph is captured again (the
baseline the issue names; padding with zero-weight rows instead is unmeasured: no GPU was lent).
A non-finite loss in one run rolls that run back and stops it alone; an error in the shared step
(out of memory, a bug) or an interruption saves every run. Latents are encoded once per distinct
(image, size, resize, flip, VAE, latent mode, seed for --latents once) for all runs (`memo`).
"""
from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager

import torch

from ..errors import ConfigError, NonFiniteLossError, OutOfMemoryError, UserError
from ..fsutil import disk_full_error, is_disk_full
from .config import PROCESS_KEYS, TrainConfig
from .control import RunLock, Stopper
from .model import load_for_training
from .preflight import plan as make_plan
from .run import Run, TrainResult, crashed
from .step import build_step


class TrainGroup:
    """process: a TrainConfig whose process-wide keys (config.PROCESS_KEYS) every run shares."""

    def __init__(self, process: TrainConfig, *, say=None, handle_signals: bool = False):
        self.process = process
        self.say = say or ((lambda *a: None) if process.quiet else _stderr)
        self.tm = load_for_training(process, self.say)
        self.model = self.tm.model
        self.id = uuid.uuid4().hex[:8]
        self.stopper = Stopper(None, None, handle_signals)
        self.runs: list[Run] = []
        self.results: dict[str, TrainResult] = {}
        self.errors: dict[str, BaseException] = {}
        self._pending: list[tuple] = []               # (plan, callback, cancel, t_launch, lock)
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self.memo: dict = {}                          # latent cache shared by the runs
        self._built = None                            # (names, BuiltStep) of the current membership

    # ------------------------------------------------------------------ membership
    def add(self, cfg: TrainConfig, *, callback=None, cancel: threading.Event | None = None,
            kind: str | None = None) -> str:
        """Check a run's settings now (ConfigError, one line) and queue it: it joins at the next
        step boundary. Returns its name. callback(info) at each step boundary (True cancels the
        run) and on its status changes; kind: what the run must train (checked)."""
        different = [k for k in PROCESS_KEYS if getattr(cfg, k) != getattr(self.process, k)]
        if different:
            raise ConfigError(f"run {cfg.name!r}: {', '.join('--' + k.replace('_', '-') for k in different)} "
                              "differs from the group's; process-wide settings are shared by every run")
        plan = make_plan(cfg, warn=self.say)
        if kind is not None and plan.kind != kind:
            raise ConfigError(f"run {plan.name!r} trains a {plan.kind}, not a {kind}")
        return self.add_plan(plan, callback=callback, cancel=cancel)

    def add_plan(self, plan, *, callback=None, cancel=None, t_launch=None, lock: RunLock | None = None) -> str:
        """Queue a planned run (its log folder locked now: a second trainer is refused at once)."""
        with self._lock:
            taken = {r.name for r in self.runs} | {p[0].name for p in self._pending}
            paths = {r.plan.log_dir.resolve() for r in self.runs} | {p[0].log_dir.resolve() for p in self._pending}
            if plan.name in taken or plan.log_dir.resolve() in paths:
                raise ConfigError(f"run {plan.name!r}: another run of this group already writes {plan.pt_path.name} "
                                  f"or {plan.log_dir}")
            kinds = {r.plan.kind for r in self.runs} | {p[0].kind for p in self._pending}
            if kinds and (plan.kind == "hypernetwork" or "hypernetwork" in kinds):
                raise ConfigError(f"run {plan.name!r}: a hypernetwork run trains alone (its modules change the UNet "
                                  "every row sees); train it in a group of its own")
            lock = lock or RunLock.for_plan(plan)
            self._pending.append((plan, callback, cancel, t_launch or time.perf_counter(), lock))
        return plan.name

    def cancel(self, name: str) -> None:
        """The run saves and leaves at the next step boundary (status "cancelled")."""
        with self._lock:
            self._cancel.add(name)

    def interrupt(self) -> None:
        """Every run saves and leaves at the next step boundary (status "interrupted")."""
        self.stopper.reason = "interrupted"

    @property
    def active(self) -> list[str]:
        with self._lock:
            return [r.name for r in self.runs] + [p[0].name for p in self._pending]

    def result(self, name: str) -> TrainResult | None:
        return self.results.get(name)

    # ------------------------------------------------------------------ stepping
    def step(self) -> bool:
        """One step for every active run; False when no run is left."""
        self._start_pending()
        self._stop_requested()
        for run in [r for r in self.runs if r.n >= r.end_step]:   # resumed at its last step: save
            self._end(run, "completed")
        if not self.runs:
            return bool(self._pending)
        runs = list(self.runs)
        for r in runs:
            r.group = {"group": self.id, "active_runs": len(runs)}
        try:
            built = self._step_for(runs)
            loss, finite = built.fn([r.begin_step() for r in runs])
        except BaseException as e:
            self._fail_all(e)
            return False
        for k, run in enumerate(runs):
            try:
                run.after_step(loss[k], finite[k])
            except (NonFiniteLossError, UserError) as e:          # rolled back and saved: this run only
                self._drop(run, error=e, saved=run.ckpt.good)
                continue
            except BaseException as e:
                self._fail_all(e)
                return False
            if run.n >= run.end_step:
                self._end(run, "completed")
        return bool(self.runs or self._pending)

    def run_all(self) -> dict[str, TrainResult]:
        """Step until every run has ended; their results by name."""
        try:
            while self.step():
                pass
        finally:
            self.close()
        return dict(self.results)

    def close(self) -> None:
        """Release the graphs and the signal handlers; runs still active are interrupted (saved)."""
        if self.runs or self._pending:
            self.interrupt()
            self._start_pending()
            self._stop_requested()
        if self._built is not None:
            self._built[1].reset()
            self._built = None
        self.stopper.restore()

    # ------------------------------------------------------------------ internals
    def _start_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for plan, callback, cancel, t_launch, lock in pending:
            try:
                run = Run.start(plan, self.tm, check_every=1 if self.tm.device.type != "cuda" else self.process.check_every,
                                stopper=self.stopper, lock=lock, memo=self.memo, callback=callback, cancel=cancel,
                                t_launch=t_launch, say=self.say)
            except Exception as e:                  # e.g. an embedding of the wrong width: this run fails
                lock.release()
                if is_disk_full(e):
                    e = disk_full_error(getattr(e, "filename", None) or plan.log_dir, e)
                self.errors[plan.name] = e
                self.results[plan.name] = _failed(plan, e)
                if callback is not None:
                    callback({"name": plan.name, "status": "failed", "error": str(e), "step": plan.start_step})
                continue
            self.runs.append(run)

    def _stop_requested(self) -> None:
        """Runs asked to stop (signal, interrupt, cancel, their callback) save and leave."""
        for run in list(self.runs):
            with self._lock:
                cancelled = run.name in self._cancel
                self._cancel.discard(run.name)
            reason = self.stopper.reason or ("cancelled" if cancelled else run.stop_reason())
            if reason:
                self._end(run, reason)

    def _step_for(self, runs: list[Run]):
        """The step of this membership (built again when it changed: its graph is captured anew)."""
        names = tuple(r.name for r in runs)
        if self._built is None or self._built[0] != names:
            if self._built is not None:
                self._built[1].reset()
            graph = self.process.cuda_graph and self.tm.device.type == "cuda" and not self.process.offload
            built = build_step(self.tm.unet, self.model.text_encoder, [r.member for r in runs],
                               clip_skip=self.process.clip_skip, cuda_graph=graph, say=self.say)
            self._built = (names, built)
            for r in runs:
                r.record.update(ran={**self.tm.ran, "cuda_graph": built.graphed, "group": self.id,
                                     "co_batched_with": [n for n in names if n != r.name],
                                     "optimizer": type(r.member.optimizer).__name__})
        return self._built[1]

    def _end(self, run: Run, status: str) -> None:
        try:
            run.finish(status)
        except BaseException as e:
            self._drop(run, error=e)
            return
        self.results[run.name] = run.result()
        self.runs.remove(run)
        run.notify()

    def _drop(self, run: Run, error: BaseException, saved: dict | None = None) -> None:
        run.fail(error, saved)
        self.errors[run.name] = error
        self.results[run.name] = run.result()
        if run in self.runs:
            self.runs.remove(run)
        run.notify()

    def _fail_all(self, e: BaseException) -> None:
        """The shared step failed (or a second Ctrl-C): every run saves its last good state."""
        for run in list(self.runs):
            saved = run.ckpt.save_after_error()
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                err = OutOfMemoryError(
                    f"out of memory at step {run.n + 1} (saved step {saved['step'] if saved else run.n} to "
                    f"{run.plan.pt_path}). Lower --batch-size, add --gradient-checkpointing, --low-vram or "
                    "--offload, or use --precision bf16/fp16.")
                err.__cause__ = e
            elif isinstance(e, (KeyboardInterrupt, UserError)):
                err = e
            elif is_disk_full(e):                 # e.g. settings.json, written between saves
                err = disk_full_error(getattr(e, "filename", None) or run.plan.log_dir, e)
            else:
                err = crashed(e, run.plan, int(saved["step"]) if saved else run.n)
                err.__cause__ = e
            self._drop(run, err, saved)


def _failed(plan, e: BaseException) -> TrainResult:
    files = ({"hypernetwork": plan.pt_path, "embedding": None, "embedding_safetensors": None}
             if plan.kind == "hypernetwork" else {"embedding": plan.pt_path, "embedding_safetensors": plan.st_path})
    return TrainResult(name=plan.name, **files, kind=plan.kind, log_dir=plan.log_dir, steps=plan.start_step,
                       final_loss=None, status="failed", error=str(e))


def _stderr(*a):
    import sys
    print(*a, file=sys.stderr, flush=True)


def train_many(configs: list[TrainConfig], *, cancel: threading.Event | None = None, callback=None,
               handle_signals: bool = False) -> list[TrainResult]:
    """Train several runs together over one model (co-batched). Every run is checked before the
    model loads; the process-wide settings come from the first and must agree. callback(info)
    per run (info["name"]) at each step boundary and on status changes; True cancels that run."""
    if not configs:
        raise ConfigError("no runs to train")
    process = configs[0]
    plans = []
    for cfg in configs:
        different = [k for k in PROCESS_KEYS if getattr(cfg, k) != getattr(process, k)]
        if different:
            raise ConfigError(f"run {cfg.name!r}: {', '.join('--' + k.replace('_', '-') for k in different)} "
                              "differs from the first run's; process-wide settings are shared by every run")
        with naming_run(cfg.name, len(configs) > 1):
            plans.append(make_plan(cfg))
    check_distinct(plans)
    group = TrainGroup(process, handle_signals=handle_signals)
    if any(p.kind == "hypernetwork" for p in plans):
        # a hypernetwork trains alone (its modules change the UNet every row sees): one after
        # another over the one loaded model
        try:
            for p in plans:
                if group.stopper.reason:
                    break
                group.add_plan(p, callback=callback, cancel=cancel)
                while group.step():
                    pass
        finally:
            group.close()
        return [group.results.get(p.name) or _failed(p, KeyboardInterrupt()) for p in plans]
    for p in plans:
        group.add_plan(p, callback=callback, cancel=cancel)
    results = group.run_all()
    return [results[p.name] for p in plans]


@contextmanager
def naming_run(name: str, several: bool = True):
    """A refusal about one of several runs says which run (every ConfigError takes one line)."""
    try:
        yield
    except ConfigError as e:
        if not several or str(e).startswith(f"run {name!r}"):
            raise
        raise type(e)(f"run {name!r}: {e}") from None


def check_distinct(plans) -> None:
    """Two runs of the same name (a group knows its runs by name), or writing the same file
    (NAME.pt, NAME.safetensors or a log folder), are refused."""
    seen: dict = {}
    names: set = set()
    for p in plans:
        for path in (p.pt_path, p.st_path, p.log_dir):
            key = path.resolve()
            if key in seen:
                raise ConfigError(f"runs {seen[key]!r} and {p.name!r} would both write {path}: give each its own "
                                  "name, out or log-dir")
            seen[key] = p.name
        if p.name in names:
            raise ConfigError(f"two runs are named {p.name!r}: give each its own name (a group tells its runs "
                              "apart by name)")
        names.add(p.name)
