"""Several runs from one TOML file, trained together (ti_fast.training.group):

    model = "v1-5.safetensors"        # top level: shared by every run (flags override these)
    steps = 2000
    [[run]]                           # one table per run: any per-run key
    name = "cat"
    data = "cats"
    [[run]]
    name = "dog"
    data = "dogs"
    vectors = 4

or a grid over the one run the top level defines:

    name = "cat"
    data = "cats"
    [sweep]
    lr = ["0.005", "0.002"]
    vectors = [1, 4]                  # -> 4 runs: cat-lr0.005-vectors1, ..., cat-lr0.002-vectors4

Process-wide keys (config.PROCESS_KEYS: the model, device, precision, ...) may only be set at
the top. A sweep's runs write OUT/<run name>.pt into the shared out folder and each its own log
folder, LOG_DIR/<run name> (LOG_DIR: the top-level log-dir, default ./ti-logs).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

from ..errors import ConfigError
from .config import PROCESS_KEYS, TrainConfig, check_value, read_toml


def _key(k: str) -> str:
    return k.replace("-", "_")


def _run_keys(table, where: str, fields: dict) -> dict:
    """A [[run]] table's keys, checked: known, per-run, of the right type."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: each [[run]] must be a table of settings")
    out = {}
    for k, v in table.items():
        key = _key(k)
        if key in PROCESS_KEYS:
            raise ConfigError(f"{where}: {k!r} is process-wide (shared by every run): set it at the top of the file")
        out[key] = check_value(key, v, where, fields)
    return out


def read_runs(path, overrides: dict | None = None, cls=TrainConfig) -> list[TrainConfig] | None:
    """The runs of a TOML file with [[run]] tables or a [sweep] table, or None when it holds one
    plain run (cls.from_toml reads that). `overrides`: command-line flags, applied to the shared
    top level; cls: TrainConfig, or HypernetworkTrainConfig for train-hypernetwork."""
    data = read_toml(path)
    runs, sweep = data.pop("run", None), data.pop("sweep", None)
    if runs is None and sweep is None:
        return None
    if runs is not None and sweep is not None:
        raise ConfigError(f"--config {path}: [[run]] tables and a [sweep] exclude each other: use one file for each")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    top = {k: check_value(k, v, str(path), fields) for k, v in data.items()}
    top.update(overrides or {})
    if runs is not None:
        if not isinstance(runs, list) or not runs:
            raise ConfigError(f"--config {path}: the [[run]] list is empty: add a [[run]] table per run")
        return [cls(**{**top, **_run_keys(t, f"{path} [[run]] #{i + 1}", fields)}) for i, t in enumerate(runs)]
    return _sweep_runs(path, top, sweep, cls, fields)


def _sweep_runs(path, top: dict, sweep, cls, fields: dict) -> list[TrainConfig]:
    where = f"--config {path} [sweep]"
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{where}: name at least one key with a list of values, e.g. lr = [\"0.005\", \"0.002\"]")
    axes = []
    for k, values in sweep.items():
        key = _key(k)
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {k!r}; keys are the flag names")
        if key in PROCESS_KEYS or key in ("name", "out", "log_dir"):
            raise ConfigError(f"{where}: {k!r} cannot be swept ({'process-wide' if key in PROCESS_KEYS else 'it names the runs'})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {k!r} needs a non-empty list of values")
        axes.append((key, [check_value(key, v, where, fields) for v in values]))
    if not top.get("name"):
        raise ConfigError(f"--config {path}: a sweep needs name = \"...\" at the top (the runs are named after it)")
    log_root = Path(top.get("log_dir") or "ti-logs")
    out = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        values = dict(zip((k for k, _ in axes), combo))
        name = top["name"] + "".join(f"-{k.replace('_', '-')}{_label(v)}" for k, v in values.items())
        out.append(cls(**{**top, **values, "name": name, "log_dir": str(log_root / name)}))
    return out


def _label(value) -> str:
    """A value as part of a run name: letters, digits and '.', '_' only ("0.005:100, 1e-3" ->
    "0.005_100_1e-3")."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", str(value)).strip("_") or "_"


def sweep_values(cfgs: list[TrainConfig]) -> list[str]:
    """The settings that differ between runs (the summary's columns)."""
    fields = dict.fromkeys(f.name for c in cfgs for f in dataclasses.fields(c))   # a hypernetwork's too
    return [k for k in fields if k not in ("name", "log_dir")
            and len({repr(getattr(c, k, None)) for c in cfgs}) > 1]


def summary(cfgs: list[TrainConfig], results) -> tuple[str, str]:
    """(text table, CSV) of a group's runs: name, the settings that differ, status, steps,
    final and best loss, wall time."""
    import csv
    import io
    keys = sweep_values(cfgs)
    head = ["name", *keys, "status", "steps", "final_loss", "best_loss", "wall_s"]
    rows = []
    for c, r in zip(cfgs, results):
        rows.append([r.name, *(str(getattr(c, k)) for k in keys), r.status, str(r.steps),
                     "" if r.final_loss is None else f"{r.final_loss:.6g}",
                     "" if r.best_loss is None else f"{r.best_loss:.6g}", f"{r.wall_time:.1f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [head, *rows])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([head, *rows])
    return text, buf.getvalue()
