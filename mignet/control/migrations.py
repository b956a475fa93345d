"""Glue between the control plane (QMP) and the data plane (Sender, Loader).

Why a separate module: QMP handlers must return at once (they run on the main loop, holding
the big lock), while a migration takes seconds to minutes. So each migration runs in its own
thread — outgoing in ``mig/src/main`` with a :class:`~mignet.migration.savevm.Sender`, incoming via
:func:`~mignet.migration.loadvm.start_load_thread` (``mig/dst/main``) after ``mig/dst/accept`` has
taken the connection — and this module is the only place that turns their progress into the
public state (:mod:`mignet.migration.status`), takes and releases the option lock
(:mod:`mignet.control.options`), and reacts to runtime changes (cancel, max-bandwidth).

Order at the end of a migration matters: the option lock is released *before* the final
status is published, so a client that sees "completed" may change options at once.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from mignet.channel import Channel
from mignet.control.objects import Objects, TlsCredsX509
from mignet.control.options import OptionSet
from mignet.errors import MignetError, MigrationCancelled, RequestRefused, SetupError
from mignet.guest.devices import DeviceSet
from mignet.guest.directory import GuestDir
from mignet.guest.ram import GuestRam, RamBlock
from mignet.guest.userfault import Userfaultfd
from mignet.guest.workload import Workload
from mignet.migration.loadvm import Loader, LoadThread, load_in_coroutine, start_load_thread
from mignet.migration.multifd import MultifdReceiver, MultifdSender, PollableListener
from mignet.migration.postcopy_source import PostcopyParams, PostcopySource
from mignet.migration.precopy import Precopy, PrecopyParams, RoundStats
from mignet.migration.savevm import Sender
from mignet.migration.status import DirectionState, MigrationState, Phase, RamCounters
from mignet.runtime.halves import bottom_half, upper_half
from mignet.runtime.threads import make_bulk, name_native_thread
from mignet.tcp import SocketChannel
from mignet.tcp.tls import tls_client, tls_server, tls_server_context
from mignet.transport import Listener, connect, listen
from mignet.units import PAGE_SIZE
from mignet.uri import parse_uri

OUTGOING_THREAD = "mig/src/main"
ACCEPT_THREAD = "mig/dst/accept"
CHANNEL_REPORT_WAIT = 0.5  # s: a failed main stream waits this long for a channel's cause

EventSink = Callable[[str, dict[str, Any]], None]
_CANCELLABLE = frozenset({Phase.CONNECTING, Phase.LISTENING, Phase.RAM, Phase.DEVICES,
                          Phase.POSTCOPY_PAUSED})


@dataclass
class Guest:
    """The guest this process holds: RAM (None on a destination that has not received one
    yet), devices, and where an incoming guest is written (``out``)."""

    ram: GuestRam | None
    devices: DeviceSet
    out: GuestDir | None = None
    max_ram: int = 1 << 40
    incoming_deferred: bool = False  # started with --incoming defer: waits for migrate-incoming
    # "thread": load in mig/dst/main (QEMU today); "coroutine": load as a coroutine of the
    # main loop, holding the big lock except while yielded (QEMU before the loader thread).
    recv_model: str = "thread"
    workload: Workload | None = None  # the source's running vCPUs (None: a paused guest)
    # postcopy (incoming): threads that read every page once the guest runs here, as its
    # vCPUs would, so that their faults ask the source for pages; 0: none
    vcpus: int = 1
    description: dict[str, Any] | None = field(default=None, repr=False)


class Migrations:
    """Starts, cancels and observes this process's migrations."""

    def __init__(self, guest: Guest, options: OptionSet, state: MigrationState,
                 emit: EventSink) -> None:
        self.guest = guest
        self.options = options
        self.state = state
        self.emit = emit
        self._sender: Sender | None = None
        self._source: Precopy | None = None  # the running outgoing driver (for its controls)
        # migrate-start-postcopy came (QEMU's s->start_postcopy): kept here, not only in the
        # driver, since the command may come before the thread has built it
        self._postcopy_requested = False
        self._loader: Loader | None = None
        self._listener: Listener | None = None
        self._recover_listener: Listener | None = None  # migrate-recover's, while it waits
        self._multifd_in: MultifdReceiver | None = None
        self._tls_in: Channel | None = None  # the one-stream destination's, in its handshake
        self.objects = Objects()  # object-add's tls-creds-x509 and authz-list, by id
        # Each direction's channels as last seen (MultifdSender/Receiver.describe), kept
        # after the migration ends: x-mignet-query-multifd reads it.
        self._multifd_seen: dict[str, Callable[[], dict[str, Any]]] = {}
        self._threads: list[threading.Thread] = []
        self._incoming_used = False
        self._mutex = threading.Lock()  # sender/loader/listener hand-over vs cancel

    # --- outgoing --------------------------------------------------------------------
    @upper_half
    def start_outgoing(self, uri: str, config: Mapping[str, Any] | None = None) -> None:
        """``migrate``: checks, then options lock, then the thread. Errors are raised here,
        synchronously, so QMP answers them; later failures end in status "failed"."""
        if self.state.incoming.running or (self.guest.incoming_deferred and self.guest.ram is None):
            raise RequestRefused("Guest is waiting for an incoming migration")
        if self.state.outgoing.running:
            raise RequestRefused("There's a migration process in progress")
        if self.guest.ram is None:
            raise RequestRefused("this process holds no guest RAM to migrate")
        parse_uri(uri)  # a malformed URI is the caller's error, answered now (as QEMU does)
        snapshot = self.options.begin("outgoing", config)
        try:
            channels = _multifd_channels(uri, snapshot.capabilities, snapshot.parameters)
            tls = self._tls(uri, snapshot.parameters, "client")
            postcopy = bool(snapshot.capabilities["postcopy-ram"])
            preempt = postcopy and bool(snapshot.capabilities["postcopy-preempt"])
            if postcopy:
                _postcopy_source_check(uri, channels, tls is not None)
        except BaseException:
            self.options.end("outgoing")
            raise
        with self._mutex:
            self._postcopy_requested = False  # as QEMU's migrate_init
        self.state.outgoing.to(Phase.CONNECTING)
        events = bool(snapshot.capabilities["events"])
        t = threading.Thread(target=self._outgoing_main,
                             args=(uri, events, channels, tls, postcopy, preempt),
                             name=OUTGOING_THREAD, daemon=True)
        self._threads.append(t)
        t.start()

    @upper_half
    def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: the outgoing migration switches to postcopy at its
        next dirty sync (QEMU's qmp_migrate_start_postcopy: its checks and messages; after
        the migration ended it is accepted and does nothing, since refusing would race
        with the end)."""
        if not self.options.capability("postcopy-ram"):
            raise RequestRefused("Enable postcopy with migrate_set_capability before"
                                 " the start of migration")
        if self.state.outgoing.phase is Phase.IDLE:
            raise RequestRefused("Postcopy must be started after migration has been started")
        with self._mutex:
            self._postcopy_requested = True
            if isinstance(self._source, PostcopySource):
                self._source.start_postcopy()

    @bottom_half
    def _outgoing_main(self, uri: str, events: bool, channels: int, tls: _Tls | None,
                       postcopy: bool = False, preempt_on: bool = False) -> None:
        out = self.state.outgoing
        channel: Channel | None = None
        preempt: Channel | None = None
        multifd: MultifdSender | None = None
        remove_observer: Callable[[], None] = lambda: None  # noqa: E731
        old_runstate = self.state.runstate
        name_native_thread(OUTGOING_THREAD)
        make_bulk()  # below the main loop's CPU priority, as the loader (runtime/threads.py)
        try:
            def connect_tls() -> Channel:
                """QEMU's TLS: the handshake before the connection's first byte, on the
                main one and on each multifd channel (multifd_tls_channel_connect)."""
                raw = connect(uri)
                if tls is None:
                    return raw
                return tls_client(cast(SocketChannel, raw), tls.creds.dir, tls.hostname)
            channel = connect_tls()
            if preempt_on:  # as mignet send: right after the main one, silent until postcopy
                preempt = connect(uri)
            if channels:
                # as QEMU: the main stream connects first, then one connection per channel
                multifd = MultifdSender.open(connect_tls, channels)
                self._multifd_seen["outgoing"] = multifd.describe
                multifd.start()
            assert self.guest.ram is not None
            sender = Sender(channel, self.guest.ram, self.guest.devices,
                            max_bandwidth=self.options.parameter("max-bandwidth"),
                            rdma_pin_all=bool(self.options.capability("rdma-pin-all")),
                            pages_to=multifd)
            # Only a running guest has vCPUs to stop (after a completed migration it stays
            # stopped: a second migrate sends it paused, as QEMU from postmigrate).
            workload = self.guest.workload if self.guest.workload and self.guest.workload.running else None

            def stopped() -> None:
                """vCPUs stopped for the final copy (the driver has moved ``out`` to
                SWITCHOVER: from here a cancel comes too late)."""
                self.state.runstate = "finish-migrate"
            def on_round(r: RoundStats) -> None:
                if events:
                    self.emit("MIGRATION_PASS", {"pass": r.round + 1})
            def on_active() -> None:
                if events:
                    self.emit("MIGRATION_PASS", {"pass": 1})
            precopy: Precopy
            if postcopy:  # switches only on migrate-start-postcopy, as QEMU's source
                precopy = PostcopySource(sender, workload, self._postcopy_params(),
                                         on_stop=stopped, on_round=on_round, state=out,
                                         on_active=on_active, preempt=preempt)
            else:
                precopy = Precopy(sender, workload, self._precopy_params(), on_stop=stopped,
                                  on_round=on_round, state=out, on_active=on_active)

            def on_option(name: str, value: Any) -> None:  # allowlisted while migrating
                if name == "max-bandwidth":  # takes effect within 100 ms
                    precopy.set_max_bandwidth(value)
                elif name == "downtime-limit":  # read at the next sync
                    precopy.params.downtime_limit_ms = int(value)
                elif name == "max-postcopy-bandwidth" and isinstance(precopy, PostcopySource):
                    precopy.set_max_postcopy_bandwidth(value)  # at once if switched, else at the switch
            remove_observer = self.options.add_observer(on_option)
            precopy.set_max_bandwidth(self.options.parameter("max-bandwidth"))  # a change meanwhile
            if isinstance(precopy, PostcopySource):
                precopy.set_max_postcopy_bandwidth(self.options.parameter("max-postcopy-bandwidth"))
            with self._mutex:
                self._sender = sender
                self._source = precopy
                if self._postcopy_requested and isinstance(precopy, PostcopySource):
                    precopy.start_postcopy()  # the command came while the thread connected
            precopy.run()  # rounds while the vCPUs run, then stop and copy (phases of ``out``)
            if multifd is not None:
                multifd.finish()
            self.state.runstate = "postmigrate"
            self._end(out, "outgoing", Phase.DONE)
        except MigrationCancelled:
            self._end(out, "outgoing", Phase.CANCELLED)
            self.state.runstate = old_runstate  # as QEMU's vm_old_state: the guest resumes
        except MignetError as exc:
            # After the switch to postcopy the guest may run on the destination: it must
            # not run here too (PostcopySource leaves its vCPUs stopped), so not old_runstate.
            handed_over = out.phase is Phase.POSTCOPY
            self._end(out, "outgoing", _failed_or_cancelled(out), str(exc))
            self.state.runstate = "postmigrate" if handed_over else old_runstate
        except BaseException as exc:  # noqa: BLE001 - a bug must still end the migration
            self._end(out, "outgoing", _failed_or_cancelled(out), f"internal error: {exc!r}")
            raise
        finally:
            remove_observer()
            with self._mutex:
                self._sender = None
                self._source = None
            if multifd is not None:
                multifd.close()
            if preempt is not None:
                preempt.close()
            if channel is not None:
                channel.close()

    def _postcopy_params(self) -> PostcopyParams:
        """Precopy's parameters, and a switch only when told (``postcopy_after=None``):
        QEMU's source switches only on migrate-start-postcopy, never by itself."""
        return PostcopyParams(**asdict(self._precopy_params()), postcopy_after=None,
                              max_postcopy_bandwidth=int(self.options.parameter("max-postcopy-bandwidth")))

    def _precopy_params(self) -> PrecopyParams:
        o = self.options
        return PrecopyParams(
            downtime_limit_ms=int(o.parameter("downtime-limit")),
            max_bandwidth=int(o.parameter("max-bandwidth")),
            auto_converge=bool(o.capability("auto-converge")),
            cpu_throttle_initial=int(o.parameter("cpu-throttle-initial")),
            cpu_throttle_increment=int(o.parameter("cpu-throttle-increment")),
            max_cpu_throttle=int(o.parameter("max-cpu-throttle")),
            throttle_trigger_threshold=int(o.parameter("throttle-trigger-threshold")),
        )

    # --- incoming --------------------------------------------------------------------
    @upper_half
    def start_incoming(self, uri: str, config: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
        """``migrate-incoming``: listen now (errors answered at once), accept and load in
        threads. Returns the listening addresses (QEMU's socket-address)."""
        if not self.guest.incoming_deferred:
            raise RequestRefused("'-incoming' was not specified on the command line")
        inc = self.state.incoming
        if inc.running:
            raise RequestRefused("The incoming migration has already been started")
        # After a failed or cancelled load the destination takes a new migrate-incoming
        # (QEMU exits instead): nothing of the failed attempt is kept.
        retry = self._incoming_used
        snapshot = self.options.begin("incoming", config)
        try:
            multifd = bool(_multifd_channels(uri, snapshot.capabilities, snapshot.parameters))
            tls = self._tls(uri, snapshot.parameters, "server")
            postcopy = bool(snapshot.capabilities["postcopy-ram"])
            preempt = postcopy and bool(snapshot.capabilities["postcopy-preempt"])
            if postcopy:
                self._postcopy_check(uri, tls is not None)
            if retry and self.guest.out is not None:  # the failed attempt's files go
                out = self.guest.out
                self.guest.out = GuestDir(out.path, force=True, digest=out.digest)
                out.close()
            listener = listen(uri)
        except BaseException:
            self.options.end("incoming")
            raise
        self._incoming_used = True
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # not on a loop: only the threaded model is possible
        with self._mutex:
            self._listener = listener
        inc.to(Phase.LISTENING)
        addr = listener.address
        if addr.scheme == "unix":
            inc.socket_address = [{"type": "unix", "path": str(addr.path)}]
        else:
            inc.socket_address = [{"type": "inet" if addr.scheme == "tcp" else addr.scheme,
                                   "host": str(addr.host), "port": str(addr.port)}]
        t = threading.Thread(target=self._incoming_main, args=(listener, multifd, tls, postcopy, preempt),
                             name=ACCEPT_THREAD, daemon=True)
        self._threads.append(t)
        t.start()
        return inc.socket_address

    @bottom_half
    def _incoming_main(self, listener: Listener, multifd_on: bool, tls: _Tls | None,
                       postcopy: bool, preempt: bool) -> None:
        inc = self.state.incoming
        channel: Channel | None = None
        multifd: MultifdReceiver | None = None
        pc = _PostcopySeen(blocktime=self.options.capability("postcopy-blocktime"))
        # (phase, error) published only after everything of this attempt is released, so a
        # client that sees the end may retry at once (same port, new references).
        outcome: tuple[Phase, str | None] | None = None
        try:
            try:
                if multifd_on or preempt:  # keep listening: more connections come
                    # multifd and preempt are only on tcp:/unix:, whose listeners are pollable.
                    # With TLS each connection is handshaken (and authorized) before it is
                    # classified; one that fails is refused, and the listener goes on.
                    multifd = MultifdReceiver(cast(PollableListener, listener), on_refused=self._refused,
                                              handshake=tls.server if tls is not None else None)
                    multifd.expect_preempt = preempt
                    multifd.bulk_threads = True  # as the loader: QMP answers first
                    self._multifd_seen["incoming"] = multifd.describe
                    with self._mutex:
                        self._multifd_in, self._listener = multifd, None  # a cancel closes it
                    if inc.phase is Phase.CANCELLING:
                        multifd.stop()
                    channel = multifd.accept_main()
                else:
                    channel = listener.accept()
            finally:
                if multifd is None:
                    listener.close()
            if tls is not None and multifd is None:  # authenticated before a byte of the stream
                channel = self._tls_incoming(tls, channel)
                with self._mutex:
                    self._listener = None
                    self._multifd_in = multifd
            block_factory = self.guest.out.block_factory if self.guest.out else RamBlock.anonymous

            def switchover() -> None:  # loader thread, big lock held
                if inc.phase is Phase.POSTCOPY:
                    # postcopy's RUN: the guest starts here with RAM still arriving; it stays
                    # postcopy-active until the stream ends (QEMU's loadvm_postcopy_handle_run_bh)
                    pc.run = True
                    self.state.runstate = "running" if self.state.autostart else "paused"
                    return
                if not inc.move(frozenset({Phase.RAM, Phase.DEVICES}), Phase.SWITCHOVER):
                    raise MigrationCancelled("incoming migration cancelled")

            def on_postcopy(what: str) -> None:  # loader thread
                if what == "listen":  # RAM faults from now on: QEMU's active -> postcopy-active
                    pc.listen_offset = loader.decoder.offset
                    if not inc.move(frozenset({Phase.RAM}), Phase.POSTCOPY):
                        raise MigrationCancelled("incoming migration cancelled")
                elif what == "paused":  # the source's connection is lost: wait for a resume
                    inc.move(frozenset({Phase.POSTCOPY, Phase.POSTCOPY_RECOVER}), Phase.POSTCOPY_PAUSED)
                elif what == "recover":
                    inc.move(frozenset({Phase.POSTCOPY_PAUSED}), Phase.POSTCOPY_RECOVER)
                elif what == "active":
                    inc.move(frozenset({Phase.POSTCOPY_RECOVER}), Phase.POSTCOPY)
            loader = Loader(channel, ram=self.guest.ram, devices=self.guest.devices,
                            max_ram_bytes=self.guest.max_ram, block_factory=block_factory,
                            on_switchover=switchover, postcopy=postcopy, vcpus=self.guest.vcpus)
            loader.on_postcopy = on_postcopy
            loader.recoverable = True  # a connection lost in postcopy waits for migrate-recover
            if multifd is not None:
                multifd.attach(loader)
                if preempt:
                    multifd.take_preempt(loader.attach_preempt)
            with self._mutex:
                self._loader = loader
            inc.counters = lambda: _load_counters(loader, multifd, pc)
            if channel.page_placement is not None:  # rdma: the protocol the source chose
                inc.rdma = channel.page_placement.describe
            if not inc.move(frozenset({Phase.LISTENING}), Phase.RAM):
                raise MigrationCancelled("incoming migration cancelled")
            if self.guest.recv_model == "coroutine":
                if self._loop is None:
                    raise MignetError("the coroutine receive model needs a main loop")
                result = asyncio.run_coroutine_threadsafe(load_in_coroutine(loader), self._loop).result()
            else:
                # bulk: below the main loop's CPU priority, so QMP answers do not queue behind it
                thread: LoadThread = start_load_thread(loader, bulk=True)
                result = thread.join()
            if multifd is not None:
                multifd.finish()  # its pages stay out of result.stats: _load_counters adds them
            self.guest.ram, self.guest.devices = result.ram, result.devices
            self.guest.description = result.description
            if self.guest.out is not None:
                self.guest.out.write(result.ram, result.devices, result.description,
                                     {"machine_type": result.stats.machine_type},
                                     result.stats.ram_section_id)
            self.guest.incoming_deferred = False
            if not pc.run:  # after postcopy's RUN the guest runs (or was stopped) already
                self.state.runstate = "running" if self.state.autostart else "paused"
            outcome = (Phase.DONE, None)
        except MigrationCancelled:
            outcome = (Phase.CANCELLED, None)
        except MignetError as exc:
            why = str(exc)
            if multifd is not None:
                try:
                    multifd.raise_error(wait=CHANNEL_REPORT_WAIT)
                except MignetError as cause:  # a channel's failure is the cause worth naming
                    why = str(cause)
            outcome = (_failed_or_cancelled(inc), why)
        except BaseException as exc:  # noqa: BLE001 - a bug must still end the migration
            outcome = (_failed_or_cancelled(inc), f"internal error: {exc!r}")
            raise
        finally:
            with self._mutex:
                last = self._loader
                self._loader = None
                self._multifd_in = None
                if self._recover_listener is not None:
                    self._recover_listener.close()
                    self._recover_listener = None
            if last is not None and last.channel is not channel:
                last.channel.close()  # the connection a postcopy recovery brought
            if multifd is not None:
                multifd.close()
                seen = multifd.describe()  # figures only: the receiver (and its RAM) can go
                self._multifd_seen["incoming"] = lambda: seen
            if channel is not None:
                channel.close()
            if pc.run and (outcome is None or outcome[0] is not Phase.DONE):
                # the guest that started at RUN lacks pages it will never get: it is gone,
                # and this process waits for a new migrate-incoming (QEMU 7.2 exits instead)
                self.state.runstate = "inmigrate"
            if outcome is not None:
                self._end(inc, "incoming", *outcome)

    def _tls_incoming(self, tls: _Tls, raw: Channel) -> Channel:
        """The one-stream destination's handshake, which a cancel cuts: the channel is
        known (``on_wrapped``) before the handshake starts, so ``cancel`` shuts down its
        live descriptor instead of waiting out the handshake limit."""
        def on_wrapped(ch: Channel) -> None:
            with self._mutex:
                self._tls_in = ch
                cancelling = self.state.incoming.phase is Phase.CANCELLING
            if cancelling:
                ch.shutdown()
        try:
            return tls.server(raw, on_wrapped)
        finally:
            with self._mutex:
                self._tls_in = None

    def multifd_channels(self) -> dict[str, Any]:
        """Per-channel figures of the latest multifd migration in each direction (None for a
        direction that had none): channels, pages per channel, packets, syncs, refusals."""
        return {d: (f() if (f := self._multifd_seen.get(d)) else None) for d in ("outgoing", "incoming")}

    def _tls(self, uri: str, params: Mapping[str, Any], endpoint: str) -> _Tls | None:
        """QEMU's ``tls-creds``/``tls-hostname``/``tls-authz`` for a migration, checked at
        its start (an id that names no object is refused then, as in QEMU)."""
        creds_id = str(params.get("tls-creds", ""))
        if not creds_id:
            return None
        address = parse_uri(uri)
        if address.scheme != "tcp":
            raise RequestRefused(f"TLS needs a tcp: URI, not {address.scheme}:")
        creds = self.objects.tls_creds(creds_id, endpoint)
        authz_id = str(params.get("tls-authz", ""))
        authorize = self.objects.authz(authz_id).allows if authz_id and endpoint == "server" else None
        hostname = str(params.get("tls-hostname", "")) or str(address.host)
        # The destination loads its credentials now: a folder that cannot serve is this
        # command's error, not a refusal of every source that comes.
        ctx = (tls_server_context(creds.dir, creds.verify_peer or authorize is not None)
               if endpoint == "server" else None)
        return _Tls(creds, authorize, hostname, ctx)

    def _postcopy_check(self, uri: str, tls: bool) -> None:
        """postcopy-ram on an incoming migration: what mignet's postcopy cannot do is refused
        at ``migrate-incoming``, not when the source switches, with the guest half here."""
        _postcopy_transport_check(uri, tls)
        if self.guest.recv_model != "thread":
            raise RequestRefused("postcopy-ram needs the loader thread: start serve with "
                                 "--recv-model thread, or turn postcopy-ram off")
        postcopy_host_check()

    def _refused(self, why: str) -> None:
        """A stray connection was turned away from a multifd listener; the migration goes on."""
        self.emit("MIGNET_CONNECTION_REFUSED", {"reason": why})

    # --- both ------------------------------------------------------------------------
    def _end(self, side: DirectionState, holder: str, phase: Phase, error: str | None = None) -> None:
        """Release the option lock, then publish the end (see the module docstring)."""
        self.options.end(holder)
        if phase is Phase.CANCELLED:
            side.move(frozenset({Phase.CANCELLING}), Phase.CANCELLED)
        elif not side.move(frozenset(Phase), phase, error):
            side.move(frozenset({Phase.CANCELLING}), Phase.CANCELLED)

    @upper_half
    def cancel(self) -> None:
        """``migrate-cancel``: stop whichever migration runs, outgoing or incoming. Returns
        at once; the migration's thread publishes "cancelled" when it has stopped."""
        out, inc = self.state.outgoing, self.state.incoming
        if out.move(_CANCELLABLE, Phase.CANCELLING):
            with self._mutex:
                if self._sender is not None:
                    self._sender.cancel()
        if inc.move(_CANCELLABLE, Phase.CANCELLING):
            with self._mutex:
                if self._listener is not None:
                    self._listener.close()  # wakes accept()
                if self._tls_in is not None:
                    self._tls_in.shutdown()  # cuts its handshake
                if self._loader is not None:
                    self._loader.cancel()
                if self._multifd_in is not None:
                    self._multifd_in.stop()  # wakes accept_main() and the channels; no joins here

    @upper_half
    def recover(self, uri: str) -> None:
        """``migrate-recover``: a destination whose postcopy paused listens on ``uri`` for the
        source that resumes (QEMU's ``migrate`` with ``resume``); the first connection
        there is handed to the paused loader. Again, it replaces the earlier listener
        (QEMU 7.2 releases the old transport too), so a wrong URI can be corrected."""
        inc = self.state.incoming
        if inc.phase is not Phase.POSTCOPY_PAUSED:
            raise RequestRefused("Migrate recover can only be run when postcopy is paused.")
        with self._mutex:
            loader = self._loader
            if loader is None:
                raise RequestRefused("Migrate recover can only be run when postcopy is paused.")
            listener = listen(uri)
            old, self._recover_listener = self._recover_listener, listener
        if old is not None:
            old.close()  # its accept thread ends
        addr = listener.address
        inc.socket_address = [{"type": "unix", "path": str(addr.path)}] if addr.scheme == "unix" \
            else [{"type": "inet", "host": str(addr.host), "port": str(addr.port)}]

        def accept() -> None:
            try:
                channel = listener.accept()
            except (MignetError, OSError, TimeoutError):
                return  # closed: the migration ended or the process quits
            finally:
                with self._mutex:
                    if self._recover_listener is listener:
                        self._recover_listener = None
                listener.close()
            if not loader.offer_recovery(channel):
                channel.close()  # the migration ended (or resumed) meanwhile
        t = threading.Thread(target=accept, name="mig/dst/recover", daemon=True)
        self._threads.append(t)
        t.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel what runs and wait for the threads (at quit). Never call with the big
        lock held: a loader may need it to finish a device section."""
        self.cancel()
        with self._mutex:  # quit ends a postcopy too, paused or not, whatever cancel allows
            if self._loader is not None:
                self._loader.cancel()
            if self._recover_listener is not None:
                self._recover_listener.close()
        for t in self._threads:
            t.join(timeout)


def _postcopy_source_check(uri: str, channels: int, tls: bool) -> None:
    """postcopy-ram on an outgoing migration: what mignet's postcopy source cannot do is
    refused at ``migrate``, before anything is sent (as ``mignet send --postcopy`` does)."""
    if channels:
        raise RequestRefused("postcopy-ram with multifd is not supported by mignet's source: "
                             "turn one of them off")
    _postcopy_transport_check(uri, tls)


def _postcopy_transport_check(uri: str, tls: bool) -> None:
    """Where mignet's postcopy runs, either role: tcp: and unix:, without TLS (page requests
    and pages cross in both directions on one connection, from two threads at once)."""
    scheme = parse_uri(uri).scheme
    if scheme not in ("tcp", "unix"):
        raise RequestRefused(f"postcopy-ram is not supported on {scheme}: URIs by mignet: "
                             "use tcp: or unix:, or turn postcopy-ram off")
    if tls:
        raise RequestRefused("postcopy-ram with TLS is not supported by mignet: page "
                             "requests need a channel two threads use at once; turn one off")


def postcopy_host_check() -> None:
    """QEMU's postcopy_ram_supported_by_host, checked when a destination turns postcopy-ram
    on: without userfaultfd, RAM could not fault, and the failure would come only at the
    source's switch, with the guest split between the hosts."""
    try:
        Userfaultfd().close()
    except SetupError as exc:
        raise RequestRefused(f"Postcopy is not supported: {exc}") from None


@dataclass
class _PostcopySeen:
    """What the controller saw of an incoming postcopy (written by the loader's thread)."""

    listen_offset: int | None = None  # stream offset at LISTEN: later bytes are postcopy's
    run: bool = False  # RUN came: the guest runs here
    blocktime: bool = False  # capability postcopy-blocktime: query-migrate reports it


def _failed_or_cancelled(side: DirectionState) -> Phase:
    return Phase.CANCELLED if side.phase is Phase.CANCELLING else Phase.FAILED


@dataclass(frozen=True)
class _Tls:
    creds: TlsCredsX509
    authorize: Callable[[str], bool] | None
    hostname: str
    server_ctx: ssl.SSLContext | None = None  # the destination's, loaded once per migration

    def server(self, raw: Channel, on_wrapped: Callable[[Channel], None] | None = None) -> Channel:
        """The destination's handshake on one accepted connection (authorization too)."""
        assert self.server_ctx is not None
        return tls_server(cast(SocketChannel, raw), self.server_ctx, self.authorize, on_wrapped=on_wrapped)


def _multifd_channels(uri: str, caps: Mapping[str, bool], params: Mapping[str, Any]) -> int:
    """How many multifd channels a migration uses (0: none), or why it cannot use them."""
    if not caps.get("multifd"):
        return 0
    scheme = parse_uri(uri).scheme
    if scheme not in ("tcp", "unix"):
        raise RequestRefused(f"multifd is not supported on {scheme}: URIs (as in QEMU; over "
                             "rdma: only mignet send --channels, into recv, runs multifd): "
                             "use tcp: or unix:, or turn the multifd capability off")
    if params.get("multifd-compression", "none") != "none":
        raise RequestRefused(f"multifd-compression '{params['multifd-compression']}' is not "
                             "supported by mignet: set it to none")
    return int(params.get("multifd-channels", 2))


def _load_counters(loader: Loader, multifd: MultifdReceiver | None = None,
                   pc: _PostcopySeen | None = None) -> RamCounters:
    s = loader.stats
    done = s.ram_done
    # decoder.offset moves with every read; stats.bytes_received only at section ends.
    # Pages RDMA wrote into our RAM never pass the stream: count them as the source reports.
    mf_bytes = multifd.bytes_received if multifd is not None else 0
    mf_pages = multifd.pages if multifd is not None else 0
    stream = max(s.bytes_received, loader.decoder.offset)
    remaining = max(0, s.ram_total - done - mf_pages * PAGE_SIZE)
    precopy_bytes, postcopy_bytes = s.bytes_received, 0
    listen = pc.listen_offset if pc is not None else None
    if listen is not None:
        precopy_bytes, postcopy_bytes = listen, max(0, stream - listen)
        if loader.postcopy is not None:  # exactly the discarded pages not back yet
            remaining = loader.postcopy.missing_pages() * PAGE_SIZE
    return RamCounters(transferred=stream + s.placed_bytes + mf_bytes,
                       remaining=remaining, total=s.ram_total,
                       duplicate=s.zero_pages,
                       normal=s.normal_pages + s.placed_bytes // PAGE_SIZE + mf_pages,
                       dirty_sync_count=s.sections, precopy_bytes=precopy_bytes,
                       multifd_bytes=mf_bytes, postcopy_bytes=postcopy_bytes,
                       postcopy_requests=s.postcopy.requests if s.postcopy is not None else 0,
                       blocktime=((s.postcopy.blocktime_ms(), s.postcopy.vcpu_blocktime_ms())
                                  if s.postcopy is not None and pc is not None and pc.blocktime
                                  else None))


__all__ = ["Guest", "Migrations", "OUTGOING_THREAD", "ACCEPT_THREAD", "PAGE_SIZE"]
