"""Fixtures for the RDMA tests: the device address, fresh ports, and the skip reason.

They need a real RDMA device (soft-RoCE in the guest harness: ``tools/test.sh`` runs them
with ``tools/rxe/run_in_guest.py``); elsewhere every ``rdma``-marked test skips, saying why.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ADDR = os.environ.get("MIGNET_RDMA_ADDR", "10.9.0.1")
_ports = itertools.count(20000 + os.getpid() % 2000 * 10)


def rdma_unavailable() -> str | None:
    """None when an RDMA device is usable here, else the reason (with its fix)."""
    try:
        from mignet.errors import SetupError
        from mignet.rdma.verbs import check_device
    except ImportError as exc:  # pragma: no cover - mignet itself is importable
        return str(exc)
    try:
        check_device()
    except SetupError as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rdma_items = [i for i in items if i.get_closest_marker("rdma")]
    if not rdma_items:
        return
    reason = rdma_unavailable()
    if reason is not None:
        skip = pytest.mark.skip(reason=f"no usable RDMA device: {reason}")
        for item in rdma_items:
            item.add_marker(skip)


@pytest.fixture
def rdma_uri() -> str:
    """A fresh ``rdma:ADDR:PORT`` (rdma_cm needs explicit ports)."""
    return f"rdma:{ADDR}:{next(_ports)}"


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh folder on tmpfs for QEMU's RAM files (a shared mmap fails on 9p)."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="mignet-rdma-", dir=base) as d:
        yield Path(d)
