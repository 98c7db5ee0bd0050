"""The README documents every train flag with its default and lists every source file."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_train_flag_documented_with_default():
    from ti_fast.cli import TRAIN_FLAGS
    from ti_fast.training.config import TrainConfig
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == {name for _, name, _ in TRAIN_FLAGS}          # every setting has a flag
    sys.path.insert(0, str(ROOT / "scripts"))
    from flags_table import table
    assert table() in readme                                          # and the table is current


def test_every_train_hypernetwork_flag_documented():
    from ti_fast.cli import HYPERNETWORK_FLAGS, TRAIN_FLAGS
    from ti_fast.hypernetworks.cli import STRUCTURE_FLAGS
    from ti_fast.training.config import HypernetworkTrainConfig
    fields = {f.name for f in dataclasses.fields(HypernetworkTrainConfig)}
    assert fields == {n for _, n, _ in TRAIN_FLAGS} | {n for n, _, _ in HYPERNETWORK_FLAGS + STRUCTURE_FLAGS}
    sys.path.insert(0, str(ROOT / "scripts"))
    from flags_table import hypernetwork_table
    assert hypernetwork_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_package_map_lists_every_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for root in ("ti_fast", "bench", "scripts", "tests"):
        for p in (ROOT / root).rglob("*.py"):
            if "__pycache__" not in p.parts:
                assert str(p.relative_to(ROOT)) in readme, p


def test_flow_statement_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import os
    from package_map import flow
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert flow() in (ROOT / "README.md").read_text(encoding="utf-8")
    finally:
        os.chdir(cwd)
