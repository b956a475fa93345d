"""What a migration stream holds, sans-I/O: feed its bytes, get sections, the machine type,
RAM blocks with page counts and device sections (with field layouts from the VM description).

The summariser keeps no page data: payloads are skipped (counted), never copied out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mignet.errors import ProtocolError
from mignet.wire.constants import PAGE_SIZE
from mignet.wire.decoder import NEED_DATA, StreamDecoder
from mignet.wire.events import (
    Configuration,
    DeviceState,
    RamBlocks,
    RamEndOfSection,
    RamPage,
    RamZero,
    StreamFinished,
    StreamStart,
    VMDescription,
)


@dataclass
class StreamSummary:
    version: int = 0
    machine_type: str = ""
    ram_total: int = 0
    blocks: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, int] = field(default_factory=lambda: {"ram_start": 0, "ram_part": 0,
                                                              "ram_end": 0, "device_full": 0})
    ram_section_id: int | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    description: dict[str, Any] | None = None
    stream_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "complete": True,
            "version": self.version,
            "machine_type": self.machine_type,
            "stream_bytes": self.stream_bytes,
            "ram_total": self.ram_total,
            "ram_section_id": self.ram_section_id,
            "normal_pages": sum(b["normal_pages"] for b in self.blocks),
            "zero_pages": sum(b["zero_pages"] for b in self.blocks),
            "blocks": self.blocks,
            "sections": self.sections,
            "devices": self.devices,
            "vmdescription": self.description is not None,
        }


def described_fields(description: dict[str, Any] | None) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(device name, instance id) -> its fields as [{name, type, size[, array_len]}], from a
    VM description (QEMU's JSON shape); empty when there is none or it is malformed."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    if not isinstance(description, dict):
        return out
    for dev in description.get("devices", []) or []:
        if not isinstance(dev, dict):
            continue
        fields = []
        for f in dev.get("fields", []) or []:
            if isinstance(f, dict) and "name" in f:
                entry = {"name": f["name"], "type": f.get("type", ""), "size": f.get("size", 0)}
                if "array_len" in f:
                    entry["array_len"] = f["array_len"]
                fields.append(entry)
        try:
            out[(str(dev.get("name")), int(dev.get("instance_id", 0)))] = fields
        except (TypeError, ValueError):
            continue
    return out


def attach_fields(devices: list[dict[str, Any]], description: dict[str, Any] | None) -> None:
    """Give each device entry ({idstr, instance_id, ...}) its ``fields`` (None if undescribed)."""
    known = described_fields(description)
    for dev in devices:
        dev["fields"] = known.get((dev["idstr"], dev["instance_id"]))


def summarise(chunks: Iterable[bytes]) -> StreamSummary:
    """Decode a whole stream given as byte chunks. Raises ProtocolError when the bytes are
    not a migration stream, StreamTruncatedError when they stop before its end."""
    dec = StreamDecoder()
    summary = StreamSummary()
    counts: dict[str, list[int]] = {}  # block -> [normal, zero]
    it = iter(chunks)
    data = memoryview(b"")
    pos = 0
    scratch = bytearray(PAGE_SIZE)
    eof = False

    def refill() -> bool:
        nonlocal data, pos, eof
        for chunk in it:
            if chunk:
                data, pos = memoryview(chunk), 0
                return True
        eof = True
        dec.receive_eof()
        return False

    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            if eof:  # the decoder raises on truncation; this only guards a loop
                raise ProtocolError(f"stream truncated at offset {dec.offset}")
            left = dec.payload_left
            if left:
                if dec.buffered:
                    dec.take_payload_into(memoryview(scratch)[:left])
                    continue
                if pos >= len(data) and not refill():
                    continue
                n = min(left, len(data) - pos)
                pos += n
                dec.payload_placed(n)
                continue
            if pos >= len(data) and not refill():
                continue
            dec.receive_data(data[pos:])
            pos = len(data)
            continue
        if isinstance(ev, StreamStart):
            summary.version = ev.version
        elif isinstance(ev, Configuration):
            summary.machine_type = ev.machine_type
        elif isinstance(ev, RamBlocks):
            summary.ram_total = ev.total
            summary.blocks = [{"name": n, "size": s, "pages": -(-s // PAGE_SIZE),
                               "normal_pages": 0, "zero_pages": 0} for n, s in ev.blocks]
            counts = {n: [0, 0] for n, _ in ev.blocks}
        elif isinstance(ev, RamPage):
            counts[ev.block][0] += 1
        elif isinstance(ev, RamZero):
            counts[ev.block][1] += 1
        elif isinstance(ev, RamEndOfSection):
            summary.sections[f"ram_{ev.kind}"] += 1
            summary.ram_section_id = ev.section_id
        elif isinstance(ev, DeviceState):
            summary.sections["device_full"] += 1
            summary.devices.append({"idstr": ev.idstr, "instance_id": ev.instance_id,
                                    "version": ev.version_id, "section_id": ev.section_id,
                                    "bytes": len(ev.raw)})
        elif isinstance(ev, VMDescription):
            summary.description = ev.description
        elif isinstance(ev, StreamFinished):
            break
    for b in summary.blocks:
        b["normal_pages"], b["zero_pages"] = counts[b["name"]]
    summary.stream_bytes = dec.offset
    attach_fields(summary.devices, summary.description)
    return summary
