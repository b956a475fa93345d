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
