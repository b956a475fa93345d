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
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mignet.cli import options
from mignet.cli.exits import report
from mignet.cli.options import refuse_unless
from mignet.errors import MignetError
from mignet.uri import parse_uri

if TYPE_CHECKING:
    from mignet.control.migrations import Guest


def add_parser(sub: Any) -> None:
    """Add ``mignet serve``."""
    s = sub.add_parser("serve", help="run a guest process driven over QMP (migrate, migrate-incoming, ...)")
    s.add_argument("--qmp", action="append", required=True, metavar="ADDR", type=_qmp_address,
                   help="unix:PATH (mode 0600) or tcp:HOST:PORT; may be repeated")
    role = s.add_mutually_exclusive_group(required=True)
    role.add_argument("--incoming", metavar="URI", type=_incoming,
                      help="be a destination: 'defer' waits for migrate-incoming, a URI listens now")
    role.add_argument("--size", metavar="SIZE", type=options.size,
                      help="be a source: a synthetic guest of SIZE (binary: 2G = 2 GiB)")
    role.add_argument("--image", metavar="FILE", help="be a source: a guest from a RAM image file")
    s.add_argument("--fill", choices=["random", "zero", "mixed"], default="random",
                   help="source with --size: the guest's contents")
    s.add_argument("--seed", type=int, default=0, help="source: seed of the guest's contents, "
                                                        "device state and writes")
    s.add_argument("--block-name", default="pc.ram", help="source with --image: its RAM block name")
    s.add_argument("--no-devices", action="store_true", help="source: no device state")
    s.add_argument("--dirty-rate", default="0", metavar="RATE", type=options.rate,
                   help="source: vCPU threads keep writing guest RAM at RATE bytes per second "
                        "(e.g. 64MiB/s), so migrate runs live precopy rounds; 0 = idle")
    s.add_argument("--out", metavar="DIR", help="destination: write the received guest to DIR")
    options.add_digest(s, "destination with --out: the manifest's digests")
    options.add_max_ram(s, "destination: ")
    s.add_argument("--recv-model", choices=["thread", "coroutine"], default="thread",
                   help="destination: load in the mig/dst/main thread or as a coroutine "
                        "of the main loop holding the big lock (QEMU's old model)")
    s.add_argument("--vcpus", type=options.count_range(0, 64), default=1, metavar="N",
                   help="destination with postcopy-ram: threads that read every page once the "
                        "guest runs here, as its vCPUs would, so their faults pull pages; 0: none "
                        "(default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print the QMP addresses as one JSON "
                                                        "line; a failure as an \"error\" object")
    s.set_defaults(func=cmd_serve, _check=check_serve)


def _qmp_address(text: str) -> str:
    try:
        scheme = parse_uri(text).scheme
    except MignetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if scheme not in ("unix", "tcp"):
        raise argparse.ArgumentTypeError(f"QMP listens on unix:PATH or tcp:HOST:PORT, not {text}")
    return text


def _incoming(text: str) -> str:
    return text if text == "defer" else options.uri(text)


def check_serve(args: argparse.Namespace) -> None:
    """A destination ignores the source's options and the other way round: refuse them."""
    source = args.incoming is None
    refuse_unless(args, source, ["fill", "seed", "block_name", "no_devices", "dirty_rate"],
                  "on a destination (--incoming)")
    refuse_unless(args, not source, ["out", "max_ram", "recv_model", "digest", "vcpus"],
                  "on a source (--size or --image); they are for --incoming")
    refuse_unless(args, bool(args.out), ["digest"], "without --out (it names the manifest's digests)")
    refuse_unless(args, not args.image, ["fill"], "with --image")
    refuse_unless(args, not args.size, ["block_name"], "with --size")


def cmd_serve(args: argparse.Namespace) -> int:
    # The QMP stack only here: every other command starts without it (start-up time).
    from mignet.control.migrations import Guest
    from mignet.guest.devices import DeviceSet
    from mignet.guest.directory import GuestDir
    from mignet.guest.ram import GuestRam
    from mignet.guest.workload import Workload
    from mignet.runtime.mainloop import MainLoop

    if args.incoming is not None:
        guest = Guest(ram=None, devices=DeviceSet.empty(), incoming_deferred=True,
                      out=GuestDir(Path(args.out), digest=args.digest) if args.out else None,
                      max_ram=args.max_ram, recv_model=args.recv_model, vcpus=args.vcpus)
        runstate = "inmigrate"
    else:
        ram = (GuestRam.from_image(Path(args.image), name=args.block_name) if args.image
               else GuestRam.generate(args.size, args.fill, seed=args.seed))
        rate = args.dirty_rate
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
    from mignet.control.migrations import Migrations
    from mignet.control.options import OptionSet
    from mignet.control.qmp_commands import Commands
    from mignet.control.qmp_server import QmpServer
    from mignet.migration.status import MigrationState, MigrationStatus
    from mignet.ui.terminal import console

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
    signalled: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        signalled.append(sig)
        server.quit.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
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
        server.emit("SHUTDOWN", {"guest": False, "reason": "host-signal" if signalled else "host-qmp-quit"})
        await asyncio.sleep(0)  # let the event go out before the sockets close
    finally:
        await server.close()
        await asyncio.to_thread(migrations.shutdown)  # without the big lock: loaders may need it
    if signalled[:1] == [signal.SIGINT]:  # Ctrl-C: a person stopped it; SIGTERM is a "quit"
        return report(KeyboardInterrupt("stopped by Ctrl-C; a migration in progress was cancelled"),
                      json_out=args.json)
    return 0
