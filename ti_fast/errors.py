"""The one base class of every refusal ti-fast makes, and its one-line message shape.

A `UserError` is something the user can fix — a file, a flag, a setting, the disk. The CLI
prints it as `ti-fast: error: <message>` on one line and exits 2; the Python API raises it. Any
other exception is a bug (the trainer still saves the run and writes the traceback to a file).
This module imports nothing of ti_fast, so every layer can raise these.
"""
from __future__ import annotations

import re

MAX_LEN = 499
_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def one_line(message, max_len: int = MAX_LEN) -> str:
    """A message as one line: line breaks become '; ', long messages are cut with '...'."""
    msg = _BREAKS.sub("; ", str(message).strip())
    if len(msg) > max_len:
        msg = msg[: max_len - 3] + "..."
    return msg


class UserError(ValueError):
    """Something the user must fix: one line naming the file or flag and what to do."""

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))


class ConfigError(UserError):
    """A refusal before a run starts: a setting, a flag or an input file is wrong. Every
    refusal of an input (data, model, embedding, hypernetwork files) derives from it."""


class DataError(ConfigError):
    """A problem with the training data (images, captions, templates)."""


class FileKindError(ConfigError):
    """A path that is not what it must be: a FIFO, socket or device named as a file, a file
    where a folder is needed, a folder that cannot be written."""


class RunError(UserError):
    """A run stopped on purpose after saving what it had (NaN/inf, out of memory, full disk)."""


class NonFiniteLossError(RunError):
    """Loss or gradient became NaN/inf; the last good state was saved."""


class OutOfMemoryError(RunError):
    """The device ran out of memory; what was trained so far was saved."""


class DiskFullError(RunError):
    """A save hit a full disk or a file-size limit; the previous files are intact."""


class RunCrashed(RuntimeError):
    """Not a user error: a bug stopped a run. The run was saved; the message is one line and the
    full traceback is in the file `traceback_path` (the CLI prints the line and exits 1)."""

    def __init__(self, message: str, traceback_path=None):
        super().__init__(one_line(message))
        self.traceback_path = traceback_path
