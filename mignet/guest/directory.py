"""A received guest on disk: one file per RAM block plus device state and a manifest.

RAM block files are created sparse and mapped as the destination's RAM, so pages land in the
files directly (no extra copy, no second write pass) and zero pages cost no disk space.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mignet.errors import SetupError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, RamBlock, block_filename

MANIFEST = "manifest.json"


class GuestDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SetupError(f"cannot create output directory {path}: {exc.strerror}") from exc
        if any(path.glob("*.ram")):
            raise SetupError(f"{path} already holds RAM files: choose an empty directory")

    def block_factory(self, name: str, size: int) -> RamBlock:
        """Used by the loader when the stream announces a block: a fresh sparse file."""
        return RamBlock.from_file(name, self.path / block_filename(name), writable=True, size=size)

    def write(self, ram: GuestRam, devices: DeviceSet, description: dict[str, Any] | None,
              stats: dict[str, Any]) -> Path:
        for block in ram:
            block.flush()
        (self.path / "devices.json").write_text(devices.to_json())
        if devices.raw:
            with open(self.path / "device-state.bin", "wb") as f:
                for _idstr, _inst, _ver, raw in devices.raw:
                    f.write(raw)
        if description is not None:
            (self.path / "vmdescription.json").write_text(json.dumps(description, indent=1))
        manifest = {
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "blocks": [{"name": b.name, "file": block_filename(b.name), "size": b.size,
                        "sha256": b.digest()} for b in ram],
            "ram_sha256": ram.digest(),
            "stats": stats,
        }
        out = self.path / MANIFEST
        out.write_text(json.dumps(manifest, indent=1))
        return out
