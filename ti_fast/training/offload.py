"""--offload: stream the UNet's blocks from pinned host memory, for cards where the weights
themselves do not fit (SD1.5's UNet is 1.72 GB in bf16; a 2 GiB card can hold the text encoder,
the activations and two blocks at a time, not the whole UNet).

Layout. The 24 big blocks (input_blocks.1-11, middle_block, output_blocks.0-11; 2-194 MB each
for SD1.5 in bf16) keep their parameters in ONE pinned host buffer per dtype, each block a
contiguous slice, so bringing a block over is one async host-to-device copy. The small pieces
(time_embed, conv_in = input_blocks.0, out: 2.1 M parameters) live on the device.

Forward. Every child of a streamed block carries a forward pre-hook; the first to run "enters"
the block: it waits for the block's copy (or issues it if it was not prefetched), points the
parameters (`.data`) at views of the device buffer, and issues the copies of the next
`prefetch` blocks in the current direction. The last child's forward hook "leaves" the block:
the parameters point back at their host slices and the device buffer is dropped; the caching
allocator recycles it in stream order, after the kernels already queued on it.

Backward. The input gradient of a frozen conv/linear needs its weight again, and a weight saved
by autograd would keep its buffer alive from forward to backward. So every streamed block is
gradient-checkpointed (non-reentrant): forward saves only the block's inputs, and backward
recomputes the block, through the same child hooks that reload its weights, right before the
block's backward. At the end of a forward that will be differentiated the UNet's own forward
hook flips the direction and prefetches the LAST block, so backward streams output_blocks.11
... input_blocks.1, each copy overlapping the previous block's recompute and backward. Per
training step every block crosses the bus twice (2 x 1.72 GB for SD1.5).

Streams and events (CUDA). A device buffer is allocated on the compute (current) stream, so it
is recycled in that stream's order. The copy stream first waits for the compute stream (the
memory may come from a block whose kernels are still queued), copies, and records an event;
the compute stream waits on that event before the block's first kernel. A copy dropped unused
is waited for all the same, so the allocator never hands out memory a copy still writes.
On a CPU device the same logic runs with plain clones and no streams (what the CPU tests see).

When a block leaves. In forward, after its last child (or a child that raised). In backward NOT
at the end of its recompute: the tensors a recompute saves for the block's backward include the
parameters themselves (the same TensorImpl whose `.data` we swap), so leaving there would point
them back at host memory before the block's backward ran (on CUDA: a device mismatch). A
recomputed block stays until the next block enters (autograd runs the later block's nodes
first), and the last one leaves when the gradients of the UNet's inputs are complete (a
multi-grad hook registered at the end of forward), else at the next forward or detach. torch's
checkpoint may also stop a recompute early (by raising inside it) once every tensor backward
needs exists; the child hooks are registered with always_call=True for that case.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

# Every parameter's offset inside its block's device buffer is a multiple of this (the buffer
# itself is 512-byte aligned by the caching allocator): cuBLAS/cuDNN take slower kernels, and
# may round differently, for misaligned operands.
ALIGN_BYTES = 256


def streamed_blocks(unet) -> list[tuple[str, nn.Module]]:
    """(name, block) of the blocks that stream, in forward order; everything else stays resident."""
    out = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks) if i > 0]
    out.append(("middle_block", unet.middle_block))
    out += [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
    return out


def _dense_stride(t: torch.Tensor) -> tuple:
    """t's own strides when it is dense (NCHW or channels_last: the slot keeps the layout),
    else the contiguous strides it will be stored with."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


@dataclass
class _Slot:
    param: nn.Parameter
    offset: int                  # elements into the dtype's host buffer
    shape: torch.Size
    stride: tuple
    home: torch.device           # where the parameter lived before attach (detach returns it)


@dataclass
class _Block:
    name: str
    module: nn.Module
    slots: dict = field(default_factory=dict)   # dtype -> [_Slot]
    spans: dict = field(default_factory=dict)   # dtype -> (start, end) elements of the host buffer
    checkpoint: bool = False                    # its checkpoint flag before attach


@dataclass
class _Copy:
    bufs: dict                   # dtype -> device tensor [end - start], the block's slice
    event: object = None         # torch.cuda.Event recorded after the copy (None on the CPU)
    waited: bool = False         # the compute stream already waits for it


class Offloader:
    """Stream `unet`'s blocks to `device` as they run. attach() moves the weights to pinned host
    memory (and the small always-resident pieces to `device`), detach() puts every parameter back
    where it was, with its value, and restores the blocks' checkpoint flags.

    prefetch: blocks copied ahead of the one running (1 = double buffering).
    loads:    Counter of copies issued per block name (2 per block per training step).
    order:    block names in the order their copies were issued since the last UNet forward began.
    max_resident: the most device copies held at once (current block + prefetched ones).
    """

    def __init__(self, unet: nn.Module, device, prefetch: int = 1):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (got {prefetch})")
        self.unet, self.device, self.prefetch = unet, torch.device(device), prefetch
        self.cuda = self.device.type == "cuda"
        self.blocks: list[_Block] = []
        self.host: dict = {}                    # dtype -> pinned host buffer [total elements]
        self.resident_homes: list = []          # (param, device before attach)
        self.hooks: list = []
        self.stream = None
        self.loaded: dict[int, _Copy] = {}      # prefetched blocks (index -> copy)
        self.current: int | None = None         # the block whose parameters point at device memory
        self.current_copy: _Copy | None = None
        self.direction = 1                      # +1 forward order, -1 backward order
        self.loads: Counter = Counter()
        self.order: list[str] = []
        self.max_resident = 0
        self.attached = False

    # ------------------------------------------------------------------ attach / detach

    def attach(self) -> "Offloader":
        if self.attached:
            raise RuntimeError("Offloader already attached")
        named = streamed_blocks(self.unet)
        streamed = {id(p) for _, b in named for p in b.parameters()}
        for p in self.unet.parameters():
            if id(p) not in streamed:           # time_embed, conv_in, out: small, always on the device
                self.resident_homes.append((p, p.device))
                p.data = p.data.to(self.device)
        sizes: Counter = Counter()
        for name, mod in named:
            blk = _Block(name, mod, checkpoint=bool(getattr(mod, "checkpoint", False)))
            for p in mod.parameters():
                dt = p.dtype
                a = max(1, ALIGN_BYTES // p.element_size())
                sizes[dt] = -(-sizes[dt] // a) * a      # round up to the alignment
                blk.spans.setdefault(dt, (sizes[dt], sizes[dt]))
                blk.slots.setdefault(dt, []).append(_Slot(p, sizes[dt], p.shape, _dense_stride(p), p.device))
                sizes[dt] += p.numel()
                blk.spans[dt] = (blk.spans[dt][0], sizes[dt])
            self.blocks.append(blk)
        # One buffer per dtype: the caching host allocator rounds each pinned allocation up to a
        # power of two, so one large buffer wastes far less than one per block.
        pin = self.cuda
        self.host = {dt: torch.empty(n, dtype=dt, pin_memory=pin) for dt, n in sizes.items()}
        with torch.no_grad():
            for blk in self.blocks:
                for dt, slots in blk.slots.items():
                    for s in slots:
                        view = self._host_view(dt, s)
                        view.copy_(s.param.data)
                        s.param.data = view             # the old storage is freed here
                mod = blk.module
                if hasattr(mod, "checkpoint"):
                    mod.checkpoint = True               # backward reloads the weights by recomputing
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
        for k, blk in enumerate(self.blocks):
            kids = list(blk.module.children())
            for j, child in enumerate(kids):
                self.hooks.append(child.register_forward_pre_hook(partial(self._pre, k)))
                self.hooks.append(child.register_forward_hook(partial(self._post, k, j == len(kids) - 1),
                                                              always_call=True))
        self.hooks.append(self.unet.register_forward_pre_hook(self._begin))
        self.hooks.append(self.unet.register_forward_hook(self._end, always_call=True))
        self.attached = True
        return self

    def detach(self) -> None:
        if not self.attached:
            return
        if self.current is not None:
            self._leave(self.current)
        self._keep([])
        if self.stream is not None:
            self.stream.synchronize()
        for h in self.hooks:
            h.remove()
        self.hooks = []
        with torch.no_grad():
            for blk in self.blocks:
                for dt, slots in blk.slots.items():
                    for s in slots:
                        # clone/to keep the strides; never leave a view into the pinned buffer
                        s.param.data = self._host_view(dt, s).to(s.home, copy=True)
                if hasattr(blk.module, "checkpoint"):
                    blk.module.checkpoint = blk.checkpoint
            for p, home in self.resident_homes:
                p.data = p.data.to(home)
        self.blocks, self.host, self.resident_homes, self.stream = [], {}, [], None
        self.attached = False

    # ------------------------------------------------------------------ queries (tests, printing)

    def on_host(self, name: str) -> bool:
        """True when every parameter of block `name` is a view of the pinned host buffer."""
        blk = next(b for b in self.blocks if b.name == name)
        return all(self._in_host(dt, s.param) for dt, slots in blk.slots.items() for s in slots)

    def streamed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def _in_host(self, dt, p) -> bool:
        h = self.host[dt]
        return p.device == h.device and h.data_ptr() <= p.data_ptr() < h.data_ptr() + h.numel() * h.element_size()

    # ------------------------------------------------------------------ hooks

    def _begin(self, module, args):
        """UNet forward starts: blocks run in forward order; prefetch the first ones."""
        if self.current is not None:
            self._leave(self.current)
        self.direction, self.order = 1, []
        self._keep(range(min(self.prefetch, len(self.blocks))))

    def _end(self, module, args, out):
        """UNet forward ended. If backward will follow, it recomputes the blocks last-first:
        prefetch the last ones now (the loss and the backward's first kernels hide the copy)."""
        if self.current is not None:
            self._leave(self.current)
        n = len(self.blocks)
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            self.direction = -1
            self._keep(range(n - 1, n - 1 - min(self.prefetch, n), -1))
            needs_grad = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            if needs_grad:   # their gradients complete = every block's backward ran
                torch.autograd.graph.register_multi_grad_hook(needs_grad, self._backward_done, mode="all")
        else:
            self._keep([])

    def _backward_done(self, grads):
        if self.current is not None:
            self._leave(self.current)
        self._keep([])

    def _pre(self, k, module, args):
        self._enter(k)

    def _post(self, k, last, module, args, result):
        # forward only (see "When a block leaves"); result None: the child raised
        if self.direction == 1 and (last or result is None):
            self._leave(k)

    # ------------------------------------------------------------------ the state machine

    def _enter(self, k: int) -> None:
        if self.current == k:
            return
        if self.current is not None:
            self._leave(self.current)
        cp = self.loaded.pop(k, None) or self._issue(k)
        self._wait(cp)
        blk = self.blocks[k]
        for dt, slots in blk.slots.items():
            start = blk.spans[dt][0]
            buf = cp.bufs[dt]
            for s in slots:
                s.param.data = buf.as_strided(s.shape, s.stride, s.offset - start)
        self.current, self.current_copy = k, cp
        n, d = len(self.blocks), self.direction
        self._keep([j for j in range(k + d, k + d * (self.prefetch + 1), d) if 0 <= j < n])

    def _leave(self, k: int) -> None:
        if self.current != k:
            return
        blk = self.blocks[k]
        for dt, slots in blk.slots.items():
            for s in slots:
                s.param.data = self._host_view(dt, s)
        # Dropping our reference is enough: kernels already queued keep the memory valid in
        # stream order, and tensors autograd saved during a recompute keep it until backward.
        self.current, self.current_copy = None, None

    def _keep(self, ks) -> None:
        """Hold device copies of exactly blocks `ks` (besides the current one): drop the others,
        issue the missing ones in the given order."""
        ks = list(ks)
        for j in [j for j in self.loaded if j not in ks]:
            self._wait(self.loaded.pop(j))       # its memory must not be reused under the copy
        for j in ks:
            if j != self.current and j not in self.loaded:
                self.loaded[j] = self._issue(j)
        self.max_resident = max(self.max_resident, len(self.loaded) + (self.current is not None))

    def _issue(self, k: int) -> _Copy:
        """Start copying block k to the device."""
        blk = self.blocks[k]
        self.loads[blk.name] += 1
        self.order.append(blk.name)
        if not self.cuda:
            return _Copy({dt: self.host[dt][a:b].clone() for dt, (a, b) in blk.spans.items()})
        compute = torch.cuda.current_stream(self.device)
        bufs = {dt: torch.empty(b - a, dtype=dt, device=self.device) for dt, (a, b) in blk.spans.items()}
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            for dt, (a, b) in blk.spans.items():
                bufs[dt].copy_(self.host[dt][a:b], non_blocking=True)
            event = self.stream.record_event()
        return _Copy(bufs, event)

    def _wait(self, cp: _Copy) -> None:
        if cp.event is not None and not cp.waited:
            torch.cuda.current_stream(self.device).wait_event(cp.event)
            cp.waited = True

    def _host_view(self, dt, s: _Slot) -> torch.Tensor:
        return self.host[dt].as_strided(s.shape, s.stride, s.offset)
