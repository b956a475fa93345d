"""The destination's multifd channels (QEMU 7.2's ``multifd`` capability), receive side.

A multifd source connects its main stream first, then ``multifd-channels`` extra
connections, each opened by a 64-byte init record (``mignet.wire.multifd``). The main
stream then carries only ZERO records, EOS markers, device state and the VM description;
page data travels in the channels' packets. :class:`MultifdReceiver` owns the listener for
the whole load:

* an accept thread takes every connection and classifies it by its first bytes (QEMU 7.2
  itself takes the first connection as the main one; peeking does not depend on the order
  connections are accepted in). With TLS (``handshake``) every connection first completes
  its own handshake, authorization included, as QEMU's ``migration_channel_process_incoming``
  does before ``migration_ioc_process_incoming``: a peer that fails it is refused before a
  byte of it is read as migration data, and the bytes classified are the decrypted ones.
  Then ``QEVM`` is the main stream; ``0x11223344`` a multifd
  channel; anything else is handed over as the main stream (the loader then says it is not
  a migration stream) while no main stream exists yet, and refused after;
* channels must all carry the UUID of the first, with distinct ids, and arrive before the
  main stream's first RAM end-of-section (QEMU's source waits for every channel's SYNC
  before it writes that EOS, so all of them are connected by then); anything else is
  refused — closed, reported through ``on_refused`` — and the migration goes on;
* one thread per channel (``mig/dst/multifd/N``, QEMU's ``multifdrecv_N``) reads each packet
  header, checks it, waits until the main stream has announced the RAM blocks, and reads
  the pages straight into the numpy blocks (consecutive offsets as one buffer; no staging
  copy). A SYNC packet is a barrier: the channel waits there until the main loader reaches
  the RAM EOS of the same round and every channel has synced (``multifd_recv_sync_main``),
  so a page re-sent in a later round never races its older copy;
* an error in any channel fails the whole load: the main channel is shut down and
  :meth:`raise_error` re-raises the channel's error (the cause) instead of the main
  stream's truncation.
"""

from __future__ import annotations

import functools
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mignet.channel import Channel, IOCondition, ShutdownHow
from mignet.errors import ClosedChannelError, ConnectionLostError, MignetError, ProtocolError, TimedOut
from mignet.guest.ram import GuestRam, RamBlock
from mignet.migration.loadvm import IDLE_TIMEOUT, Loader, LoadStats
from mignet.runtime.threads import start_thread
from mignet.uri import Address
from mignet.wire import PAGE_SIZE
from mignet.wire.constants import QEMU_VM_FILE_MAGIC, SectionType
from mignet.wire.multifd import (
    FLAG_SYNC,
    INIT_SIZE,
    MAGIC_BYTES,
    PACKET_LEN,
    PACKET_PAGES,
    ChannelInit,
    build_init,
    build_packet,
    check_offsets,
    parse_init,
    parse_packet,
)

QEVM_BYTES = QEMU_VM_FILE_MAGIC.to_bytes(4, "big")
CLASSIFY_TIMEOUT = 30.0  # a connection must say what it is within this
SETTLE_TIMEOUT = 2.0  # at a RAM EOS: how long to wait for connections still being classified
#: ... of which a TLS handshake with nothing new to read: a source's last handshake segment
#: in flight (one retransmission on a short link), not a stranger that stalled in it
QUIET_HANDSHAKE_SETTLE = 0.25
ACCEPT_THREAD_NAME = "mig/dst/multifd-accept"


#: TLS on an accepted connection: (the raw connection, ``on_wrapped``) -> the
#: authenticated, authorized channel, or MignetError to refuse it. ``on_wrapped`` (may be
#: None) gets the channel that stands for the connection before its handshake starts, so a
#: stop can interrupt the handshake (the raw one's descriptor is already detached).
Handshake = Callable[[Channel, Callable[[Channel], None] | None], Channel]


class PollableListener(Protocol):
    """A listener whose socket can be polled (tcp:, unix:)."""

    address: Address

    def fileno(self) -> int: ...

    def accept(self, timeout: float | None = None) -> Channel: ...

    def close(self) -> None: ...


class _Stopped(MignetError):
    """Internal: the receiver is stopping; a channel thread leaves quietly."""


@dataclass
class _ChannelState:
    channel_id: int
    channel: Channel
    pages: int = 0
    packets: int = 0
    synced: bool = False
    done: bool = False  # its thread has ended
    thread: threading.Thread | None = field(default=None, repr=False)


class MultifdReceiver:
    """Accepts the main stream and any multifd channels from ``listener`` (see the module
    docstring); ``attach`` hooks it into the main stream's :class:`Loader`."""

    def __init__(self, listener: PollableListener, *,
                 on_refused: Callable[[str], None] | None = None,
                 classify_timeout: float = CLASSIFY_TIMEOUT,
                 settle_timeout: float = SETTLE_TIMEOUT,
                 handshake: Handshake | None = None) -> None:
        self.listener = listener
        self.on_refused = on_refused
        #: TLS: turns an accepted connection into the authenticated, authorized channel
        #: (bounded by its own timeout), or raises MignetError to refuse it. Every
        #: connection goes through it before it is classified (main, multifd, stray).
        self.handshake = handshake
        # Called from a channel thread once a packet's pages are in place (the relay
        # forwards them); ``offsets`` are the packet's byte offsets, in packet order.
        self.on_pages: Callable[[RamBlock, np.ndarray], None] | None = None
        # Called at each RAM EOS once every channel has synced, before any is let go (all
        # of the round's pages are in; none of the next round's yet).
        self.on_round: Callable[[], None] | None = None
        self.classify_timeout = classify_timeout
        self.settle_timeout = settle_timeout
        self.idle_timeout: float | None = IDLE_TIMEOUT  # a stalled channel fails the load
        self.bulk_threads = False  # channel threads below the main loop's priority (serve)
        #: Set before accepting: the connection that follows the main one without a
        #: multifd record is QEMU's postcopy preempt channel (capability postcopy-preempt),
        #: silent until postcopy. It goes to the handler (:meth:`take_preempt`).
        self.expect_preempt = False
        self._on_preempt: Callable[[Channel], None] | None = None
        self._preempt: Channel | None = None  # taken before anyone asked for it
        self._preempt_taken = False
        #: Given a connection that starts with a stream command (0x08): a source resuming
        #: a postcopy on a new connection (QEMU's migrate with resume=true); False: refused.
        self.on_recovery: Callable[[Channel], bool] | None = None
        self.refused: list[str] = []
        self._cond = threading.Condition()
        self._accept_lock = threading.Lock()
        self._main: Channel | None = None
        self._uuid: bytes | None = None
        self._channels: dict[int, _ChannelState] = {}
        self._unclassified: set[Channel] = set()
        self._handshaking: set[Channel] = set()  # of the unclassified: in their TLS handshake
        # accept order of the unclassified (a TLS channel keeps its raw socket's place): junk
        # becomes the main stream only once every earlier connection is classified
        self._order: dict[Channel, int] = {}
        self._accepted = 0
        self._frozen = False  # the first RAM EOS passed: the channel set is complete
        self._ram: GuestRam | None = None
        self._generation = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._loader: Loader | None = None
        self._acceptor: threading.Thread | None = None

    # --- accepting -------------------------------------------------------------------
    def accept_main(self, timeout: float | None = None) -> Channel:
        """Wait for the main stream's connection (multifd channels that come before it are
        kept); ``TimeoutError`` when none came in time."""
        if self._acceptor is None:
            self._acceptor, _ = start_thread(self._accept_loop, ACCEPT_THREAD_NAME)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._main is None:
                if self._stopping:  # closed meanwhile (a cancel)
                    raise ClosedChannelError(f"stopped listening on {self.listener.address} before "
                                             "the migration's connection came")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    refused = (f" ({len(self.refused)} refused: see the refused events)"
                               if self.refused else "")
                    raise TimeoutError(f"no migration connected on {self.listener.address} within "
                                       f"{timeout} s{refused}")
                self._cond.wait(left if left is not None else 0.5)
            return self._main

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                if _readable(self.listener.fileno(), 0.1):
                    self._accept_ready()
            except (OSError, MignetError, ValueError):
                if self._stopping:
                    return
                time.sleep(0.05)

    def _accept_ready(self) -> None:
        """Accept every connection waiting in the backlog; each is classified in its own
        thread. Under one lock, so ``_settle`` never misses one taken but not yet counted."""
        with self._accept_lock:
            while not self._stopping and _readable(self.listener.fileno(), 0):
                try:
                    ch = self.listener.accept(timeout=0.5)
                except TimeoutError:
                    return
                except MignetError as exc:  # rdma: setting a connection up can fail midway
                    self._report(f"a connection to {self.listener.address} failed while being "
                                 f"accepted: {exc}")
                    continue
                with self._cond:
                    self._unclassified.add(ch)
                    self._accepted += 1
                    self._order[ch] = self._accepted
                start_thread(functools.partial(self._classify, ch), "mig/dst/multifd-classify")

    def _classify(self, ch: Channel) -> None:
        raw = ch
        try:
            if self.handshake is not None:
                ch = self._secure(raw)
            if self.expect_preempt and self._take_as_preempt(ch):
                return
            head = self._peek(ch, 4)
            if head == MAGIC_BYTES:
                init = parse_init(self._peek(ch, INIT_SIZE, exact=True))
                ch.read_exactly(INIT_SIZE)
                self._register(ch, init)
                return
            if head[:1] == bytes([SectionType.COMMAND]) and self.on_recovery is not None \
                    and self._main is not None:
                if not self.on_recovery(ch):
                    self._refuse(ch, "a postcopy resume, but no postcopy here is paused or "
                                     "could pause")
                return
            with self._cond:
                if head != QEVM_BYTES:  # junk is the error only if no real source came first
                    mine = self._order.get(raw, 0)
                    self._cond.wait_for(lambda: self._main is not None or self._stopping or all(
                        seq >= mine for seq in self._order.values()), self.classify_timeout)
                if self._main is None:  # QEVM, or something the loader will name
                    self._main = ch
                    self._cond.notify_all()
                    return
            what = "a second migration stream" if head == QEVM_BYTES else \
                f"neither a migration stream nor a multifd channel (it began {head!r})"
            self._refuse(ch, f"{what}")
        except (MignetError, OSError, TimeoutError) as exc:
            self._refuse(ch, str(exc).removeprefix(f"{ch.name}: "))
        finally:
            with self._cond:
                self._unclassified.discard(raw)
                self._unclassified.discard(ch)
                self._order.pop(raw, None)
                self._order.pop(ch, None)
                self._cond.notify_all()

    def _secure(self, raw: Channel) -> Channel:
        """``raw`` after its TLS handshake: the channel that stands for it from now on. It
        is registered before the handshake starts (``on_wrapped``), so a stop shuts down
        the live descriptor and cuts a handshake under way. Its first bytes must come
        within ``classify_timeout``: a TLS read that met half a record would otherwise
        wait for the rest forever."""
        assert self.handshake is not None
        wrapped: list[Channel] = []

        def on_wrapped(tls: Channel) -> None:
            with self._cond:
                self._unclassified.discard(raw)
                self._handshaking.discard(raw)
                self._unclassified.add(tls)
                self._handshaking.add(tls)
                self._order[tls] = self._order.get(raw, 0)
                stopping = self._stopping
            wrapped.append(tls)
            if stopping:
                tls.shutdown()

        with self._cond:
            self._handshaking.add(raw)
        try:
            ch = self.handshake(raw, on_wrapped)
        except BaseException:
            with self._cond:
                for gone in wrapped:  # closed by the handshake; the caller refuses ``raw``
                    self._unclassified.discard(gone)
            raise
        finally:
            with self._cond:
                self._handshaking.discard(raw)
                self._handshaking.difference_update(wrapped)
                self._cond.notify_all()
        with self._cond:
            self._unclassified.discard(raw)
            self._unclassified.add(ch)
            self._order[ch] = self._order.get(raw, 0)
            stopping = self._stopping
        if stopping:
            ch.shutdown()
        ch.set_idle_timeout(read=self.classify_timeout)
        return ch

    def _take_as_preempt(self, ch: Channel) -> bool:
        """Whether ``ch`` is the preempt channel: QEMU connects it right after the main
        one and sends nothing on it before postcopy, so it is the first connection that
        stays silent once the main one is known. One that speaks is classified as usual."""
        deadline = time.monotonic() + self.classify_timeout
        while time.monotonic() < deadline and not self._stopping:
            with self._cond:
                take = self._main is not None and not self._preempt_taken
                if take:
                    self._preempt_taken = True
                    handler = self._on_preempt
                    if handler is None:
                        self._preempt = ch
            if take:
                if handler is not None:
                    handler(ch)
                return True
            if ch.wait_cond(IOCondition.IN, 0.05):
                return False
        return False

    def take_preempt(self, handler: Callable[[Channel], None]) -> None:
        """Hand the preempt channel to ``handler``: now if it came already, else when it
        does (it may connect before or after whoever handles it exists)."""
        with self._cond:
            self._on_preempt = handler
            ch, self._preempt = self._preempt, None
        if ch is not None:
            handler(ch)

    def _peek(self, ch: Channel, size: int, exact: bool = False) -> bytes:
        """The first ``size`` bytes without consuming them (fewer if the peer closed first,
        unless ``exact``); ``TimeoutError`` after ``classify_timeout``."""
        deadline = time.monotonic() + self.classify_timeout
        while True:
            if self._stopping:
                raise ConnectionLostError("the receiver is stopping")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"it sent {size} bytes in {self.classify_timeout:.0f} s"
                                   + (" (a silent connection after the main one is QEMU's "
                                      "postcopy preempt channel: recv --postcopy-preempt, "
                                      "or capability postcopy-preempt on serve)" if size == 4 else ""))
            if ch.wait_cond(IOCondition.IN, min(left, 0.5)):
                data = ch.peek(size)
                if len(data) == size or (not data and not exact):
                    return data
                if not data:
                    raise ConnectionLostError("it closed before sending its multifd init record")
                time.sleep(0.005)  # part of it is there; the rest is on its way

    def _register(self, ch: Channel, init: ChannelInit) -> None:
        with self._cond:
            cid = init.channel_id
            why = None
            if self._frozen:
                why = (f"multifd channel {cid} arrived after the first RAM sync "
                       f"(the migration has channels {sorted(self._channels)})")
            elif self._uuid is not None and init.uuid != self._uuid:
                why = (f"multifd channel {cid} carries UUID {init.uuid_text}, the migration's "
                       f"channels carry {ChannelInit(self._uuid, 0).uuid_text}")
            elif cid in self._channels:
                why = f"multifd channel id {cid} is already connected"
            elif self._stopping:
                why = "the receiver is stopping"
            if why is None and self._ram is not None:
                try:
                    self._share_ram(ch)
                except MignetError as exc:
                    why = str(exc)
            if why is None:
                self._uuid = init.uuid
                state = _ChannelState(cid, ch)
                ch.set_idle_timeout(read=self.idle_timeout)
                self._channels[cid] = state
                state.thread, _ = start_thread(lambda: self._channel_thread(state),
                                               f"mig/dst/multifd/{cid}", bulk=self.bulk_threads)
                self._cond.notify_all()
                return
        self._refuse(ch, why)

    def _refuse(self, ch: Channel, why: str) -> None:
        ch.shutdown()
        ch.close()
        self._report(f"refused a connection from {ch.name}: {why}")

    def _report(self, message: str) -> None:
        with self._cond:
            self.refused.append(message)
        if self.on_refused is not None and not self._stopping:
            self.on_refused(message)

    def _settle(self) -> None:
        """Take and classify every connection already made (QEMU's channels all connected
        before the EOS the main loader is at), waiting at most ``settle_timeout``. One
        still in its TLS handshake is waited for only while its socket holds bytes the
        handshake has not read, or for the first ``QUIET_HANDSHAKE_SETTLE`` s: a source's
        channel has sent its whole handshake, init record and SYNC before the main
        stream's EOS (that grace covers one of its segments still in flight), while a
        stranger stalled in its handshake has nothing more to say."""
        self._accept_ready()
        start = time.monotonic()
        deadline = start + self.settle_timeout
        quiet_until = start + min(self.settle_timeout, QUIET_HANDSHAKE_SETTLE)
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if not any(ch not in self._handshaking or now < quiet_until or _has_input(ch)
                           for ch in self._unclassified):
                    return
                if now >= deadline:
                    return
                self._cond.wait(min(deadline - now, 0.02))

    # --- the main loader's side --------------------------------------------------------
    def attach(self, loader: Loader) -> None:
        """Hook into the main stream's loader: RAM blocks once announced, a SYNC barrier
        at every RAM end-of-section."""
        self._loader = loader
        loader.on_blocks = self._blocks_ready
        loader.on_ram_eos = self._sync_main
        loader.channel_count = lambda: self.channel_count

    @property
    def channel_count(self) -> int:
        with self._cond:
            return len(self._channels)

    @property
    def pages(self) -> int:
        """Pages placed by the channels so far (progress; read without the lock)."""
        return sum(s.pages for s in list(self._channels.values()))

    @property
    def bytes_received(self) -> int:
        """Bytes read on the channels so far: init records, packet headers, pages."""
        return sum(INIT_SIZE + s.packets * PACKET_LEN + s.pages * PAGE_SIZE
                   for s in list(self._channels.values()))

    def _blocks_ready(self, ram: GuestRam) -> None:
        with self._cond:
            self._ram = ram
            for state in self._channels.values():
                self._share_ram(state.channel)
            self._cond.notify_all()

    def _share_ram(self, ch: Channel) -> None:
        """RDMA: the source WRITEs a channel's pages into the RAM the main connection
        registered (one protection domain: its keys serve every queue pair); tell the
        channel's source where that RAM lives. Called with ``_cond`` held, once both the
        channel and the RAM exist."""
        main = self._main.page_placement if self._main is not None else None
        if ch.page_placement is not None and main is not None and self._ram is not None:
            ch.page_placement.register_destination_ram(self._ram, shared=main)

    def _sync_main(self) -> None:
        """``multifd_recv_sync_main``: wait until every channel delivered its SYNC for this
        round, then let them all go on."""
        if not self._frozen:
            self._settle()
        with self._cond:
            self._frozen = True
            if not self._channels:
                return
            while True:
                self._check_failed()
                states = list(self._channels.values())
                if all(s.synced for s in states):
                    break
                gone = [s.channel_id for s in states if s.done and not s.synced]
                if gone:
                    raise ConnectionLostError(
                        f"multifd channel {gone[0]} closed before its SYNC at RAM round "
                        f"{self._generation + 1}; the migration is incomplete")
                self._cond.wait(0.2)
            for s in states:
                s.synced = False
            if self.on_round is not None:
                self.on_round()
            self._generation += 1
            self._cond.notify_all()

    def _check_failed(self) -> None:
        if self._error is not None:
            raise ConnectionLostError(f"a multifd channel failed: {self._error}")
        if self._loader is not None and self._loader.cancelled:
            raise ConnectionLostError("cancelled while waiting for the multifd channels")
        if self._stopping:
            raise ConnectionLostError("the multifd receiver stopped")

    # --- a channel ---------------------------------------------------------------------
    def _channel_thread(self, state: _ChannelState) -> None:
        ch = state.channel
        header = bytearray(PACKET_LEN)
        cached: tuple[str, RamBlock, memoryview] | None = None
        try:
            while True:
                if ch.read_into(header) == 0:
                    return  # the source closed the channel at a packet boundary
                if self._stopping:
                    return
                pkt = parse_packet(header)
                state.packets += 1
                if pkt.normal_pages:
                    if cached is None or cached[0] != pkt.block:
                        block = self._block(pkt.block, pkt.packet_num)
                        cached = (pkt.block, block, block.view())
                    _, block, mv = cached
                    check_offsets(pkt, block.size)
                    offs = pkt.offsets.astype(np.int64)
                    if block.pristine is not None:  # no longer known to hold zeros
                        block.pristine[offs // PAGE_SIZE] = False
                    # RDMA: the source WROTE the pages into place before it sent this packet
                    # on the same queue pair, so they are there; only their offsets came.
                    if ch.page_placement is None and ch.readv_into(_page_views(mv, offs)) == 0:
                        raise ConnectionLostError(
                            f"the channel closed before packet {pkt.packet_num}'s "
                            f"{pkt.normal_pages} pages")
                    state.pages += pkt.normal_pages
                    if self.on_pages is not None:
                        self.on_pages(block, offs)
                if pkt.sync:
                    self._sync_channel(state)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - any failure fails the whole load
            self._fail(state, exc)
        finally:
            with self._cond:
                state.done = True
                self._cond.notify_all()

    def _block(self, name: str, packet_num: int) -> RamBlock:
        with self._cond:
            while self._ram is None:
                if self._stopping or self._error is not None:
                    raise _Stopped
                self._cond.wait(0.5)
            ram = self._ram
        block = ram.get(name)
        if block is None:
            raise ProtocolError(
                f"multifd: packet {packet_num} names RAM block {name!r}, which the main stream "
                f"did not announce (it has {', '.join(b.name for b in ram)})")
        return block

    def _sync_channel(self, state: _ChannelState) -> None:
        with self._cond:
            state.synced = True
            generation = self._generation
            self._cond.notify_all()
            while self._generation == generation:
                if self._stopping or self._error is not None:
                    raise _Stopped
                self._cond.wait(0.5)

    def _fail(self, state: _ChannelState, exc: BaseException) -> None:
        with self._cond:
            if self._stopping or self._error is not None:
                return
            self._error = _channel_error(state.channel_id, exc)
            self._cond.notify_all()
            main = self._main
            others = [s.channel for s in self._channels.values()]
        if main is not None:
            main.shutdown()  # the loader wakes; raise_error names the cause
        for ch in others:
            ch.shutdown()

    # --- the end ---------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        return self._error

    def raise_error(self, wait: float = 0.0) -> None:
        """Re-raise a channel's failure, if one failed (the cause of the main's error).

        ``wait``: when the main stream failed first, how long to give the channels to report.
        A source whose channel broke ends its main stream at the same moment, so the main's
        EOF and the channel's reset race; the reset is the cause worth naming. A channel
        waiting at a SYNC reads nothing and would never see its reset, so its socket is
        looked at meanwhile."""
        deadline = time.monotonic() + wait
        while wait > 0:
            with self._cond:
                if self._error is not None or self._stopping:
                    break
                live = [s for s in self._channels.values() if s.thread is not None and not s.done]
                parked = [s for s in live if s.synced]  # not reading: cannot see a reset
            left = deadline - time.monotonic()
            if not live or left <= 0:
                break
            self._probe(parked)
            with self._cond:
                if self._error is None:
                    self._cond.wait(min(left, 0.05))
        if self._error is not None:
            raise self._error

    def _probe(self, states: list[_ChannelState]) -> None:
        """Fail the first of ``states`` (channels parked at a SYNC, whose threads do not
        read, so a peek cannot race them) whose connection was reset."""
        for state in states:
            try:
                if state.channel.wait_cond(IOCondition.IN, 0):
                    state.channel.peek(1)
            except MignetError as exc:  # lost: reset by the peer or the network
                self._fail(state, exc)
                return

    def finish(self, stats: LoadStats | None = None) -> None:
        """The main stream is loaded (its last EOS synced every channel): stop the
        channels, re-raise a channel failure, and add their pages to ``stats``."""
        self.raise_error()
        self.close()
        self.raise_error()
        if stats is not None:
            stats.normal_pages += self.pages

    def stop(self) -> None:
        """Wake everything without waiting (safe on the main loop, e.g. from a cancel): the
        accept loop and ``accept_main`` see the flag, every channel is shut down; the
        owner's :meth:`close` then joins the threads and releases the sockets."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            states = list(self._channels.values())
            pending = list(self._unclassified)
        for ch in pending:
            ch.shutdown()
        for s in states:
            s.channel.shutdown()

    def close(self) -> None:
        """Stop accepting, close the listener and every channel (idempotent)."""
        self.stop()
        with self._cond:
            states = list(self._channels.values())
        with self._accept_lock:
            self.listener.close()
        for s in states:
            if s.thread is not None:
                s.thread.join(5)
            s.channel.close()
        if self._acceptor is not None:
            self._acceptor.join(5)

    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {"channels": len(self._channels),
                    "pages": {cid: s.pages for cid, s in sorted(self._channels.items())},
                    "packets": sum(s.packets for s in self._channels.values()),
                    "syncs": self._generation, "refused": list(self.refused)}


def _has_input(ch: Channel) -> bool:
    """Whether ``ch``'s socket holds unread bytes (a poll: never reads, so it cannot race
    the thread in its handshake)."""
    try:
        fds = ch.poll_fds(IOCondition.IN)
        return bool(fds) and _readable(fds[0][0], 0)
    except (OSError, ValueError):  # closed meanwhile
        return False


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000.0))


def _page_views(mv: memoryview, offs: np.ndarray) -> list[memoryview]:
    """Views of the pages at ``offs``; runs of consecutive pages become one view."""
    if offs.size == 1:
        o = int(offs[0])
        return [mv[o:o + PAGE_SIZE]]
    breaks = np.flatnonzero(np.diff(offs) != PAGE_SIZE) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [offs.size])).tolist()
    return [mv[int(offs[a]):int(offs[b - 1]) + PAGE_SIZE] for a, b in zip(starts, ends, strict=True)]


def _channel_error(channel_id: int, exc: BaseException) -> MignetError:
    text = f"multifd channel {channel_id}: {str(exc).removeprefix('multifd: ')}"
    if isinstance(exc, TimedOut):  # a stalled channel is a timeout (exit 6), as on the main stream
        return TimedOut(text)
    if isinstance(exc, ProtocolError):
        return ProtocolError(text)
    if isinstance(exc, ConnectionLostError):
        return ConnectionLostError(text)
    return MignetError(text)


# --- the source side ---------------------------------------------------------------------
SEND_THREAD_PREFIX = "mig/src/multifd/"
_POLL = 0.2  # how often a blocked queue operation looks for a failure
# Packets per hand-off to a channel thread: one queue hand-off per 128-page packet was
# 2,048 thread wake-ups per GiB (docs/benchmarks.md, issue 11); each packet keeps its
# own header and number on the wire, as QEMU's receiver expects.
JOB_PACKETS = 4


@dataclass
class _SendJob:
    sync: bool = False
    stop: bool = False
    block: str = ""
    region: RamBlock | None = None
    data: memoryview | None = None
    #: the data packets of the job, each (page offsets, packet number): up to
    #: ``JOB_PACKETS``, written by one channel in one vectored write
    packets: list[tuple[np.ndarray, int]] = field(default_factory=list)
    packet_num: int = 0  # a SYNC's


class MultifdSender:
    """The source's multifd channels (QEMU 7.2's ``multifd_send_*``), one thread each.

    The main thread (the :class:`~mignet.migration.savevm.Sender`) finds zero pages itself
    and sends them as ZERO records on the main stream; the data pages it hands to
    :meth:`queue_pages`, which gathers them into packets of up to ``PACKET_PAGES`` pages of
    one RAM block (QEMU's ``multifd_queue_page``) and puts them on a shared queue, up to
    ``JOB_PACKETS`` per job; whichever channel thread is free takes a job (QEMU: the next idle
    channel, per packet) and writes each packet's 1344-byte header and its pages straight
    from guest RAM, the job in one vectored write (runs of consecutive pages as one view; no
    staging copy). :meth:`sync` is ``multifd_send_sync_main``: the
    pending pages go out, then one SYNC packet per channel; it returns once every channel has
    written its SYNC, and only then does the main stream write its RAM EOS. Each channel
    opens with the init record, written by :meth:`open` (``uuid``: QEMU 7.2's destination requires its own
    ``qemu_uuid``, all zeros unless it was started with ``-uuid``). A failing channel fails
    the migration: the main thread re-raises ``multifd channel N: ...`` at its next call."""

    def __init__(self, channels: list[Channel], *, uuid: bytes = bytes(16),
                 queue_depth: int | None = None, idle_timeout: float | None = IDLE_TIMEOUT) -> None:
        """``channels``: as :meth:`open` makes them, each with its init record written."""
        if not channels:
            raise ValueError("multifd needs at least one channel")
        self.channels = channels
        for ch in channels:  # a destination that stops reading a channel fails the send
            ch.set_idle_timeout(write=idle_timeout)
        self.uuid = uuid
        self._jobs: queue.Queue[_SendJob] = queue.Queue(queue_depth or 2 * len(channels))
        self._barrier = threading.Barrier(len(channels) + 1)
        self._error: BaseException | None = None
        self._stopping = False
        self._packet_num = 0
        self._pending_block: RamBlock | None = None
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        self.pages = [0] * len(channels)
        self.packets = [0] * len(channels)
        self.syncs = 0
        self._threads: list[threading.Thread] = []

    @classmethod
    def open(cls, connect: Callable[[], Channel], count: int, *, uuid: bytes = bytes(16),
             **kwargs: Any) -> MultifdSender:
        """``count`` channels from ``connect`` (after the main one, as QEMU 7.2's destination
        expects), each announced — its init record written — as soon as it is connected,
        before the next one connects; if one cannot be opened, those already open are
        closed. ``kwargs`` as the constructor's.

        The one place an init record is written. Right after the connection, not in the
        channel's thread: a QEMU 7.2 destination with TLS handshakes connections on its
        main loop, which then blocks reading the channel's init record
        (``multifd_recv_new_channel``), so the next channel's handshake waits for it."""
        channels: list[Channel] = []
        try:
            for cid in range(count):
                channels.append(connect())
                channels[-1].write_all(build_init(uuid, cid))
        except BaseException:
            for ch in channels:
                ch.close()
            raise
        return cls(channels, uuid=uuid, **kwargs)

    def start(self) -> None:
        for cid, ch in enumerate(self.channels):
            t, _ = start_thread(functools.partial(self._thread, cid, ch), f"{SEND_THREAD_PREFIX}{cid}")
            self._threads.append(t)

    # --- the main thread ---------------------------------------------------------------
    def queue_pages(self, block: RamBlock, offsets: np.ndarray) -> int:
        """Queue the data pages of ``block`` at byte ``offsets`` (ascending); returns the
        bytes handed to the channels (full packets: header + pages), for rate limiting."""
        if self._pending_block is not block:
            sent = self._flush()
            self._pending_block = block
        else:
            sent = 0
        self._pending.append(offsets)
        self._pending_count += len(offsets)
        if self._pending_count >= PACKET_PAGES:
            offs = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            full = len(offs) - len(offs) % PACKET_PAGES
            step = PACKET_PAGES * JOB_PACKETS
            for start in range(0, full, step):
                sent += self._put_pages(block, offs[start:min(start + step, full)])
            rest = offs[full:]
            self._pending = [rest] if len(rest) else []
            self._pending_count = len(rest)
        return sent

    def _flush(self) -> int:
        block, offs = self._pending_block, self._pending
        self._pending, self._pending_count = [], 0
        if block is None or not offs:
            return 0
        return self._put_pages(block, np.concatenate(offs) if len(offs) > 1 else offs[0])

    def _put_pages(self, block: RamBlock, offsets: np.ndarray) -> int:
        """One job: ``offsets`` cut into packets of ``PACKET_PAGES`` (the last may be short)."""
        packets = [(offsets[i:i + PACKET_PAGES], self._next_packet())
                   for i in range(0, len(offsets), PACKET_PAGES)]
        self._put(_SendJob(block=block.name, region=block, data=block.view(), packets=packets))
        return PACKET_LEN * len(packets) + len(offsets) * PAGE_SIZE

    def _next_packet(self) -> int:
        n = self._packet_num
        self._packet_num += 1
        return n

    def _put(self, job: _SendJob) -> None:
        while True:
            self._check()
            try:
                self._jobs.put(job, timeout=_POLL)
                return
            except queue.Full:
                continue

    def flush(self) -> int:
        """Send the pending partial packet now (a relay: its input has paused)."""
        return self._flush()

    def sync(self) -> int:
        """``multifd_send_sync_main``: pending pages out, one SYNC packet per channel, and
        wait until each channel wrote it. Returns the bytes handed to the channels."""
        sent = self._flush()
        for _ in self.channels:
            self._put(_SendJob(sync=True, packet_num=self._next_packet()))
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            self._check()
            raise ConnectionLostError("multifd: the channels were shut down") from None
        self._check()
        self.syncs += 1
        return sent + PACKET_LEN * len(self.channels)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopping:
            raise ConnectionLostError("multifd: the channels were shut down")

    def finish(self) -> None:
        """After the last sync: every thread ends, every channel is shut for writing."""
        for _ in self.channels:
            self._put(_SendJob(stop=True))
        for t in self._threads:
            t.join()
        self._check()

    def abort(self) -> None:
        """Stop everything now (an error elsewhere, or a cancel): channels shut down."""
        self._stopping = True
        self._barrier.abort()
        for ch in self.channels:
            try:
                ch.shutdown()
            except MignetError:
                pass

    def close(self) -> None:
        if any(t.is_alive() for t in self._threads):
            self.abort()
            for t in self._threads:
                t.join(5)
        for ch in self.channels:
            ch.close()

    def describe(self) -> dict[str, Any]:
        out = {"channels": len(self.channels), "pages": dict(enumerate(self.pages)),
               "packets": sum(self.packets), "syncs": self.syncs}
        placed = [ch.page_placement.describe() for ch in self.channels if ch.page_placement is not None]
        if placed:  # RDMA: what each channel WROTE into the destination's RAM
            out["placement"] = placed
        return out

    # --- a channel ---------------------------------------------------------------------
    def _thread(self, cid: int, ch: Channel) -> None:
        # RDMA: pages are WRITTEN into the destination's RAM and the packet, sent after them
        # on the same queue pair, carries only their offsets. A page's WRITE in round k+1
        # must not land before the main stream's ZERO record for it in round k is applied:
        # it waits until the destination has processed this channel's last SYNC (its
        # receiver passes a SYNC only once the main loader reached that round's end).
        placement = ch.page_placement
        after = 0
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=_POLL)
                except queue.Empty:
                    if self._stopping:
                        return
                    continue
                if job.stop:
                    if placement is not None:
                        placement.fence()
                    ch.shutdown(ShutdownHow.WRITE)
                    return
                if job.sync:
                    ch.write_all(build_packet(flags=FLAG_SYNC, packet_num=job.packet_num))
                    if placement is not None:
                        after = placement.stream_position()
                    self.packets[cid] += 1
                    self._barrier.wait()
                    continue
                assert job.data is not None
                heads = [build_packet(block=job.block, offsets=offs, packet_num=num)
                         for offs, num in job.packets]
                if placement is not None and job.region is not None:
                    # every packet's pages first, then the headers (after them on this QP)
                    placement.write_pages(job.region, np.concatenate([o for o, _ in job.packets]),
                                          after=after)
                    ch.writev_all(heads)
                else:
                    bufs: list[bytes | memoryview] = []
                    for head, (offs, _) in zip(heads, job.packets, strict=True):
                        bufs.append(head)
                        bufs += _page_views(job.data, offs.astype(np.int64))
                    ch.writev_all(bufs)
                self.pages[cid] += sum(len(offs) for offs, _ in job.packets)
                self.packets[cid] += len(job.packets)
        except threading.BrokenBarrierError:
            return  # another channel failed, or an abort: that is the error
        except BaseException as exc:  # noqa: BLE001 - any failure fails the migration
            if self._error is None and not self._stopping:
                self._error = _channel_error(cid, exc)
            self._stopping = True
            self._barrier.abort()


def accept_incoming(listener: Any, timeout: float | None, on_refused: Callable[[str], None],
                    channels: bool = True, preempt: bool = False,
                    handshake: Handshake | None = None
                    ) -> tuple[Channel, MultifdReceiver | None]:
    """Accept a migration's main connection, as ``recv`` and ``relay`` do: keep listening,
    so a multifd source (QEMU's capability, a relay's link, ``send --channels``; over rdma:
    each channel is a queue pair of its own) can add its channels; without ``channels``,
    take the one connection. ``handshake`` (TLS) is done on every connection before it is
    classified (see the module docstring). The listener is closed unless the returned
    receiver now owns it. A source that never comes is one line (TimedOut). ``preempt``: a
    postcopy preempt channel is expected (:meth:`MultifdReceiver.take_preempt`)."""
    multifd: MultifdReceiver | None = None
    try:
        if channels:
            multifd = MultifdReceiver(listener, on_refused=on_refused, handshake=handshake)
            multifd.expect_preempt = preempt
            return multifd.accept_main(timeout=timeout), multifd
        channel = listener.accept(timeout=timeout)
        return (channel if handshake is None else handshake(channel, None)), None
    except TimeoutError as exc:
        if multifd is not None:
            multifd.close()
        raise TimedOut(str(exc)) from None  # its own exit status: the source never came
    finally:
        if multifd is None:
            listener.close()
