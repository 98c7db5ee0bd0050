"""`ti-fast serve`: the argument parser (torch-free, for --help) and the command.

Check the settings, bind, load the model in the worker, serve until SIGINT/SIGTERM, stop
gracefully."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

from ..errors import ConfigError

# process-wide training flags: (flag, TrainConfig key, help)
_PROCESS_FLAGS = [
    ("--vae", "vae", "separate VAE file"),
    ("--tokenizer", "tokenizer", "tokenizer folder when the model has none"),
    ("--device", "device", "auto (cuda if available, else cpu), cuda, cuda:1, cpu"),
    ("--precision", "precision", "auto, bf16, fp16, full"),
    ("--attention", "attention", "auto, sdpa, xformers, math, triton"),
    ("--kernels", "kernels", "fused GroupNorm+SiLU / GEGLU: torch, auto, triton"),
]


def add_serve_parser(sub, process_settings=None) -> None:
    """Register `serve`. process_settings(cfg): the CLI's per-process setup (threads, allocator),
    handed in by ti_fast.cli so that this face does not import its peer."""
    p = sub.add_parser("serve", help="HTTP server: one loaded model, a job queue, A1111-compatible routes",
                       description="Serve training and txt2img over HTTP (native API under /api/v1, A1111's under "
                                   "/sdapi/v1, the API page at /docs). Needs the [serve] extra.")
    p.add_argument("--model", required=True, help="SD1.x checkpoint (.safetensors, .ckpt or a diffusers folder), loaded once")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=7861, help="port (default 7861; 0 = any free port, printed)")
    p.add_argument("--home", default="ti-fast-home",
                   help="folder of datasets/, embeddings/, hypernetworks/, logs/, outputs/ and the job database "
                        "(default ./ti-fast-home)")
    p.add_argument("--token", default=None, help="shared secret every request must carry (Bearer, Basic password or the "
                                                 "login cookie); prefer --token-file or $TI_FAST_TOKEN (argv is visible)")
    p.add_argument("--token-file", default=None, help="read the token from this file's first line")
    p.add_argument("--max-running", type=int, default=4, help="runs co-batched at once; more jobs queue (default 4)")
    p.add_argument("--max-upload-mb", type=int, default=2048, help="one dataset upload, all files (default 2048)")
    p.add_argument("--max-file-mb", type=int, default=256, help="one uploaded or extracted file (default 256)")
    p.add_argument("--max-files", type=int, default=5000, help="files in one upload or zip (default 5000)")
    p.add_argument("--max-body-mb", type=int, default=64, help="any other request body (default 64)")
    g = p.add_argument_group("the model's process-wide settings (as `ti-fast train`; jobs may not change them)")
    for flag, _, help_ in _PROCESS_FLAGS:
        g.add_argument(flag, default=None, help=help_)
    g.add_argument("--low-vram", action="store_true", default=None, help="checkpointing, VAE off the GPU")
    g.add_argument("--offload", action="store_true", default=None, help="stream the UNet's blocks from CPU memory")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the UNet")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None, help="CUDA graphs (on)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC on CUDA (on)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute every UNet block in backward (less memory, slower)")
    g.add_argument("--clip-skip", type=int, default=None, help="CLIP skip of every run, A1111 numbering (1 = off)")
    g.add_argument("--check-every", type=int, default=None, help="CUDA: read losses and the NaN flag every N steps")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default as `ti-fast train`)")
    p.set_defaults(func=cmd_serve, process_settings=process_settings)


def settings_from_args(a):
    from .settings import ServeSettings, read_token
    keys = [k for _, k, _ in _PROCESS_FLAGS] + ["low_vram", "offload", "compile", "cuda_graph", "channels_last",
                                                "gradient_checkpointing", "clip_skip", "check_every", "threads"]
    process = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    process["model"] = a.model
    return ServeSettings(model=a.model, host=a.host, port=a.port, home=a.home, token=read_token(a.token, a.token_file),
                         max_running=a.max_running, process=process, max_body_mb=a.max_body_mb,
                         max_upload_mb=a.max_upload_mb, max_file_mb=a.max_file_mb, max_files=a.max_files)


def cmd_serve(a) -> int:
    return serve(settings_from_args(a), process_settings=a.process_settings)


def serve(settings, *, process_settings=None, group_factory=None) -> int:
    """Check, bind, load the model (the worker's group), serve until a signal; 0 after a graceful
    stop. group_factory: what makes the training group (default: ti_fast.training.group.TrainGroup)."""
    from .settings import check_settings
    check_settings(settings)
    cfg = check_process(settings.process)                # every flag first, then what is installed
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ti-fast serve needs the [serve] extra ({e.name} is missing): "
                          "pip install 'ti-fast[serve]'") from None
    sock = bind(settings.host, settings.port)            # a taken port fails here, before the model loads
    if process_settings is not None:
        process_settings(cfg)
    from .state import ServerState
    state = ServerState(settings, group_factory=group_factory)
    try:
        state.start()
    except BaseException:
        sock.close()
        state.stop(5)
        raise
    return run_server(state, sock)


def check_process(process: dict):
    """The process-wide settings as TrainConfig checks them (type, choices), before anything loads."""
    from ..training.config import ATTENTION, KERNELS, PRECISIONS, TrainConfig, check_value
    for k, v in process.items():
        check_value(k, v, "serve")
    cfg = TrainConfig(**process)
    for flag, value, allowed in (("--precision", cfg.precision, PRECISIONS), ("--attention", cfg.attention, ATTENTION),
                                 ("--kernels", cfg.kernels, KERNELS)):
        if value not in allowed:
            raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    for flag, value, lo, hi in (("--threads", cfg.threads, 1, 1024), ("--clip-skip", cfg.clip_skip, 1, 12),
                                ("--check-every", cfg.check_every, 1, 10_000)):
        if value is not None and not lo <= value <= hi:
            raise ConfigError(f"{flag} {value}: from {lo} to {hi}")
    from ..devices import check_device_name                  # (imports torch: the cheap checks come first)
    check_device_name(cfg.device)
    return cfg


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def make_server(state):
    """The uvicorn server for a started ServerState (its own logging off: the server says what matters)."""
    import uvicorn
    from .app import create_app
    config = uvicorn.Config(create_app(state), log_config=None, access_log=False, proxy_headers=False,
                            server_header=False, timeout_graceful_shutdown=10, lifespan="on", timeout_keep_alive=5)
    return Server(config, state)


def run_server(state, sock: socket.socket) -> int:
    """Serve on `sock` until SIGINT/SIGTERM; 0 after a graceful stop."""
    server = make_server(state)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    info = state.model_info
    state.say(f"ti-fast serve: listening on http://{shown}:{port}/ (web page /, API page /docs) - model "
              f"{info.name if info else state.settings.model}, home {state.home.root}, "
              f"{'token required' if state.settings.token else 'loopback only, no token'}")
    server.run(sockets=[sock])
    return 0


class Server:
    """uvicorn's Server whose signal handling starts the graceful stop at once (streams end, the
    runs save) and never re-raises the signal afterwards; a watchdog ends the process if the stop
    takes longer than --shutdown plus a margin."""

    def __new__(cls, config, state):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if not self.should_exit:
                    state.say("ti-fast serve: stopping (running jobs save and can resume at the next start)")
                    state.begin_shutdown()
                    _watchdog(state)
                super().handle_exit(sig, frame)

            def capture_signals(self):
                return _signals(self)

        return _Server(config)


def _signals(server):
    import contextlib
    import signal

    @contextlib.contextmanager
    def capture():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
    return capture()


def _watchdog(state) -> None:
    def run():
        threading.Event().wait(state.settings.shutdown_s + 3)
        print("ti-fast serve: the stop took too long; exiting (runs keep their last save)", file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=run, name="ti-fast-stop-watchdog", daemon=True).start()
