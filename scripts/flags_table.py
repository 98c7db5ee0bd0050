"""Print the README's table of `ti-fast train` flags from the CLI's own definitions."""
from __future__ import annotations

import dataclasses

from ti_fast.cli import TRAIN_FLAGS
from ti_fast.training.config import TrainConfig


def table() -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    section = None
    for sec, name, help_ in TRAIN_FLAGS:
        if sec != section:
            rows.append(f"| **{sec}** | | |")
            section = sec
        d = defaults[name]
        d = "off" if d is False else "on" if d is True else ("—" if d is None else f"`{d}`")
        rows.append(f"| `--{name.replace('_', '-')}` | {d} | {help_} |")
    rows += ["| `--no-half` | off | same as `--precision full` |",
             "| `--config FILE.toml` | — | settings from a TOML file (keys = flag names); flags override it |",
             "| `--demo` | off | the built-in tiny demo (tiny random model + synthetic images under ./ti-demo) |"]
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
