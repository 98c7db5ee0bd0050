"""Data flows one way through the package: every import inside ti_fast (function-level imports
included) points to a lower layer or stays inside its own unit; `training` and `sample` never
import each other; the face `serve` sits just below `cli`, which registers its subcommand;
nothing imports diffusers, bench or tests."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A unit is a top-level module or sub-package of ti_fast. Units in one row are
# peers: neither may import the other.
LAYERS = [
    ["errors"],
    ["fsutil"],
    ["images", "devices", "kernels"],
    ["models"],
    ["loading"],
    ["embeddings", "prompt", "infotext"],
    ["hypernetworks", "preprocessing"],
    ["diffusion", "interop"],
    ["training", "sample"],
    ["serve"],
    ["cli"],                  # the command line registers `serve` (ti_fast.serve.cli)
    ["__init__"],
]
RANK = {unit: i for i, row in enumerate(LAYERS) for unit in row}
FORBIDDEN = ("diffusers", "bench", "tests")


def _modules():
    """(dotted module name, is_package, path) of every source file of ti_fast."""
    for base, prefix in ((ROOT / "ti_fast", "ti_fast"),):
        for p in sorted(base.rglob("*.py")):
            rel = p.relative_to(base).with_suffix("")
            parts = [prefix, *rel.parts]
            pkg = parts[-1] == "__init__"
            if pkg:
                parts = parts[:-1]
            yield ".".join(parts), pkg, p


def _imports(name: str, pkg: bool, path: Path):
    """Every imported module, absolute (relative imports resolved), with its line."""
    here = name if pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from ti_fast import x` may import the sub-module x
            for a in node.names:
                yield (f"{mod}.{a.name}" if mod in ("ti_fast", "ti_fast.diffusion", "ti_fast.sample",
                                                    "ti_fast.training", "ti_fast.loading", "ti_fast.models",
                                                    "ti_fast.embeddings", "ti_fast.hypernetworks",
                                                    "ti_fast.preprocessing", "ti_fast.serve") else mod), node.lineno


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ti_fast":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def test_every_unit_has_a_layer():
    units = {unit_of(n) for n, _, _ in _modules()}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


def test_imports_point_down_only():
    bad = []
    for name, pkg, path in _modules():
        src = unit_of(name)
        for mod, line in _imports(name, pkg, path):
            top = mod.split(".")[0]
            if top in FORBIDDEN:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod} (never from ti_fast)")
                continue
            dst = unit_of(mod)
            if dst is None or dst == src:
                continue
            if dst not in RANK:
                continue                         # a name, not a module (`from ti_fast import train`)
            if RANK[dst] >= RANK[src]:
                way = "sideways" if RANK[dst] == RANK[src] else "upward"
                bad.append(f"{path.relative_to(ROOT)}:{line} ({src}) imports {mod} ({dst}): {way}")
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def test_the_checker_catches_a_sideways_import(tmp_path):
    """The rule itself: training -> sample is refused, sample -> diffusion allowed."""
    assert RANK["training"] == RANK["sample"]
    assert RANK["diffusion"] < RANK["sample"] and RANK["errors"] < RANK["fsutil"] < RANK["models"]
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ..sample.generate import generate\n    from ..diffusion import samplers\n")
    got = [m for m, _ in _imports("ti_fast.training.x", False, f)]
    assert got == ["ti_fast.sample.generate", "ti_fast.diffusion.samplers"]
    assert [unit_of(m) for m in got] == ["sample", "diffusion"]
