"""pyproject.toml: every ti_fast package is installed, and the [test] extra pulls nothing GPU-only
(those live in [gpu]; .ci/run installs triton and bitsandbytes for the tests that use them)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_ONLY = ("triton", "xformers", "bitsandbytes", "nvidia-", "cupy", "flash-attn")


@pytest.fixture(scope="module")
def project():
    try:
        import tomllib
    except ModuleNotFoundError:                       # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower()


def test_every_package_is_listed(project):
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {".".join(("ti_fast",) + p.parent.relative_to(ROOT / "ti_fast").parts)
             for p in (ROOT / "ti_fast").rglob("__init__.py")}
    assert found <= listed, f"not installed by pip: {sorted(found - listed)}"


def test_test_extra_pulls_nothing_gpu_only(project):
    extras = project["project"]["optional-dependencies"]
    test = [_name(r) for r in extras["test"]]
    assert not [n for n in test if n.startswith(GPU_ONLY)], test
    assert {_name(r) for r in extras["gpu"]} >= {"triton", "bitsandbytes"}
    base = [_name(r) for r in project["project"]["dependencies"]]
    assert not [n for n in base if n.startswith(GPU_ONLY)], base
    ci = (ROOT / ".ci" / "run").read_text()
    assert "triton==" in ci and "bitsandbytes==" in ci      # the tests that use them keep running in CI
