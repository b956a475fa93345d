"""Device state described like QEMU's vmstate: a versioned list of typed fields.

A description is data, not code: the same table encodes, decodes (sans-I/O, from bytes) and
produces the VMDESCRIPTION JSON entry that QEMU's ``analyze-migration.py`` reads. Fields added
in a later version carry ``version_added``, so an older stream (lower ``version_id``) still
loads, exactly the way QEMU's ``VMSTATE_*_V`` fields work.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from mignet.errors import MisuseError, ProtocolError

# vmstate type name -> struct format of one element (QEMU writes big-endian).
_FORMATS: dict[str, str] = {
    "uint8": ">B", "uint16": ">H", "uint32": ">I", "uint64": ">Q",
    "int8": ">b", "int16": ">h", "int32": ">i", "int64": ">q", "bool": ">?",
}


@dataclass(frozen=True)
class VMStateField:
    """One field: a scalar, an array of ``count`` scalars, or a ``buffer`` of ``size`` bytes."""

    name: str
    type: str
    count: int = 1
    size: int = 0  # only for "buffer"
    version_added: int = 0

    def __post_init__(self) -> None:
        if self.type == "buffer":
            if self.size <= 0 or self.count != 1:
                raise MisuseError(f"buffer field {self.name} needs size > 0 and count 1")
        elif self.type not in _FORMATS:
            raise MisuseError(f"field {self.name}: unknown vmstate type {self.type!r}")

    @property
    def element_size(self) -> int:
        return self.size if self.type == "buffer" else struct.calcsize(_FORMATS[self.type])

    @property
    def wire_size(self) -> int:
        return self.element_size * self.count

    def present_in(self, version_id: int) -> bool:
        return version_id >= self.version_added


@dataclass(frozen=True)
class VMStateDescription:
    """A device's state layout at its current ``version_id``; streams back to
    ``minimum_version_id`` still load."""

    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple[VMStateField, ...]

    def fields_for(self, version_id: int) -> list[VMStateField]:
        return [f for f in self.fields if f.present_in(version_id)]

    def wire_size(self, version_id: int) -> int:
        return sum(f.wire_size for f in self.fields_for(version_id))

    def check_version(self, version_id: int) -> None:
        if not self.minimum_version_id <= version_id <= self.version_id:
            raise ProtocolError(
                f"device {self.name!r}: stream has version {version_id}, mignet loads "
                f"versions {self.minimum_version_id}..{self.version_id}"
            )

    def encode(self, values: dict[str, Any], version_id: int | None = None) -> bytes:
        """The field bytes of a SECTION_FULL body (no length prefix, as QEMU)."""
        version = self.version_id if version_id is None else version_id
        out = bytearray()
        for f in self.fields_for(version):
            value = values[f.name]
            if f.type == "buffer":
                data = bytes(value)
                if len(data) != f.size:
                    raise MisuseError(f"{self.name}.{f.name}: buffer must be {f.size} bytes")
                out += data
            elif f.count == 1:
                out += struct.pack(_FORMATS[f.type], value)
            else:
                if len(value) != f.count:
                    raise MisuseError(f"{self.name}.{f.name}: needs {f.count} elements")
                out += struct.pack(">" + _FORMATS[f.type][1] * f.count, *value)
        return bytes(out)

    def decode(self, data: bytes | memoryview, version_id: int) -> dict[str, Any]:
        """Decode exactly ``wire_size(version_id)`` bytes into field values."""
        self.check_version(version_id)
        if len(data) != self.wire_size(version_id):
            raise ProtocolError(
                f"device {self.name!r}: {len(data)} bytes of state, version {version_id} "
                f"has {self.wire_size(version_id)}"
            )
        values: dict[str, Any] = {}
        pos = 0
        for f in self.fields_for(version_id):
            chunk = data[pos:pos + f.wire_size]
            pos += f.wire_size
            if f.type == "buffer":
                values[f.name] = bytes(chunk)
            elif f.count == 1:
                values[f.name] = struct.unpack(_FORMATS[f.type], chunk)[0]
            else:
                values[f.name] = list(struct.unpack(">" + _FORMATS[f.type][1] * f.count, chunk))
        return values

    def describe(self, idstr: str, instance_id: int) -> dict[str, Any]:
        """This device's entry in the VMDESCRIPTION JSON, in QEMU's shape."""
        fields: list[dict[str, Any]] = []
        for f in self.fields_for(self.version_id):
            entry: dict[str, Any] = {"name": f.name, "type": f.type}
            if f.count > 1:
                entry["array_len"] = f.count
            entry["size"] = f.element_size
            fields.append(entry)
        return {
            "name": idstr, "instance_id": instance_id, "vmsd_name": self.name,
            "version": self.version_id, "fields": fields,
        }
