"""The ``mignet`` command line: recv, send, demo here; bench, inspect, rxe and serve in their modules.

Every failure the user can cause or fix (bad URI, port in use, a peer that is not mignet or
QEMU, a truncated stream) ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

# numpy starts OpenBLAS's thread pool at import: 0.2 s of every command's start-up on this
# machine kind (two threads spinning after it), for matrix routines mignet never calls.
# Before the first numpy import; a user's own setting stays.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from rich.markup import escape  # noqa: E402

from mignet import __version__
from mignet.bench.procstat import peak_rss
from mignet.bench.receiver import receiver_result, recv_command, start_receiver
from mignet.channel import Channel, ShutdownHow
from mignet.cli import bench, inspect, options, relay, rxe, serve
from mignet.cli.exits import UsageError, emit_json, report
from mignet.cli.options import refuse_unless
from mignet.errors import (
    ConnectionLostError,
    MignetError,
    MigrationCancelled,
    PeerFailedError,
    SetupError,
)
from mignet.guest.devices import DeviceSet
from mignet.guest.directory import GuestDir, open_snapshot
from mignet.guest.ram import DIGESTS, GuestRam, RamBlock, RamDigests, allocate_guest_memory
from mignet.migration.loadvm import IDLE_TIMEOUT, Loader, LoadResult, LoadStats, start_load_thread
from mignet.migration.multifd import Handshake, MultifdReceiver, MultifdSender, accept_incoming
from mignet.migration.savevm import Sender, SendStats
from mignet.runtime.threads import finished
from mignet.tcp import SocketChannel
from mignet.tcp.tls import HANDSHAKE_TIMEOUT, glob_rules, tls_client, tls_server, tls_server_context
from mignet.transport import connect, listen
from mignet.ui.terminal import console, multifd_channels, run_with_progress, stats_table, transfer_progress
from mignet.units import PAGE_SIZE, human_bytes, rate
from mignet.uri import parse_uri
from mignet.wire.multifd import MAX_CHANNELS


# --- recv ----------------------------------------------------------------------------
def cmd_recv(args: argparse.Namespace) -> int:
    _cancel_on_sigterm()
    out = GuestDir(Path(args.out), force=args.force, digest=args.digest) if args.out else None
    handshake = _tls_handshake(args)  # credentials that cannot load fail here, before listening
    listener = listen(args.listen)
    if not args.quiet:
        console.print(f"mignet: listening on {listener.address}")
    address = listener.address
    if address.scheme == "tcp" and not args.tls_creds and not _loopback(str(address.host)):
        # said even with --quiet: anyone who can reach the port can send this host a guest
        console.print(f"mignet: warning: {address} is reachable from other hosts and not "
                      "encrypted or authenticated: use --tls-creds DIR", soft_wrap=True)
    if args.json:
        emit_json({"event": "listening", "uri": str(address)})
    # With --tls-creds every connection (the main one and each multifd channel) is
    # authenticated and authorized before a byte of it is read as migration data.
    channel, multifd = accept_incoming(listener, args.timeout, lambda why: _refused(args, why),
                                       preempt=args.postcopy_preempt, handshake=handshake)
    loader = Loader(channel, devices=DeviceSet.empty(), max_ram_bytes=args.max_ram,
                    block_factory=out.block_factory if out else RamBlock.anonymous,
                    idle_timeout=args.idle_timeout, postcopy=args.postcopy, vcpus=args.vcpus)
    try:
        if multifd is not None and args.postcopy_preempt:
            multifd.take_preempt(loader.attach_preempt)
        if multifd is not None and args.postcopy:
            # a lost connection pauses postcopy; the source resumes to this same address
            loader.recoverable = True
            multifd.on_recovery = loader.offer_recovery
            loader.on_postcopy = lambda phase: _postcopy_phase(args, loader, phase)
        if multifd is not None:
            multifd.idle_timeout = args.idle_timeout
            multifd.attach(loader)
        try:
            result = _run_load(loader, quiet=args.quiet, extra_pages=multifd)
        except Exception:
            if multifd is not None:
                multifd.raise_error(wait=0.5)  # a failed channel is the cause of the main's error
            raise
        if multifd is not None:
            multifd.finish(result.stats)
    finally:
        if multifd is not None:
            multifd.close()
        channel.close()
        if loader.channel is not channel:
            loader.channel.close()  # the connection a postcopy recovery brought
    stats = _load_stats_dict(result.stats)
    if channel.page_placement is not None:  # RDMA: which protocol the source spoke
        stats["rdma"] = channel.page_placement.describe()
    if multifd is not None and multifd.channel_count:
        stats["multifd"] = multifd.describe()
    # Each block hashed once, after the load (XXH3 by default: a fraction of the transfer);
    # the RAM digest, the table, the JSON line and the manifest all reuse these.
    wanted = out is not None or args.json or not args.quiet
    digests = result.ram.digests(args.digest) if wanted else None
    if out:
        out.write(result.ram, result.devices, result.description, stats, result.stats.ram_section_id,
                  digests=digests)
    if not args.quiet:
        _print_load_table(result, digests, out, stats.get("rdma"))
    if args.json:
        emit_json({"event": "completed", **digest_keys(digests), "stats": stats,
                    "blocks": result.ram.layout(), "peak_rss": peak_rss()})
    return 0


def digest_keys(digests: RamDigests | None) -> dict[str, Any]:
    """The JSON keys of a guest's digests (docs/cli.md): the algorithm, the RAM digest and
    each block's, in full; all null with ``--digest none`` or where there is no guest."""
    return {"digest": digests.algorithm if digests else None,
            "ram_digest": digests.ram if digests else None,
            "block_digests": digests.blocks if digests else None}


def _digest_row(digests: RamDigests | None) -> tuple[str, str]:
    """The table's digest row: shortened, and it says so."""
    if digests is None:
        return ("RAM digest", "none (--digest none)")
    return (f"RAM {digests.algorithm}", short_digest(digests.ram))


def short_digest(digest: str) -> str:
    """A digest's head for a table, saying it is one (no '…': a cut cell's mark)."""
    return f"{digest[:16]} (of {len(digest)} hex; --json: all)"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _refused(args: argparse.Namespace, why: str) -> None:
    """A stray connection (not the migration's) was turned away; the migration goes on."""
    if args.json:
        emit_json({"event": "refused", "reason": why})
    elif not args.quiet:
        console.print(f"mignet: {escape(why)}", soft_wrap=True)


#: How long a connection to a TLS listener may take over its handshake before it is
#: refused: below a TLS client's own 30 s. Each connection is handshaken in its own thread,
#: so a stalled stranger holds up no other connection; the source's own channels come well
#: within it.
TLS_GRACE = 10.0


def _tls_handshake(args: argparse.Namespace) -> Handshake | None:
    """``recv --tls-creds``: the server's handshake for each accepted connection (None
    without TLS). The credentials are loaded here, once: a folder that cannot serve is a
    SetupError at start. A port scanner, a stalled, unauthenticated or unauthorized client
    is refused (said as ``refused``), and the listener keeps listening: a stranger cannot
    take the migration's place, nor add a channel to it."""
    if not args.tls_creds:
        return None
    authorize = glob_rules(args.tls_authz)
    ctx = tls_server_context(Path(args.tls_creds), args.tls_verify_peer or authorize is not None)
    return lambda raw, on_wrapped: tls_server(cast(SocketChannel, raw), ctx, authorize, timeout=TLS_GRACE,
                                              on_wrapped=on_wrapped)


def _postcopy_phase(args: argparse.Namespace, loader: Loader, phase: str) -> None:
    """Say when postcopy pauses (the source's connection was lost: the guest waits here
    with its RAM) and when a source resumes it, as QEMU's postcopy-paused/-recover."""
    if phase not in ("paused", "recover", "active"):
        return
    status = {"paused": "postcopy-paused", "recover": "postcopy-recover",
              "active": "postcopy-active"}[phase]
    if args.json:
        emit_json({"event": status, **({"reason": loader.pause_reason} if phase == "paused" else {})})
    elif not args.quiet:
        why = f" ({loader.pause_reason}); resume with the source's migrate -r to this address" \
            if phase == "paused" else ""
        console.print(f"mignet: {status}{escape(why)}", soft_wrap=True)


def _cancel_on_sigterm() -> None:
    """SIGTERM (kill, a supervisor) cancels a receive as Ctrl-C does, with one line and the
    cancelled status, instead of ending it at once with no message; --out's manifest keeps
    saying "complete": false either way."""
    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("cancelled by SIGTERM")
    try:
        signal.signal(signal.SIGTERM, terminated)
    except ValueError:
        pass  # not the main thread (main() called by a program): its own handlers stay


def _run_load(loader: Loader, quiet: bool, extra_pages: MultifdReceiver | None = None) -> LoadResult:
    thread = start_load_thread(loader)

    def poll() -> tuple[int, int | None, str]:
        s = loader.stats
        done = s.ram_done + (extra_pages.pages * PAGE_SIZE if extra_pages is not None else 0)
        return done, s.ram_total or None, f"{s.device_sections} dev"
    rows = multifd_channels(extra_pages.describe) if extra_pages is not None else None
    try:
        with transfer_progress("receiving", poll, enabled=not quiet, channels=rows):
            while not finished(thread.future, 0.2):
                pass
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (_cancel_on_sigterm)
        loader.cancel()
        finished(thread.future, 10)  # not Thread.join: see runtime.threads.finished
        raise MigrationCancelled(str(exc) or "cancelled by Ctrl-C") from None
    return thread.join()


def _load_stats_dict(s: LoadStats) -> dict[str, Any]:
    return {"machine_type": s.machine_type, "ram_total": s.ram_total, "return_path": s.return_path,
            "stream_bytes": s.bytes_received, "normal_pages": s.normal_pages,
            "zero_pages": s.zero_pages, "ram_sections": s.sections,
            "device_sections": s.device_sections, "seconds": round(s.elapsed, 4),
            "setup_seconds": round(s.setup_seconds, 4), "rdma_placed_bytes": s.placed_bytes,
            "predicted_pages": s.predicted_pages, "mispredictions": s.mispredictions,
            "switchover_at": s.switchover_at,  # CLOCK_MONOTONIC: live downtime on one host
            "postcopy": s.postcopy.to_json() if s.postcopy is not None else None}


def _rdma_row(rdma: dict[str, Any]) -> tuple[str, str]:
    """Which RDMA protocol ran (mignet's own or QEMU's) and how RAM was registered."""
    mode = "rdma-pin-all" if rdma["pin_all"] else "1 MiB chunks registered on demand"
    return ("RDMA protocol", f"{rdma['protocol']} ({mode})")


def _print_load_table(result: LoadResult, digests: RamDigests | None, out: GuestDir | None,
                      rdma: dict[str, Any] | None = None) -> None:
    s = result.stats
    rows: list[tuple[str, Any]] = [
        ("source machine", s.machine_type),
        ("RAM blocks", ", ".join(f"{n} ({human_bytes(z)})" for n, z in result.ram.layout())),
        ("stream bytes", human_bytes(s.bytes_received)),
        ("pages: data / zero", f"{s.normal_pages} / {s.zero_pages}"),
        ("device sections", s.device_sections),
    ]
    if s.postcopy is not None:
        pc = s.postcopy.to_json()
        lat = pc["fault-latency-ms"]
        rows += [("postcopy: discarded pages", pc["discarded-pages"]),
                 ("postcopy: faults / requests", f"{pc['faults']} / {pc['requests']}")]
        if lat["p50"] is not None:
            rows.append(("fault latency p50/p99/max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms"))
    if rdma is not None:  # the peer chose the protocol: QEMU's own, or mignet's
        rows.append(_rdma_row(rdma))
    if s.placed_bytes:  # RDMA: page data bypassed the stream
        rows += [("written by RDMA", human_bytes(s.placed_bytes)),
                 ("setup (RAM registration)", f"{s.setup_seconds:.2f} s")]
    rows += [
        ("time", f"{s.elapsed:.2f} s"),
        ("throughput of stream bytes", rate(s.bytes_received + s.placed_bytes, s.elapsed)),
        _digest_row(digests),
    ]
    if out:
        rows.append(("written to", str(out.path)))
    stats_table("incoming migration completed", rows)


# --- send ----------------------------------------------------------------------------
def _source_ram(args: argparse.Namespace) -> GuestRam:
    if args.image:  # copy-on-write for rdma:, which registers it (open_snapshot's private)
        return GuestRam.from_image(Path(args.image), name=args.block_name,
                                   private=parse_uri(args.uri).scheme == "rdma")
    return GuestRam.generate(args.size, args.fill, seed=args.seed)


def check_recv(args: argparse.Namespace) -> None:
    """Refuse, before listening, options that would be ignored or cannot work."""
    if args.tls_creds and parse_uri(args.listen).scheme != "tcp":
        raise UsageError("--tls-creds needs a tcp: URI (as QEMU's TLS migration)", options.prog(args))
    refuse_unless(args, bool(args.tls_creds), ["tls_authz", "tls_verify_peer"], "without --tls-creds")
    refuse_unless(args, args.postcopy, ["vcpus", "postcopy_preempt"], "without --postcopy")
    if args.postcopy and (args.tls_creds or parse_uri(args.listen).scheme == "rdma"):
        raise UsageError("--postcopy needs plain tcp: or unix: (mignet's postcopy does not run "
                         "over TLS or RDMA yet)", options.prog(args))


def check_send(args: argparse.Namespace) -> None:
    """Refuse, before connecting, what cannot work or would be silently ignored."""
    prog = options.prog(args)
    if not args.image and not args.size and not args.snapshot and not args.stream:
        raise UsageError("say what to send: --snapshot DIR, --stream FILE, --image FILE or "
                         "--size SIZE [--fill random|zero|mixed]", prog)
    if args.channels > 1:
        if args.stream:
            raise UsageError("--channels re-encodes the guest; a --stream file is replayed as "
                             "it was written", prog)
    if args.tls_creds and parse_uri(args.uri).scheme != "tcp":
        raise UsageError("--tls-creds needs a tcp: URI (as QEMU's TLS migration)", prog)
    refuse_unless(args, bool(args.tls_creds), ["tls_hostname"], "without --tls-creds")
    if args.live and not (args.size or args.snapshot):
        raise UsageError("--live migrates a running guest: give --size, or --snapshot to run a "
                         "received one (an image or a stream file is not running)", prog)
    refuse_unless(args, bool(args.live), ["dirty_rate", "auto_converge", "downtime_limit"],
                  "without --live")
    refuse_unless(args, not args.live, ["return_path"],
                  "with --live (live precopy has no return path; --postcopy always opens one)")
    refuse_unless(args, bool(args.postcopy), ["postcopy_after", "max_postcopy_bandwidth",
                                              "postcopy_preempt"], "without --postcopy")
    if args.postcopy:
        if not args.live:
            raise UsageError("--postcopy switches a running guest over: add --live", prog)
        if args.channels > 1:
            raise UsageError("--postcopy with --channels (multifd) is not supported by mignet: "
                             "drop one of them", prog)
        if args.tls_creds or parse_uri(args.uri).scheme == "rdma":
            raise UsageError("--postcopy needs plain tcp: or unix: (mignet's postcopy does not "
                             "run over TLS or RDMA yet)", prog)
    refuse_unless(args, bool(args.size), ["fill"], "without --size")
    refuse_unless(args, bool(args.image), ["block_name"], "without --image")
    refuse_unless(args, bool(args.size or args.image), ["seed", "no_devices"],
                  "with --snapshot or --stream (they carry their own devices)")
    refuse_unless(args, not args.stream,
                  ["max_bandwidth", "return_path", "rdma_pin_all", "channels", "digest"],
                  "with --stream (the file is replayed byte for byte)")
    refuse_unless(args, parse_uri(args.uri).scheme == "rdma", ["rdma_pin_all", "rdma_protocol"],
                  "without an rdma: URI")
    if args.rdma_protocol == "qemu":
        if args.stream:
            raise UsageError("--rdma-protocol qemu re-encodes the guest (HOOK records where QEMU "
                             "registers RAM); a --stream file is replayed as it was written", prog)
        if args.return_path:
            raise UsageError("--return-path over QEMU's RDMA protocol needs a second RDMA "
                             "connection, which mignet does not open: drop --return-path", prog)
        if args.channels > 1:
            raise UsageError("--channels over QEMU's RDMA protocol: QEMU 7.2 has no multifd "
                             "over rdma:, so neither has mignet there; drop one of them", prog)


def cmd_send(args: argparse.Namespace) -> int:
    if args.stream:
        return _send_stream(args)
    if args.live:
        return _send_live(args)
    kwargs: dict[str, Any] = {}
    if args.snapshot:
        # rdma: registers the RAM, which a read-only file mapping cannot be: copy-on-write
        snap = open_snapshot(Path(args.snapshot), private=parse_uri(args.uri).scheme == "rdma")
        ram, devices = snap.ram, snap.devices
        kwargs = {"machine_type": snap.machine_type, "ram_section_id": snap.ram_section_id,
                  "description": snap.description}
    else:
        ram = _source_ram(args)
        devices = DeviceSet.empty() if args.no_devices else DeviceSet.example(args.seed)
    channel = _connect_main(args)
    try:
        with _channels_for(args) as multifd:
            # A replay goes to real QEMU: by default ask it to confirm the load (return path),
            # except over QEMU's RDMA protocol, which carries none here.
            return_path = (bool(args.snapshot) and args.rdma_protocol != "qemu"
                           if args.return_path is None else args.return_path)
            sender = Sender(channel, ram, devices, max_bandwidth=args.max_bandwidth,
                            rdma_pin_all=args.rdma_pin_all, pages_to=multifd,
                            return_path=return_path, idle_timeout=args.idle_timeout, **kwargs)
            try:
                stats = _run_send(sender, quiet=args.quiet, multifd=multifd)
            except (ConnectionLostError, PeerFailedError) as exc:
                if not args.snapshot:
                    raise
                # QEMU says why only in its own log; the usual reason is a guest it cannot hold.
                raise type(exc)(f"{exc} — QEMU refuses a snapshot whose machine type or RAM "
                                f"differ from its own: start it with -machine {snap.machine_type} "
                                f"and {human_bytes(ram.total)} of RAM blocks as {_block_list(ram)}"
                                ) from None
    finally:
        channel.close()
    rdma = channel.page_placement.describe() if channel.page_placement is not None else None
    digests = ram.digests(args.digest) if args.json or not args.quiet else None
    if not args.quiet:
        _print_send_table(stats, digests, rdma)
    if args.json:
        emit_json(_send_completed(digests, stats.transferred, stats.elapsed, confirmed=stats.confirmed,
                                   multifd=multifd.describe() if multifd is not None else None,
                                   rdma=rdma))
    return 0


def _send_completed(digests: RamDigests | None, transferred: int, seconds: float, *,
                    confirmed: bool | None = None, migration: dict[str, Any] | None = None,
                    multifd: dict[str, Any] | None = None, stream: str | None = None,
                    rdma: dict[str, Any] | None = None) -> dict[str, Any]:
    """``send --json``'s last line: one shape whatever was sent (docs/cli.md), so a
    script reads the same keys with and without --live; what does not apply is null.
    ``rdma``: over rdma:, which protocol ran and its counters (as recv's stats.rdma)."""
    return {"event": "completed", **digest_keys(digests), "transferred": transferred,
            "seconds": round(seconds, 4), "confirmed": confirmed, "live": migration is not None,
            "migration": migration, "multifd": multifd, "stream": stream, "rdma": rdma}


@contextmanager
def _channels_for(args: argparse.Namespace) -> Iterator[MultifdSender | None]:
    """``--channels N``: the multifd channels beside the main connection, opened after it
    (QEMU 7.2's destination takes its first connection as the main stream), finished when
    the body succeeds and closed on every way out; None for one stream."""
    if args.channels <= 1:
        yield None
        return
    # with --tls-creds each channel has its own TLS session, as QEMU's multifd_tls_channel_connect
    multifd = MultifdSender.open(lambda: _connect_main(args), args.channels, idle_timeout=args.idle_timeout)
    multifd.start()
    try:
        yield multifd
        multifd.finish()
    finally:
        multifd.close()


def _connect_main(args: argparse.Namespace) -> Channel:
    """A connection to the destination (the main one, or a multifd channel), with QEMU's
    TLS when --tls-creds says so; on rdma: in the protocol --rdma-protocol names. A
    destination that stalls the handshake is given up on within the idle limit, as a stall
    later would be."""
    channel = connect(args.uri, rdma_protocol=args.rdma_protocol or "mignet",
                      rdma_pin_all=bool(args.rdma_pin_all))
    if not args.tls_creds:
        return channel
    host = str(parse_uri(args.uri).host)
    limit = HANDSHAKE_TIMEOUT if args.idle_timeout is None else min(args.idle_timeout, HANDSHAKE_TIMEOUT)
    return tls_client(cast(SocketChannel, channel), Path(args.tls_creds), args.tls_hostname or host,
                      timeout=limit)


def _send_stream(args: argparse.Namespace) -> int:
    """Replay a captured stream file byte for byte (no decoding: what QEMU wrote is sent)."""
    path = Path(args.stream)
    try:
        f = open(path, "rb")  # closed by the with below
    except OSError as exc:
        raise SetupError(f"cannot read stream file {path}: {exc.strerror}") from None
    sent = 0
    t0 = time.monotonic()
    with f:
        channel = _connect_main(args)
        channel.set_idle_timeout(write=args.idle_timeout)
        try:
            while chunk := f.read(1 << 20):
                sent += channel.write_all(chunk)
            channel.shutdown(ShutdownHow.WRITE)
        finally:
            channel.close()
    if not args.quiet:
        console.print(f"mignet: sent {path} ({human_bytes(sent)}) to {args.uri}")
    if args.json:
        emit_json(_send_completed(None, sent, time.monotonic() - t0, stream=str(path)))
    return 0


def _live_params(args: argparse.Namespace) -> Any:
    from mignet.migration.postcopy_source import PostcopyParams
    from mignet.migration.precopy import PrecopyParams

    common = {"downtime_limit_ms": args.downtime_limit, "max_bandwidth": args.max_bandwidth,
              "auto_converge": args.auto_converge}
    if getattr(args, "postcopy", False):
        return PostcopyParams(**common, postcopy_after=args.postcopy_after,
                              max_postcopy_bandwidth=args.max_postcopy_bandwidth)
    return PrecopyParams(**common)


def _live_guest(args: argparse.Namespace) -> tuple[GuestRam, DeviceSet, dict[str, Any]]:
    """The running guest of --live: synthetic (--size), or a received one (--snapshot) whose
    RAM is copied into private memory for its vCPUs to write, sent with its own machine
    type, device state and section id so that QEMU takes it."""
    from mignet.migration.dirty import page_aligned

    if not args.snapshot:
        devices = DeviceSet.empty() if args.no_devices else DeviceSet.example(args.seed)
        return page_aligned(_source_ram(args)), devices, {}
    snap = open_snapshot(Path(args.snapshot))
    ram = GuestRam()
    for block in snap.ram:  # writable and page-aligned, off the read-only files
        data = allocate_guest_memory(block.size)
        data[:] = block.data
        ram.add(RamBlock(block.name, data))
    return ram, snap.devices, {
        "machine_type": snap.machine_type, "ram_section_id": snap.ram_section_id,
        "description": snap.description}


def _send_live(args: argparse.Namespace) -> int:
    """Live migration of a running guest (its vCPUs write at --dirty-rate): precopy, or
    with --postcopy precopy rounds and then postcopy."""
    from mignet.ui.live import print_live_table, run_live

    ram, devices, sender_options = _live_guest(args)
    channel = _connect_main(args)
    preempt: Channel | None = None
    try:
        if getattr(args, "postcopy_preempt", False):
            preempt = connect(args.uri)  # right after the main one, silent until postcopy
        with _channels_for(args) as multifd:  # each round's dirty pages, synced per round
            precopy, workload = run_live(channel, ram, devices, dirty_rate=args.dirty_rate,
                                         params=_live_params(args), quiet=args.quiet, seed=args.seed,
                                         rdma_pin_all=args.rdma_pin_all, pages_to=multifd,
                                         idle_timeout=args.idle_timeout, sender_options=sender_options,
                                         preempt=preempt)
    finally:
        channel.close()
        if preempt is not None:
            preempt.close()
    digests = ram.digests(args.digest) if args.json or not args.quiet else None
    if not args.quiet:
        print_live_table(precopy, workload)
        row = _digest_row(digests)
        when = "the switch to postcopy" if args.postcopy else "stop-and-copy"
        console.print(f"source {row[0]} at {when}: {row[1]}")
    if args.json:
        info = precopy.query_migrate()
        placement = channel.page_placement
        emit_json(_send_completed(digests, info["ram"]["transferred"], info["total-time"] / 1000,
                                   confirmed=precopy.sender.stats.confirmed, migration=info,
                                   multifd=multifd.describe() if multifd else None,
                                   rdma=placement.describe() if placement is not None else None))
    return 0


def _run_send(sender: Sender, quiet: bool, multifd: MultifdSender | None = None) -> SendStats:
    def poll() -> tuple[int, int | None, str]:
        s = sender.stats
        return s.ram_done, s.ram_total, f"{s.zero_pages} zero pages"
    return run_with_progress(sender.run, label="sending", poll=poll, cancel=sender.cancel, quiet=quiet,
                             channels=multifd_channels(multifd.describe) if multifd is not None else None)


def _block_list(ram: GuestRam) -> str:
    blocks = [f"{b.name} {human_bytes(b.size)}" for b in ram]
    return ", ".join(blocks[:3]) + (f" (+{len(blocks) - 3} more)" if len(blocks) > 3 else "")


def _print_send_table(s: SendStats, digests: RamDigests | None,
                      rdma: dict[str, Any] | None = None) -> None:
    rows: list[tuple[str, Any]] = [("RAM", human_bytes(s.ram_total))]
    if rdma is not None:
        rows.append(_rdma_row(rdma))
    stats_table("outgoing migration completed", [
        *rows,
        ("stream bytes", human_bytes(s.transferred)),
        ("pages: data / zero", f"{s.normal_pages} / {s.zero_pages}"),
        ("time", f"{s.elapsed:.2f} s"),
        ("throughput of stream bytes", rate(s.transferred, s.elapsed)),
        _digest_row(digests),
        ("confirmed by the destination", {True: "yes (SHUT 0)", None: "not asked (no return path)"}
         .get(s.confirmed, "no")),
    ])


# --- demo ----------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Both ends on loopback: a receiver process, this process migrates a *running* guest
    (vCPU threads writing at --dirty-rate) by live precopy; digests compared afterwards."""
    from mignet.migration.dirty import page_aligned
    from mignet.ui.live import print_live_table, run_live

    size, dirty_rate, quiet = args.size, args.dirty_rate, args.quiet
    if not quiet:
        console.print(f"mignet demo: live-migrating a {human_bytes(size)} {args.fill} guest, its vCPUs "
                  f"writing {human_bytes(dirty_rate)}/s, over loopback TCP to a separate receiver process")
    receiver, uri = start_receiver([*recv_command(max_ram=size + (64 << 20)), "--digest", args.digest])
    done: dict[str, Any] = {}

    def destination_loaded() -> float | None:
        """The receiver's switchover on this host's CLOCK_MONOTONIC (its JSON line)."""
        done.update(receiver_result(receiver, timeout=60))
        return done["stats"].get("switchover_at")
    try:
        ram = page_aligned(GuestRam.generate(size, args.fill, seed=args.seed))
        devices = DeviceSet.example(args.seed)
        channel = connect(uri)
        precopy, workload = run_live(channel, ram, devices, dirty_rate=dirty_rate, params=_live_params(args),
                                     destination_loaded=destination_loaded, seed=args.seed, quiet=quiet)
        channel.close()
        source = ram.digests(args.digest)  # the vCPUs are stopped: RAM as frozen at stop-and-copy
    finally:
        if receiver.poll() is None:
            receiver.send_signal(signal.SIGINT)
            receiver.wait(10)
    assert source is not None
    identical = done["ram_digest"] == source.ram
    if not quiet:
        print_live_table(precopy, workload, "demo result")
        stats_table(f"digests ({args.digest})", [("source (frozen at stop-and-copy)", short_digest(source.ram)),
                                                ("received", short_digest(done["ram_digest"]))])
    if identical:
        if not quiet:
            console.print(f"[bold green]OK[/]: the received RAM is identical to the source ({args.digest} match)")
        if args.json:  # else the error line (main) is the last one
            info = precopy.query_migrate()
            emit_json({"event": "completed", "digest": args.digest, "ram_digest": source.ram,
                        "received_digest": done["ram_digest"], "identical": True,
                        "transferred": info["ram"]["transferred"],
                        "seconds": info["total-time"] / 1000, "migration": info})
        return 0
    raise DemoFailed(f"the received RAM differs from the source ({args.digest} mismatch): a mignet bug, "
                     "please report it with this command line")


class DemoFailed(MignetError):
    """The demo's own check failed: the guest did not arrive intact (exit 1, FAILED)."""


# --- entry point ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = options.Parser(
        prog="mignet", description="Migrate guest memory over TCP or RDMA in QEMU's stream format. "
                                   f"{options.SIZES[0].upper()}{options.SIZES[1:]}; {options.RATES}. "
                                   "Exit statuses: docs/cli.md.")
    p.add_argument("--version", action="version", version=f"mignet {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("recv", help="receive a migration stream (from mignet or QEMU)")
    r.add_argument("--listen", required=True, metavar="URI", type=options.uri,
                   help="tcp:HOST:PORT, unix:PATH or rdma:HOST:PORT")
    r.add_argument("--out", metavar="DIR", help="write each RAM block and the device state to DIR")
    r.add_argument("--force", action="store_true",
                   help="reuse an --out DIR that holds an earlier (finished or failed) receive, "
                        "replacing its files")
    options.add_max_ram(r)
    options.add_digest(r, "the received RAM's digests (table, --json, --out's manifest)")
    r.add_argument("--timeout", type=options.seconds, metavar="SECONDS",
                   help="seconds to wait for the source (default: no limit)")
    _add_idle_timeout(r)
    r.add_argument("--postcopy", action="store_true",
                   help="accept a source that switches to postcopy (QEMU's postcopy-ram): "
                        "the guest runs here before all RAM came, and pages it touches are "
                        "asked for")
    r.add_argument("--vcpus", type=options.count_range(0, 64), default=1, metavar="N",
                   help="postcopy: threads that read every page once the guest runs here, "
                        "as its vCPUs would, so their faults pull pages; 0: none "
                        "(default: %(default)s)")
    r.add_argument("--postcopy-preempt", action="store_true",
                   help="postcopy: take QEMU's preempt channel (postcopy-preempt), a second "
                        "connection that carries the asked-for pages past the rest")
    r.add_argument("--tls-creds", metavar="DIR",
                   help="TLS on tcp: as QEMU's tls-creds-x509 endpoint=server: DIR holds "
                        "ca-cert.pem, server-cert.pem, server-key.pem")
    r.add_argument("--tls-verify-peer", action=argparse.BooleanOptionalAction, default=True,
                   help="require the source's client certificate, signed by the CA (as QEMU)")
    r.add_argument("--tls-authz", action="append", default=[], metavar="DNAME",
                   help="let in only clients whose certificate name matches this glob, e.g. "
                        "'CN=*.example.com,O=Example Org' (QEMU's authz-list); repeatable")
    _add_output_options(r)
    r.set_defaults(func=cmd_recv, _check=check_recv)

    s = sub.add_parser("send", help="send guest RAM and device state")
    s.add_argument("uri", metavar="URI", type=options.uri,
                   help="the destination: tcp:HOST:PORT, unix:PATH or rdma:HOST:PORT")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--image", metavar="FILE", help="a RAM image, e.g. QEMU's memory-backend-file")
    src.add_argument("--size", metavar="SIZE", type=options.size,
                     help="a synthetic guest of SIZE (binary: 2G = 2 GiB)")
    src.add_argument("--snapshot", metavar="DIR",
                     help="a guest received with recv --out DIR (e.g. from real QEMU): its "
                          "machine type, RAM blocks and device state, sent so that "
                          "qemu -incoming accepts it")
    src.add_argument("--stream", metavar="FILE",
                     help="a captured stream file (e.g. QEMU's migrate \"exec:cat > FILE\"), "
                          "replayed byte for byte")
    s.add_argument("--fill", choices=["random", "zero", "mixed"], default="random",
                   help="with --size: the synthetic guest's contents")
    s.add_argument("--seed", type=int, default=0, help="with --size or --image: seed of the "
                                                        "guest's contents and device state")
    s.add_argument("--block-name", default="pc.ram", help="RAM block name for --image")
    s.add_argument("--max-bandwidth", default="0", metavar="RATE", type=options.rate,
                   help="bytes per second, e.g. 128MiB/s; 0 = unlimited")
    _add_idle_timeout(s)
    s.add_argument("--tls-creds", metavar="DIR",
                   help="TLS on tcp: as QEMU's tls-creds-x509 endpoint=client: DIR holds "
                        "ca-cert.pem (and client-cert.pem, client-key.pem)")
    s.add_argument("--tls-hostname", metavar="NAME",
                   help="the name the destination's certificate must carry (default: the URI's host)")
    s.add_argument("--no-devices", action="store_true", help="send no device-state sections")
    s.add_argument("--return-path", action=argparse.BooleanOptionalAction, default=None,
                   help="open QEMU's return path and report completed only once the destination "
                        "confirms the load (SHUT); default: on with --snapshot, else off")
    s.add_argument("--rdma-pin-all", action="store_true", default=None,
                   help="rdma: URIs: the destination registers all its RAM before the first page "
                        "(QEMU's rdma-pin-all) instead of 1 MiB chunks on demand")
    s.add_argument("--rdma-protocol", choices=["mignet", "qemu"], default=None,
                   help="rdma: URIs: mignet's own protocol (into mignet recv; the default) or "
                        "QEMU 7.2's (into qemu -incoming rdma:)")
    s.add_argument("--channels", type=options.count_range(1, MAX_CHANNELS), default=1, metavar="N",
                   help="QEMU 7.2's multifd: page data over N extra connections (N >= 2; "
                        "the destination needs the multifd capability and multifd-channels N)")
    s.add_argument("--live", action="store_true",
                   help="live precopy: the guest keeps running (vCPUs writing at --dirty-rate)")
    s.add_argument("--dirty-rate", default="200MiB/s", metavar="RATE", type=options.rate,
                   help="with --live: the vCPUs' write rate, bytes per second")
    _add_live_options(s, "with --live: ")
    s.add_argument("--postcopy", action="store_true",
                   help="with --live: switch to postcopy (QEMU's postcopy-ram) unless precopy "
                        "converged first: the guest moves to the destination, which asks for "
                        "the pages it touches while the rest streams behind (the destination "
                        "needs postcopy-ram / recv --postcopy)")
    s.add_argument("--postcopy-after", type=options.count1, default=1, metavar="ROUNDS",
                   help="with --postcopy: precopy rounds (dirty syncs) before the switch")
    s.add_argument("--max-postcopy-bandwidth", default="0", metavar="RATE", type=options.rate,
                   help="with --postcopy: bytes per second of the stream after the switch; "
                        "requested pages are not limited; 0 = unlimited")
    s.add_argument("--postcopy-preempt", action="store_true",
                   help="with --postcopy: requested pages go on a second connection, past the "
                        "rest (QEMU's postcopy-preempt; recv --postcopy-preempt)")
    options.add_digest(s, "the sent RAM's digest (table, --json)")
    _add_output_options(s)
    s.set_defaults(func=cmd_send, _check=check_send)

    d = sub.add_parser("demo", help="migrate a guest over loopback and check it arrived intact")
    d.add_argument("--size", default="1G", type=options.size, metavar="SIZE",
                   help="guest RAM (binary: 1G = 1 GiB)")
    d.add_argument("--fill", choices=["random", "zero", "mixed"], default="mixed",
                   help="the guest's contents")
    d.add_argument("--seed", type=int, default=7, help="seed of the guest's contents and writes")
    d.add_argument("--dirty-rate", default="100MiB/s", metavar="RATE", type=options.rate,
                   help="the vCPUs' write rate, bytes per second (0 = idle)")
    d.add_argument("--max-bandwidth", default="0", metavar="RATE", type=options.rate,
                   help="bytes per second, e.g. 128MiB/s; 0 = unlimited")
    _add_live_options(d)
    options.add_digest(d, "the digest both ends compare", choices=DIGESTS[:-1])
    _add_output_options(d, "a completed event with both digests")
    d.set_defaults(func=cmd_demo)

    for module in (bench, inspect, relay, rxe, serve):
        module.add_parser(sub)
    return p


def _add_live_options(p: argparse.ArgumentParser, only: str = "") -> None:
    p.add_argument("--downtime-limit", type=options.count0, default=300, metavar="MS",
                   help=f"{only}switch over once the rest fits in MS milliseconds at the measured "
                        "bandwidth, as QEMU")
    p.add_argument("--auto-converge", action="store_true",
                   help=f"{only}throttle the vCPUs progressively while the dirty rate outruns the link")


def _add_idle_timeout(p: argparse.ArgumentParser) -> None:
    """``--idle-timeout`` of recv and send: the stall limit of both ends (migration.loadvm)."""
    p.add_argument("--idle-timeout", type=options.idle_seconds, default=IDLE_TIMEOUT, metavar="SECONDS",
                   help=options.IDLE_HELP)


def _add_output_options(p: argparse.ArgumentParser, what: str = "events") -> None:
    p.add_argument("--json", action="store_true",
                   help=f"one JSON object per line on stdout: {what}; a failure is an "
                        "\"error\" object (docs/cli.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table, only errors")


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure becomes one line (and with --json one JSON object)
    and the exit status of its kind (mignet/cli/exits.py)."""
    argv = sys.argv[1:] if argv is None else argv
    words = argv[:argv.index("--")] if "--" in argv else argv
    json_out = "--json" in words  # until the options are parsed, in case they do not parse
    try:
        args = build_parser().parse_args(argv)
        json_out = bool(getattr(args, "json", False))
        check = getattr(args, "_check", None)  # "check" is rxe run's --check
        if check is not None:
            check(args)
        return int(args.func(args))
    except (MignetError, MigrationCancelled, KeyboardInterrupt) as exc:
        return report(exc, json_out=json_out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
