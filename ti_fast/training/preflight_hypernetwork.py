"""The preflight's hypernetwork part: every check of a `train-hypernetwork` run that needs no
model, called from preflight.validate / preflight.plan when cfg.kind is "hypernetwork".

    validate_hypernetwork(cfg)   the settings alone: the create flags' rules (structure_from_options),
                                 embedding-only settings left unset, no create flags beside a file
    start_hypernetwork(cfg)      --hypernetwork FILE read and checked (an embedding there: one line
                                 naming `ti-fast train --embedding`); the default name (its stem)
    hypernetwork_plan(cfg, start)  the model's widths from its header alone (model_widths), the
                                 widths this run trains, the Structure
    resume_changes(state, ...)   a resumable state's hypernetwork checked, and what a resumed run
                                 would change in its shape (widths, structure)

The hypernetwork template has no [name], so `check_name_reachable` does not apply here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..fsutil import kind_of
from ..hypernetworks import (EmbeddingNotHypernetworkError, Hypernetwork, HypernetworkError, Structure,
                             check_widths, model_widths, options_structure, read_hypernetwork)
from .config import EMBEDDING_ONLY, STRUCTURE_KEYS, TrainConfig

# What a resumed run must keep (weight_init only says how the first weights were drawn).
SHAPE_FIELDS = ("layer_structure", "activation", "layer_norm", "dropout_structure", "activate_output")


@dataclass
class HypernetworkPlan:
    """What the run trains, decided before the model loads."""
    structure: Structure
    widths: list[int]                 # the widths the run trains (the file's, --sizes, or the model's own)
    model_widths: list[int]           # what the model offers ([768, 320, 640, 1280] on SD1)
    start: Hypernetwork | None = None  # --hypernetwork FILE (CPU, fp32)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def validate_hypernetwork(cfg) -> None:
    """The settings alone (no files): ConfigError / HypernetworkError naming the flag."""
    base = TrainConfig()
    for key in EMBEDDING_ONLY:
        if getattr(cfg, key) != getattr(base, key):
            hint = ("start from a hypernetwork with --hypernetwork FILE" if key == "embedding"
                    else "a hypernetwork has none: leave it out")
            raise ConfigError(f"{_flag(key)} is an embedding setting ({hint}; embeddings train with `ti-fast train`)")
    if cfg.hypernetwork is not None:
        given = [k for k in STRUCTURE_KEYS if getattr(cfg, k) != getattr(type(cfg)(), k)]
        if given:
            raise ConfigError(f"{_flag(given[0])}: the structure comes from --hypernetwork {cfg.hypernetwork}; "
                              "leave the create flags out (or drop --hypernetwork to create a new one)")
        return
    options_structure(**{k: getattr(cfg, k) for k in STRUCTURE_KEYS})


def start_hypernetwork(cfg) -> Hypernetwork | None:
    """--hypernetwork FILE, read (weights-only) and checked; None without one."""
    if not cfg.hypernetwork:
        return None
    path = cfg.hypernetwork
    kind = kind_of(path)
    if kind == "missing":
        raise ConfigError(f"--hypernetwork {path}: no such file")
    if kind != "file":
        raise ConfigError(f"--hypernetwork {path} is a {kind}, not a file")
    try:
        return read_hypernetwork(path)
    except EmbeddingNotHypernetworkError:
        raise ConfigError(f"--hypernetwork {path}: a textual-inversion embedding, not a hypernetwork "
                          f"(train it with `ti-fast train --embedding {path}`)") from None
    except HypernetworkError as e:
        raise ConfigError(f"--hypernetwork {e}") from None


def hypernetwork_plan(cfg, start: Hypernetwork | None) -> HypernetworkPlan:
    """The widths and structure of the run, against the model's widths read from its header
    (nothing of the model is built): a width the model lacks is refused here."""
    available = model_widths(cfg.model)
    if start is not None:
        missing = [w for w in start.widths if w not in available]
        if missing:
            raise ConfigError(f"--hypernetwork {cfg.hypernetwork}: made for another model: it has width "
                              f"{missing[0]}, the model's widths are {', '.join(map(str, available))}")
        return HypernetworkPlan(start.structure, start.widths, available, start)
    structure, sizes = options_structure(**{k: getattr(cfg, k) for k in STRUCTURE_KEYS})
    widths = check_widths(sizes, available) if sizes is not None else list(available)
    why = structure.problem(widths, creating=True)
    if why:
        raise ConfigError(f"--layer-structure: {why}")
    return HypernetworkPlan(structure, widths, available, None)


def structure_dict(s: Structure) -> dict:
    """A Structure as plain values (what a resumable state stores)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}


def resume_changes(state: dict, hp: HypernetworkPlan, state_path) -> tuple[list[str], HypernetworkPlan]:
    """The state's hypernetwork checked (ConfigError when malformed), the shape changes a resumed
    run would make (empty: none), and the plan with the state's weight_init (how its first
    weights were drawn, written into the file)."""
    fix = "delete it (or pass --overwrite) to start the run again"
    weights, meta = state.get("hypernetwork"), state.get("hypernetwork_meta")
    ok = (isinstance(weights, dict) and weights and all(torch.is_tensor(v) for v in weights.values())
          and isinstance(meta, dict) and isinstance(meta.get("widths"), list)
          and isinstance(meta.get("structure"), dict))
    if not ok:
        raise ConfigError(f"{state_path}: the state's hypernetwork weights are missing or malformed: {fix}")
    old, new = meta["structure"], structure_dict(hp.structure)
    changes = [] if list(meta["widths"]) == list(hp.widths) else [f"widths {meta['widths']} (now {hp.widths})"]
    changes += [f"{k.replace('_', ' ')} {old.get(k)!r} (now {new[k]!r})" for k in SHAPE_FIELDS if old.get(k) != new[k]]
    if changes:
        return changes, hp
    with torch.device("meta"):
        want = Hypernetwork("state", hp.widths, hp.structure).state_dict()
    bad = [k for k in want if k not in weights or tuple(weights[k].shape) != tuple(want[k].shape)]
    if bad or len(weights) != len(want):
        raise ConfigError(f"{state_path}: the state's hypernetwork weights do not fit its structure "
                          f"({bad[0] if bad else 'extra entries'}): {fix}")
    init = old.get("weight_init")
    structure = dataclasses.replace(hp.structure, weight_init=init) if isinstance(init, str) else hp.structure
    return [], dataclasses.replace(hp, structure=structure)
