"""The one exception every refusal of a model file raises."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

MAX_LEN = 399


class ModelLoadError(ConfigError):
    """A model file/folder that ti-fast will not load: one line (< 400 chars) naming the file,
    what it is and what to do."""

    def __init__(self, message: str):
        msg = " ".join(str(message).split())          # one line, collapsed whitespace
        if len(msg) > MAX_LEN:
            msg = msg[: MAX_LEN - 3] + "..."
        super().__init__(msg)


def refuse(path, what: str) -> ModelLoadError:
    """ModelLoadError('<file name>: <what>'), the message shape every refusal uses.
    path: a Path (its name is shown) or a str label shown as is (e.g. 'pipe/unet/config.json')."""
    label = path if isinstance(path, str) else Path(path).name
    return ModelLoadError(f"{label}: {what}")
