"""``mignet serve``: a guest process driven over QMP, like a QEMU started with ``-qmp``.

    mignet serve --qmp unix:/run/src.qmp --size 2G --fill random     # a source
    mignet serve --qmp unix:/run/dst.qmp --incoming defer             # a destination

The process then does nothing on its own: management issues migrate-incoming, migrate,
query-migrate, ... and finally ``quit``. SIGINT/SIGTERM end it like ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from mignet.control.migrations import Guest, Migrations
from mignet.control.options import OptionSet
from mignet.control.qmp_commands import Commands
from mignet.control.qmp_server import QmpServer
from mignet.guest.devices import DeviceSet
from mignet.guest.directory import GuestDir
from mignet.guest.ram import GuestRam
from mignet.guest.workload import Workload
from mignet.migration.status import MigrationState, MigrationStatus
from mignet.runtime.mainloop import MainLoop
from mignet.ui.terminal import console
from mignet.units import parse_rate, parse_size


def add_parser(sub: Any) -> None:
    """Add ``mignet serve``."""
    s = sub.add_parser("serve", help="run a guest process driven over QMP (migrate, migrate-incoming, ...)")
    s.add_argument("--qmp", action="append", required=True, metavar="ADDR",
                   help="unix:PATH (mode 0600) or tcp:HOST:PORT; may be repeated")
    role = s.add_mutually_exclusive_group(required=True)
    role.add_argument("--incoming", metavar="URI",
                      help="be a destination: 'defer' waits for migrate-incoming, a URI listens now")
    role.add_argument("--size", metavar="SIZE", help="a synthetic source guest of SIZE (e.g. 2G)")
    role.add_argument("--image", metavar="FILE", help="a source guest from a RAM image file")
    s.add_argument("--fill", choices=["random", "zero", "mixed"], default="random")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--block-name", default="pc.ram", help="RAM block name for --image")
    s.add_argument("--no-devices", action="store_true", help="a source without device state")
    s.add_argument("--dirty-rate", default="0", metavar="RATE",
                   help="source: vCPU threads keep writing guest RAM at RATE (e.g. 64MiB/s), so "
                        "migrate runs live precopy rounds")
    s.add_argument("--out", metavar="DIR", help="destination: write the received guest to DIR")
    s.add_argument("--max-ram", default=str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                   metavar="SIZE", help="destination: refuse sources with more RAM")
    s.add_argument("--recv-model", choices=["thread", "coroutine"], default="thread",
                   help="destination: load in the mig/dst/main thread (default) or as a coroutine "
                        "of the main loop holding the big lock (QEMU's old model)")
    s.add_argument("--json", action="store_true", help="print the QMP addresses as one JSON line")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.incoming is not None:
        guest = Guest(ram=None, devices=DeviceSet.empty(), incoming_deferred=True,
                      out=GuestDir(Path(args.out)) if args.out else None,
                      max_ram=parse_size(args.max_ram), recv_model=args.recv_model)
        runstate = "inmigrate"
    else:
        ram = (GuestRam.from_image(Path(args.image), name=args.block_name) if args.image
               else GuestRam.generate(parse_size(args.size), args.fill, seed=args.seed))
        rate = parse_rate(args.dirty_rate)
        guest = Guest(ram=ram,
                      devices=DeviceSet.empty() if args.no_devices else DeviceSet.example(args.seed),
                      workload=Workload(ram, rate, seed=args.seed) if rate else None)
        if guest.workload is not None:
            guest.workload.start()
        runstate = "running"
    # The loader thread and the main loop share the GIL: a shorter switch interval (default
    # 5 ms) bounds how long a QMP command waits for it during a full-speed load.
    sys.setswitchinterval(0.001)
    loop = MainLoop()  # handlers hold the big lock; it is free only while the loop waits
    try:
        return loop.run(_serve(args, guest, runstate))
    finally:
        loop.close()
        if guest.workload is not None:
            guest.workload.stop()


async def _serve(args: argparse.Namespace, guest: Guest, runstate: str) -> int:
    options = OptionSet()
    state = MigrationState(runstate=runstate)
    server: QmpServer
    migrations = Migrations(guest, options, state, lambda e, d: server.emit(e, d))
    commands = Commands(migrations, options, state, on_quit=lambda: server.quit.set())
    server = QmpServer(commands.table())
    # QEMU sends MIGRATION only with the "events" capability (migrate_generate_event).
    def on_status(_direction: str, status: MigrationStatus) -> None:
        if options.capability("events"):
            server.emit("MIGRATION", {"status": status.value})
    state.set_listener(on_status)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.quit.set)
    try:
        for address in args.qmp:
            await server.listen(address)
        if args.incoming is not None and args.incoming != "defer":
            migrations.start_incoming(args.incoming)
        if args.json:
            sys.stdout.write(json.dumps({"event": "qmp-listening", "qmp": server.addresses}) + "\n")
            sys.stdout.flush()
        else:
            console.print(f"mignet: QMP on {', '.join(server.addresses)}")
        await server.quit.wait()
        server.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        await asyncio.sleep(0)  # let the event go out before the sockets close
    finally:
        await server.close()
        await asyncio.to_thread(migrations.shutdown)  # without the big lock: loaders may need it
    return 0
