"""Devices and precisions from their user-facing names, checked up front.

`check_device_name` is the pure check the preflight runs (no CUDA initialisation);
`resolve_device` / `resolve_precision` turn settings into torch objects when a run starts.
"""
from __future__ import annotations

import os
import re

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "full")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")


def check_device_name(name, flag: str = "--device") -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N'; anything else is refused with the allowed forms."""
    if not isinstance(name, str) or not _DEVICE.match(name.strip()):
        raise ConfigError(f"{flag} {name!r}: use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    return name.strip()


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """auto = cuda if available, else cpu. An explicit CUDA device that is not there is refused."""
    name = check_device_name(name, flag)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name}: no CUDA device is available (use {flag} cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto = bf16 where the GPU supports it, else fp16; full (fp32) on the CPU."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "full" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_threads() -> int:
    """Half the cores this process may use (at least 1): the UNet's CPU kernels scale poorly
    past that, and on a shared machine spinning OpenMP workers on every core slow everyone down
    (the demo on a busy 2-core machine: 48-125 s with all threads, 7.5 s with one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def set_cpu_threads(threads: int | None) -> None:
    """torch's CPU thread count, set at a command's entry (never inside train() or generate()):
    `threads` (--threads), else OMP_NUM_THREADS as torch read it, else default_threads()."""
    if threads is not None:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())
