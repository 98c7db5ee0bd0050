"""--cuda-graph: capture the static training step in a CUDA graph and replay it.

Why: at batch 1 the SD1.5 step is launch-bound — about two thousand kernels for forward and
backward, each a few microseconds of host work, against 2.2 ms of arithmetic (performance.md:
70 ms eager, 21 ms as one graph). A replay launches all of them with one call.

What is captured: the step's `__call__` itself (step.py: one run's TrainStep, or a GroupStep of
co-batched runs), the whole gradient-accumulation group — every micro-batch's noise/t draw,
forward and backward, the finiteness flags, gradient clipping and the AdamW updates — as ONE
graph per bucket key (the shapes, dtypes and present fields of every member's micro-batches; a
group whose membership changes is a new GroupStep, captured afresh). One replay per optimizer step is the fewest launches possible, and reusing the
real step means the graph computes what the eager trainer computes by construction. The cost is
one graph per distinct group shape; aspect buckets x grad_accum can multiply them, so at most
`max_graphs` are captured (all share one memory pool) and any further shape runs eagerly.

Graph rules this module keeps (torch.cuda "CUDA Graphs" notes):
- static inputs: each captured group reads its own device buffers; a call copies the new
  micro-batches into them (copy_) before the replay.
- RNG: ε and t come from each run's own CUDA generator, each registered with the graph
  (CUDAGraph.register_generator_state, torch >= 2.5). A replay advances that generator by the
  same philox offsets as the eager step, so a graphed and an eager step from the same state draw
  the same numbers, and the generator's get_state/set_state (resume) stay meaningful.
- gradient: the step sets each parameter's grad = None at its start; inside the capture that is a Python
  act, so the first backward writes the gradient into a graph-pool buffer at a fixed address
  (the torch docs' whole-network pattern) and later micro-batches accumulate into it in place.
- optimizer: torch AdamW/Adam with capturable=True (step counter on the device) and the learning
  rate held in a 0-d device tensor during capture; before each replay the float lr that the
  trainer wrote into param_groups is copied into that tensor (only when it changed).
- outputs: the captured loss and finite flag are static tensors; each call returns clones, since
  the trainer keeps several steps' results before reading them.
- warm-up runs on a side stream before capture (lazy init, cuBLAS/Triton autotuning, AdamW state
  creation). It really trains, so the parameters, the optimizer state and the generator state are
  snapshotted before and restored, in place, after the capture.
Not capturable, so refused (maybe_graphed falls back to eager with one line): fp16 loss scaling
(the skip decision reads the device), bitsandbytes AdamW8bit, any other optimizer, CPU tensors.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch

from .step import GroupStep, MicroBatch

FIELDS = tuple(f.name for f in fields(MicroBatch))   # latents, input_ids, vector_index, latent_std, weight, c_concat, token_weight
CAPTURABLE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)


class GraphUnavailable(RuntimeError):
    """The step cannot be captured; the message says why."""


def ineligible_reason(step: GroupStep) -> str | None:
    """None when `step` (a GroupStep or a one-run TrainStep) can be captured, else a short reason
    (for one printed line)."""
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device and this torch sees none"
    if step.device.type != "cuda":
        return f"the step runs on {step.device}, CUDA graphs need a CUDA device"
    if any(getattr(g, "device", torch.device("cpu")).type != "cuda" for g in step.generators):
        return "the step's generator is not a CUDA generator"
    if step.scalers:
        return "fp16 loss scaling decides each step on the host; use --precision bf16 to graph the step"
    for opt in step.optimizers:
        if type(opt) not in CAPTURABLE_OPTIMIZERS:
            return f"optimizer {type(opt).__name__} is not capturable (only torch AdamW/Adam)"
        if any(g.get("differentiable") for g in opt.param_groups):
            return "a differentiable optimizer cannot be captured"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register a generator with a graph (needs torch >= 2.5)"
    return None


def maybe_graphed(step: GroupStep, say=print, **kwargs):
    """GraphedStep(step) when the step can be captured; otherwise the step itself and one line."""
    reason = ineligible_reason(step)
    if reason is not None:
        say(f"ti-fast: --cuda-graph off ({reason}); running the step eagerly")
        return step
    return GraphedStep(step, **kwargs)


# ------------------------------------------------------------------ static input buffers

def batch_key(micro_batches) -> tuple:
    """What a captured graph is specialised to: per micro-batch and field, (shape, dtype, device)
    or None for an absent field — for a list of micro-batches (one run) or a list of such lists
    (a group's members). Equal keys can share a graph."""
    if isinstance(micro_batches, MicroBatch):
        return tuple(None if (t := getattr(micro_batches, f)) is None else (tuple(t.shape), t.dtype, t.device)
                     for f in FIELDS)
    return tuple(batch_key(x) for x in micro_batches)


def _buffers(template):
    """Empty device buffers shaped like `template` (a MicroBatch or nested lists of them)."""
    if isinstance(template, MicroBatch):
        return MicroBatch(**{f: None if (t := getattr(template, f)) is None
                             else torch.empty(t.shape, dtype=t.dtype, device=t.device) for f in FIELDS})
    return [_buffers(x) for x in template]


def _copy(dst, src) -> None:
    if isinstance(src, MicroBatch):
        for f in FIELDS:
            t = getattr(src, f)
            if t is not None:
                getattr(dst, f).copy_(t, non_blocking=True)
        return
    for d, s in zip(dst, src):
        _copy(d, s)


class StaticBatches:
    """Device buffers at fixed addresses for one step's micro-batches (a run's list, or a group's
    list of lists): the graph reads these, `copy_from` writes new micro-batches into them.
    Buffers are contiguous even when the source is an expanded view (the trainer's inpainting
    c_concat is [1,5,h,w] expanded to [B,5,h,w])."""

    def __init__(self, template):
        self.key = batch_key(template)
        self.mbs = _buffers(template)

    def copy_from(self, micro_batches) -> None:
        if batch_key(micro_batches) != self.key:
            raise ValueError("micro-batches do not match this graph's shapes/dtypes/fields")
        _copy(self.mbs, micro_batches)


# ------------------------------------------------------------------ optimizer/parameters/RNG snapshot

@dataclass
class Snapshot:
    """Everything the warm-up changes: the trained parameters, optimizer state tensors, generator
    state."""
    params: list                     # clones of the parameters, in order
    state: dict                      # param -> {name: tensor clone} for state that existed before
    gen_state: list                  # each generator's state, in order


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def take_snapshot(params, optimizers, generators=None) -> Snapshot:
    """params: one tensor (an embedding's vectors) or a list of the trained parameters;
    optimizers, generators: one or a list (a group's members)."""
    state = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
             for opt in _as_list(optimizers) for p, st in opt.state.items()}
    gens = [] if generators is None else _as_list(generators)
    return Snapshot([p.detach().clone() for p in _as_list(params)], state, [g.get_state() for g in gens])


def restore_snapshot(snap: Snapshot, params, optimizers, generators=None) -> None:
    """Put the snapshot back IN PLACE (a captured graph holds these tensors' addresses). State
    that the warm-up created (AdamW's first step: step, exp_avg, exp_avg_sq) is zeroed, which is
    exactly a fresh AdamW state."""
    with torch.no_grad():
        for p, saved in zip(_as_list(params), snap.params):
            p.copy_(saved)
        for opt in _as_list(optimizers):
            for p, st in opt.state.items():
                before = snap.state.get(p, {})
                for k, v in st.items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if k in before else v.zero_()
    for g, state in zip([] if generators is None else _as_list(generators), snap.gen_state):
        g.set_state(state)


def state_steps_to(optimizer, device) -> None:
    """capturable AdamW keeps its step counter on the parameter's device; state loaded from a
    non-capturable run (resume) has it as a CPU tensor."""
    for st in optimizer.state.values():
        s = st.get("step")
        if torch.is_tensor(s) and s.device != device:
            st["step"] = s.to(device=device, dtype=torch.float32)


class LrTensors:
    """One 0-d device tensor per param group (of one optimizer, or of every member's): what the
    captured AdamW reads as its lr. The trainer keeps writing floats into param_groups[i]['lr'];
    `sync` copies a changed value over (one tiny fill kernel, no host sync)."""

    def __init__(self, optimizers, device):
        self.groups = [g for opt in _as_list(optimizers) for g in opt.param_groups]
        self.tensors = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in self.groups]
        self.host = [float(g["lr"]) for g in self.groups]

    def sync(self) -> None:
        for i, g in enumerate(self.groups):
            v = float(g["lr"])
            if v != self.host[i]:
                self.tensors[i].fill_(v)
                self.host[i] = v

    def swap_in(self) -> list:
        """For warm-up and capture: param_groups read the tensors (and capturable=True).
        Returns what to hand back to swap_out."""
        self.sync()
        old = [(g["lr"], g.get("capturable", False)) for g in self.groups]
        for g, t in zip(self.groups, self.tensors):
            g["lr"], g["capturable"] = t, True
        return old

    def swap_out(self, old: list) -> None:
        for g, (lr, cap) in zip(self.groups, old):
            g["lr"], g["capturable"] = lr, cap


# ------------------------------------------------------------------ the graphed step

@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    static: StaticBatches
    loss: torch.Tensor               # [] fp32 ([K] for a group), written by every replay
    finite: torch.Tensor             # [] bool ([K])


class GraphedStep:
    """Same contract as the step it wraps (TrainStep or GroupStep): micro-batches -> (mean loss,
    finite) device tensors. The caller sets the learning rates in the optimizers' param_groups as
    for the eager step.

    step:        the step to capture (bf16/fp32 models, torch AdamW/Adam, CUDA generators)
    warmup:      eager runs on a side stream before the first capture of each key
    max_graphs:  captured keys at most; further keys run eagerly (one printed line)
    """

    def __init__(self, step: GroupStep, *, warmup: int = 3, max_graphs: int = 8, say=print):
        reason = ineligible_reason(step)
        if reason is not None:
            raise GraphUnavailable(f"cannot capture the training step in a CUDA graph: {reason}")
        self.step, self.warmup, self.max_graphs, self.say = step, warmup, max_graphs, say
        self.device = step.device
        self.lr = LrTensors(step.optimizers, self.device)
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()   # shared: replays never overlap
        self._warned = False

    def __call__(self, micro_batches):
        key = batch_key(micro_batches)
        cap = self.graphs.get(key)
        if cap is None:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(micro_batches)
            cap = self._capture(micro_batches, key)
        self.lr.sync()
        cap.static.copy_from(micro_batches)
        cap.graph.replay()
        return cap.loss.clone(), cap.finite.clone()

    def _eager(self, micro_batches):
        if not self._warned:
            self.say(f"ti-fast: {len(self.graphs)} CUDA graphs captured (the limit); "
                     "other batch shapes run eagerly")
            self._warned = True
        old = self.lr.swap_in()          # the same capturable AdamW math as the replays, no host sync
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                return self.step(micro_batches)
        finally:
            self.lr.swap_out(old)

    def _capture(self, micro_batches, key) -> _Captured:
        step, opts = self.step, self.step.optimizers
        static = StaticBatches(micro_batches)
        static.copy_from(micro_batches)
        for opt in opts:
            state_steps_to(opt, self.device)
        snap = take_snapshot(step.params, opts, step.generators)
        old = self.lr.swap_in()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                # AdamW warns that capturable=True runs uncaptured: true, and only here
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                for _ in range(max(1, self.warmup)):
                    step(static.mbs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            for gen in step.generators:
                graph.register_generator_state(gen)
            # thread_local: a helper thread (progress bar, prefetch) cannot break the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss, finite = step(static.mbs)
        finally:
            self.lr.swap_out(old)
            # capture recorded kernels without running them: undo what the warm-up trained
            # (also when the capture failed, so that an eager retry starts from the same state)
            restore_snapshot(snap, step.params, opts, step.generators)
        cap = _Captured(graph, static, loss, finite)
        self.graphs[key] = cap
        return cap

    def reset(self) -> None:
        """Drop every captured graph (frees their pool once nothing else holds it)."""
        for cap in self.graphs.values():
            cap.graph.reset()
        self.graphs.clear()
