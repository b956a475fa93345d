"""A small model of a guest's devices, so device-state sections travel like QEMU's.

Device state is what the main loop shares with the migration code (in QEMU the vCPUs and
device models), so loading it must hold the big lock — the loader asserts that.

The devices are deliberately versioned: ``mignet-cpu`` version 2 added ``xcr0``, so a
version-1 stream still loads (the field then keeps its reset value).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from mignet.errors import ProtocolError
from mignet.runtime.bql import assert_bql_held
from mignet.wire.vmstate import VMStateDescription, VMStateField

CPU = VMStateDescription("mignet-cpu", version_id=2, minimum_version_id=1, fields=(
    VMStateField("regs", "uint64", count=16),
    VMStateField("rip", "uint64"),
    VMStateField("rflags", "uint64"),
    VMStateField("halted", "bool"),
    VMStateField("xcr0", "uint64", version_added=2),
))
SERIAL = VMStateDescription("mignet-serial", version_id=1, minimum_version_id=1, fields=(
    VMStateField("divider", "uint16"),
    VMStateField("lcr", "uint8"),
    VMStateField("mcr", "uint8"),
    VMStateField("fifo", "buffer", size=16),
))
TIMER = VMStateDescription("mignet-timer", version_id=3, minimum_version_id=2, fields=(
    VMStateField("clock_ns", "int64"),
    VMStateField("enabled", "bool"),
    VMStateField("period_ns", "uint32"),
    VMStateField("drift_ppm", "int32", version_added=3),
))

# A device with a large state (e.g. a GPU or NIC ring): makes device-heavy streams for the
# receive-model benchmark, where loading device state holds the big lock.
BLOB = VMStateDescription("mignet-blob", version_id=1, minimum_version_id=1, fields=(
    VMStateField("generation", "uint64"),
    VMStateField("state", "buffer", size=64 << 10),
))


class _KnownDevices(Mapping[str, VMStateDescription]):
    """idstr -> layout: what the decoder may parse field by field. Fixed names plus any
    number of ``mignet-blob/N`` instances."""

    _fixed: dict[str, VMStateDescription] = {
        "mignet-cpu/0": CPU, "mignet-cpu/1": CPU, "mignet-serial": SERIAL, "mignet-timer": TIMER,
    }

    def __getitem__(self, idstr: str) -> VMStateDescription:
        if idstr in self._fixed:
            return self._fixed[idstr]
        prefix, _, index = idstr.partition("/")
        if prefix == BLOB.name and index.isdigit():
            return BLOB
        raise KeyError(idstr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._fixed)

    def __len__(self) -> int:
        return len(self._fixed)


KNOWN_DEVICES: Mapping[str, VMStateDescription] = _KnownDevices()


@dataclass
class Device:
    idstr: str
    vmsd: VMStateDescription
    values: dict[str, Any]
    instance_id: int = 0


class RawSection(NamedTuple):
    """One device section kept as the source sent it: enough to send it again unchanged
    (QEMU finds a section by idstr and instance id; the id only pairs header and footer)."""

    idstr: str
    instance_id: int
    version_id: int
    data: bytes
    section_id: int | None = None


@dataclass
class DeviceSet:
    """The guest's devices in section order. ``raw`` keeps sections of devices mignet does
    not model (real QEMU's), byte for byte."""

    devices: list[Device] = field(default_factory=list)
    raw: list[RawSection] = field(default_factory=list)

    @classmethod
    def example(cls, seed: int = 0) -> DeviceSet:
        """Two vCPUs, a serial port and a timer with reproducible contents."""
        rng = np.random.default_rng(seed)
        u64 = lambda: int(rng.integers(0, 2**63))  # noqa: E731
        devs = [
            Device(f"mignet-cpu/{i}", CPU, {
                "regs": [u64() for _ in range(16)], "rip": u64(), "rflags": 0x202,
                "halted": bool(i), "xcr0": 7}, instance_id=i)
            for i in range(2)
        ]
        devs.append(Device("mignet-serial", SERIAL, {
            "divider": 12, "lcr": 3, "mcr": 11, "fifo": rng.bytes(16)}))
        devs.append(Device("mignet-timer", TIMER, {
            "clock_ns": u64(), "enabled": True, "period_ns": 1_000_000, "drift_ppm": -12}))
        return cls(devs)

    @classmethod
    def heavy(cls, count: int, seed: int = 0) -> DeviceSet:
        """The example devices plus ``count`` 64 KiB blobs: a stream heavy in device state."""
        devs = cls.example(seed)
        rng = np.random.default_rng(seed + 1)
        for i in range(count):
            devs.devices.append(Device(f"mignet-blob/{i}", BLOB, {
                "generation": i, "state": rng.bytes(BLOB.fields[1].size)}, instance_id=i))
        return devs

    @classmethod
    def empty(cls) -> DeviceSet:
        return cls([])

    def find(self, idstr: str) -> Device | None:
        return next((d for d in self.devices if d.idstr == idstr), None)

    def load(self, idstr: str, instance_id: int, version_id: int, raw: bytes,
             values: dict[str, Any] | None, section_id: int | None = None) -> None:
        """Apply one device section. Must hold the big lock: this is main-loop state."""
        assert_bql_held("loading device state")
        if values is None:
            self.raw.append(RawSection(idstr, instance_id, version_id, raw, section_id))
            return
        vmsd = KNOWN_DEVICES.get(idstr)
        if vmsd is None:  # pragma: no cover - the decoder only decodes known devices
            raise ProtocolError(f"unknown device {idstr!r}")
        dev = self.find(idstr)
        if dev is None:
            dev = Device(idstr, vmsd, {}, instance_id)
            self.devices.append(dev)
        dev.values.update(values)

    def to_json(self) -> str:
        def plain(v: Any) -> Any:
            return v.hex() if isinstance(v, bytes) else v
        return json.dumps({
            "devices": [
                {"idstr": d.idstr, "instance_id": d.instance_id, "vmsd": d.vmsd.name,
                 "version": d.vmsd.version_id,
                 "fields": {k: plain(v) for k, v in d.values.items()}}
                for d in self.devices],
            "opaque_sections": [
                {"idstr": s.idstr, "instance_id": s.instance_id, "version": s.version_id,
                 "bytes": len(s.data), "section_id": s.section_id} for s in self.raw],
        }, indent=1)

    def sections(self) -> list[RawSection]:
        """Every section as bytes, in send order: modelled devices encoded, then the raw
        ones as they came. What a snapshot directory stores and a replay sends."""
        own = [RawSection(d.idstr, d.instance_id, d.vmsd.version_id, d.vmsd.encode(d.values))
               for d in self.devices]
        return own + self.raw

    def state_equal(self, other: DeviceSet) -> bool:
        mine = {d.idstr: d.values for d in self.devices}
        theirs = {d.idstr: d.values for d in other.devices}
        return mine == theirs and self.raw == other.raw
