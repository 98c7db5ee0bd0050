"""The trainer stays a set of small parts: train() reads as a short story (<= 100 lines) and no
other function in ti_fast/training is over 80 lines (signature, docstring and body)."""
from __future__ import annotations

import ast
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "ti_fast" / "training"


def _functions():
    for path in sorted(TRAINING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield path.name, node.name, node.end_lineno - start + 1


def test_train_and_every_other_training_function_are_short():
    sizes = list(_functions())
    (train_lines,) = [n for f, name, n in sizes if (f, name) == ("loop.py", "train")]
    assert train_lines <= 100, train_lines
    long = [(f, name, n) for f, name, n in sizes if n > 80 and (f, name) != ("loop.py", "train")]
    assert not long, long
