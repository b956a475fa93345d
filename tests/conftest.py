"""Shared fixtures. Tests use real sockets, real threads and real processes throughout."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.support


@pytest.fixture(autouse=True)
def _no_bql_leak() -> Iterator[None]:
    """Every test must leave the big lock free."""
    from mignet.runtime.bql import BQL

    yield
    assert BQL._owner is None, "a test leaked the big lock"


@pytest.fixture
def mignet_cmd() -> list[str]:
    return [sys.executable, "-m", "mignet"]


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "120"
    return env
