"""The counting-guest harness itself: a running guest migrated live QEMU -> QEMU keeps counting.

Why: later tests use the counting guest to prove that a migration moved a whole machine
(RAM, CPU, devices), with "the destination goes on from the source's last tick + 1" as the
oracle. This test shows the oracle works with QEMU on both ends, so a failure elsewhere
points at mignet, not at the harness.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.counting_guest import (
    CountingGuest,
    assert_resumed,
    build_initramfs,
    counting_guest_skip_reason,
    parse_ticks,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.slow,
    pytest.mark.skipif(counting_guest_skip_reason() is not None,
                       reason=counting_guest_skip_reason() or ""),
]


@pytest.fixture(scope="session")
def counting_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session: every counting guest boots the same archive."""
    return build_initramfs(tmp_path_factory.mktemp("counting-initramfs"))


def test_parse_ticks_skips_partial_and_foreign_lines() -> None:
    log = b"[ 0.1] boot\r\ntick 1\r\ntick 2\r\nti" + b"ck 3\r\n" + b"tick 4"
    assert parse_ticks(log) == [1, 2, 3]
    assert parse_ticks(b"xtick 5\r\n") == []


def test_live_migration_keeps_counting(counting_initramfs: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with CountingGuest(tmp_path, counting_initramfs, name="src") as src, \
            CountingGuest(tmp_path, counting_initramfs, name="dst", incoming=True) as dst:
        src.wait_ticks(3, timeout=120)  # booted and counting (slow under TCG on a busy host)
        uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        info = src.migrate(uri, timeout=120)
        assert info["status"] == "completed"
        assert src.status() == "postmigrate"  # the source stopped: its log is final now
        src_log = src.serial_text()
        src_ticks = parse_ticks(src_log)
        assert src_ticks == list(range(1, len(src_ticks) + 1)), "source skipped a tick"
        last = src_ticks[-1]

        dst.wait_ticks(last + 3, timeout=60)
        assert dst.status() == "running"  # no -S: QEMU's destination autostarts
        dst_log = dst.serial_text()

    dst_ticks = assert_resumed(last, dst_log)
    # The two logs are one serial stream: a line cut by the switchover joins up again, and
    # no tick is lost or repeated.
    joined = parse_ticks(src_log + dst_log)
    assert joined == list(range(1, len(joined) + 1))
    assert joined[-1] == dst_ticks[-1]
    assert time.monotonic() - t0 < 300  # generous: ~30 s measured on a loaded 2-core host
