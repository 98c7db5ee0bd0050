"""Print the README's tables of `ti-fast train` and `ti-fast train-hypernetwork` flags from the
CLI's own definitions (--write: replace them in README.md)."""
from __future__ import annotations

import dataclasses

from ti_fast.cli import HYPERNETWORK_FLAGS, HYPERNETWORK_HELP, TRAIN_FLAGS
from ti_fast.hypernetworks.cli import STRUCTURE_FLAGS
from ti_fast.training.config import EMBEDDING_ONLY, HypernetworkTrainConfig, TrainConfig

HEADER = "| flag | default | what it does |"
HN_HEADER = "| train-hypernetwork flag | default | what it does |"


def _default(d) -> str:
    return "off" if d is False else "on" if d is True else ("—" if d is None else f"`{d}`")


def table() -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    rows = [HEADER, "|---|---|---|"]
    section = None
    for sec, name, help_ in TRAIN_FLAGS:
        if sec != section:
            rows.append(f"| **{sec}** | | |")
            section = sec
        rows.append(f"| `--{name.replace('_', '-')}` | {_default(defaults[name])} | {help_} |")
    rows += ["| `--no-half` | off | same as `--precision full` |",
             "| `--config FILE.toml` | — | settings from a TOML file (keys = flag names); flags override it |",
             "| `--demo` | off | the built-in tiny demo (tiny random model + synthetic images under ./ti-demo) |"]
    return "\n".join(rows)


def hypernetwork_table() -> str:
    """train-hypernetwork's own flags, then the shared ones whose default or meaning differs there."""
    defaults = {f.name: f.default for f in dataclasses.fields(HypernetworkTrainConfig)}
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    rows = [HN_HEADER, "|---|---|---|", "| **the hypernetwork** | | |"]
    for name, _, help_ in HYPERNETWORK_FLAGS + STRUCTURE_FLAGS:
        d = "the model's widths" if name == "sizes" else _default(defaults[name])
        rows.append(f"| `--{name.replace('_', '-')}` | {d} | {help_} |")
    rows.append("| **shared with `train`, different here** | | |")
    for _, name, help_ in TRAIN_FLAGS:
        if name in HYPERNETWORK_HELP or defaults[name] != base[name]:
            shown = HYPERNETWORK_HELP.get(name, help_)
            rows.append(f"| `--{name.replace('_', '-')}` | {_default(defaults[name])} | {shown} |")
    gone = ", ".join(f"`--{n.replace('_', '-')}`" for n in EMBEDDING_ONLY)
    rows.append(f"| {gone}, `--demo` | — | not offered (embedding settings) |")
    return "\n".join(rows)


def _replace(text: str, header: str, new: str) -> str:
    start = text.index(header)
    end = text.index("\n\n", start)
    return text[:start] + new + text[end:]


def write_readme(path: str = "README.md") -> None:
    """Replace the README's two flag tables (each from its header row to the first blank line)."""
    from pathlib import Path
    text = Path(path).read_text(encoding="utf-8")
    text = _replace(_replace(text, HEADER, table()), HN_HEADER, hypernetwork_table())
    Path(path).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    import sys
    if "--write" in sys.argv:
        write_readme()
    else:
        print(table() + "\n\n" + hypernetwork_table())
