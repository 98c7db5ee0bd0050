"""`train(TrainConfig)`: one run, told as a short story — plan, model, what is trained, data,
step, loop, finish — each a part of ti_fast.training:

    preflight.plan      every check that needs no model (nothing heavy is loaded before it passes)
    model.load_for_training   the frozen model with this run's ops, attention and memory options
    trainable           what is trained (an embedding's vectors) and how it is saved and previewed
    batches             images -> cached latents -> the micro-batches of each step
    step.build_step     the step (eager or a CUDA-graph replay), shared with bench/
    checkpointer        loss log, last-good snapshot, NaN rollback, periodic and final saves
    control             signals, cancel, the log folder's lock
    run, group          one run's bookkeeping; the group that steps runs together (train() is a
                        group of one, so a run alone and a run co-batched follow the same code)

Usable as a library: no global state is changed (ops and attention are chosen per model; signal
handlers are restored; the allocator and thread count are the CLI's business), silent with
quiet=True, cancellable through an Event or a callback returning True.
"""
from __future__ import annotations

import sys
import threading
import time

from .config import TrainConfig
from .control import RunLock
from .group import TrainGroup
from .preflight import plan as make_plan
from .run import TrainResult  # noqa: F401  (the public name: ti_fast.TrainResult)
from .step import GroupStep, TrainStep  # noqa: F401  (the step classes tests patch)


def train(cfg: TrainConfig, *, cancel: threading.Event | None = None, callback=None,
          handle_signals: bool = False) -> TrainResult:
    """Run one training job. Raises ConfigError (bad settings or files, before anything heavy
    loads), NonFiniteLossError / OutOfMemoryError / DiskFullError (after saving what was
    trained), RunCrashed (a bug: saved, traceback written to the log folder)."""
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_launch = time.perf_counter()
    plan = make_plan(cfg, warn=say)                         # 1. plan: every check, nothing loaded
    for note in plan.notes:
        say(note)
    lock = RunLock.for_plan(plan)                           # a second trainer is refused now
    try:
        group = TrainGroup(cfg, say=say, handle_signals=handle_signals)   # 2. model
    except BaseException:
        lock.release()
        raise
    # 3.-7. what is trained, data, step, loop, finish: the run's parts (run.py) in a group of one
    group.add_plan(plan, callback=callback, cancel=cancel, t_launch=t_launch, lock=lock)
    result = group.run_all()[plan.name]
    error = group.errors.get(plan.name)
    if error is not None and not isinstance(error, KeyboardInterrupt):
        raise error
    return result
