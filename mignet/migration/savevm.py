"""The source side: writes guest RAM and device state as one QEMU migration stream.

Pages are sent in batches: one vectorised zero check per batch; the zero pages become ZERO
records (one small buffer), the data pages' records (word + page) are packed into one reused
2 MiB buffer and written with one call. Packing is one cache-friendly copy per batch, and
measured faster on loopback than a vectored write of 8-byte words interleaved with views of
guest RAM (the kernel pays per segment). A RAM section (SECTION_PART) is closed every
``section_bytes`` like a QEMU iteration, so a receiver sees regular progress markers.

With ``pages_to`` (QEMU's multifd: :class:`~mignet.migration.multifd.MultifdSender`) the
data pages of a batch go to the channels instead; the main stream keeps the ZERO records,
and before every RAM EOS the channels sync (``multifd_send_sync_main`` before
RAM_SAVE_FLAG_EOS, as QEMU 7.2's ram.c does in setup, every iteration and completion).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mignet.channel import Channel, IOCondition, ShutdownHow
from mignet.errors import ConnectionLostError, PeerFailedError, ProtocolError, TimedOut
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, RamBlock, zero_pages
from mignet.migration.loadvm import IDLE_TIMEOUT
from mignet.migration.ratelimit import RateLimiter
from mignet.runtime.cancel import Cancel
from mignet.runtime.halves import bottom_half, upper_half
from mignet.units import PAGE_SIZE
from mignet.wire import StreamEncoder
from mignet.wire.constants import PAGE_RECORD_SIZE
from mignet.wire.postcopy import CMD_POSTCOPY_ADVISE, advise_payload
from mignet.wire.return_path import CMD_OPEN_RETURN_PATH, CMD_PING, RP_SHUT, command, parse_rp_messages

MACHINE_TYPE = "mignet-pc-1.0"
BATCH_PAGES = 508  # pages per batch: about 2 MiB of records in the staging buffer


class PageChannels(Protocol):
    """Where data pages go when not in the main stream (multifd)."""

    def queue_pages(self, block: RamBlock, offsets: np.ndarray) -> int: ...

    def sync(self) -> int: ...

    def abort(self) -> None: ...


@dataclass
class SendStats:
    started: float = field(default_factory=time.monotonic)
    ram_total: int = 0
    transferred: int = 0  # stream bytes written
    multifd_bytes: int = 0  # of those, written on multifd channels (headers, pages, SYNCs)
    normal_pages: int = 0
    zero_pages: int = 0
    pages_scanned: int = 0
    sections: int = 0
    finished: float | None = None
    confirmed: bool | None = None  # the destination's SHUT said loaded; None: no return path

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def ram_done(self) -> int:
        return self.pages_scanned * PAGE_SIZE


class Sender:
    """Sends one complete stream of ``ram`` and ``devices`` over ``channel``."""

    def __init__(self, channel: Channel, ram: GuestRam, devices: DeviceSet, *,
                 max_bandwidth: int = 0, section_bytes: int = 64 << 20,
                 machine_type: str = MACHINE_TYPE, rdma_pin_all: bool | None = None,
                 ram_section_id: int | None = None,
                 description: dict[str, Any] | None = None,
                 pages_to: PageChannels | None = None, return_path: bool = False,
                 confirm_timeout: float = 120.0, idle_timeout: float | None = IDLE_TIMEOUT) -> None:
        self.channel = channel
        # A destination that stops reading ends the send; reads stay unbounded: the
        # return path is silent for the whole migration.
        channel.set_idle_timeout(write=idle_timeout)
        self.idle_timeout = idle_timeout
        self.ram = ram
        self.devices = devices
        self.encoder = StreamEncoder()
        self.stats = SendStats(ram_total=ram.total)
        self.limiter = RateLimiter(max_bandwidth)
        self.section_bytes = section_bytes
        self.machine_type = machine_type
        self.ram_section_id = ram_section_id
        # A captured guest's own VM description; None: describe mignet's modelled devices.
        self.description = description
        self.pages_to = pages_to
        # QEMU's return path: completed only once the destination confirms with SHUT.
        self.return_path = return_path
        self.confirm_timeout = confirm_timeout
        # Postcopy: ADVISE after the return path opens, so the destination prepares to fault.
        self.postcopy_advise = False
        # Who reads the destination's SHUT (given the timeout, returns its value): None reads
        # the return path here at the end; a postcopy source's reader thread owns it throughout.
        self.shut_from: Callable[[float], int] | None = None
        self._cancel = Cancel("outgoing migration", on_cancel=self._shutdown_all)
        self.placement = channel.page_placement
        # QEMU's RDMA protocol (into qemu -incoming rdma:): QEMU's destination takes page
        # registrations only between a HOOK record it read in the stream and the end of
        # that round, which must come before the section's EOS; and its RAM is not known to
        # be zero (ROMs), so zero pages go with the others (an all-zero chunk as COMPRESS).
        self.rounds = self.placement is not None and self.placement.protocol == "qemu"
        self.rdma_pin_all = rdma_pin_all  # QEMU's rdma-pin-all; None: the transport's default
        # The destination starts zeroed: in the first pass zero pages need not be sent when
        # pages travel outside the stream (RDMA); later passes must clear pages that became zero.
        self.first_pass = True
        self._staging = np.empty(BATCH_PAGES * PAGE_RECORD_SIZE, dtype=np.uint8)
        self._section_open = False
        self._since_section = 0
        # QEMU flushes the stop-and-copy round "regardless of rate limiting": live precopy
        # clears this for its final round (max-bandwidth only shapes the live rounds).
        self.rate_limited = True

    @upper_half
    def cancel(self) -> None:
        self._cancel.cancel()

    def _shutdown_all(self) -> None:
        if self.pages_to is not None:
            self.pages_to.abort()
        self.channel.shutdown()

    def _account(self, n: int) -> None:
        """Bytes sent outside the main channel (RDMA placement, multifd channels)."""
        self.stats.transferred += n
        self._since_section += n
        if self.rate_limited:
            self.limiter.consume(n, self._cancel.flag)

    def _account_multifd(self, n: int) -> None:
        self.stats.multifd_bytes += n
        self._account(n)

    def _sync_pages(self) -> None:
        """Multifd: every channel's SYNC is out before the main stream's RAM EOS."""
        if self.pages_to is not None:
            self._cancel.check()
            self._account_multifd(self.pages_to.sync())

    # --- I/O helpers -----------------------------------------------------------------
    def _write(self, bufs: list[object]) -> None:
        self._cancel.check()
        with self._cancel.guard():
            n = self.channel.writev_all(bufs)  # type: ignore[arg-type]
        self.stats.transferred += n
        self._since_section += n
        if self.rate_limited:
            self.limiter.consume(n, self._cancel.flag)

    # --- the stream ------------------------------------------------------------------
    @bottom_half
    def run(self) -> SendStats:
        self.start()
        for block in self.ram:
            self.send_pages(block, range_pages(block))
        self.finish()
        return self.stats

    def start(self) -> None:
        """The stream header, configuration and the RAM setup section (block list)."""
        enc = self.encoder
        if self.placement is not None:
            self.placement.announce(self.rdma_pin_all)
        bufs: list[object] = [enc.header(), enc.configuration(self.machine_type)]
        if self.return_path:  # as QEMU's migration_thread: right after the header
            bufs += [command(CMD_OPEN_RETURN_PATH), command(CMD_PING, (1).to_bytes(4, "big"))]
        if self.postcopy_advise:  # as QEMU's migration_thread: before the setup section
            bufs.append(command(CMD_POSTCOPY_ADVISE, advise_payload()))
        bufs.append(enc.ram_start(self.ram.layout(), self.ram_section_id))
        if self.pages_to is not None:
            tail = len(enc.ram_section_close())  # EOS + footer end the setup section
            setup = bufs.pop()
            assert isinstance(setup, bytes)
            self._write([*bufs, setup[:-tail]])
            self._sync_pages()
            bufs = [setup[-tail:]]
        elif self.rounds:  # QEMU's ram_save_setup: the block list, HOOK, its round, EOS
            assert self.placement is not None
            tail = len(enc.ram_section_close())
            setup = bufs.pop()
            assert isinstance(setup, bytes)
            self._write([*bufs, setup[:-tail], enc.hook()])
            self.placement.begin_round()
            self.placement.end_round(list(self.ram))  # where the destination's blocks are
            bufs = [setup[-tail:]]
        self._write(bufs)

    def send_pages(self, block: RamBlock, batches: Iterable[tuple[int, int]]) -> None:
        """Send the pages of ``block`` given as (first page, count) batches (a full pass)."""
        for first, count in batches:
            self._send_batch(block, np.arange(first, first + count), block.zero_mask(first, count))

    def send_page_list(self, block: RamBlock, pages: np.ndarray, batch: int = BATCH_PAGES) -> None:
        """Send the pages of ``block`` whose indices are in ``pages`` (ascending), e.g. the
        dirty pages of a live round, which are scattered: one zero check and one write per
        ``batch`` pages, whatever their spacing."""
        words = block.page_words()
        for start in range(0, len(pages), batch):
            idx = pages[start:start + batch]
            self._send_batch(block, idx, zero_pages(words, idx))

    def _send_batch(self, block: RamBlock, idx: np.ndarray, zero: np.ndarray) -> None:
        """One batch: ZERO records for the zero pages, then the data pages — in the stream,
        packed from guest RAM, or, where the transport places pages itself (RDMA), written
        into the destination's RAM with only the ZERO records in the stream (none in the
        first pass: the destination starts zeroed)."""
        enc = self.encoder
        if not self._section_open:
            self._open_section(final=False)
        offsets = idx.astype(np.uint64) * np.uint64(PAGE_SIZE)
        nzero = int(np.count_nonzero(zero))
        data = offsets[~zero] if nzero else offsets
        # Encode ZERO records only when they are written: encoding moves the CONTINUE block.
        send_zero = nzero > 0 and not self.rounds and (self.placement is None or not self.first_pass)
        zero_records = enc.zero_records(block.name, offsets[zero]) if send_zero else b""
        if self.placement is not None and self.rounds:  # every page by RDMA, zero ones too
            self._account(self.placement.write_pages(block, offsets, zero))
        elif self.pages_to is not None:  # multifd, whatever the transport
            if send_zero:
                self._write([zero_records])
            if len(data):
                self._cancel.check()
                self._account_multifd(self.pages_to.queue_pages(block, data))
        elif self.placement is not None:
            if len(data):
                self._account(self.placement.write_pages(block, data))
            if send_zero:
                self._write([zero_records])
        else:
            bufs: list[object] = [zero_records] if send_zero else []
            bufs += enc.page_records(block.name, block.data, data, self._staging)
            self._write(bufs)
        self.stats.zero_pages += nzero
        self.stats.normal_pages += len(idx) - nzero
        self.stats.pages_scanned += len(idx)
        if self._since_section >= self.section_bytes:
            self.close_section()

    def _open_section(self, final: bool) -> None:
        """A SECTION_PART (END when ``final``) header; on QEMU's RDMA protocol with the
        HOOK that starts its registration round (QEMU's ram_control_before_iterate)."""
        if self.rounds:
            assert self.placement is not None
            self._write([self.encoder.ram_section(final), self.encoder.hook()])
            self.placement.begin_round()
        else:
            self._write([self.encoder.ram_section(final)])
        self._section_open = True

    def close_section(self) -> None:
        if self._section_open:
            self._sync_pages()
            if self.rounds:  # every WRITE landed, round over: before EOS, as QEMU's ram.c
                assert self.placement is not None
                self.placement.end_round()
            self._write([self.encoder.ram_section_close()])
            self._section_open = False
            self._since_section = 0
            self.stats.sections += 1

    def finish(self, before_devices: Callable[[], None] | None = None) -> None:
        """The last RAM section (END), device state, EOF and the VM description."""
        enc = self.encoder
        self.close_section()
        if self.pages_to is not None:
            self._write([enc.ram_section(final=True)])
            self._sync_pages()
            self._write([enc.ram_section_close()])
        elif self.rounds:  # QEMU's ram_save_complete: an (empty) round of its own
            self._open_section(final=True)
            self.close_section()
            self.stats.sections -= 1  # not a RAM iteration
        else:
            self._write([enc.ram_section(final=True), enc.ram_section_close()])
        if self.placement is not None:
            self.placement.fence()  # every page has landed before device state is sent
        if before_devices is not None:
            before_devices()
        parts: list[object] = list(self.device_sections())
        description = self.description
        if description is None:
            description = {"page_size": PAGE_SIZE, "devices": [
                dev.vmsd.describe(dev.idstr, dev.instance_id) for dev in self.devices.devices]}
        parts += [enc.eof(), enc.vmdescription(description)]
        self._write(parts)
        self._end()

    def device_sections(self) -> list[bytes]:
        """Every device's state as SECTION_FULL records: the stream's tail in precopy, the
        body of postcopy's package."""
        return [self.encoder.device_section(s.idstr, s.instance_id, s.version_id, s.data, s.section_id)
                for s in self.devices.sections()]

    def write_commands(self, bufs: list[bytes]) -> None:
        """QEMU_VM_COMMAND sections between RAM sections (postcopy's discards and package)."""
        self.close_section()
        self._write(list(bufs))

    def finish_postcopy(self, after_eof: Callable[[], None] | None = None) -> None:
        """Postcopy's end (QEMU's qemu_savevm_state_complete_postcopy): the last RAM section
        (END) and EOF. The device state went in the package and no VM description follows.
        ``after_eof`` runs before waiting for SHUT (the preempt channel's own end)."""
        enc = self.encoder
        self.close_section()
        self._write([enc.ram_section(final=True), enc.ram_section_close(), enc.eof()])
        if after_eof is not None:
            after_eof()
        self._end()

    def _end(self) -> None:
        """Nothing more to send: half-close, then wait for the destination's SHUT."""
        try:
            self.channel.shutdown(ShutdownHow.WRITE)
        except ConnectionLostError:
            pass
        if self.return_path:
            with self._cancel.guard():
                if self.shut_from is not None:
                    self._shut(self.shut_from(self.confirm_timeout))
                else:
                    self._await_shut()
        elif self.rounds:
            with self._cancel.guard():
                self._await_close()
        self.stats.finished = time.monotonic()

    def _await_close(self) -> None:
        """QEMU's RDMA protocol has no end-of-stream message, and QEMU's destination fails
        a load whose source disconnects before it completed: so the end is its disconnect,
        after it read the last byte. (It disconnects after a failed load too: without a
        return path the source cannot tell, as QEMU's own cannot.)"""
        self.channel.set_idle_timeout(read=self.idle_timeout or self.confirm_timeout,
                                      write=self.idle_timeout)
        if self.channel.read_some_into([memoryview(bytearray(1))]) != 0:
            raise ProtocolError("the QEMU destination sent stream bytes back over RDMA")

    def _shut(self, value: int) -> None:
        """The destination's SHUT: 0 means it loaded the guest."""
        if value != 0:
            self.stats.confirmed = False
            raise PeerFailedError(
                f"the destination could not load the stream (it answered SHUT "
                f"{value} on the return path); its log says why")
        self.stats.confirmed = True

    def _await_shut(self) -> None:
        """Read the return path until the destination's SHUT.

        Bounded by ``confirm_timeout``, and by the idle limit: a destination that took
        every byte (the send queue empty or no longer shrinking) and then answered nothing
        for that long is stalled, and the wait ends as any other stalled I/O does."""
        deadline = time.monotonic() + self.confirm_timeout
        idle = self.idle_timeout
        progress = time.monotonic()
        unsent = self.channel.unsent_bytes()
        buf = bytearray(4096)
        pending = b""
        while True:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise TimedOut(f"the destination did not confirm the load within "
                               f"{self.confirm_timeout:.0f} s (no SHUT on the return path)")
            wait = left
            if idle is not None:
                queued = self.channel.unsent_bytes()
                if queued is not None and unsent is not None and queued < unsent:
                    progress = now  # the destination is still reading what we sent
                unsent = queued
                if now - progress >= idle:
                    raise TimedOut(f"the destination took the stream and then answered nothing for "
                                   f"{idle:g} s (no SHUT on the return path); giving up (a stalled "
                                   "peer or network: check the other side)")
                wait = min(left, progress + idle - now, 0.25)
            if not self.channel.wait_cond(IOCondition.IN, wait):
                continue
            n = self.channel.read_some_into([memoryview(buf)])
            progress = time.monotonic()
            if n == 0:
                raise ConnectionLostError(
                    "the destination closed the connection without confirming the load (no "
                    "SHUT on the return path): it most likely failed; see its log")
            try:
                messages, pending = parse_rp_messages(pending + bytes(buf[:n]))
            except ValueError as exc:
                raise ProtocolError(f"return path: {exc}") from None
            for kind, value in messages:
                if kind == RP_SHUT:
                    self._shut(value)
                    return


def range_pages(block: RamBlock, batch: int = BATCH_PAGES) -> Iterable[tuple[int, int]]:
    for first in range(0, block.pages, batch):
        yield first, min(batch, block.pages - first)
