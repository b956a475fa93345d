"""QEMU's stream commands (QEMU_VM_COMMAND sections) and return-path messages, sans-I/O.

With the ``return-path`` capability a QEMU source sends OPEN_RETURN_PATH and a PING right
after the header; the destination answers on the same connection, in the other direction,
with PONG and, once the guest is loaded, SHUT (0 = loaded, else failed). Only then does
the source report ``completed``: a source without a return path cannot tell a destination
that loaded the guest from one that died at the last byte. Facts from QEMU 7.2's
migration/savevm.c (``enum qemu_vm_cmd``, ``qemu_savevm_command_send``) and migration.c
(``enum mig_rp_message_type``, ``rp_cmd_args``).
"""

from __future__ import annotations

import struct

from mignet.wire.constants import SectionType
from mignet.wire.postcopy import (
    CMD_PACKAGED,
    CMD_POSTCOPY_ADVISE,
    CMD_POSTCOPY_LISTEN,
    CMD_POSTCOPY_RAM_DISCARD,
    CMD_POSTCOPY_RESUME,
    CMD_POSTCOPY_RUN,
    CMD_RECV_BITMAP,
    RP_REQ_PAGES,
    RP_REQ_PAGES_ID,
)

CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
#: QEMU 7.2's MIG_CMD_* numbers and names.
COMMAND_NAMES = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN",
                 5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "PACKAGED", 8: "ENABLE_COLO",
                 9: "POSTCOPY_RESUME", 10: "RECV_BITMAP"}
#: The commands mignet implements, with their payload length (None: variable, checked by
#: the command's parser; ADVISE is 16 with postcopy-ram, 0 for dirty bitmaps alone).
SUPPORTED_COMMANDS: dict[int, int | None] = {
    CMD_OPEN_RETURN_PATH: 0, CMD_PING: 4, CMD_POSTCOPY_ADVISE: 16, CMD_POSTCOPY_LISTEN: 0,
    CMD_POSTCOPY_RUN: 0, CMD_POSTCOPY_RAM_DISCARD: None, CMD_PACKAGED: 4,
    CMD_POSTCOPY_RESUME: 0, CMD_RECV_BITMAP: None}

RP_SHUT = 1
RP_PONG = 2
_RP_LENGTHS = {RP_SHUT: 4, RP_PONG: 4}  # the messages a source of mignet's understands
#: Page requests (postcopy): fixed, and a counted block name of 1-255 bytes after the head
#: (QEMU's rp_cmd_args: REQ_PAGES 12, REQ_PAGES_ID variable).
_RP_REQ_LENGTHS = {RP_REQ_PAGES: range(12, 13), RP_REQ_PAGES_ID: range(14, 13 + 256)}
#: QEMU 7.2's MIG_RP_MSG_* names, for messages and errors.
RP_NAMES = {RP_SHUT: "SHUT", RP_PONG: "PONG", RP_REQ_PAGES_ID: "REQ_PAGES_ID",
            RP_REQ_PAGES: "REQ_PAGES", 5: "RECV_BITMAP", 6: "RESUME_ACK"}
_HEAD = struct.Struct(">HH")
_BE32 = struct.Struct(">I")


def command(cmd: int, data: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND section: type byte, be16 command, be16 length, data."""
    return bytes([SectionType.COMMAND]) + _HEAD.pack(cmd, len(data)) + data


def rp_message(kind: int, data: bytes) -> bytes:
    """One return-path message: be16 type, be16 length, data."""
    return _HEAD.pack(kind, len(data)) + data


def rp_shut(status: int) -> bytes:
    return rp_message(RP_SHUT, _BE32.pack(status))


def rp_pong(value: int) -> bytes:
    return rp_message(RP_PONG, _BE32.pack(value))


def parse_rp_frames(data: bytes, *, requests: bool = False) -> tuple[list[tuple[int, bytes]], bytes]:
    """Whole messages at the front of ``data`` as (type, payload), and the rest. SHUT and
    PONG always; page requests (a postcopy source's) with ``requests``.

    Raises ValueError for a type or length QEMU's own table would refuse."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while len(data) - pos >= _HEAD.size:
        kind, length = _HEAD.unpack_from(data, pos)
        allowed = _RP_REQ_LENGTHS.get(kind) if requests else None
        if _RP_LENGTHS.get(kind) != length and (allowed is None or length not in allowed):
            raise ValueError(f"return-path message type {kind} with {length} bytes")
        if len(data) - pos < _HEAD.size + length:
            break
        out.append((kind, data[pos + _HEAD.size:pos + _HEAD.size + length]))
        pos += _HEAD.size + length
    return out, data[pos:]


def rp_value(data: bytes) -> int:
    """The be32 of a SHUT or PONG."""
    return int(_BE32.unpack(data)[0])


def parse_rp_messages(data: bytes) -> tuple[list[tuple[int, int]], bytes]:
    """Whole SHUT/PONG messages at the front of ``data`` as (type, value), and the rest.

    Raises ValueError for a type or length QEMU's own table would refuse."""
    frames, rest = parse_rp_frames(data)
    return [(kind, rp_value(payload)) for kind, payload in frames], rest
