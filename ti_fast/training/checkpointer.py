"""One run's record keeping: the loss log, the last-good snapshot and NaN rollback, the periodic
and final saves, the resumable state.

The device is read once per check (every --check-every steps on CUDA, every step on CPU): the
pending steps' losses and finiteness flags come back in one transfer, are logged, and — when all
are finite — the run's complete state is snapshotted on its device as the last good one. Saves
write, in this order, loss.csv (rows up to the saved step) and loss.png, then LOG/state.pt, then
the trainable's files (NAME.pt, NAME.safetensors), each atomically and inside the stopper's
shield: whatever interrupts a run, the state, the pair and loss.csv agree on the step. A run
killed between two of those writes is put right by `resume`: the state is the source of truth,
the pair is rewritten from it, and loss.csv's rows past its step are dropped — so the log goes
first (rows ahead of the state are harmless, rows missing behind it would be lost).
"""
from __future__ import annotations

import math

import torch

from ..errors import NonFiniteLossError
from ..fsutil import disk_full_error, is_disk_full, remove_run_temps, remove_temps
from .outputs import LossLog, plot_loss, save_state


def _clone(x):
    """A deep copy of a state dict's tensors, on their own device (cheap on a GPU)."""
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x.detach().clone() if torch.is_tensor(x) else x


def _cpu(x):
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x.detach().cpu() if torch.is_tensor(x) else x


class Checkpointer:
    """plan: the run's Plan; trainable, data (TrainingData), optimizer, gen (the step's
    generator), scaler (fp16 or None): the parts whose state is the run's state."""

    def __init__(self, plan, trainable, data, optimizer, gen, scaler, *, stopper, check_every: int, say=print):
        self.plan, self.trainable, self.data = plan, trainable, data
        self.optimizer, self.gen, self.scaler = optimizer, gen, scaler
        self.stopper, self.check_every, self.say = stopper, check_every, say
        self.loss_log = LossLog(plan.log_dir / "loss.csv", resume_step=plan.start_step if plan.state else 0)
        self.pending: list[tuple] = []       # (step, epoch, epoch_step, lr, loss tensor, finite tensor)
        self.last_loss: float | None = None
        self.smooth: float | None = None
        self.good: dict | None = None

    # ------------------------------------------------------------------ state
    def snapshot(self, step: int) -> dict:
        """The run's complete state at `step` (tensors cloned on their device)."""
        return _clone({**self.trainable.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                       **self.data.state_dict(), "seed": self.plan.seed, "gen": self.gen.get_state(),
                       "scaler": self.scaler.state_dict() if self.scaler else None,
                       "name": self.plan.name, "kind": self.trainable.kind})

    def resume(self, state: dict) -> None:
        """Put a resumable state back into the parts, and the output files into agreement with it."""
        self.trainable.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.data.load_state_dict(state)
        self.gen.set_state(state["gen"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if not self.trainable.outputs_agree(state, int(state["step"]), self.plan.out_dir):
            with self.stopper.shield():
                self._guard(lambda: self.trainable.write(state, int(state["step"]), self.plan.out_dir))

    def start(self, step: int) -> None:
        """The run starts at `step`: the first last-good snapshot. Temp files that a killed run
        left beside the files written here are removed (this run holds the log folder's lock)."""
        for path in (self.plan.state_path, self.loss_log.path, self.loss_log.path.with_suffix(".png"),
                     self.plan.log_dir / "settings.json", self.plan.pt_path, self.plan.st_path):
            remove_temps(path)
        for sub in ("embeddings", "hypernetworks", "images", "image_embeddings"):
            remove_run_temps(self.plan.log_dir / sub, self.plan.name)
        self.good = self.snapshot(step)

    # ------------------------------------------------------------------ per step
    def record(self, step: int, lr: float, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.pending.append((step, self.data.epoch, self.data.position, lr, loss, finite))

    def due(self, step: int, end: int) -> bool:
        cfg = self.plan.cfg
        return (len(self.pending) >= self.check_every or step == end
                or (cfg.save_every and step % cfg.save_every == 0)
                or (cfg.preview_every and step % cfg.preview_every == 0))

    def flush(self) -> int | None:
        """One host sync for the pending steps: log them; the step of the first non-finite loss
        or gradient (then nothing after it is logged), else None and a new last-good snapshot."""
        if not self.pending:
            return None
        rows, self.pending = self.pending, []
        vals = torch.stack([p[4] for p in rows]).float().cpu().tolist()
        oks = torch.stack([p[5] for p in rows]).cpu().tolist()
        for (s, ep, es, lr, _, _), v, ok in zip(rows, vals, oks):
            if not ok or not math.isfinite(v):
                return s
            self.loss_log.add(s, ep, es, v, lr)
            self.last_loss = v
            self.smooth = v if self.smooth is None else 0.95 * self.smooth + 0.05 * v
        self.good = self.snapshot(rows[-1][0])
        return None

    def check(self) -> int:
        """Flush; on a non-finite value save the last good state and raise NonFiniteLossError.
        Returns how many steps were logged."""
        n = len(self.pending)
        bad = self.flush()
        if bad is not None:
            self.save(self.good)
            raise NonFiniteLossError(
                f"loss became NaN/inf at step {bad}; restored the {self.trainable.kind} of step "
                f"{self.good['step']} and saved it to {self.plan.pt_path}. Lower the learning rate (--lr) or "
                "use --precision bf16, then --resume.")
        return n

    # ------------------------------------------------------------------ saving
    def save_periodic(self, step: int) -> None:
        """Every --save-every steps: the trainable's periodic copy (LOG/embeddings/NAME-STEP.pt,
        LOG/hypernetworks/NAME-STEP.pt), the state, loss.csv/png."""
        snap = self.good if self.good is not None and self.good["step"] == step else self.snapshot(step)
        with self.stopper.shield():
            self._guard(lambda: self._write_log(step))
            self._guard(lambda: self.trainable.write_periodic(snap, step, self.plan.log_dir))
            self._guard(lambda: save_state(self.plan.state_path, _cpu(snap)))

    def save(self, snap: dict) -> None:
        """The final save (also after an interruption or an error): log, state, output files."""
        step = int(snap["step"])
        with self.stopper.shield():
            self._guard(lambda: self._write_log(step))
            self._guard(lambda: save_state(self.plan.state_path, _cpu(snap)))
            self._guard(lambda: self.trainable.write(snap, step, self.plan.out_dir))

    def save_after_error(self) -> dict | None:
        """After an exception inside a step, or a second Ctrl-C: save the last good state, the
        only one known to be consistent (taken at a step boundary after a check; on the CPU
        every step is checked). Returns the saved snapshot."""
        self.pending = []
        if self.good is not None:
            self.save(self.good)
        return self.good

    def _write_log(self, step: int) -> None:
        self.loss_log.flush(upto=step)
        points = self.loss_log.losses(upto=step)
        if points:
            plot_loss(points, self.plan.log_dir / "loss.png", title=f"{self.plan.name} loss")

    @staticmethod
    def _guard(write) -> None:
        """A full disk (or a file-size limit) stops the run with one line; the previous file is
        intact (atomic writes)."""
        try:
            write()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(getattr(e, "filename", None) or "the output folder", e) from None
            raise
