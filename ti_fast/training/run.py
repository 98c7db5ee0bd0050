"""One run inside a group (ti_fast.training.group): its parts and its own bookkeeping between
steps. A run owns its step counter, schedule, data stream, generator, optimizer, checkpointer,
previews and settings record; the group owns the model and the shared step.

    run = Run.start(plan, tm, ...)      set up: trainable, data (latents), member, checkpointer
    groups = run.begin_step()           lr and clip threshold of this update, the next micro-batches
    run.after_step(loss, finite)        count, log (one host read per check), save, preview, report
    run.finish(status) -> TrainResult   the final save and the result
"""
from __future__ import annotations

import datetime
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import MAX_LEN, RunCrashed, one_line
from ..fsutil import atomic_write_text
from .batches import build_training_data
from .checkpointer import Checkpointer
from .control import RunLock
from .outputs import RunRecord
from .previews import Previewer
from .step import new_member
from .trainable import trainable_for


@dataclass
class TrainResult:
    name: str
    embedding: Path | None          # NAME.pt (A1111 format); None for a hypernetwork
    embedding_safetensors: Path | None   # NAME.safetensors (emb_params); None for a hypernetwork
    log_dir: Path
    steps: int                      # completed optimizer steps (total, including earlier runs)
    final_loss: float | None
    status: str                     # completed | interrupted | cancelled | failed
    wall_time: float = 0.0
    samples_per_s: float = 0.0
    peak_memory_gib: float | None = None
    files: dict = field(default_factory=dict)
    best_loss: float | None = None
    error: str | None = None        # the one line of a failed run
    hypernetwork: Path | None = None     # a hypernetwork run: NAME.pt (A1111 format)
    kind: str = "embedding"


class Run:
    def __init__(self, plan, tm, trainable, data, member, ckpt, preview, record, lock, *, callback, cancel,
                 t_launch, say):
        self.plan, self.tm, self.trainable, self.data, self.member = plan, tm, trainable, data, member
        self.ckpt, self.preview, self.record, self.lock = ckpt, preview, record, lock
        self.callback, self.cancel, self.t_launch, self.say = callback, cancel, t_launch, say
        self.name, self.n, self.status = plan.name, plan.start_step, "running"
        self.samples, self.t0, self.error = 0, None, None
        self.last_preview: Path | None = None
        self.group: dict = {}                 # {"group": id, "active_runs": n}, set by the group
        self.bar = None if plan.cfg.quiet else _bar(plan)
        ckpt.start(self.n)

    @classmethod
    def start(cls, plan, tm, *, check_every: int, stopper, lock: RunLock, memo=None, callback=None, cancel=None,
              t_launch=None, say=print) -> "Run":
        """Set a planned run up on the group's model (its log folder already locked): its
        trainable, data (latents cached, shared with the group's other runs through `memo`),
        optimizer and generator, checkpointer (resuming the state when the plan has one),
        previews, record."""
        try:
            model, cfg = tm.model, plan.cfg
            trainable = trainable_for(plan, model, tm.device)
            data = build_training_data(plan, tm, trainable, say, memo=memo)
            gen = torch.Generator(device=tm.device).manual_seed(plan.seed)
            member = new_member(trainable, optimizer=cfg.optimizer, lr=plan.lr.rate(plan.start_step), generator=gen,
                                clip_grad=(plan.clip[0], plan.clip[1].rate(plan.start_step)) if plan.clip else None,
                                fp16=tm.dtype == torch.float16)
            ckpt = Checkpointer(plan, trainable, data, member.optimizer, gen, member.scaler, stopper=stopper,
                                check_every=check_every, say=say)
            if plan.state is not None:
                ckpt.resume(plan.state)
            record = RunRecord(plan.log_dir / "settings.json", _settings(plan, tm, data, trainable),
                               resumed=plan.state is not None)
            preview = Previewer(model, plan, data.ptok, tm.device, data.first_prompt()) if plan.previews else None
        except BaseException:
            if "trainable" in locals():
                trainable.close()             # a hypernetwork's hooks leave the shared UNet
            lock.release()
            raise
        return cls(plan, tm, trainable, data, member, ckpt, preview, record, lock, callback=callback, cancel=cancel,
                   t_launch=t_launch or time.perf_counter(), say=say)

    # ------------------------------------------------------------------ between steps
    @property
    def end_step(self) -> int:
        return self.plan.end_step

    def stop_reason(self) -> str | None:
        """"cancelled" when the run's Event is set or its callback returns True, else None."""
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.callback is not None and self.callback(self.info()):
            return "cancelled"
        return None

    def begin_step(self):
        """The learning rate (and clip threshold) of the update made at step n; the next group of
        micro-batches."""
        lr = self.plan.lr.rate(self.n)
        for g in self.member.optimizer.param_groups:
            g["lr"] = lr
        clip = self.plan.clip
        if clip and clip[1].rate(self.n) != clip[1].rate(max(self.n - 1, 0)):
            self.member.clip_value.fill_(float(clip[1].rate(self.n)))
        self.lr = lr
        self.t0 = self.t0 or time.perf_counter()
        return self.data.next_group()

    def after_step(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """Count the step; log, save and preview when due (NonFiniteLossError after rolling back)."""
        cfg, ckpt = self.plan.cfg, self.ckpt
        self.n += 1
        self.samples += cfg.batch_size * cfg.grad_accum
        ckpt.record(self.n, self.lr, loss, finite)
        if self.n == self.plan.start_step + 1:
            self._first_step_done()
        if ckpt.due(self.n, self.end_step):
            self._show(ckpt.check())
        if cfg.save_every and self.n % cfg.save_every == 0:
            ckpt.save_periodic(self.n)
        if self.preview is not None and self.n % cfg.preview_every == 0:
            self.last_preview = self.preview(self.n, self.trainable)

    def info(self) -> dict:
        """What a progress callback sees."""
        wall = time.perf_counter() - self.t0 if self.t0 else 0.0
        done = self.n - self.plan.start_step
        rate = self.samples / wall if wall > 0 else 0.0
        eta = wall / done * (self.end_step - self.n) if done else None
        rows = self.ckpt.loss_log.rows
        return {"name": self.name, **self.group, "status": self.status, "step": self.n, "end_step": self.end_step,
                "loss": self.ckpt.last_loss, "lr": float(rows[-1][4]) if rows else None, "epoch": self.data.epoch,
                "samples_per_s": rate, "eta_s": eta, "preview": str(self.last_preview) if self.last_preview else None,
                "error": self.error, "files": {"outputs": [str(p) for p in self.trainable.output_paths(self.plan.out_dir)],
                          "log_dir": str(self.plan.log_dir)}, "kind": self.trainable.kind}

    def notify(self) -> None:
        """Tell the callback about a status change (its answer no longer matters)."""
        if self.callback is not None:
            self.callback(self.info())

    def _first_step_done(self) -> None:
        if self.tm.device.type == "cuda":
            torch.cuda.synchronize(self.tm.device)    # once: time the first step finished, not issued
        values = {"launch_to_first_step_s": round(time.perf_counter() - self.t_launch, 3)}
        if self.plan.cfg.compile:
            values["compile_s"] = round(time.perf_counter() - self.t0, 3)
            self.say(f"ti-fast: torch.compile: the first step (compilation) took {values['compile_s']:.1f} s")
        self.record.update(**values)

    def _show(self, logged: int) -> None:
        """Advance the progress bar by the steps just logged, with their loss and the lr of the
        last one shown."""
        if self.bar is not None and logged:
            lr = self.ckpt.loss_log.rows[-1][4] if self.ckpt.loss_log.rows else ""
            self.bar.set_postfix(loss=f"{self.ckpt.smooth:.4f}", lr=lr, refresh=False)
            self.bar.update(logged)                      # redraws: the postfix must be set first

    # ------------------------------------------------------------------ the end
    def finish(self, status: str) -> None:
        """A clean stop at a step boundary: the last check, the final save."""
        self._show(self.ckpt.check())
        self.ckpt.save(self.ckpt.good)                   # checked: the state at step n
        self.status = status

    def fail(self, error: BaseException, saved: dict | None = None) -> None:
        """The run stopped on an error; what was trained is saved (by the checkpointer)."""
        self.status = "failed" if not isinstance(error, KeyboardInterrupt) else "interrupted"
        self.error = None if isinstance(error, KeyboardInterrupt) else str(error)
        if saved is not None:
            self.n = int(saved["step"])

    def result(self) -> TrainResult:
        if self.bar is not None:
            self.bar.close()
        plan, tm = self.plan, self.tm
        wall = time.perf_counter() - (self.t0 or time.perf_counter())
        peak = torch.cuda.max_memory_allocated(tm.device) / 2**30 if tm.device.type == "cuda" else None
        try:
            self.record.update(wall_time_s=round(wall, 3), status=self.status, steps_done=self.n)
        except OSError as e:                  # a record, not the run's state: say so, lose nothing else
            self.say(f"ti-fast: {self.record.path} not updated ({e.strerror or e})")
        losses = [l for _, l in self.ckpt.loss_log.losses()]
        fields = {"embedding": None, "embedding_safetensors": None, **self.trainable.result_fields(plan.out_dir)}
        res = TrainResult(name=plan.name, **fields, kind=self.trainable.kind,
                          log_dir=plan.log_dir, steps=self.n, final_loss=self.ckpt.last_loss, status=self.status,
                          wall_time=wall, samples_per_s=(self.samples / wall if wall > 0 else 0.0), peak_memory_gib=peak,
                          files={"loss_csv": plan.log_dir / "loss.csv", "loss_png": plan.log_dir / "loss.png",
                                 "settings": plan.log_dir / "settings.json", "state": plan.state_path},
                          best_loss=min(losses) if losses else None, error=self.error)
        mem = f", peak {peak:.2f} GiB" if peak is not None else ""
        loss = self.ckpt.last_loss
        self.say(f"ti-fast: {plan.name}: {self.status} at step {self.n}/{plan.end_step} in {wall:.1f} s "
                 f"({res.samples_per_s:.2f} samples/s{mem}); final loss {loss if loss is None else round(loss, 5)}")
        outs = self.trainable.output_paths(plan.out_dir)
        also = f"  (+ {', '.join(p.name for p in outs[1:])})" if outs[1:] else ""
        self.say(f"  {self.trainable.kind}: {outs[0]}{also}\n  log:       {plan.log_dir}")
        self.trainable.close()                # a hypernetwork's hooks leave the (shared) UNet
        self.lock.release()
        return res


def _bar(plan):
    from tqdm import tqdm
    return tqdm(total=plan.end_step, initial=plan.start_step, desc=plan.name, unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _settings(plan, tm, data, trainable) -> dict:
    model = tm.model
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"), "config": plan.cfg.to_dict(),
            "ran": dict(tm.ran), "seed": plan.seed, "device": str(tm.device), "dtype": str(tm.dtype),
            "model": {"name": model.info.name, "hash": model.info.hash, "path": str(model.info.path),
                      "variant": model.info.variant},
            "images": len(data.items), **trainable.settings(),
            "start_step": plan.start_step, "end_step": plan.end_step, "versions": _versions()}


def crashed(e: BaseException, plan, step: int) -> RunCrashed:
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
