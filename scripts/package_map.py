"""Print the README's package map: one line per source file, from its docstring's first line."""
from __future__ import annotations

import ast
from pathlib import Path

ROOTS = ["ti_fast", "bench", "scripts", "tests"]


def first_line(path: Path) -> str:
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    else:
        lines = [ln.lstrip("# ").strip() for ln in path.read_text(encoding="utf-8").splitlines()[1:4] if ln.startswith("#")]
        doc = lines[0] if lines else ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def package_map() -> str:
    out = ["```"]
    for root in ROOTS:
        for p in sorted(Path(root).rglob("*")):
            if p.suffix not in (".py", ".sh") or "__pycache__" in p.parts:
                continue
            out.append(f"{str(p):38s} {first_line(p)}")
    out.append("```")
    return "\n".join(out)




def flow() -> str:
    """The README's one-line statement of the import layers, from tests/test_layers.py's LAYERS
    (the test that enforces them)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("test_layers", Path("tests") / "test_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [" | ".join(f"`{u}`" for u in row) for row in mod.LAYERS]
    return ("Data flows one way (lowest first; units in one step never import each other; enforced by "
            "tests/test_layers.py): " + " → ".join(f"({r})" if "|" in r else r for r in rows) + ".")


def write_readme(path: str = "README.md") -> None:
    """Replace the flow statement and the fenced block after '## Package map' with the current ones."""
    text = Path(path).read_text(encoding="utf-8")
    head, _, tail = text.partition("## Package map")
    start = tail.index("```")
    end = tail.index("```", start + 3) + 3
    lines = tail[:start].split("\n")
    lines = [flow() if ln.startswith("Data flows one way") else ln for ln in lines]
    Path(path).write_text(head + "## Package map" + "\n".join(lines) + package_map() + tail[end:], encoding="utf-8")


if __name__ == "__main__":
    import sys
    if "--write" in sys.argv:
        write_readme()
    else:
        print(package_map())
