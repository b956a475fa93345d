"""``mignet relay --listen URI --to URI``: be the destination of one migration (QEMU or
mignet) and, page by page as they arrive, the source of the same stream towards ``--to``
(QEMU's ``-incoming``, ``mignet recv`` or another relay), over tcp:, unix: or rdma:.

    qemu (migrate tcp:B:4444) -> relay --listen tcp:0.0.0.0:4444 --to rdma:C:4445
                              -> relay --listen rdma:0.0.0.0:4445 --to tcp:D:4446 -> qemu -incoming

``--channels N`` makes the outbound link QEMU 7.2's multifd (tcp:/unix:); a relay listening
on tcp:/unix: accepts a multifd inbound as ``mignet recv`` does.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mignet.cli import options
from mignet.cli.exits import UsageError, emit_json
from mignet.cli.options import refuse_unless
from mignet.errors import MigrationCancelled
from mignet.migration.multifd import accept_incoming
from mignet.migration.relay import Relay, RelayStats
from mignet.runtime.threads import finished, start_thread
from mignet.transport import connect, listen
from mignet.ui.terminal import console
from mignet.units import human_bytes, rate
from mignet.uri import parse_uri
from mignet.wire.multifd import MAX_CHANNELS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("relay", help="receive a migration stream and forward it, page by page, to URI")
    p.add_argument("--listen", required=True, metavar="URI", type=options.uri,
                   help="tcp:HOST:PORT, unix:PATH or rdma:HOST:PORT")
    p.add_argument("--to", required=True, metavar="URI", type=options.uri,
                   help="where the stream goes on: qemu -incoming, mignet recv or another relay")
    options.add_max_ram(p)
    p.add_argument("--channels", type=options.count_range(1, MAX_CHANNELS), default=1, metavar="N",
                   help="QEMU 7.2's multifd towards --to: page data over N extra connections "
                        "(N >= 2; tcp: or unix:)")
    p.add_argument("--timeout", type=options.seconds, metavar="SECONDS",
                   help="seconds to wait for the source (default: no limit)")
    p.add_argument("--progress", type=options.seconds, default=0.25, metavar="SECONDS",
                   help="with --json: a progress event this often")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout: "
                                                        "events; a failure is an \"error\" object")
    p.add_argument("--quiet", action="store_true", help="no summary line, only errors")
    p.set_defaults(func=cmd_relay, _check=check_relay)


def check_relay(args: argparse.Namespace) -> None:
    """Refused before anything listens: what cannot work, or would be ignored."""
    if args.channels > 1 and parse_uri(args.to).scheme not in ("tcp", "unix"):
        raise UsageError("--channels (multifd) needs a tcp: or unix: --to (over rdma: only "
                         "mignet send --channels, into recv, runs multifd)", options.prog(args))
    refuse_unless(args, args.json, ["progress"], "without --json")


def _refused(args: argparse.Namespace, why: str) -> None:
    """A stray connection (not the migration's) was turned away; the relay goes on."""
    if args.json:
        emit_json({"event": "refused", "reason": why})
    elif not args.quiet:
        console.print(f"mignet relay: {why}", soft_wrap=True, markup=False)


def _progress(relay: Relay) -> dict[str, Any]:
    s = relay.stats
    return {"event": "progress", "t": time.monotonic(), "bytes_in": relay.loader.decoder.offset,
            "bytes_out": s.bytes_out, "pages": s.pages_out, "zero_pages": s.zero_out,
            "ram_sections": s.ram_sections}


def cmd_relay(args: argparse.Namespace) -> int:
    listener = listen(args.listen)
    if args.json:
        emit_json({"event": "listening", "uri": str(listener.address)})
    elif not args.quiet:
        console.print(f"mignet relay: listening on {listener.address}, forwarding to {args.to}")
    inbound, multifd = accept_incoming(listener, args.timeout, lambda why: _refused(args, why))
    relay = Relay(inbound, lambda: connect(args.to), max_ram_bytes=args.max_ram,
                  channels=args.channels if args.channels > 1 else 0, multifd_in=multifd)
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            box["stats"] = relay.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = exc
    try:
        _, future = start_thread(main, "mig/relay")
        while not finished(future, args.progress):
            if args.json:
                emit_json(_progress(relay))
    except KeyboardInterrupt:
        relay.cancel()
        finished(future, 10)  # not Thread.join: see runtime.threads.finished
        raise MigrationCancelled("cancelled by Ctrl-C") from None
    finally:
        relay.close()
        inbound.close()
    if "error" in box:
        raise box["error"]
    stats: RelayStats = box["stats"]
    if args.json:
        emit_json({"event": "completed", **stats.as_dict()})
    elif not args.quiet:
        console.print(
            f"mignet relay: {human_bytes(stats.bytes_in)} in, {human_bytes(stats.bytes_out)} out, "
            f"{stats.pages_out} pages + {stats.zero_out} zero, {stats.ram_sections} RAM sections, "
            f"{stats.device_sections} device sections, {stats.elapsed:.2f} s "
            f"({rate(stats.bytes_out, stats.elapsed)})")
    return 0
