"""``mignet inspect STREAM_FILE|DIR [--json]``: what a captured migration stream (e.g. QEMU's
``migrate "exec:cat > FILE"``) or a directory written by ``mignet recv --out`` holds —
machine type, RAM blocks and page counts, device sections and their fields (like QEMU's
scripts/analyze-migration.py). The stream is decoded by :mod:`mignet.wire.summary`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mignet.errors import MignetError, ProtocolError, SetupError
from mignet.guest.directory import DEVICES, MANIFEST, VMDESCRIPTION
from mignet.units import PAGE_SIZE, human_bytes
from mignet.wire.summary import attach_fields, summarise

_CHUNK = 1 << 20
_SHOWN_FIELDS = 6


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show what a captured stream file or a recv --out DIR holds")
    p.add_argument("path", metavar="STREAM_FILE|DIR",
                   help="a migration stream (e.g. from QEMU's migrate \"exec:cat > FILE\") "
                        "or a directory written by mignet recv --out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    info = inspect_dir(path) if path.is_dir() else inspect_stream(path)
    if args.json:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        print_summary(info)
    return 0


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def inspect_stream(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SetupError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise SetupError(f"{path}: {exc.strerror}") from None
    if size == 0:
        raise ProtocolError(f"{path} is empty, not a migration stream")
    try:
        summary = summarise(_chunks(path))
    except OSError as exc:
        raise SetupError(f"{path}: {exc.strerror}") from None
    except MignetError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return {"kind": "stream", "path": str(path), **summary.as_dict()}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path} ({what}) cannot be read: {exc}") from None


def inspect_dir(path: Path) -> dict[str, Any]:
    manifest = _read_json(path / MANIFEST, "manifest")
    if not isinstance(manifest, dict):
        raise SetupError(f"{path} is not a mignet recv --out directory: it has no {MANIFEST}")
    stats = manifest.get("stats") or {}
    blocks = [{"name": b.get("name"), "size": b.get("size", 0), "file": b.get("file"),
               "pages": -(-int(b.get("size", 0)) // PAGE_SIZE)}
              for b in manifest.get("blocks", []) if isinstance(b, dict)]
    devinfo = _read_json(path / DEVICES, "device list")
    sections = devinfo.get("sections", []) if isinstance(devinfo, dict) else []
    devices = [{"idstr": s.get("idstr"), "instance_id": s.get("instance_id"), "version": s.get("version"),
                "section_id": s.get("section_id"), "bytes": s.get("bytes")}
               for s in sections if isinstance(s, dict)]
    description = _read_json(path / VMDESCRIPTION, "VM description")
    attach_fields(devices, description if isinstance(description, dict) else None)
    return {
        "kind": "directory",
        "path": str(path),
        "complete": manifest.get("complete") is True,
        "machine_type": manifest.get("machine_type", ""),
        "stream_bytes": stats.get("stream_bytes"),
        "ram_total": sum(int(b["size"]) for b in blocks),
        "ram_section_id": manifest.get("ram_section_id"),
        "normal_pages": stats.get("normal_pages"),
        "zero_pages": stats.get("zero_pages"),
        "blocks": blocks,
        "devices": devices,
        "vmdescription": description is not None,
    }


def _fields_text(fields: list[dict[str, Any]] | None) -> str:
    if fields is None:
        return "-"
    parts = [f"{f['name']}:{f['size']}" + (f"x{f['array_len']}" if "array_len" in f else "")
             for f in fields[:_SHOWN_FIELDS]]
    if len(fields) > _SHOWN_FIELDS:
        parts.append(f"+{len(fields) - _SHOWN_FIELDS} more")
    return ", ".join(parts)


def print_summary(info: dict[str, Any]) -> None:
    out = Console(highlight=False)
    head = Table(title=f"{info['kind']} {info['path']}", show_header=False, title_justify="left")
    head.add_column("what", style="bold")
    head.add_column("value", overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("complete", "yes" if info["complete"] else "[red]no[/] (the receive did not finish)"),
        ("machine type", info["machine_type"] or "-"),
    ]
    if info.get("version"):
        rows.append(("stream version", info["version"]))
    if info.get("stream_bytes") is not None:
        rows.append(("stream bytes", f"{info['stream_bytes']} ({human_bytes(info['stream_bytes'])})"))
    rows.append(("RAM", human_bytes(info["ram_total"])))
    if info.get("normal_pages") is not None:
        rows.append(("pages: data / zero", f"{info['normal_pages']} / {info['zero_pages']}"))
    if "sections" in info:
        s = info["sections"]
        rows.append(("sections", f"ram {s['ram_start']} start, {s['ram_part']} part, "
                                 f"{s['ram_end']} end; {s['device_full']} device"))
    rows.append(("ram section id", info["ram_section_id"] if info["ram_section_id"] is not None else "-"))
    rows.append(("VM description", "yes" if info["vmdescription"] else "no"))
    for key, value in rows:
        head.add_row(key, str(value))
    out.print(head)

    ram = Table(title="RAM blocks", title_justify="left")
    ram.add_column("block", overflow="fold")
    ram.add_column("size", justify="right")
    ram.add_column("pages", justify="right")
    per_block = info["kind"] == "stream"
    if per_block:
        ram.add_column("data", justify="right")
        ram.add_column("zero", justify="right")
    for b in info["blocks"]:
        cells = [str(b["name"]), human_bytes(b["size"]), str(b["pages"])]
        if per_block:
            cells += [str(b["normal_pages"]), str(b["zero_pages"])]
        ram.add_row(*cells)
    out.print(ram)

    if info["devices"]:
        dev = Table(title="device sections", title_justify="left")
        dev.add_column("id", justify="right")
        dev.add_column("idstr", overflow="fold")
        dev.add_column("inst", justify="right")
        dev.add_column("ver", justify="right")
        dev.add_column("bytes", justify="right")
        dev.add_column("fields (name:size)", overflow="fold", ratio=1)
        for d in info["devices"]:
            dev.add_row(str(d["section_id"]), str(d["idstr"]), str(d["instance_id"]), str(d["version"]),
                        str(d["bytes"]), _fields_text(d["fields"]))
        out.print(dev)
