"""ServeSettings: how `ti-fast serve` runs, checked in one pure pass before anything loads.

Address, token, home folder, limits, the process-wide training keys. Torch-free: the CLI's
parser and `ti-fast serve --help` import it."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
# TrainConfig keys that belong to the process, not to a run (the group's; torch-free module): the
# model loads once with them and every run of a group shares them, so a job may not set them (a
# request naming one is refused with 400 naming it).
from ..training.config import PROCESS_KEYS

MiB = 1 << 20


@dataclass
class ServeSettings:
    model: str                                   # checkpoint file or folder (loaded once)
    host: str = "127.0.0.1"                      # bind address; anything not loopback needs a token
    port: int = 7861
    home: str = "ti-fast-home"                   # datasets/, embeddings/, hypernetworks/, logs/, outputs/, jobs.sqlite
    token: str | None = None                     # shared secret: Bearer, Basic password or login cookie
    max_running: int = 4                         # runs co-batched in the group at once; the rest queue
    # --- process-wide training keys (TrainConfig names), passed to the group once
    process: dict = field(default_factory=dict)
    # --- limits (413 beyond them)
    max_body_mb: int = 64                        # any JSON request body (A1111 sends images as base64)
    max_upload_mb: int = 2048                    # one dataset upload (multipart or zip), all files together
    max_file_mb: int = 256                       # one uploaded or extracted file
    max_files: int = 5000                        # files in one upload or one zip
    max_pixels: int = 64 * MiB                   # an image's width x height (checked from its header)
    max_queued: int = 1000                       # jobs waiting at once
    shutdown_s: float = 25.0                     # SIGINT/SIGTERM: the process is gone within this (+ a margin)

    def __post_init__(self):
        self.process = {**self.process, "model": self.model}


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost (no DNS lookup: a name is not an address)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def read_token(token: str | None, token_file: str | None) -> str | None:
    """--token, else --token-file (its first line), else $TI_FAST_TOKEN, else None."""
    if token is None and token_file:
        from ..fsutil import special_reason
        why = special_reason(token_file)
        if why is not None or not Path(token_file).is_file():
            raise ConfigError(f"--token-file {token_file}: {why or 'no such file'}")
        token = Path(token_file).read_text(encoding="utf-8", errors="replace").splitlines()[0:1]
        token = token[0].strip() if token else ""
    if token is None:
        token = os.environ.get("TI_FAST_TOKEN") or None
    return token


def check_settings(s: ServeSettings) -> None:
    """Every check that needs nothing loaded: ConfigError naming the flag."""
    if not is_loopback_host(s.host) and not s.token:
        raise ConfigError(f"--host {s.host} is not a loopback address: anyone who can reach it could train and "
                          "read files, so set --token (or --token-file, or $TI_FAST_TOKEN) too")
    if s.token is not None:
        if len(s.token) < 8:
            raise ConfigError("--token: use at least 8 characters (a long random string, e.g. from "
                              "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
        if any(c.isspace() for c in s.token):
            raise ConfigError("--token: no spaces or line breaks")
    if not isinstance(s.port, int) or not 0 <= s.port <= 65535:
        raise ConfigError(f"--port {s.port!r}: a port number from 0 to 65535")
    if not isinstance(s.max_running, int) or not 1 <= s.max_running <= 64:
        raise ConfigError(f"--max-running {s.max_running!r}: from 1 to 64 runs at once")
    for flag, v in (("--max-upload-mb", s.max_upload_mb), ("--max-file-mb", s.max_file_mb),
                    ("--max-body-mb", s.max_body_mb), ("--max-files", s.max_files)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag} {v!r}: a positive whole number")
    bad = sorted(set(s.process) - set(PROCESS_KEYS))
    if bad:
        raise ConfigError(f"{bad[0]} is not a process-wide setting (those are {', '.join(PROCESS_KEYS)})")
    if not s.model:
        raise ConfigError("--model PATH is required (a .safetensors/.ckpt file or a diffusers folder)")
    from ..fsutil import check_writable_dir, kind_of
    kind = kind_of(s.model)
    if kind not in ("file", "folder"):
        raise ConfigError(f"--model {s.model}: {'no such file or folder' if kind == 'missing' else 'is a ' + kind}")
    check_writable_dir(s.home, "--home")
