"""QEMU's RDMA migration protocol (migration/rdma.c, QEMU 7.2): its framing, as data.

Why mignet speaks it beside its own (``control``): real QEMU can only migrate over
``rdma:`` with it. It differs from mignet's in every respect that matters for speed: one
message at a time in lock-step (the receiver SENDs READY, the sender SENDs one message,
which may ask for one answer), 512 KiB receive buffers, and the stream's bytes in
``QEMU_FILE`` messages of at most 32 KiB. Pages bypass it: the source RDMA WRITEs them into
the destination's RAM, after asking for each 1 MiB chunk's key (``REGISTER_REQUEST``)
unless ``rdma-pin-all`` registered the whole RAM up front.

Everything is big-endian (QEMU's ``htonl``/``htonll``). Only structures live here; the
exchange itself is :mod:`mignet.rdma.qemu_channel`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from mignet.errors import ProtocolError

#: RDMACapabilities {be32 version, be32 flags}: the source's connect private data, and
#: the destination's accept private data (the flags it grants).
CAPS = struct.Struct(">II")
VERSION = 1  # RDMA_CONTROL_VERSION_CURRENT
CAP_PIN_ALL = 0x01  # RDMA_CAPABILITY_PIN_ALL
KNOWN_CAPS = CAP_PIN_ALL

#: RDMAControlHeader {be32 len (payload bytes), be32 type, be32 repeat, be32 padding}
HEADER = struct.Struct(">IIII")
MAX_MESSAGE = 512 << 10  # RDMA_CONTROL_MAX_BUFFER: header included
MAX_COMMANDS = 4096  # RDMA_CONTROL_MAX_COMMANDS_PER_MESSAGE
CHUNK_SHIFT = 20  # RDMA_REG_CHUNK_SHIFT: 1 MiB registration chunks

#: RDMADestBlock {remote_host_addr, offset, length, be32 rkey, pad}: the destination's
#: answer to RAM_BLOCKS_REQUEST, one per RAM block in the source's order.
DEST_BLOCK = struct.Struct(">QQQII")
#: RDMARegister {current_addr (or chunk), be32 block index, pad, chunks}: register the
#: chunk holding current_addr (a destination ram_addr_t offset) and ``chunks`` more.
REGISTER = struct.Struct(">QIIQ")
#: RDMARegisterResult {be32 rkey, pad, host_addr (the block's base)}
REGISTER_RESULT = struct.Struct(">IIQ")
#: RDMACompress {be32 value, be32 block index, offset, length}: fill with ``value``
#: (zero pages of a chunk not registered yet travel like this, not by WRITE)
COMPRESS = struct.Struct(">IIQQ")


class Control(enum.IntEnum):
    NONE = 0
    ERROR = 1
    READY = 2  # the receiver has a buffer posted: send the next message
    QEMU_FILE = 3  # migration stream bytes
    RAM_BLOCKS_REQUEST = 4
    RAM_BLOCKS_RESULT = 5
    COMPRESS = 6
    REGISTER_REQUEST = 7
    REGISTER_RESULT = 8
    REGISTER_FINISHED = 9  # the source's registrations for this iteration are done
    UNREGISTER_REQUEST = 10
    UNREGISTER_FINISHED = 11


def control_name(kind: int) -> str:
    return Control(kind).name if kind in Control._value2member_map_ else f"type {kind}"


@dataclass(frozen=True)
class Caps:
    version: int
    flags: int

    @property
    def pin_all(self) -> bool:
        return bool(self.flags & CAP_PIN_ALL)


def parse_caps(private: bytes) -> Caps | None:
    """QEMU's capabilities from a connect request's private data; None if it holds none
    (rdma_cm pads private data with zeros, so version 0 means nothing was sent)."""
    if len(private) < CAPS.size:
        return None
    version, flags = CAPS.unpack_from(private)
    return Caps(version, flags) if version else None


def accept_caps(offered: Caps) -> bytes:
    """Our answer: only the capabilities QEMU 7.2 knows, as its destination answers."""
    if offered.version != VERSION:
        raise ProtocolError(f"QEMU's RDMA protocol version {offered.version} is not supported "
                            f"(mignet speaks version {VERSION}, QEMU 7.2's)")
    return CAPS.pack(VERSION, offered.flags & KNOWN_CAPS)


def message(kind: Control, payload: bytes = b"", repeat: int = 1) -> bytes:
    return HEADER.pack(len(payload), kind, repeat, 0) + payload


def parse_header(buf: memoryview, received: int) -> tuple[int, int, int]:
    """(type, repeat, payload length) of a received message of ``received`` bytes;
    ProtocolError if its header disagrees with what arrived, as QEMU checks."""
    if received < HEADER.size:
        raise ProtocolError(f"QEMU RDMA control message of {received} bytes (no header)")
    length, kind, repeat, _ = HEADER.unpack_from(buf)
    if HEADER.size + length != received:
        raise ProtocolError(f"QEMU RDMA control message says {length} payload bytes, "
                            f"{received - HEADER.size} arrived")
    if repeat > MAX_COMMANDS:
        raise ProtocolError(f"QEMU RDMA control message with {repeat} commands "
                            f"(at most {MAX_COMMANDS})")
    return kind, repeat, length


def commands(st: struct.Struct, payload: memoryview, repeat: int, what: str) -> list[tuple[int, ...]]:
    """``repeat`` packed structures from a request's payload."""
    if repeat * st.size > len(payload):
        raise ProtocolError(f"QEMU RDMA {what} message too short for {repeat} commands")
    return [st.unpack_from(payload, i * st.size) for i in range(repeat)]
