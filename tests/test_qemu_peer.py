"""Real QEMU 7.2 (Debian's qemu-system-x86) as the migration source into ``mignet recv``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mignet.guest.ram import block_filename
from tests.support.qemu_peer import QemuSource, qemu_skip_reason

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(qemu_skip_reason() is not None,
                                                   reason=qemu_skip_reason() or "")]


def test_real_qemu_source_lands_byte_identical(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                               tmp_path: Path) -> None:
    out = tmp_path / "received"
    recv = subprocess.Popen([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--out", str(out),
                             "--json", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env)
    assert recv.stdout is not None
    uri = json.loads(recv.stdout.readline())["uri"]
    with QemuSource(tmp_path, mem_mib=256, fill="random", seed=3) as qemu:
        info = qemu.migrate(uri)
        assert info["status"] == "completed"
        stdout, stderr = recv.communicate(timeout=120)
        assert recv.returncode == 0, stderr
        source = np.fromfile(qemu.image_path, np.uint8)
    received = np.fromfile(out / block_filename("m0"), np.uint8)
    assert received.size == 256 << 20
    assert np.array_equal(received, source)
    done = json.loads(stdout.strip().splitlines()[-1])
    names = [name for name, _ in done["blocks"]]
    assert names[0] == "m0" and "pc.bios" in names
    assert done["stats"]["machine_type"].startswith("pc-i440fx")
    assert done["stats"]["device_sections"] > 20  # real devices, split with the VM description
    assert (out / "device-state.bin").stat().st_size > 1000
    assert json.loads((out / "vmdescription.json").read_text())["page_size"] == 4096
