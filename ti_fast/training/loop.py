"""`train(TrainConfig)`: one run, told as a short story — plan, model, what is trained, data,
step, loop, finish — each a part of ti_fast.training:

    preflight.plan      every check that needs no model (nothing heavy is loaded before it passes)
    model.load_for_training   the frozen model with this run's ops, attention and memory options
    trainable           what is trained (an embedding's vectors) and how it is saved and previewed
    batches             images -> cached latents -> the micro-batches of each step
    step.build_step     the step (eager or a CUDA-graph replay), shared with bench/
    checkpointer        loss log, last-good snapshot, NaN rollback, periodic and final saves
    control             signals, cancel, the log folder's lock

Usable as a library: no global state is changed (ops and attention are chosen per model; signal
handlers are restored; the allocator and thread count are the CLI's business), silent with
quiet=True, cancellable through an Event or a callback returning True.
"""
from __future__ import annotations

import datetime
import platform
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import MAX_LEN, NonFiniteLossError, OutOfMemoryError, RunCrashed, UserError, one_line
from ..fsutil import atomic_write_text, disk_full_error, is_disk_full
from .batches import build_training_data
from .checkpointer import Checkpointer
from .config import TrainConfig
from .control import RunLock, Stopper
from .model import load_for_training
from .outputs import RunRecord
from .preflight import plan as make_plan
from .previews import Previewer
from .step import TrainStep, build_step  # noqa: F401  (TrainStep: the class tests patch)
from .trainable import EmbeddingTrainable


@dataclass
class TrainResult:
    name: str
    embedding: Path                 # NAME.pt (A1111 format)
    embedding_safetensors: Path     # NAME.safetensors (emb_params)
    log_dir: Path
    steps: int                      # completed optimizer steps (total, including earlier runs)
    final_loss: float | None
    status: str                     # completed | interrupted | cancelled
    wall_time: float = 0.0
    samples_per_s: float = 0.0
    peak_memory_gib: float | None = None
    files: dict = field(default_factory=dict)


def train(cfg: TrainConfig, *, cancel: threading.Event | None = None, callback=None,
          handle_signals: bool = False) -> TrainResult:
    """Run one training job. Raises ConfigError (bad settings or files, before anything heavy
    loads), NonFiniteLossError / OutOfMemoryError / DiskFullError (after saving what was
    trained), RunCrashed (a bug: saved, traceback written to the log folder)."""
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_launch = time.perf_counter()
    plan = make_plan(cfg, warn=say)                                             # 1. plan
    for note in plan.notes:
        say(note)
    with RunLock(plan.log_dir):
        tm = load_for_training(cfg, say)                                        # 2. model
        model = tm.model
        trainable = EmbeddingTrainable.for_run(plan, model, tm.device)          # 3. what is trained
        data = build_training_data(plan, tm, trainable, say)                    # 4. data
        gen = torch.Generator(device=tm.device).manual_seed(plan.seed)
        graph = cfg.cuda_graph and tm.device.type == "cuda" and not cfg.offload
        step = build_step(tm.unet, model.text_encoder, trainable, optimizer=cfg.optimizer,  # 5. step
                          lr=plan.lr.rate(plan.start_step), generator=gen, clip_skip=cfg.clip_skip,
                          clip_grad=(plan.clip[0], plan.clip[1].rate(plan.start_step)) if plan.clip else None,
                          fp16=tm.dtype == torch.float16, cuda_graph=graph, say=say)
        stopper = Stopper(cancel, callback, handle_signals)
        try:                      # from here on, whatever happens, the signal handlers are put back
            ckpt = Checkpointer(plan, trainable, data, step.optimizer, gen, step.scaler, stopper=stopper,
                                check_every=1 if tm.device.type != "cuda" else cfg.check_every, say=say)
            if plan.state is not None:
                ckpt.resume(plan.state)
            record = RunRecord(plan.log_dir / "settings.json", _settings(plan, tm, step, data, trainable),
                               resumed=plan.state is not None)
            preview = Previewer(model, plan, data.ptok, tm.device, data.first_prompt()) if plan.previews else None
            if tm.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(tm.device)
            run = _Run(plan, step, data, ckpt, stopper, preview, trainable, record, t_launch, say)
            run.loop()                                                          # 6. loop
        finally:
            stopper.restore()
            step.reset()          # the captured graphs' memory pool returns now, not at garbage collection
        return _finish(run, tm, say)                                            # 7. finish


class _Run:
    """The step loop of one run and what it needs between steps."""

    def __init__(self, plan, step, data, ckpt, stopper, preview, trainable, record, t_launch, say):
        self.plan, self.step, self.data, self.ckpt = plan, step, data, ckpt
        self.stopper, self.preview, self.trainable, self.record = stopper, preview, trainable, record
        self.t_launch, self.say = t_launch, say
        self.n = plan.start_step            # completed steps
        self.status = "completed"
        self.samples = 0
        self.t0: float | None = None
        self.bar = None if plan.cfg.quiet else _bar(plan)

    def loop(self) -> None:
        plan, cfg, ckpt = self.plan, self.plan.cfg, self.ckpt
        ckpt.start(self.n)
        try:
            while self.n < plan.end_step:
                if self.stopper.should_stop({"step": self.n, "loss": ckpt.last_loss}):
                    self.status = self.stopper.reason
                    break
                lr = self._set_rates()
                group = self.data.next_group()
                self.t0 = self.t0 or time.perf_counter()
                loss, finite = self.step.fn(group)
                self.n += 1
                self.samples += cfg.batch_size * cfg.grad_accum
                ckpt.record(self.n, lr, loss, finite)
                if self.n == plan.start_step + 1:
                    self._first_step_done()
                if ckpt.due(self.n, plan.end_step):
                    self._show(ckpt.check())
                if cfg.save_every and self.n % cfg.save_every == 0:
                    ckpt.save_periodic(self.n)
                if self.preview is not None and self.n % cfg.preview_every == 0:
                    self.preview(self.n, self.trainable)
            self._show(ckpt.check())
            ckpt.save(ckpt.good)                  # checked: the state at step n
        except (NonFiniteLossError, UserError):
            raise
        except BaseException as e:
            saved = ckpt.save_after_error()       # never lose what was trained
            self.n = saved["step"] if saved else plan.start_step
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
                raise OutOfMemoryError(
                    f"out of memory at step {self.n + 1} (saved step {self.n} to {plan.pt_path}). Lower "
                    "--batch-size, add --gradient-checkpointing, --low-vram or --offload, or use "
                    "--precision bf16/fp16.") from e
            if isinstance(e, KeyboardInterrupt):
                self.status = "interrupted"
                return
            if is_disk_full(e):                   # e.g. settings.json, written between saves
                raise disk_full_error(e.filename or plan.log_dir, e) from None
            raise _crashed(e, plan, self.n) from e

    def _set_rates(self) -> float:
        """The learning rate (and clip threshold) of the update made at step n."""
        lr = self.plan.lr.rate(self.n)
        for g in self.step.optimizer.param_groups:
            g["lr"] = lr
        clip = self.plan.clip
        if clip and clip[1].rate(self.n) != clip[1].rate(max(self.n - 1, 0)):
            self.step.base.set_clip(clip[1].rate(self.n))
        return lr

    def _first_step_done(self) -> None:
        if self.step.base.device.type == "cuda":
            torch.cuda.synchronize(self.step.base.device)   # once: time the first step finished, not issued
        values = {"launch_to_first_step_s": round(time.perf_counter() - self.t_launch, 3)}
        if self.plan.cfg.compile:
            values["compile_s"] = round(time.perf_counter() - self.t0, 3)
            self.say(f"ti-fast: torch.compile: the first step (compilation) took {values['compile_s']:.1f} s")
        self.record.update(**values)

    def _show(self, logged: int) -> None:
        """Advance the progress bar by the steps just logged, with their loss and the lr of the
        last one shown."""
        if self.bar is not None and logged:
            self.bar.update(logged)
            lr = self.ckpt.loss_log.rows[-1][4] if self.ckpt.loss_log.rows else ""
            self.bar.set_postfix(loss=f"{self.ckpt.smooth:.4f}", lr=lr, refresh=False)


def _bar(plan):
    from tqdm import tqdm
    return tqdm(total=plan.end_step, initial=plan.start_step, desc=plan.name, unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _settings(plan, tm, step, data, trainable) -> dict:
    model = tm.model
    ran = {**tm.ran, "cuda_graph": step.graphed, "optimizer": type(step.optimizer).__name__}
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"), "config": plan.cfg.to_dict(),
            "ran": ran, "seed": plan.seed, "device": str(tm.device), "dtype": str(tm.dtype),
            "model": {"name": model.info.name, "hash": model.info.hash, "path": str(model.info.path),
                      "variant": model.info.variant},
            "images": len(data.items), "kind": trainable.kind, "vectors": int(trainable.vectors.shape[0]),
            "start_step": plan.start_step, "end_step": plan.end_step, "versions": _versions()}


def _finish(run: _Run, tm, say) -> TrainResult:
    if run.bar is not None:
        run.bar.close()
    plan = run.plan
    wall = time.perf_counter() - (run.t0 or time.perf_counter())
    peak = torch.cuda.max_memory_allocated(tm.device) / 2**30 if tm.device.type == "cuda" else None
    run.record.update(wall_time_s=round(wall, 3), status=run.status, steps_done=run.n)
    res = TrainResult(name=plan.name, embedding=plan.pt_path, embedding_safetensors=plan.st_path,
                      log_dir=plan.log_dir, steps=run.n, final_loss=run.ckpt.last_loss, status=run.status,
                      wall_time=wall, samples_per_s=(run.samples / wall if wall > 0 else 0.0), peak_memory_gib=peak,
                      files={"loss_csv": plan.log_dir / "loss.csv", "loss_png": plan.log_dir / "loss.png",
                             "settings": plan.log_dir / "settings.json", "state": plan.state_path})
    mem = f", peak {peak:.2f} GiB" if peak is not None else ""
    loss = run.ckpt.last_loss
    say(f"ti-fast: {run.status} at step {run.n}/{plan.end_step} in {wall:.1f} s "
        f"({res.samples_per_s:.2f} samples/s{mem}); final loss {loss if loss is None else round(loss, 5)}")
    say(f"  embedding: {plan.pt_path}  (+ {plan.st_path.name})\n  log:       {plan.log_dir}")
    return res


def _crashed(e: BaseException, plan, step: int) -> RunCrashed:
    """A bug, not a user error: the run was saved; the full traceback goes to a file in the log
    folder and the message is one line pointing at it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = plan.log_dir / f"traceback-{stamp}.txt"
    try:
        atomic_write_text(path, "".join(traceback.format_exception(e)))
    except OSError:
        path = None
    where = f"; full traceback in {path}" if path else ""
    head, tail = f"internal error at step {step}: ", f" (the run was saved at step {step}{where}; please report it)"
    # the error's own text is cut to fit the line, never the path after it
    what = one_line(f"{type(e).__name__}: {e}", max(80, MAX_LEN - len(head) - len(tail)))
    return RunCrashed(head + what + tail, traceback_path=path)


def _versions():
    import transformers
    return {"ti_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}
