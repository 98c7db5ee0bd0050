"""Print the README's package map: one line per source file, from its docstring's first line."""
from __future__ import annotations

import ast
from pathlib import Path

ROOTS = ["ti_fast", "kernels", "bench", "scripts", "tests"]


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




def write_readme(path: str = "README.md") -> None:
    """Replace the fenced block after '## Package map' with the current map."""
    text = Path(path).read_text(encoding="utf-8")
    head, _, tail = text.partition("## Package map")
    start = tail.index("```")
    end = tail.index("```", start + 3) + 3
    Path(path).write_text(head + "## Package map" + tail[:start] + package_map() + tail[end:], encoding="utf-8")


if __name__ == "__main__":
    import sys
    if "--write" in sys.argv:
        write_readme()
    else:
        print(package_map())
