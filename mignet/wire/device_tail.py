"""Splitting real QEMU's device sections, which carry no length on the wire.

QEMU writes device state (SECTION_FULL) field by field with no size prefix, so a receiver that
does not know every device's layout cannot tell where one section ends. After the last
section QEMU sends EOF and then a JSON VM description listing, for every section in order,
the size of each field. So the receiver keeps the bytes from the first unknown section to the
end of the input and splits them afterwards:

1. find the VMDESCRIPTION at the end (a 0x06 whose be32 length reaches exactly the end,
   right after the 0x00 EOF byte);
2. walk the sections with the sizes the description gives, checking every footer; where a
   device gives no sizes, find its footer by scanning (0x7E + its section id, followed by the
   next section or EOF).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from mignet.errors import ProtocolError
from mignet.wire.constants import SectionType

_BE32 = struct.Struct(">I")


@dataclass(frozen=True)
class TailSection:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    raw: bytes  # the field bytes (incl. subsections), without header and footer


def split_device_tail(tail: bytes, base: int) -> tuple[list[TailSection], dict[str, Any] | None]:
    """Split ``tail`` (from a SECTION_FULL byte to the end of input; ``base`` is its stream
    offset, for error messages) into device sections and the VM description."""
    end, description = _find_vmdescription(tail, base)
    # The description is the peer's word: only well-formed entries guide the split; anything
    # else falls back to scanning for the section's footer.
    listed = description.get("devices") if description else None
    devices = [d if isinstance(d, dict) else None for d in listed] if isinstance(listed, list) else []
    sections: list[TailSection] = []
    pos = 0
    index = 0
    while pos < end and tail[pos] == SectionType.SECTION_FULL:
        if pos + 6 > end:
            break
        sid = _BE32.unpack_from(tail, pos + 1)[0]
        idlen = tail[pos + 5]
        head = pos + 6 + idlen + 8
        if head > end:
            raise ProtocolError("device section header runs past the end", offset=base + pos)
        idstr = tail[pos + 6:pos + 6 + idlen].decode("utf-8", "replace")
        instance, version = struct.unpack_from(">II", tail, pos + 6 + idlen)
        desc = devices[index] if index < len(devices) else None
        body_end = _body_end_from_description(tail, head, end, sid, desc)
        if body_end is None:
            body_end = _body_end_by_scan(tail, head, end, sid)
        if body_end is None:
            raise ProtocolError(
                f"cannot find the end of device section {idstr!r} (id {sid}): the stream "
                "has no usable VM description", offset=base + pos)
        sections.append(TailSection(sid, idstr, instance, version, tail[head:body_end]))
        pos = body_end + 5
        index += 1
    if pos >= end or tail[pos] != SectionType.EOF:
        found = tail[pos] if pos < end else None
        raise ProtocolError(
            f"expected EOF after device sections, found {found!r}", offset=base + pos)
    if pos + 1 != end:
        raise ProtocolError(f"{end - pos - 1} unexpected bytes after EOF", offset=base + pos + 1)
    return sections, description


def _find_vmdescription(tail: bytes, base: int) -> tuple[int, dict[str, Any] | None]:
    """Return (index of the EOF byte + 1, description or None)."""
    if tail.endswith(b"\x00") and not _looks_like_vmdesc_end(tail):
        return len(tail), None  # EOF without a description (suppress-vmdesc machines)
    search_from = len(tail)
    while True:
        p = tail.rfind(b"\x00\x06", 0, search_from)
        if p < 0:
            raise ProtocolError("stream ended without EOF after device sections", offset=base + len(tail))
        if p + 6 <= len(tail) and _BE32.unpack_from(tail, p + 2)[0] == len(tail) - p - 6:
            try:
                description = json.loads(tail[p + 6:])
            except ValueError:
                description = None
            except RecursionError:
                raise ProtocolError("VM description is nested too deeply to be a real one",
                                    offset=base + p + 1) from None
            if isinstance(description, dict):
                return p + 1, description
        search_from = p + 1 if p + 1 < search_from else p


def _looks_like_vmdesc_end(tail: bytes) -> bool:
    return tail.rstrip().endswith(b"}")


def _body_end_from_description(tail: bytes, head: int, end: int, sid: int,
                               desc: dict[str, Any] | None) -> int | None:
    if not desc or "fields" not in desc:
        return None
    try:
        after_fields = head + _fields_size(desc)
        pos = _skip_subsections(tail, after_fields, end, desc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError):
        return None  # the description does not fit these bytes: scan for the footer instead
    if pos is None or not _footer_at(tail, pos, end, sid):
        return None
    return pos


def _fields_size(desc: dict[str, Any]) -> int:
    return sum(int(f["size"]) * int(f.get("array_len", 1)) for f in desc.get("fields", []))


def _skip_subsections(tail: bytes, pos: int, end: int, desc: dict[str, Any]) -> int | None:
    subs = {s["vmsd_name"]: s for s in desc.get("subsections", [])}
    while pos < end and tail[pos] == SectionType.SUBSECTION:
        namelen = tail[pos + 1]
        name = tail[pos + 2:pos + 2 + namelen].decode("utf-8", "replace")
        sub = subs.get(name)
        if sub is None:
            return None
        pos += 2 + namelen + 4 + _fields_size(sub)
        nested = _skip_subsections(tail, pos, end, sub)
        if nested is None:
            return None
        pos = nested
    return pos if pos <= end else None


def _footer_at(tail: bytes, pos: int, end: int, sid: int) -> bool:
    return (pos + 5 <= end and tail[pos] == SectionType.SECTION_FOOTER
            and _BE32.unpack_from(tail, pos + 1)[0] == sid)


#: What may follow a device section: in a precopy tail, and in a postcopy package (whose
#: devices are followed by PING and RUN commands, never by EOF).
TAIL_FOLLOWERS = frozenset({SectionType.SECTION_FULL, SectionType.EOF})
PACKAGE_FOLLOWERS = frozenset({SectionType.SECTION_FULL, SectionType.COMMAND})


def _body_end_by_scan(tail: bytes, head: int, end: int, sid: int) -> int | None:
    return section_end_by_scan(tail, head, end, sid, TAIL_FOLLOWERS)


def section_end_by_scan(buf: bytes | bytearray, head: int, end: int, sid: int,
                        followers: frozenset[int]) -> int | None:
    """Where the body of section ``sid`` that starts at ``head`` ends: at its footer
    (0x7E + id) that one of ``followers`` comes right after, before ``end``."""
    marker = bytes([SectionType.SECTION_FOOTER]) + _BE32.pack(sid)
    pos = head
    while True:
        p = buf.find(marker, pos, end)
        if p < 0:
            return None
        nxt = p + 5
        if nxt < end and buf[nxt] in followers:
            return p
        pos = p + 1
