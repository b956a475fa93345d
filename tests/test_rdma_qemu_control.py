"""QEMU's RDMA framing (``mignet.rdma.qemu_control``) on the host, without a device: the
sizes migration/rdma.c's packed structures have, how a connection's private data is told
apart, and the header checks QEMU itself makes. The exchange runs in tests/rdma/."""

from __future__ import annotations

import pytest

from mignet.errors import ProtocolError
from mignet.rdma import qemu_control as q
from mignet.rdma.control import TAG


def test_structures_have_qemus_packed_sizes() -> None:
    # RDMAControlHeader, RDMADestBlock (with its pad), RDMARegister, RDMARegisterResult,
    # RDMACompress, RDMACapabilities: QEMU divides lengths by these sizes
    assert [s.size for s in (q.HEADER, q.DEST_BLOCK, q.REGISTER, q.REGISTER_RESULT, q.COMPRESS, q.CAPS)] \
        == [16, 32, 24, 16, 24, 8]


def test_private_data_tells_qemu_from_mignet() -> None:
    padded = 56  # rdma_cm pads a connect request's private data with zeros
    qemu = q.parse_caps((b"\x00\x00\x00\x01\x00\x00\x00\x01").ljust(padded, b"\x00"))
    assert qemu == q.Caps(1, 1) and qemu.pin_all
    assert q.parse_caps(bytes(padded)) is None  # nothing sent: an older mignet
    assert q.parse_caps(b"") is None
    assert not TAG.startswith(b"\x00\x00\x00\x01")  # mignet's tag is never QEMU version 1
    # the answer keeps only what QEMU 7.2 knows; an unknown version is refused
    assert q.accept_caps(q.Caps(1, 0xFF)) == b"\x00\x00\x00\x01\x00\x00\x00\x01"
    with pytest.raises(ProtocolError, match="version 2 is not supported"):
        q.accept_caps(q.Caps(2, 0))


def test_headers_are_checked_as_qemu_checks_them() -> None:
    msg = q.message(q.Control.QEMU_FILE, b"abc")
    assert msg[:16] == b"\x00\x00\x00\x03\x00\x00\x00\x03\x00\x00\x00\x01\x00\x00\x00\x00"
    assert q.parse_header(memoryview(msg), len(msg)) == (q.Control.QEMU_FILE, 1, 3)
    with pytest.raises(ProtocolError, match="3 payload bytes, 2 arrived"):
        q.parse_header(memoryview(msg), len(msg) - 1)
    with pytest.raises(ProtocolError, match="no header"):
        q.parse_header(memoryview(msg), 8)
    many = q.HEADER.pack(0, q.Control.REGISTER_REQUEST, q.MAX_COMMANDS + 1, 0)
    with pytest.raises(ProtocolError, match="4097 commands"):
        q.parse_header(memoryview(many), len(many))
    with pytest.raises(ProtocolError, match="too short for 2 commands"):
        q.commands(q.REGISTER, memoryview(bytes(24)), 2, "REGISTER_REQUEST")
    assert q.control_name(9) == "REGISTER_FINISHED" and q.control_name(99) == "type 99"


def test_zero_runs_of_a_batch_follow_its_chunked_runs() -> None:
    """The source sends an all-zero run of a chunk not registered yet as COMPRESS: which runs
    (``placement._runs``: contiguous pages, cut at 1 MiB) are all zero, against brute force."""
    import numpy as np

    from mignet.rdma.placement import _runs
    from mignet.rdma.qemu_source import _zero_runs

    rng = np.random.default_rng(3)
    pages = np.sort(rng.choice(1024, 700, replace=False)).astype(np.int64)  # 4 MiB, gaps
    offsets = pages * 4096
    zero = rng.random(len(pages)) < 0.9
    zero[(offsets >= 1 << 20) & (offsets < 2 << 20)] = True  # one whole zero chunk
    runs = _runs(offsets)
    got = _zero_runs(offsets, zero, runs)
    by_offset = dict(zip(offsets.tolist(), zero.tolist(), strict=True))
    want = [all(by_offset[o] for o in range(s, s + n, 4096)) for s, n in runs]
    assert got == want and any(want) and not all(want)
    assert _zero_runs(offsets, None, runs) == [False] * len(runs)


def test_hook_record_is_qemus_flag() -> None:
    from mignet.wire import StreamEncoder

    assert StreamEncoder.hook() == (0x80).to_bytes(8, "big")  # RAM_SAVE_FLAG_HOOK
