"""The control messages that travel by SEND/RECV between the two RDMA endpoints.

Like QEMU's RDMA control header, every message starts with a small fixed header; unlike
QEMU's lock-step exchange (every message waits for READY), flow control is by credits: each
header returns the receive buffers its sender has re-posted, and reports how many stream
messages its reader has *processed*. The source uses that count to never let a page write
overtake a ZERO record the destination has not applied yet (see ``placement``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from mignet.errors import ProtocolError


class Msg(enum.IntEnum):
    DATA = 1  # migration stream bytes
    CREDIT = 2  # credits / processed count only
    EOF = 3  # the sender shut down writing: the stream ends here
    BLOCKS = 4  # destination -> source: where each RAM block lives
    REG_REQUEST = 5  # source -> destination: register these 1 MiB chunks (chunk mode)
    REG_RESULT = 6  # destination -> source: their rkeys
    PLACED = 7  # source -> destination: bytes its WRITEs have landed so far (progress)
    MODE = 8  # source -> destination, before the stream: how to register RAM (pin-all or not)


#: mignet's connect private data: the listener tells mignet's protocol from QEMU's by it
#: (QEMU sends its RDMA capabilities, a be32 version of 1, there).
TAG = b"MIGNETv1"

#: type, pad, credits returned, payload length, stream messages processed so far
HEADER = struct.Struct("<BBHIQ")
BLOCK = struct.Struct("<QQII")  # addr, length, rkey (0 = register chunks on demand), name length
CHUNK_REQ = struct.Struct("<II")  # block index, chunk index
CHUNK_RES = struct.Struct("<IIQI")  # block index, chunk index, chunk address, rkey
PLACED = struct.Struct("<Q")  # bytes landed
MODE = struct.Struct("<B")  # 1: pin-all


@dataclass(frozen=True)
class RemoteBlock:
    """A destination RAM block as the source sees it."""

    index: int
    name: str
    addr: int
    length: int
    rkey: int  # 0: chunk mode, ask for each 1 MiB chunk's rkey

    @property
    def chunked(self) -> bool:
        return self.rkey == 0


def pack_blocks(blocks: list[RemoteBlock]) -> bytes:
    out = bytearray(struct.pack("<I", len(blocks)))
    for b in blocks:
        name = b.name.encode()
        out += BLOCK.pack(b.addr, b.length, b.rkey, len(name)) + name
    return bytes(out)


def unpack_blocks(data: bytes) -> list[RemoteBlock]:
    try:
        (count,) = struct.unpack_from("<I", data)
        pos, out = 4, []
        for i in range(count):
            addr, length, rkey, nlen = BLOCK.unpack_from(data, pos)
            pos += BLOCK.size
            out.append(RemoteBlock(i, data[pos:pos + nlen].decode(), addr, length, rkey))
            pos += nlen
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed RDMA block list from the destination: {exc}") from None
    return out
