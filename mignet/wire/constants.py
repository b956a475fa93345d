"""Numbers of QEMU's migration stream format (migration/savevm.c, migration/ram.c)."""

from __future__ import annotations

import enum

from mignet.units import PAGE_SIZE

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3
FLAGS_MASK = PAGE_SIZE - 1  # flags live in the low bits of a record's offset word


class SectionType(enum.IntEnum):
    """The byte that starts every top-level element of the stream."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class RamFlag(enum.IntFlag):
    """Flags in the low 12 bits of a RAM record's be64 word."""

    FULL = 0x01  # obsolete since QEMU 1.x
    ZERO = 0x02  # one fill byte follows
    MEM_SIZE = 0x04  # block list follows
    PAGE = 0x08  # PAGE_SIZE raw bytes follow
    EOS = 0x10  # end of this section's RAM records
    CONTINUE = 0x20  # same block as the previous record: no name follows
    XBZRLE = 0x40
    HOOK = 0x80  # RDMA registration hook
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


# What each unsupported flag means, so the error tells the user which capability to turn off.
UNSUPPORTED_RAM_FLAGS: dict[RamFlag, str] = {
    RamFlag.FULL: "the obsolete FULL flag (pre-1.0 QEMU)",
    RamFlag.XBZRLE: "XBZRLE-compressed pages: disable the xbzrle capability on the source",
    RamFlag.HOOK: "RDMA hooks in a socket stream: use an rdma: URI on both sides",
    RamFlag.COMPRESS_PAGE: "compressed pages: disable the compress capability on the source",
    RamFlag.MULTIFD_FLUSH: "multifd flushes: disable the multifd capability on the source",
}

RECORD_HEADER_SIZE = 8
PAGE_RECORD_SIZE = RECORD_HEADER_SIZE + PAGE_SIZE
# A CONTINUE'd full page: what the receiver's fast path predicts.
CONTINUE_PAGE_FLAGS = int(RamFlag.PAGE | RamFlag.CONTINUE)
RAM_SECTION_NAME = "ram"
RAM_SECTION_VERSION = 4
