"""A received guest on disk: one file per RAM block, every device section, and a manifest.

RAM block files are created sparse and mapped as the destination's RAM, so pages land in the
files directly (no extra copy, no second write pass) and zero pages cost no disk space.

A directory is a *snapshot* that ``mignet send --snapshot DIR`` can replay into real QEMU: the
manifest keeps the machine type and the source's id for its 'ram' section, every block in
stream order, and ``devices.json`` lists every device section (idstr, instance, version,
section id) whose bytes lie back to back in ``device-state.bin``, in stream order. The VM
description is kept as QEMU sent it.

The manifest is written first with ``"complete": false`` and replaced (atomically) by the
final one only after every byte arrived, so a failed or interrupted receive leaves a
directory that says it is incomplete, and a replay refuses it.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mignet.errors import SetupError
from mignet.guest.devices import DeviceSet, RawSection
from mignet.guest.ram import GuestRam, RamBlock, block_filename

MANIFEST = "manifest.json"
DEVICES = "devices.json"
DEVICE_STATE = "device-state.bin"
VMDESCRIPTION = "vmdescription.json"
FORMAT = 1  # of this directory layout


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Snapshot:
    """A complete guest read back from a directory: what a replay sends."""

    path: Path
    machine_type: str
    ram: GuestRam
    devices: DeviceSet
    description: dict[str, Any] | None
    ram_section_id: int | None


def _check_shared_mapping(path: Path) -> None:
    """RAM blocks are files mapped shared; some file systems cannot (9p and virtiofs shares,
    such as a soft-RoCE guest's ``--rwdir``). Find out before a byte is read, not with a
    traceback from numpy after the source connected."""
    probe = path / ".mignet-mmap-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise SetupError(f"cannot write to output directory {path}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[0] = 1
    except OSError as exc:
        raise SetupError(
            f"{path} cannot hold guest RAM: its file system cannot map files shared "
            f"({exc.strerror}; 9p and virtiofs shares cannot); use a local folder such as "
            "/dev/shm/NAME") from exc
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class GuestDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SetupError(f"cannot create output directory {path}: {exc.strerror}") from exc
        if any(path.glob("*.ram")):
            raise SetupError(f"{path} already holds RAM files: choose an empty directory")
        _check_shared_mapping(path)
        try:
            _write_atomic(path / MANIFEST, json.dumps(
                {"format": FORMAT, "complete": False, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                indent=1))
        except OSError as exc:
            raise SetupError(f"cannot write to output directory {path}: {exc.strerror}") from exc

    def block_factory(self, name: str, size: int) -> RamBlock:
        """Used by the loader when the stream announces a block: a fresh sparse file."""
        return RamBlock.from_file(name, self.path / block_filename(name), writable=True, size=size)

    def write(self, ram: GuestRam, devices: DeviceSet, description: dict[str, Any] | None,
              stats: dict[str, Any], ram_section_id: int | None = None) -> Path:
        """Flush RAM and write the device state and the final manifest (last, atomically)."""
        for block in ram:
            block.flush()
        sections = devices.sections()
        with open(self.path / DEVICE_STATE, "wb") as f:
            for s in sections:
                f.write(s.data)
        info = json.loads(devices.to_json())
        info["sections"] = [{"idstr": s.idstr, "instance_id": s.instance_id, "version": s.version_id,
                             "section_id": s.section_id, "bytes": len(s.data)} for s in sections]
        (self.path / DEVICES).write_text(json.dumps(info, indent=1))
        if description is not None:
            (self.path / VMDESCRIPTION).write_text(json.dumps(description, indent=1))
        manifest = {
            "format": FORMAT,
            "complete": True,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine_type": stats.get("machine_type", ""),
            "ram_section_id": ram_section_id,
            "blocks": [{"name": b.name, "file": block_filename(b.name), "size": b.size,
                        "sha256": b.digest()} for b in ram],
            "ram_sha256": ram.digest(),
            "stats": stats,
        }
        out = self.path / MANIFEST
        _write_atomic(out, json.dumps(manifest, indent=1))
        return out


def open_snapshot(path: Path) -> Snapshot:
    """Read a directory written by ``mignet recv --out``; RAM is mapped read-only.

    Refuses (one line each) a directory without a manifest, one whose receive did not
    finish, and one whose files disagree with its manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SetupError(f"{path} is not a snapshot: it has no {MANIFEST} (write one with "
                         f"mignet recv --out {path})") from None
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path}/{MANIFEST} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise SetupError(f"{path} is an incomplete snapshot (its receive did not finish): "
                         "receive the guest again")
    if not manifest.get("machine_type"):
        raise SetupError(f"{path}/{MANIFEST} names no machine type; QEMU would refuse the stream")
    ram = GuestRam()
    for entry in manifest.get("blocks", []):
        block = RamBlock.from_file(entry["name"], path / entry["file"], writable=False)
        if block.size != entry["size"]:
            raise SetupError(f"{path / entry['file']} is {block.size} bytes, the manifest says "
                             f"{entry['size']}")
        ram.add(block)
    if not len(ram):
        raise SetupError(f"{path}/{MANIFEST} lists no RAM blocks")
    devices = DeviceSet.empty()
    info = json.loads((path / DEVICES).read_text())
    blob = (path / DEVICE_STATE).read_bytes()
    pos = 0
    for s in info.get("sections", []):
        data = blob[pos:pos + s["bytes"]]
        if len(data) != s["bytes"]:
            raise SetupError(f"{path / DEVICE_STATE} is shorter than {DEVICES} says: the "
                             "snapshot is damaged")
        devices.raw.append(RawSection(s["idstr"], s["instance_id"], s["version"], data, s["section_id"]))
        pos += s["bytes"]
    if pos != len(blob):
        raise SetupError(f"{path / DEVICE_STATE} holds {len(blob) - pos} bytes more than {DEVICES} "
                         "lists: the snapshot is damaged")
    description = None
    if (path / VMDESCRIPTION).exists():
        description = json.loads((path / VMDESCRIPTION).read_text())
    return Snapshot(path, manifest["machine_type"], ram, devices, description,
                    manifest.get("ram_section_id"))
