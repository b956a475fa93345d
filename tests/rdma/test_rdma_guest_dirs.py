"""Inside the soft-RoCE guest, folders shared with ``--rwdir`` are 9p: guest RAM files cannot
be mapped shared there, so ``recv --out`` on one must refuse up front in one line (and the
guest's /dev/shm works). ``tools/test.sh`` shares one such folder for this test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import one_line_error

pytestmark = pytest.mark.rdma


def writable_9p_mount() -> Path | None:
    """A writable 9p mount of this guest (a ``--rwdir`` share), if there is one."""
    with open("/proc/mounts") as f:
        for line in f:
            _dev, where, fstype, opts, *_ = line.split()
            if fstype == "9p" and "rw" in opts.split(",") and os.access(where, os.W_OK):
                return Path(where.replace("\\040", " "))
    return None


def test_out_on_a_9p_share_is_refused_in_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                   rdma_uri: str) -> None:
    share = writable_9p_mount()
    if share is None:
        pytest.skip("no writable 9p share in this guest (tools/test.sh passes one with --rwdir)")
    out = share / f"recv-out-{os.getpid()}"
    r = subprocess.run([*mignet_cmd, "recv", "--listen", rdma_uri, "--out", str(out)],
                       capture_output=True, text=True, env=subprocess_env, timeout=120)
    one_line_error(r, "cannot map files shared")
    assert not (out.exists() and any(out.glob("*.ram")))
