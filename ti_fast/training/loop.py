"""`train(TrainConfig)`: the whole run — checks, model, data, cached latents, the step loop,
saving, resume, signals, NaN rollback, previews and the closing summary.

Usable as a library: no global state, silent with quiet=True, cancellable through an Event or a
callback returning True (cancel = the Ctrl-C path: save, then return status "cancelled").
"""
from __future__ import annotations

import math
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from . import config as C
from .config import TrainConfig, ConfigError, NonFiniteLossError, OutOfMemoryError
from .outputs import LossLog, plot_loss, write_settings, save_state, load_state
from .step import TrainStep, MicroBatch, LossScaler
from .templates import load_template, draw_prompt, render_prompt   # not re-imported per step


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto = bf16 where the GPU supports it, else fp16; full (fp32) on the CPU."""
    if precision == "full" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _make_optimizer(kind: str, params, lr: float):
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:
            raise ConfigError(f"--optimizer adamw8bit needs bitsandbytes ({e}); pip install bitsandbytes") from None
        # min_8bit_size lowered: N x 768 vectors are far below bnb's default 4096-element
        # threshold, and we want real 8-bit state, not a silent fp32 fallback.
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=1)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class _Stopper:
    """SIGINT/SIGTERM (CLI only), an Event, or a callback: all end in the same save path."""

    def __init__(self, cancel, callback, handle_signals):
        self.cancel, self.callback, self.reason = cancel, callback, None
        self.old = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.reason = "interrupted"
        for sig, h in self.old.items():   # a second Ctrl-C interrupts at once (still saved)
            signal.signal(sig, h)

    def should_stop(self, info) -> bool:
        if self.reason:
            return True
        if self.cancel is not None and self.cancel.is_set():
            self.reason = "cancelled"
        elif self.callback is not None and self.callback(info):
            self.reason = "cancelled"
        return self.reason is not None

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        self.old = {}


def _resolve_paths(cfg: TrainConfig, name: str):
    out = Path(cfg.out)
    log = Path(cfg.log_dir) if cfg.log_dir else Path("ti-logs") / name
    return out, log, out / f"{name}.pt", out / f"{name}.safetensors"


def train(cfg: TrainConfig, *, cancel: threading.Event | None = None, callback=None,
          handle_signals: bool = False) -> TrainResult:
    """Run one training job. Raises ConfigError (bad settings, before loading anything),
    NonFiniteLossError / OutOfMemoryError (after saving what was trained)."""
    from ..training.data import list_images, prepare_dataset, BatchOrder, DataError
    from ..training.lr import parse_schedule, ScheduleError
    from ..embeddings import Embedding, read_embedding, save_pt, save_safetensors, sanitize_name, init_vectors, EmbeddingError
    from ..loading import load_model
    from ..prompt import PromptTokenizer

    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_launch = time.perf_counter()

    # ---- 1. everything that can be checked without a model
    C.validate(cfg)
    clip_sched = C.parse_clip_grad(cfg.clip_grad, cfg.steps)
    try:
        sched = parse_schedule(cfg.lr, cfg.steps)
    except ScheduleError as e:
        raise ConfigError(f"--lr: {e}") from None
    try:
        lines = load_template(cfg.template)
        list_images(cfg.data, recursive=cfg.recursive)     # missing/empty folder: fail before loading
    except DataError as e:
        raise ConfigError(str(e)) from None
    start_emb = None
    if cfg.embedding:
        try:
            start_emb = read_embedding(cfg.embedding)
        except EmbeddingError as e:
            raise ConfigError(str(e)) from None
    try:
        name = sanitize_name(cfg.name if cfg.name else start_emb.name)
    except EmbeddingError as e:
        raise ConfigError(str(e)) from None
    out_dir, log_dir, pt_path, st_path = _resolve_paths(cfg, name)
    state_path = log_dir / "state.pt"
    if cfg.resume:
        if not state_path.exists():
            raise ConfigError(f"--resume: no resumable state at {state_path} (use the same --log-dir / --name)")
    elif not cfg.overwrite:
        clash = [p for p in (pt_path, st_path) if p.exists()]
        if clash:
            raise ConfigError(f"{clash[0]} exists: pass --resume to continue it or --overwrite to replace it")
    if cfg.model is None:
        raise ConfigError("--model PATH is required (a .safetensors/.ckpt file or a diffusers folder; try --demo)")

    state = load_state(state_path) if cfg.resume else None
    seed = int(state["seed"]) if state else (cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31))
    device = _device(cfg.device)
    if device.type == "cuda" and (cfg.low_vram or cfg.offload):
        from .lowvram import lean_allocator
        lean_allocator()                           # before the weights arrive: no fragmented segments
    if cfg.offload and device.type != "cuda":
        raise ConfigError("--offload needs a CUDA device (it streams the UNet's weights to the GPU)")
    dtype = resolve_precision(cfg.precision, device)

    # ---- 2. model
    say(f"ti-fast: loading {cfg.model} on {device} ({str(dtype).replace('torch.', '')})")
    from ..loading import ModelLoadError
    from ..models.attention import set_attention_backend, AttentionBackendError
    try:
        # --offload: load on the CPU, move all but the UNet (its blocks stream, see prepare_unet)
        model = load_model(cfg.model, device="cpu" if cfg.offload else device, dtype=dtype, vae=cfg.vae,
                           tokenizer=cfg.tokenizer)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    if cfg.offload:
        model.text_encoder.to(device)
        model.vae.to(device)
    from ..models.ops import set_kernels, KernelError
    if cfg.kernels == "triton" and device.type != "cuda":
        raise ConfigError("--kernels triton needs a CUDA device (use --kernels torch or auto)")
    try:
        set_kernels(cfg.kernels, verbose=not cfg.quiet)
    except KernelError as e:
        raise ConfigError(f"--kernels {cfg.kernels}: {e}") from None
    try:
        set_attention_backend(model.unet, cfg.attention, device, verbose=not cfg.quiet)
        set_attention_backend(model.text_encoder, "sdpa" if cfg.attention in ("auto", "triton") else cfg.attention,
                              device, verbose=False)
    except AttentionBackendError as e:
        raise ConfigError(str(e)) from None
    unet, te, vae = model.unet, model.text_encoder, model.vae
    for m in (unet, te, vae):
        m.requires_grad_(False).eval()
    if cfg.gradient_checkpointing or cfg.low_vram:
        from .lowvram import checkpoint_blocks
        unet.set_gradient_checkpointing(True, None if cfg.gradient_checkpointing else checkpoint_blocks(
            unet, batch=cfg.batch_size, latent_hw=(cfg.height // 8, cfg.width // 8), elem_bytes=dtype.itemsize))
    from .accel import prepare_unet                # --channels-last, --offload, --compile (at the first step)
    unet_step = prepare_unet(unet, device, channels_last=cfg.channels_last and device.type == "cuda", offload=cfg.offload,
                             compile=cfg.compile, say=say)
    width = te.config.width

    # ---- 3. the embedding's vectors (fp32 master copy)
    start_step = 0
    if state is not None:
        init = state["vectors"].float()
        start_step = int(state["step"])
    elif start_emb is not None:
        init = start_emb.vectors.float()
        if init.shape[1] != width:
            raise ConfigError(f"{cfg.embedding}: vectors are {init.shape[1]} wide, the model needs {width}")
        start_step = int(start_emb.step or 0)
    else:
        ids = model.tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        init = init_vectors(te.token_table.detach().float().cpu(), ids, cfg.vectors)
    n_vec = init.shape[0]
    vectors = torch.nn.Parameter(init.clone().to(device=device, dtype=torch.float32))
    if start_step >= sched.end_step:
        raise ConfigError(f"nothing to do: the embedding already has {start_step} steps and training ends at {sched.end_step} (raise --steps)")

    # ---- 4. data and cached latents
    rng = random.Random(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    try:
        ds = prepare_dataset(cfg.data, recursive=cfg.recursive, width=cfg.width, height=cfg.height,
                             resize=cfg.resize, buckets=cfg.buckets, flip=False, alpha_weight=cfg.alpha_weight,
                             warn=say)
    except DataError as e:
        raise ConfigError(str(e)) from None
    items = ds.items
    # The Triton kernels of the VAE encode and of the UNet step compile on threads from here on
    # (ti_fast/training/prewarm.py): the first launch on a machine stops waiting for them only
    # where they are needed, and they compile in parallel.
    from . import prewarm
    warm = prewarm.start(unet, vae, device=device, batch=cfg.batch_size, image_hw=(cfg.height, cfg.width),
                         dtype=dtype, channels_last=cfg.channels_last, say=say)
    try:
        latents, weights, concat = _cache_latents(cfg, vae, items, device, dtype, seed, model, unet, warm, say)
        if warm is not None:
            warm.wait("unet")
    finally:
        if warm is not None:
            warm.close()
    previews = cfg.preview_every > 0 or cfg.png_embed
    if device.type == "cuda":
        vae.to("cpu")                      # the VAE leaves the GPU after caching
        torch.cuda.empty_cache()
    order = BatchOrder([tuple(it.size) for it in items], cfg.batch_size, seed)
    ptok = PromptTokenizer(model.tokenizer, {name: n_vec})
    long = sum(ptok.n_chunks(max((ln.replace("[filewords]", it.caption) for ln in lines), key=len)) > 1 for it in items)
    if long:
        say(f"ti-fast: {long} caption(s) make prompts longer than 75 tokens; training cuts them there")

    # ---- 5. optimizer, step, resume
    optimizer = _make_optimizer(cfg.optimizer, [vectors], sched.rate(start_step))
    scaler = LossScaler() if dtype == torch.float16 else None
    step_fn = TrainStep(unet_step, te, vectors, optimizer, generator=gen, clip_skip=cfg.clip_skip,
                        clip_grad=(clip_sched[0], clip_sched[1].rate(start_step)) if clip_sched else None,
                        scaler=scaler)
    base_step = step_fn                            # set_clip lives on the eager step (graphs share its tensor)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(_tuple(state["py_rng"]))
        gen.set_state(state["gen"])
        order.load_state_dict(state["order"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    if cfg.cuda_graph and device.type == "cuda" and not cfg.offload:
        # (offload moves the weights every step, a graph replays fixed addresses.) --low-vram is
        # graphed too: its checkpointed step is what a small card runs at batch 1, launch-bound
        # eagerly; the recompute is captured like the rest (checkpoints keep no RNG state). The
        # capture starts from an emptied cache; what the graph's pool still adds is in lowvram.py.
        from .graph import maybe_graphed
        step_fn = maybe_graphed(step_fn, say=say)   # bf16/fp32 + torch AdamW; else one line, eager

    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "embeddings").mkdir(exist_ok=True)
    loss_log = LossLog(log_dir / "loss.csv", resume_step=start_step if cfg.resume else 0)
    settings = {"config": cfg.to_dict(), "seed": seed, "device": str(device), "dtype": str(dtype),
                "model": {"name": model.info.name, "hash": model.info.hash, "path": str(model.info.path),
                          "variant": model.info.variant},
                "images": len(items), "vectors": n_vec, "start_step": start_step, "end_step": sched.end_step,
                "versions": _versions()}
    write_settings(log_dir / "settings.json", settings)

    def snapshot(step):
        return {"vectors": vectors.detach().float().cpu().clone(), "optimizer": _cpu_state(optimizer.state_dict()),
                "step": step, "order": order.state_dict(), "seed": seed, "py_rng": rng.getstate(),
                "gen": gen.get_state(), "scaler": scaler.state_dict() if scaler else None, "name": name}

    def embedding(vecs, step):
        return Embedding(name=name, vectors=vecs.detach().float().cpu().clone(), step=step,
                         sd_checkpoint=model.info.hash, sd_checkpoint_name=model.info.name, path=None)

    def save_final(snap):
        emb = embedding(snap["vectors"], snap["step"])
        out_dir.mkdir(parents=True, exist_ok=True)
        save_pt(emb, pt_path)
        save_safetensors(emb, st_path)
        save_state(state_path, snap)
        loss_log.flush()
        if loss_log.rows:
            plot_loss(loss_log.losses(), log_dir / "loss.png", title=f"{name} loss")

    preview = None
    if previews:
        from .previews import Previewer
        preview = Previewer(model, cfg, name, ptok, log_dir, device, items_prompt=_first_prompt(lines, name, items))

    # ---- 6. the loop
    stopper = _Stopper(cancel, callback, handle_signals)
    check_every = 1 if device.type != "cuda" else cfg.check_every
    step = start_step
    good = snapshot(step)
    pending = []                                   # (step, epoch, epoch_step, lr, loss tensor, finite tensor)
    bar = None
    if not cfg.quiet:
        from tqdm import tqdm
        bar = tqdm(total=sched.end_step, initial=start_step, desc=name, unit="step", dynamic_ncols=True, file=sys.stderr)
    smooth = None
    samples = 0
    t0 = None
    status = "completed"
    last_loss = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def flush_pending():
        """One host sync for the last `check_every` steps: log rows, NaN check, snapshot."""
        nonlocal pending, good, smooth, last_loss
        if not pending:
            return None
        vals = torch.stack([p[4] for p in pending]).float().cpu().tolist()
        oks = torch.stack([p[5] for p in pending]).cpu().tolist()
        bad_at = None
        for (s, ep, es, lr, _, _), v, ok in zip(pending, vals, oks):
            if not ok or not math.isfinite(v):
                bad_at = s
                break
            loss_log.add(s, ep, es, v, lr)
            last_loss = v
            smooth = v if smooth is None else 0.95 * smooth + 0.05 * v
        n = len(pending)
        pending = []
        if bad_at is not None:
            return bad_at
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{sched.rate(step - 1):.2g}", refresh=False)
        good = snapshot(step)
        return None

    def check():
        """Flush; on a non-finite loss or gradient roll back to the last good state and stop."""
        bad = flush_pending()
        if bad is not None:
            save_final(good)
            raise NonFiniteLossError(
                f"loss became NaN/inf at step {bad}; restored the vectors of step {good['step']} and saved them "
                f"to {pt_path}. Lower the learning rate (--lr) or use --precision bf16, then --resume.")

    try:
        while step < sched.end_step:
            if stopper.should_stop({"step": step}):
                status = stopper.reason
                break
            lr = sched.rate(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if clip_sched and clip_sched[1].rate(step) != clip_sched[1].rate(max(step - 1, 0)):
                base_step.set_clip(clip_sched[1].rate(step))
            mbs = []
            for _ in range(cfg.grad_accum):
                batch = order.next_batch()
                mbs.append(_micro_batch(batch, items, latents, weights, concat, ptok, lines, name, cfg, rng, device))
            if t0 is None:
                t0 = time.perf_counter()
            t_step = time.perf_counter()
            loss, finite = step_fn(mbs)
            step += 1
            samples += cfg.batch_size * cfg.grad_accum
            pending.append((step, order.epoch, order.position, lr, loss, finite))
            if step == start_step + 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)      # once: time the first step finished, not issued
                settings["launch_to_first_step_s"] = round(time.perf_counter() - t_launch, 3)
                if cfg.compile:
                    settings["compile_s"] = round(time.perf_counter() - t_step, 3)
                    say(f"ti-fast: torch.compile: the first step (compilation) took {settings['compile_s']:.1f} s")
                    write_settings(log_dir / "settings.json", settings)
            due_save = cfg.save_every and step % cfg.save_every == 0
            due_prev = preview is not None and cfg.preview_every and step % cfg.preview_every == 0
            if len(pending) >= check_every or due_save or due_prev or step == sched.end_step:
                check()
            if due_save:
                save_pt(embedding(vectors, step), log_dir / "embeddings" / f"{name}-{step}.pt")
                save_state(state_path, snapshot(step))
                loss_log.flush()
                plot_loss(loss_log.losses(), log_dir / "loss.png", title=f"{name} loss")
            if due_prev:
                preview(step, vectors.detach(), embedding(vectors, step))
        check()
        save_final(snapshot(step))
    except NonFiniteLossError:
        raise
    except BaseException as e:
        # Ctrl-C twice, OOM, anything: never lose what was trained. Save the last checked-good state.
        try:
            bad = flush_pending()
        except BaseException:
            bad = True
        try:
            save_final(good if bad is not None else snapshot(step))
        except BaseException as save_err:  # pragma: no cover - disk full etc.
            say(f"ti-fast: could not save after the error: {save_err}")
        if _is_oom(e):
            raise OutOfMemoryError(
                f"out of memory on {device} at step {step} (saved {pt_path}). Lower --batch-size, add "
                f"--gradient-checkpointing, --low-vram or --offload, or use --precision bf16/fp16.") from e
        if isinstance(e, KeyboardInterrupt):
            status = "interrupted"
        else:
            raise
    finally:
        stopper.restore()
        if bar is not None:
            bar.close()
        if hasattr(step_fn, "reset"):
            step_fn.reset()      # the captured graphs' memory pool returns now, not at garbage collection

    wall = time.perf_counter() - (t0 or time.perf_counter())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    settings["wall_time_s"] = round(wall, 3)
    write_settings(log_dir / "settings.json", settings)
    res = TrainResult(name=name, embedding=pt_path, embedding_safetensors=st_path, log_dir=log_dir, steps=step,
                      final_loss=last_loss, status=status, wall_time=wall,
                      samples_per_s=(samples / wall if wall > 0 else 0.0), peak_memory_gib=peak,
                      files={"loss_csv": log_dir / "loss.csv", "loss_png": log_dir / "loss.png",
                             "settings": log_dir / "settings.json", "state": state_path})
    if not cfg.quiet:
        mem = f", peak {peak:.2f} GiB" if peak is not None else ""
        say(f"ti-fast: {status} at step {step}/{sched.end_step} in {wall:.1f} s "
            f"({res.samples_per_s:.2f} samples/s{mem}); final loss {last_loss if last_loss is None else round(last_loss, 5)}")
        say(f"  embedding: {pt_path}  (+ {st_path.name})\n  log:       {log_dir}")
    return res


def _cache_latents(cfg, vae, items, device, dtype, seed, model, unet, warm, say):
    """Latents of every image (once, through the VAE), the alpha-channel loss weights and the
    inpainting models' conditioning: (latents, weights or None, {size: c_concat})."""
    from .latents import encode_dataset
    from ..diffusion.conditioning import grey_latent, inpaint_concat
    say(f"ti-fast: {len(items)} images; caching latents ({cfg.latents}{', flipped too' if cfg.flip else ''})")
    if warm is not None:
        warm.wait("vae")                   # the encoder's kernels: compiled in parallel, not one by one
    enc_gen = torch.Generator(device=device)
    enc_gen.manual_seed(seed + 1)
    latents = encode_dataset(vae, items, device=device, mode=cfg.latents, generator=enc_gen,
                             store_dtype=dtype if device.type == "cuda" else torch.float32,
                             cache_dir=cfg.cache_dir, vae_hash=model.info.hash, resize=cfg.resize,
                             flip=cfg.flip, seed=seed)
    down = vae.downscale
    weights = None
    if cfg.alpha_weight:
        weights = [_latent_weight(it, down, cfg.flip, device) for it in items]
    concat = {}
    if unet.config.in_channels == 9:
        for it in items:
            if tuple(it.size) not in concat:
                concat[tuple(it.size)] = inpaint_concat(grey_latent(vae, it.size[1], it.size[0], device))
    return latents, weights, concat


def _micro_batch(batch, items, latents, weights, concat, ptok, lines, name, cfg, rng, device) -> MicroBatch:
    lat, std, wts, prompts = [], [], [], []
    for i in batch:
        f = rng.randrange(2) if cfg.flip else 0    # which cached orientation
        lat.append(latents[i].mean[f])
        if latents[i].std is not None:
            std.append(latents[i].std[f])
        if weights is not None:
            wts.append(weights[i][f])
        prompts.append(draw_prompt(lines, name, items[i].caption, rng, cfg.shuffle_tags, cfg.tag_dropout))
    tok = ptok(prompts, chunks=1)
    size = tuple(items[batch[0]].size)
    cc = concat.get(size)
    return MicroBatch(latents=torch.stack(lat), input_ids=tok.input_ids.to(device), vector_index=tok.vector_index.to(device),
                      token_weight=tok.weights.to(device) if tok.weighted else None,
                      latent_std=torch.stack(std) if std else None,
                      weight=torch.stack(wts) if wts else None,
                      c_concat=cc.expand(len(batch), -1, -1, -1) if cc is not None else None)


def _latent_weight(item, down, flip, device):
    """Alpha map [H, W] -> per-latent-pixel weight [F, 1, h, w] (block mean, scaled to mean 1)."""
    from .data import latent_weight
    w = latent_weight(item.weight, down)                    # [h, w]
    ws = [w] + ([w.flip(-1)] if flip else [])
    return torch.stack(ws)[:, None].to(device)


def _first_prompt(lines, name, items):
    return render_prompt(lines[0], name, items[0].caption, rng=random.Random(0))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _cpu_state(sd):
    if isinstance(sd, dict):
        return {k: _cpu_state(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_cpu_state(v) for v in sd]
    if torch.is_tensor(sd):
        return sd.detach().cpu().clone()
    return sd


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _versions():
    import transformers
    return {"ti_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}
