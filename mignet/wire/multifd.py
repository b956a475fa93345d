"""QEMU 7.2's multifd channels, sans-I/O: the init record and the page-packet header.

With the ``multifd`` capability the source opens one extra connection per channel
(parameter ``multifd-channels``) besides the main stream. Layouts (all big-endian), from
QEMU 7.2's migration/multifd.c and multifd.h:

* ``MultiFDInit_t``, once at the start of each channel, 64 bytes: be32 magic 0x11223344,
  be32 version 1, 16-byte UUID (the source's ``qemu_uuid``, the same on every channel),
  u8 channel id, 7 + 32 reserved bytes.
* ``MultiFDPacket_t``, then over and over: be32 magic, be32 version, be32 flags (bit 0
  SYNC, bits 1-3 compression: 0 none, 1 zlib, 2 zstd), be32 pages_alloc, be32
  normal_pages, be32 next_packet_size, be64 packet_num, 4 x be64 reserved, 256-byte
  NUL-padded RAM block name (320 bytes), then ``PACKET_PAGES`` be64 offset slots. QEMU
  always sends and reads the full ``PACKET_LEN`` (1344) bytes, whatever ``pages_alloc``
  says; the first ``normal_pages`` slots are used. ``normal_pages`` x 4096 bytes of page
  data follow, in offset order.

A packet with SYNC ends a round: the channel's receiver waits there until every channel
delivered its SYNC for the RAM end-of-section (EOS) the main stream just reached.
"""

from __future__ import annotations

import struct
import uuid as uuid_mod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mignet.errors import ProtocolError
from mignet.units import PAGE_SIZE

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MAGIC_BYTES = struct.pack(">I", MULTIFD_MAGIC)

FLAG_SYNC = 1 << 0
COMPRESSION_MASK = 7 << 1
COMPRESSION_NAMES = {1: "zlib", 2: "zstd"}

MULTIFD_PACKET_SIZE = 512 * 1024  # QEMU's MULTIFD_PACKET_SIZE: one packet's page payload
PACKET_PAGES = MULTIFD_PACKET_SIZE // PAGE_SIZE  # 128 offset slots
_INIT = struct.Struct(">II16sB7x32x")
INIT_SIZE = _INIT.size  # 64
_HEADER = struct.Struct(">IIIIIIQ32x256s")
HEADER_SIZE = _HEADER.size  # 320
PACKET_LEN = HEADER_SIZE + 8 * PACKET_PAGES  # 1344: what QEMU 7.2 reads per packet
MAX_CHANNELS = 255  # the id is a u8


@dataclass(frozen=True)
class ChannelInit:
    """A channel's first 64 bytes: who sent it (``uuid``) and which channel it is."""

    uuid: bytes  # 16 bytes
    channel_id: int

    @property
    def uuid_text(self) -> str:
        return str(uuid_mod.UUID(bytes=self.uuid))


@dataclass(frozen=True)
class PacketHeader:
    """One packet's header with its used offsets (``normal_pages`` of them, numpy be64)."""

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    block: str
    offsets: np.ndarray

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def payload_size(self) -> int:
        return self.normal_pages * PAGE_SIZE


def parse_init(data: bytes | bytearray | memoryview) -> ChannelInit:
    """Decode and check a channel's init record (exactly ``INIT_SIZE`` bytes)."""
    if len(data) != INIT_SIZE:
        raise ProtocolError(f"multifd: init record is {INIT_SIZE} bytes, got {len(data)}")
    magic, version, uuid, channel_id = _INIT.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise ProtocolError(f"multifd: init record magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}"
                            " (not a QEMU multifd channel)")
    if version != MULTIFD_VERSION:
        raise ProtocolError(f"multifd: init record version {version}, expected {MULTIFD_VERSION}")
    return ChannelInit(bytes(uuid), channel_id)


def build_init(uuid: bytes, channel_id: int) -> bytes:
    if len(uuid) != 16:
        raise ValueError("a multifd UUID is 16 bytes")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def parse_packet(data: bytes | bytearray | memoryview) -> PacketHeader:
    """Decode and check a packet header with its offset slots (exactly ``PACKET_LEN``
    bytes). Block-relative checks (the block exists, offsets inside it) need the block
    list: :func:`check_offsets`."""
    if len(data) != PACKET_LEN:
        raise ProtocolError(f"multifd: packet header is {PACKET_LEN} bytes, got {len(data)}")
    (magic, version, flags, pages_alloc, normal, next_size, packet_num,
     raw_name) = _HEADER.unpack_from(data)
    if magic != MULTIFD_MAGIC:
        raise ProtocolError(f"multifd: packet magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}")
    if version != MULTIFD_VERSION:
        raise ProtocolError(f"multifd: packet version {version}, expected {MULTIFD_VERSION}")
    comp = (flags & COMPRESSION_MASK) >> 1
    if comp:
        name = COMPRESSION_NAMES.get(comp, f"method {comp}")
        raise ProtocolError(f"multifd: packet compressed with {name}, which mignet does not "
                            "implement: set the source's multifd-compression to none")
    if pages_alloc > PACKET_PAGES:
        raise ProtocolError(f"multifd: packet has {pages_alloc} page slots, at most {PACKET_PAGES}")
    if normal > pages_alloc:
        raise ProtocolError(f"multifd: packet carries {normal} pages but has {pages_alloc} slots")
    block = ""
    if normal:
        end = raw_name.find(b"\0")
        name_bytes = raw_name if end < 0 else raw_name[:end]
        if not name_bytes:
            raise ProtocolError(f"multifd: packet {packet_num} carries {normal} pages but names no RAM block")
        try:
            block = name_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"multifd: packet {packet_num} names RAM block {name_bytes!r}, "
                                "which is not UTF-8") from None
    offsets = np.frombuffer(data, dtype=">u8", count=normal, offset=HEADER_SIZE).copy()
    return PacketHeader(flags, pages_alloc, normal, next_size, packet_num, block, offsets)


def check_offsets(header: PacketHeader, block_size: int) -> None:
    """Every offset page-aligned and its page inside a block of ``block_size`` bytes."""
    offs = header.offsets
    if offs.size == 0:
        return
    bad = (offs % PAGE_SIZE != 0) | (offs > block_size - PAGE_SIZE)
    if block_size < PAGE_SIZE or bad.any():
        i = int(np.argmax(bad)) if block_size >= PAGE_SIZE else 0
        off = int(offs[i])
        why = "is not page-aligned" if off % PAGE_SIZE else "lies outside the block"
        raise ProtocolError(f"multifd: packet {header.packet_num} page offset {off:#x} in RAM block "
                            f"{header.block!r} ({block_size} bytes) {why}")


def build_packet(*, block: str = "", offsets: Sequence[int] | np.ndarray = (), flags: int = 0,
                 packet_num: int = 0, pages_alloc: int = PACKET_PAGES,
                 next_packet_size: int | None = None) -> bytes:
    """A ``PACKET_LEN`` header with ``offsets`` in its first slots (payload not included)."""
    offs = np.asarray(offsets, dtype=">u8")
    if offs.size > PACKET_PAGES:
        raise ValueError(f"at most {PACKET_PAGES} pages per packet")
    name = block.encode()
    if len(name) >= 256:
        raise ValueError("a RAM block name has fewer than 256 bytes")
    if next_packet_size is None:
        next_packet_size = int(offs.size) * PAGE_SIZE
    head = _HEADER.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags, pages_alloc, int(offs.size),
                        next_packet_size, packet_num, name)
    slots = np.zeros(PACKET_PAGES, dtype=">u8")
    slots[:offs.size] = offs
    return head + slots.tobytes()
