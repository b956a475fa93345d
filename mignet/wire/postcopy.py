"""QEMU's postcopy on the wire, sans-I/O: the stream commands, their order, and the page
requests a destination sends back.

Postcopy switches a migration over before every page has arrived: the source stops its
guest, tells the destination which pages it has dirtied since sending them (RAM_DISCARD),
sends the device state in one length-prefixed PACKAGED command (LISTEN, the devices, RUN)
and keeps streaming the rest while the destination runs and asks for the pages it touches
(REQ_PAGES on the return path). Facts from QEMU 7.2's migration/savevm.c
(``qemu_savevm_send_postcopy_*``, ``loadvm_postcopy_*``) and migration.c
(``migrate_send_rp_message_req_pages``, ``rp_cmd_args``).

Everything that decides whether a postcopy command may come next is in :data:`TRANSITIONS`:
the decoder consults it for every command, top level or packaged.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

from mignet.units import PAGE_SIZE

CMD_POSTCOPY_ADVISE = 3
CMD_POSTCOPY_LISTEN = 4
CMD_POSTCOPY_RUN = 5
CMD_POSTCOPY_RAM_DISCARD = 6
CMD_PACKAGED = 7
CMD_POSTCOPY_RESUME = 9
CMD_RECV_BITMAP = 10

RP_REQ_PAGES_ID = 3
RP_REQ_PAGES = 4
RP_RECV_BITMAP = 5
RP_RESUME_ACK = 6
RESUME_ACK_VALUE = 1  # QEMU's MIGRATION_RESUME_ACK_VALUE
RECV_BITMAP_ENDING = 0x0123456789ABCDEF  # QEMU's RAMBLOCK_RECV_BITMAP_ENDING

DISCARD_VERSION = 0  # QEMU's postcopy_ram_discard_version
#: QEMU refuses larger packages (MAX_VM_CMD_PACKAGED_SIZE is 4 GiB); real device state is
#: ~12 KB, and the destination must hold the whole package before it applies any of it.
MAX_PACKAGE_BYTES = 256 << 20

_ADVISE = struct.Struct(">QQ")
_HEAD = struct.Struct(">HH")
_BE64 = struct.Struct(">Q")
_RANGE = struct.Struct(">QQ")
_REQ = struct.Struct(">QI")


class PostcopyState(enum.Enum):
    """The incoming side's postcopy state (QEMU's ``PostcopyState``)."""

    NONE = "none"
    ADVISE = "advise"  # the source may switch to postcopy later
    DISCARD = "discard"  # it did: dirty pages are being thrown away here
    LISTENING = "listening"  # RAM now faults on missing pages; device state follows
    RUNNING = "running"  # the destination runs; the rest of RAM streams in


_P = PostcopyState
#: (state, command) -> next state. A pair not listed is a peer out of QEMU's order.
TRANSITIONS: dict[tuple[PostcopyState, int], PostcopyState] = {
    (_P.NONE, CMD_POSTCOPY_ADVISE): _P.ADVISE,
    (_P.ADVISE, CMD_POSTCOPY_RAM_DISCARD): _P.DISCARD,
    (_P.DISCARD, CMD_POSTCOPY_RAM_DISCARD): _P.DISCARD,
    (_P.ADVISE, CMD_PACKAGED): _P.ADVISE,
    (_P.DISCARD, CMD_PACKAGED): _P.DISCARD,
    (_P.ADVISE, CMD_POSTCOPY_LISTEN): _P.LISTENING,
    (_P.DISCARD, CMD_POSTCOPY_LISTEN): _P.LISTENING,
    (_P.LISTENING, CMD_POSTCOPY_RUN): _P.RUNNING,
    # postcopy recovery, on the connection that replaces a lost one (QEMU's migrate -r)
    (_P.RUNNING, CMD_RECV_BITMAP): _P.RUNNING,
    (_P.RUNNING, CMD_POSTCOPY_RESUME): _P.RUNNING,
}
#: The commands only a package may carry (QEMU reads RUN's effect as "quit the package").
PACKAGED_ONLY = frozenset({CMD_POSTCOPY_LISTEN, CMD_POSTCOPY_RUN})
#: The commands only a recovery connection may carry.
RECOVERY_ONLY = frozenset({CMD_RECV_BITMAP, CMD_POSTCOPY_RESUME})
ORDER = "ADVISE, RAM_DISCARD..., PACKAGED(LISTEN, devices, RUN)"


def next_state(state: PostcopyState, cmd: int) -> PostcopyState | None:
    return TRANSITIONS.get((state, cmd))


# --- payloads ----------------------------------------------------------------------------
def advise_payload(page_size_summary: int = PAGE_SIZE, target_page_size: int = PAGE_SIZE) -> bytes:
    """ADVISE with postcopy-ram: the OR of the source's RAM page sizes, its target page size."""
    return _ADVISE.pack(page_size_summary, target_page_size)


def parse_advise(data: bytes) -> tuple[int, int]:
    """(page size summary, target page size); the caller checked the length is 16."""
    summary, tps = _ADVISE.unpack(data)
    return summary, tps


def discard_payload(block: str, ranges: list[tuple[int, int]]) -> bytes:
    """One RAM_DISCARD: version, counted block name, a NUL, then (start, length) pairs."""
    name = block.encode()
    return (bytes([DISCARD_VERSION, len(name)]) + name + b"\0"
            + b"".join(_RANGE.pack(s, n) for s, n in ranges))


def parse_discard(data: bytes) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The block name and (start, length) ranges; ValueError says what is malformed."""
    if len(data) < 1 + 1 + 1 + 1 + _RANGE.size:
        raise ValueError(f"RAM_DISCARD of {len(data)} bytes is too short")
    if data[0] != DISCARD_VERSION:
        raise ValueError(f"RAM_DISCARD version {data[0]}, QEMU 7.2 sends {DISCARD_VERSION}")
    namelen = data[1]
    if 2 + namelen + 1 > len(data):
        raise ValueError("RAM_DISCARD block name runs past its command")
    try:
        name = data[2:2 + namelen].decode()
    except UnicodeDecodeError:
        raise ValueError(f"RAM_DISCARD block name {data[2:2 + namelen]!r} is not UTF-8") from None
    if data[2 + namelen] != 0:
        raise ValueError("RAM_DISCARD block name is not NUL-terminated")
    rest = data[3 + namelen:]
    if not rest or len(rest) % _RANGE.size:
        raise ValueError(f"RAM_DISCARD carries {len(rest)} bytes of ranges, not 16-byte pairs")
    return name, tuple(_RANGE.iter_unpack(rest))


def parse_recv_bitmap(data: bytes) -> str:
    """RECV_BITMAP's block name (a counted string)."""
    if not data or len(data) != 1 + data[0]:
        raise ValueError(f"RECV_BITMAP of {len(data)} bytes does not match its name length")
    return data[1:].decode("utf-8", "replace")


def recv_bitmap_reply(block: str, received: np.ndarray) -> bytes:
    """The RECV_BITMAP answer: the return-path message naming ``block``, then (outside the
    message framing, as QEMU reads it) be64 size, the received pages as a little-endian
    bitmap padded to 8 bytes, and the end mark. The source re-sends every page not in it."""
    name = block.encode()
    bits = np.packbits(received.astype(bool), bitorder="little").tobytes()
    bits += bytes(-len(bits) % 8)
    head = _HEAD.pack(RP_RECV_BITMAP, 1 + len(name)) + bytes([len(name)]) + name
    return head + _BE64.pack(len(bits)) + bits + _BE64.pack(RECV_BITMAP_ENDING)


def resume_ack() -> bytes:
    return _HEAD.pack(RP_RESUME_ACK, 4) + RESUME_ACK_VALUE.to_bytes(4, "big")


def packaged_length(data: bytes) -> int:
    return int.from_bytes(data, "big")


# --- return path: page requests ----------------------------------------------------------
def req_pages(offset: int, length: int, block: str | None) -> tuple[int, bytes]:
    """A page request: (message type, data). ``block`` None reuses the previous request's
    block (REQ_PAGES); a name starts a new one (REQ_PAGES_ID), as QEMU's destination does."""
    head = _REQ.pack(offset, length)
    if block is None:
        return RP_REQ_PAGES, head
    name = block.encode()
    return RP_REQ_PAGES_ID, head + bytes([len(name)]) + name


def parse_req_pages(kind: int, data: bytes) -> tuple[int, int, str | None]:
    """(offset, length, block or None) of a REQ_PAGES / REQ_PAGES_ID message."""
    if len(data) < _REQ.size:
        raise ValueError(f"page request of {len(data)} bytes")
    offset, length = _REQ.unpack_from(data)
    if kind == RP_REQ_PAGES:
        if len(data) != _REQ.size:
            raise ValueError(f"REQ_PAGES of {len(data)} bytes, expected {_REQ.size}")
        return offset, length, None
    if len(data) < _REQ.size + 1 or len(data) != _REQ.size + 1 + data[_REQ.size]:
        raise ValueError(f"REQ_PAGES_ID of {len(data)} bytes does not match its name length")
    return offset, length, data[_REQ.size + 1:].decode("utf-8", "replace")
