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


def write_readme(path: str = "README.md") -> None:
    """Replace the README's train-flags table (from its header row to the first blank line)."""
    from pathlib import Path
    text = Path(path).read_text(encoding="utf-8")
    start = text.index("| flag | default | what it does |")
    end = text.index("\n\n", start)
    Path(path).write_text(text[:start] + table() + text[end:], encoding="utf-8")


if __name__ == "__main__":
    import sys
    if "--write" in sys.argv:
        write_readme()
    else:
        print(table())
