"""A relay: the destination of one migration stream and the source of another.

``mignet relay --listen URI --to URI`` sits between a QEMU source and a QEMU destination (or
another relay): it loads the incoming stream into numpy RAM blocks with the destination's
own loader (pages read straight into place, predicted runs of up to 511 pages per read) and
re-emits every record on the outbound channel as it goes — it never waits for the whole guest.

What is kept, so that real QEMU accepts the result:

* the machine type (CONFIGURATION) and the 'ram' section id (never 0);
* section boundaries: each RAM section that ends on input (EOS + footer) ends on output, with
  its kind (PART or END), so live rounds pass through as rounds;
* record order within a section (ZERO and PAGE records; a ZERO record with a non-zero fill
  byte leaves as a PAGE record holding that fill);
* device sections byte for byte with their idstr, instance, version and section ids, then EOF
  and the VM description (``json.dumps``' default separators: QEMU's exact format).

Outbound writes are batched: the records of up to ``BATCH_PAGES`` pages are packed from the
RAM blocks (the encoder's staging buffer) and written with one call, and whatever is pending
is written before any read that would block, so a slow or paused source never holds pages
back. Page data always travels in the byte stream, also over rdma: (a relay on an RDMA link
does not place pages remotely: its peer could not tell which pages changed).

Multifd (QEMU 7.2's ``multifd`` capability) on either side: with ``channels`` > 0 the relay
is a multifd source (a :class:`MultifdSender`: data pages in channel packets as they arrive,
ZERO records and device state on the main stream, one SYNC per channel before every RAM
EOS); given a :class:`MultifdReceiver` it is a multifd destination — each channel's packets
are forwarded by the channel's thread as soon as they are in place. Rounds stay rounds: at
an inbound RAM EOS the receiver's barrier (every channel's SYNC) runs before the relay ends
the section, and pages of the next round (released by that barrier) wait until the section
has left (a ZERO record of round k and the page's data of round k+1 must never share a round).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mignet.channel import Buffer, Channel, IOCondition, ShutdownHow, WritableBuffer
from mignet.errors import ConnectionLostError, ProtocolError
from mignet.guest.devices import KNOWN_DEVICES, DeviceSet
from mignet.guest.ram import GuestRam, RamBlock
from mignet.migration.loadvm import IDLE_TIMEOUT, MAX_RUN, Loader
from mignet.migration.multifd import MultifdReceiver, MultifdSender
from mignet.wire import (
    PAGE_SIZE,
    DeviceState,
    Event,
    RamBlocks,
    RamEndOfSection,
    RamZero,
    StreamDecoder,
    StreamEncoder,
)
from mignet.wire.constants import PAGE_RECORD_SIZE
from mignet.wire.decoder import NeedData
from mignet.wire.decoder_states import RECORD_STATES, DecoderState

BATCH_PAGES = 512  # pages per outbound write (about 2 MiB of records)
CLOSE_TIMEOUT = 120.0  # seconds to wait for the outbound peer to close after the stream


@dataclass
class RelayStats:
    """Progress of one relay; written by the relay's thread, read by anyone."""

    started: float = field(default_factory=time.monotonic)
    bytes_in: int = 0  # stream bytes consumed (updated at each section end and at the end)
    bytes_out: int = 0  # stream bytes written
    pages_out: int = 0  # PAGE records written
    zero_out: int = 0  # ZERO records written
    ram_sections: int = 0  # RAM sections (start, parts, end) forwarded
    device_sections: int = 0
    writes: int = 0  # outbound write calls
    machine_type: str = ""
    ram_section_id: int | None = None
    first_page_out_at: float | None = None  # CLOCK_MONOTONIC of the first page written
    input_done_at: float | None = None  # the inbound stream was complete
    finished: float | None = None
    multifd_in: dict[str, Any] | None = None  # the inbound channels (MultifdReceiver.describe)
    multifd_out: dict[str, Any] | None = None  # the outbound channels (MultifdSender.describe)

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        return {"bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "pages": self.pages_out,
                "zero_pages": self.zero_out, "ram_sections": self.ram_sections,
                "device_sections": self.device_sections, "writes": self.writes,
                "machine_type": self.machine_type, "ram_section_id": self.ram_section_id,
                "seconds": round(self.elapsed, 4), "first_page_out_at": self.first_page_out_at,
                "input_done_at": self.input_done_at, "multifd_in": self.multifd_in,
                "multifd_out": self.multifd_out}


class _TappedDecoder(StreamDecoder):
    """The loader's decoder, telling the relay about the end of each RAM section (the loader
    itself only counts them). Every page before it has been placed by then."""

    def __init__(self, on_section_end: Callable[[RamEndOfSection], None],
                 before_section_end: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_section_end = on_section_end
        self._before_section_end = before_section_end

    def next_event(self) -> Event | NeedData:
        event = super().next_event()
        if type(event) is RamEndOfSection:
            self._before_section_end()
            self._on_section_end(event)
        return event


class _FlushBeforeWait(Channel):
    """The inbound channel as the loader sees it: before a read that would block, the
    relay's pending output is written, so no page waits for input that is not there."""

    def __init__(self, inner: Channel, flush: Callable[[], None], pending: Callable[[], bool]) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self._flush = flush
        self._pending = pending

    def read_some_into(self, bufs: Sequence[WritableBuffer]) -> int:
        if self._pending() and not self.inner.wait_cond(IOCondition.IN, 0):
            self._flush()
        return self.inner.read_some_into(bufs)

    def hint_bulk_reads(self, low_water: int) -> None:
        self.inner.hint_bulk_reads(low_water)

    def shutdown(self, how: ShutdownHow = ShutdownHow.BOTH) -> None:
        self.inner.shutdown(how)

    def close(self) -> None:
        self.inner.close()

    def _readv(self, bufs: Sequence[WritableBuffer]) -> int | None:
        return self.inner._readv(bufs)

    def _writev(self, bufs: Sequence[Buffer]) -> int | None:
        return self.inner._writev(bufs)

    def _peek(self, size: int) -> bytes | None:
        return self.inner._peek(size)

    def poll_fds(self, cond: IOCondition) -> list[tuple[int, int]]:
        return self.inner.poll_fds(cond)

    def _set_blocking(self, blocking: bool) -> None:
        self.inner.set_blocking(blocking)

    def _set_idle_timeout(self, read: float | None, write: float | None) -> None:
        self.inner.set_idle_timeout(read, write)  # the reads happen on the inner channel

    def _shutdown(self, how: ShutdownHow) -> None:
        self.inner.shutdown(how)

    def _close(self) -> None:
        self.inner.close()


class _RelayLoader(Loader):
    """The destination's loader with its RAM hooks turned into outbound records."""

    def __init__(self, channel: Channel, relay: Relay, max_ram_bytes: int) -> None:
        super().__init__(channel, devices=DeviceSet.empty(), max_ram_bytes=max_ram_bytes,
                         block_factory=RamBlock.anonymous)
        self.relay = relay
        self.decoder = _TappedDecoder(relay._section_end, self._eos_hook_first,
                                      devices=KNOWN_DEVICES, max_ram_bytes=max_ram_bytes)

    def _eos_hook_first(self) -> None:
        # The multifd barrier (every inbound channel's SYNC) before the relay ends the
        # section: the round's channel pages must leave inside it.
        if self.on_ram_eos is not None and not self._eos_hooked:
            self._eos_hooked = True
            self.on_ram_eos()

    def _setup_blocks(self, event: RamBlocks) -> None:
        # No RDMA registration: pages reach a relay in the byte stream (see module doc).
        self.ram = GuestRam([self.block_factory(name, size) for name, size in event.blocks])
        self.stats.ram_total = event.total
        self.relay._blocks(self.ram, event)
        if self.on_blocks is not None:
            self.on_blocks(self.ram)

    def _zero_page(self, event: RamZero) -> None:
        super()._zero_page(event)
        self.relay._zero(event)

    def _page_done(self, block: RamBlock, off: int, count: int) -> None:
        super()._page_done(block, off, count)
        self.relay._pages(block, off, count)

    def _load_device(self, event: DeviceState) -> None:
        self.stats.device_sections += 1
        self.relay._device(event)

    def _switchover(self) -> None:
        self.stats.switchover_at = time.monotonic()
        self.relay._eof()


class Relay:
    """Forwards one stream from ``inbound`` to the channel ``connect_out()`` opens — called
    once the inbound stream has shown a valid header and its RAM blocks, so a peer that is
    not a migration source never causes a connection to the destination."""

    def __init__(self, inbound: Channel, connect_out: Callable[[], Channel], *,
                 max_ram_bytes: int = 1 << 40, batch_pages: int = BATCH_PAGES,
                 close_timeout: float = CLOSE_TIMEOUT, channels: int = 0,
                 multifd_in: MultifdReceiver | None = None) -> None:
        self.inbound = inbound
        self.connect_out = connect_out
        self.outbound: Channel | None = None
        self.batch_pages = batch_pages
        self.close_timeout = close_timeout
        self.stats = RelayStats()
        self.encoder = StreamEncoder()
        self.loader = _RelayLoader(_FlushBeforeWait(inbound, self.flush, self._has_pending), self,
                                   max_ram_bytes)
        # Records waiting to be written, in stream order: ("P", block, offset, count) page
        # runs, ("Z", block, offset, 1) zero pages; and raw bytes (section framing, devices).
        self._ops: list[tuple[str, RamBlock, int, int]] = []
        self._pending_pages = 0
        self._out: list[Buffer] = []
        self._staging = np.empty((batch_pages + MAX_RUN + 1) * PAGE_RECORD_SIZE, dtype=np.uint8)
        self._section_open = False
        self._ram: GuestRam | None = None
        # Multifd: the channels' threads add pages too, so records are added under a lock.
        self._lock = threading.RLock()
        self.channels = channels
        self.multifd_out: MultifdSender | None = None
        self.multifd_in = multifd_in
        self._gate_closed = False  # between an inbound RAM EOS and the section's end
        self._deferred: list[tuple[RamBlock, np.ndarray]] = []
        if multifd_in is not None:
            multifd_in.attach(self.loader)
            multifd_in.on_pages = self._channel_pages
            multifd_in.on_round = self._close_gate

    # --- the run ---------------------------------------------------------------------
    def run(self) -> RelayStats:
        """Relay until the stream is complete and the outbound peer has closed."""
        try:
            result = self.loader.run()
        except Exception:
            if self.multifd_in is not None:
                self.multifd_in.raise_error()  # a failed channel is the cause
            raise
        if self.multifd_in is not None:
            self.multifd_in.finish(result.stats)
            self.stats.multifd_in = self.multifd_in.describe()
        self.stats.input_done_at = time.monotonic()
        self.stats.bytes_in = result.stats.bytes_received
        if self.outbound is None:
            raise ProtocolError("the incoming stream ended before it announced its RAM blocks")
        if result.description is not None:
            self._out.append(self.encoder.vmdescription(result.description))
        self.flush()
        out = self.outbound
        if self.multifd_out is not None:
            self.multifd_out.finish()
            self.stats.multifd_out = self.multifd_out.describe()
        try:
            out.shutdown(ShutdownHow.WRITE)
        except ConnectionLostError:
            pass
        self._wait_peer_close(out)
        self.stats.finished = time.monotonic()
        return self.stats

    def close(self) -> None:
        if self.multifd_in is not None:
            self.multifd_in.close()
        if self.multifd_out is not None:
            self.multifd_out.close()
        if self.outbound is not None:
            self.outbound.close()

    def cancel(self) -> None:
        """Stop from any thread: both channels are shut down."""
        self.loader.cancel()
        if self.multifd_in is not None:
            self.multifd_in.close()
        if self.multifd_out is not None:
            self.multifd_out.abort()
        if self.outbound is not None:
            self.outbound.shutdown()

    def _wait_peer_close(self, out: Channel) -> None:
        """The destination has everything; it closes once it has loaded it (QEMU does,
        and so do mignet recv and relay). Anything it sends meanwhile is discarded."""
        scratch = bytearray(4096)
        deadline = time.monotonic() + self.close_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not out.wait_cond(IOCondition.IN, left):
                raise ConnectionLostError(
                    f"the destination did not close the connection within {self.close_timeout:.0f} s "
                    "after the end of the stream")
            try:
                if out.read_some_into([scratch]) == 0:
                    return
            except ConnectionLostError:
                return  # a reset once it has everything: closed all the same

    # --- hooks from the loader -------------------------------------------------------
    def _blocks(self, ram: GuestRam, event: RamBlocks) -> None:
        self._ram = ram
        self.stats.machine_type = self.loader.stats.machine_type
        self.outbound = self.connect_out()
        self.outbound.set_idle_timeout(write=IDLE_TIMEOUT)  # a far side that stops reading ends it
        if self.channels:
            # QEMU 7.2's destination takes its first connection as the main stream.
            self.multifd_out = MultifdSender.open(self.connect_out, self.channels)
            self.multifd_out.start()
        self._out.append(self.encoder.header())
        if self.stats.machine_type:
            self._out.append(self.encoder.configuration(self.stats.machine_type))

    def _pages(self, block: RamBlock, offset: int, count: int) -> None:
        with self._lock:
            if self.multifd_out is not None:
                self._queue_out(block, np.arange(offset, offset + count * PAGE_SIZE, PAGE_SIZE,
                                                 dtype=np.uint64))
                return
            self._ops.append(("P", block, offset, count))
            self._pending_pages += count
            if self._pending_pages >= self.batch_pages:
                self.flush()

    def _zero(self, event: RamZero) -> None:
        assert self._ram is not None
        block = self._ram[event.block]
        with self._lock:
            if event.fill != 0 and self.multifd_out is not None:
                self._queue_out(block, np.array([event.offset], dtype=np.uint64))
                return
            self._ops.append(("Z" if event.fill == 0 else "P", block, event.offset, 1))
            self._pending_pages += 1
            if self._pending_pages >= self.batch_pages:
                self.flush()

    def _queue_out(self, block: RamBlock, offsets: np.ndarray) -> None:
        assert self.multifd_out is not None
        self.multifd_out.queue_pages(block, offsets)
        self.stats.pages_out += len(offsets)
        if self.stats.first_page_out_at is None:
            self.stats.first_page_out_at = time.monotonic()

    # --- multifd in: a channel thread's pages --------------------------------------------
    def _channel_pages(self, block: RamBlock, offsets: np.ndarray) -> None:
        with self._lock:
            if self._gate_closed:
                self._deferred.append((block, offsets.copy()))
            else:
                self._forward_pages(block, offsets)

    def _forward_pages(self, block: RamBlock, offsets: np.ndarray) -> None:
        if self.multifd_out is not None:
            self._queue_out(block, offsets.astype(np.uint64))
            return
        offs = offsets.astype(np.int64)
        breaks = np.flatnonzero(np.diff(offs) != PAGE_SIZE) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [offs.size])).tolist()
        for a, b in zip(starts, ends, strict=True):
            self._ops.append(("P", block, int(offs[a]), b - a))
        self._pending_pages += offs.size
        if self._pending_pages >= self.batch_pages:
            self.flush()

    def _close_gate(self) -> None:
        """The receiver's barrier passed (every channel synced, all waiting: none is adding
        pages): the next round's pages wait until this section has left."""
        self._gate_closed = True

    def _open_gate(self) -> None:
        if not self._gate_closed:
            return
        self._gate_closed = False
        deferred, self._deferred = self._deferred, []
        for block, offsets in deferred:
            self._forward_pages(block, offsets)

    def _section_end(self, event: RamEndOfSection) -> None:
        with self._lock:
            self._section_end_locked(event)
            self._open_gate()

    def _section_end_locked(self, event: RamEndOfSection) -> None:
        enc = self.encoder
        if event.kind == "start":
            if self._ops:
                raise ProtocolError("page records in the RAM setup section: the relay cannot forward them")
            if event.section_id == 0:
                raise ProtocolError("'ram' section with id 0 (QEMU would load it as 'timer')")
            assert self._ram is not None
            self.stats.ram_section_id = event.section_id
            if self.multifd_out is not None:
                self.multifd_out.sync()  # QEMU: sync, then the setup section's EOS
            self._out.append(enc.ram_start(self._ram.layout(), event.section_id))
        else:
            self._encode_ops(event.kind == "end", force=True)
            if self.multifd_out is not None:
                self.multifd_out.sync()  # every channel's SYNC before the EOS
            if not self._section_open:
                self._out.append(enc.ram_section(final=event.kind == "end"))
            self._out.append(enc.ram_section_close())
            self._section_open = False
        self.stats.ram_sections += 1
        self.stats.bytes_in = self.loader.decoder.offset
        self.flush()

    def _device(self, event: DeviceState) -> None:
        with self._lock:
            self._encode_ops(False, force=True)
            self._out.append(self.encoder.device_section(
                event.idstr, event.instance_id, event.version_id, event.raw, event.section_id))
            self.stats.device_sections += 1

    def _eof(self) -> None:
        with self._lock:
            self._encode_ops(False, force=True)
            self._out.append(self.encoder.eof())

    # --- output ----------------------------------------------------------------------
    def _has_pending(self) -> bool:
        return bool(self._ops or self._out or self.multifd_out is not None)

    def flush(self) -> None:
        """Write every pending record and byte with one vectored write."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self.multifd_out is not None:
            self.multifd_out.flush()  # the partial packet: the input has paused
        self._encode_ops(self._current_kind_is_end())
        if not self._out:
            return
        out = self.outbound
        if out is None:
            return  # nothing can be pending before the blocks are known
        bufs, self._out = self._out, []
        self.stats.bytes_out += out.writev_all(bufs)
        self.stats.writes += 1
        if self.stats.first_page_out_at is None and self.stats.pages_out:
            self.stats.first_page_out_at = time.monotonic()

    def _current_kind_is_end(self) -> bool:
        # Which section the pending records belong to: the decoder's current one (its
        # header has been read; the relay writes its own header before the first record).
        return getattr(self.loader.decoder, "_section_kind", "part") == "end"

    def _in_section(self) -> bool:
        # The input is inside a PART/END section (not between sections: channel pages
        # may arrive before the main stream's next section header).
        dec = self.loader.decoder
        return (dec.state in RECORD_STATES or dec.state is DecoderState.PAGE_PAYLOAD) \
            and getattr(dec, "_section_kind", "part") != "start"

    def _encode_ops(self, final: bool, force: bool = False) -> None:
        """Turn pending records into buffers: runs of page records packed from the RAM
        blocks into the staging buffer, zero records as one buffer per run."""
        ops = self._ops
        if not ops:
            return
        enc = self.encoder
        if not self._section_open and not force and self.multifd_in is not None \
                and not self._in_section():
            return  # channel pages between sections wait for the next section header
        if not self._section_open:
            if getattr(self.loader.decoder, "_section_kind", "part") == "start":
                raise ProtocolError("page records in the RAM setup section: the relay cannot forward them")
            self._out.append(enc.ram_section(final=final))
            self._section_open = True
        used = 0
        i = 0
        n = len(ops)
        pages = zeros = 0
        while i < n:
            kind, block, _, _ = ops[i]
            j = i
            offsets: list[int] = []
            while j < n and ops[j][0] == kind and ops[j][1] is block:
                _, _, off, count = ops[j]
                if count == 1:
                    offsets.append(off)
                else:
                    offsets.extend(range(off, off + count * PAGE_SIZE, PAGE_SIZE))
                j += 1
            arr = np.array(offsets, dtype=np.uint64)
            if kind == "Z":
                self._out.append(enc.zero_records(block.name, arr))
                zeros += len(arr)
            else:
                need = (len(arr) - 1) * PAGE_RECORD_SIZE
                # Each run packs into its own part of the staging buffer (all are written
                # together); the encoder allocates a fresh one should it not fit.
                fits = used + need <= self._staging.size
                self._out.extend(enc.page_records(block.name, block.data, arr,
                                                  self._staging[used:] if fits else None))
                used += need if fits else 0
                pages += len(arr)
            i = j
        self._ops = []
        self._pending_pages = 0
        self.stats.pages_out += pages
        self.stats.zero_out += zeros
