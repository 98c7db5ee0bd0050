"""What the tests need from their surroundings: CI=1 (or true/yes) turns a missing optional
package or system browser from a skip into a failure, since .ci/run installs them all."""
from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(msg: str) -> None:
    """Skip the test, or fail it under CI (where the thing missing should have been installed)."""
    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)
