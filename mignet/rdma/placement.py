"""Zero-copy page placement: the source RDMA-WRITEs pages straight into the destination's RAM.

Destination (``register_destination_ram``): each numpy RAM block is registered for remote
writes (local + remote write, never remote read), either whole (pin-all) or, as QEMU does
without the ``rdma-pin-all`` capability, in 1 MiB chunks registered when the source asks for
them. The source chooses (``announce``, before the stream starts), as QEMU's source does. The
destination then tells the source each block's address, length and rkey (0 in chunk mode).

Registering fresh destination RAM (pinning, faulting its pages in) costs about as much as
moving it under emulation. Pin-all pays it all before the first page (QEMU counts that as
setup time); chunk mode asks ``READAHEAD_CHUNKS`` ahead of its writes, so the destination
registers while earlier chunks are in flight.

Source (``write_pages``): contiguous pages coalesce into one WRITE (split at 1 MiB so chunk
keys apply and the window stays fine-grained); up to ``WRITE_WINDOW`` signalled WRITEs are in
flight; ``fence`` waits for every completion. On an RC queue pair a WRITE's completion means
the data is in the destination's memory, and later SENDs are delivered after earlier WRITEs,
so after ``fence`` the device state may follow.

Ordering against ZERO records. In a later live round a page that became zero travels as a
ZERO record in the byte stream, which the destination applies whenever its loader gets to
it, whereas a WRITE lands at once. If the page is then written again, that WRITE could land
before the loader applies the older ZERO record and be wiped. So before a WRITE the source
waits until the destination reports that its loader has processed every stream message sent
so far (carried in each control header). In a first pass this costs one round trip per RAM
section (64 MiB), since only the section header precedes the pages. A connection whose
stream carries no ZERO records (a multifd channel: its order against the main stream's comes
from the caller's own barrier) names the point to wait for instead (``write_pages(after=…)``,
``stream_position``), so its writes wait once per barrier, not per message.

Several connections from one source process to one destination process (multifd's
channels, each its own queue pair) share one librdmacm protection domain, so the keys of
one registration serve them all: the destination registers its RAM once
(``register_destination_ram(blocks, shared=…)`` reuses another placement's registrations,
chunks included) and each connection tells its own source where the blocks live.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from mignet.channel import MemoryRegion
from mignet.errors import ConnectionLostError, MisuseError, ProtocolError
from mignet.rdma import verbs
from mignet.rdma.control import CHUNK_REQ, CHUNK_RES, MODE, PLACED, Msg, RemoteBlock, pack_blocks, unpack_blocks
from mignet.units import PAGE_SIZE

CHUNK = 1 << 20
MAX_WRITE = 1 << 20
WRITE_WINDOW = 32  # outstanding signalled RDMA WRITEs
READAHEAD_CHUNKS = 16  # chunk mode: registrations requested ahead of the writes
PLACED_EVERY = 8 << 20  # the source reports landed bytes this often (destination progress)
# ... and at least this often (s) while WRITEs land: they bypass the destination's CPU, and a
# slow (rate-limited) stream must not look stalled to the destination's idle limit
PLACED_INTERVAL = 0.5


def pin_all_default() -> bool:
    """``MIGNET_RDMA_PIN_ALL=1`` turns QEMU's ``rdma-pin-all`` on where nothing else says;
    off (QEMU's default) the destination registers 1 MiB chunks as the source needs them."""
    return os.environ.get("MIGNET_RDMA_PIN_ALL", "0") not in ("0", "no", "false", "")


class RdmaPlacement:
    """``RemotePagePlacement`` for an :class:`~mignet.rdma.channel.RdmaChannel`."""

    protocol = "mignet"

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        # Destination: the mode the source announced (QEMU: the source's capability decides).
        self.pin_all = False
        self.window = WRITE_WINDOW
        self._mrs: list[tuple[Any, int]] = []  # (MR, bytes) to release on close
        # destination (shared by every placement that registers through ``_registrar``)
        self._local_blocks: list[MemoryRegion] = []
        self._dst_chunks: dict[tuple[int, int], Any] = {}
        self._entries: list[RemoteBlock] = []
        self._registrar: RdmaPlacement = self  # whose MRs these are
        self._dst_lock = threading.Lock()
        # source
        self._remote: dict[str, RemoteBlock] | None = None
        self._remote_chunks: dict[tuple[int, int], int] = {}
        self._asked: set[tuple[int, int]] = set()  # chunks requested (answered or not)
        self._src_mrs: dict[str, Any] = {}  # block name -> MR
        # Lengths of the WRITEs in flight, in post order: an RC queue completes them in order.
        self._inflight: collections.deque[int] = collections.deque()
        self.writes = 0
        self.bytes_written = 0
        self.landed = 0  # source: bytes whose WRITE completed
        self._landed_told = 0
        self._told_at = time.monotonic()
        # destination: what the source reported as landed, and who wants to know
        self.placed_bytes = 0
        self.on_placed: Callable[[int], None] | None = None
        self._error: str | None = None
        channel.on_message(Msg.BLOCKS, self._on_blocks)
        channel.on_message(Msg.REG_REQUEST, self._on_reg_request)
        channel.on_message(Msg.REG_RESULT, self._on_reg_result)
        channel.on_message(Msg.PLACED, self._on_placed)
        channel.on_message(Msg.MODE, self._on_mode)
        channel.on_write_done = self._on_write_done

    # --- destination -----------------------------------------------------------------
    def register_destination_ram(self, blocks: Iterable[MemoryRegion], shared: Any = None) -> None:
        """Register every block for remote writes and send the block list to the source.

        ``shared``: the placement of another connection from the same source process that
        registered these blocks already (multifd: the main connection's); its registrations,
        and the chunks either registers later, serve this connection too."""
        if shared is not None:
            self._share(shared)
            return
        e = self.channel._e
        # Chunks stay registered until the end, so chunk mode too ends up pinning all of it:
        # refuse now, before a page has moved, rather than after some.
        blocks = list(blocks)
        verbs.check_memlock(verbs.pinned_bytes() + sum(b.size for b in blocks))
        entries = []
        for i, block in enumerate(blocks):
            self._local_blocks.append(block)
            rkey = 0
            if self.pin_all:
                mr = self._register(block.data.ctypes.data, block.size,
                                    e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
                rkey = mr.rkey
            entries.append(RemoteBlock(i, block.name, block.data.ctypes.data, block.size, rkey))
        self._entries = entries
        self.channel.send_control(Msg.BLOCKS, pack_blocks(entries))

    def _share(self, main: RdmaPlacement) -> None:
        if not main._entries:
            raise MisuseError("the placement to share has not registered its RAM yet")
        # Both connections' PDs are librdmacm's one PD of the device (not checked: reading
        # a CMID's PD pointer through pyverbs 44 crashed here). Were they not, the source's
        # first WRITE would fail with a remote access error.
        self.pin_all = main.pin_all
        self._local_blocks, self._dst_chunks = main._local_blocks, main._dst_chunks
        self._entries, self._registrar, self._dst_lock = main._entries, main._registrar, main._dst_lock
        self.channel.send_control(Msg.BLOCKS, pack_blocks(self._entries))

    def _on_reg_request(self, payload: bytes) -> None:
        """Chunk mode: register the chunks the source is about to write; reply with rkeys."""
        e = self.channel._e
        out = bytearray()
        for bi, ci in CHUNK_REQ.iter_unpack(payload):
            if bi >= len(self._local_blocks):
                raise ProtocolError(f"the source asked to register chunk {ci} of unknown block {bi}")
            block = self._local_blocks[bi]
            start = ci * CHUNK
            if start >= block.size:
                raise ProtocolError(f"chunk {ci} lies outside RAM block {block.name!r}")
            with self._dst_lock:  # connections sharing the registrations ask at once
                mr = self._dst_chunks.get((bi, ci))
                if mr is None:
                    length = min(CHUNK, block.size - start)
                    verbs.check_memlock(verbs.pinned_bytes() + length)
                    mr = self._registrar._register(block.data.ctypes.data + start, length,
                                                   e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
                    self._dst_chunks[(bi, ci)] = mr
            out += CHUNK_RES.pack(bi, ci, block.data.ctypes.data + start, mr.rkey)
        self.channel.send_control(Msg.REG_RESULT, bytes(out))

    def _on_mode(self, payload: bytes) -> None:
        if self._local_blocks:
            raise ProtocolError("the source chose a RAM registration mode after the block list")
        if len(payload) != MODE.size:
            raise ProtocolError(f"malformed RDMA mode message ({len(payload)} bytes)")
        self.pin_all = bool(MODE.unpack(payload)[0])

    def _on_placed(self, payload: bytes) -> None:
        if len(payload) != PLACED.size:
            raise ProtocolError(f"malformed RDMA progress message ({len(payload)} bytes)")
        (self.placed_bytes,) = PLACED.unpack(payload)
        if self.on_placed is not None:
            self.on_placed(self.placed_bytes)

    # --- source ----------------------------------------------------------------------
    def announce(self, pin_all: bool | None = None) -> None:
        """Tell the destination how to register its RAM before the stream starts: all of it
        up front (``rdma-pin-all``) or 1 MiB chunks on demand. SENDs arrive in order, so it
        knows before it reads the block list. ``None``: ``pin_all_default()``."""
        pin = pin_all_default() if pin_all is None else pin_all
        self.pin_all = pin  # what describe() reports on this side too
        self.channel.send_control(Msg.MODE, MODE.pack(int(pin)))

    def _on_blocks(self, payload: bytes) -> None:
        self._remote = {b.name: b for b in unpack_blocks(payload)}

    def _on_reg_result(self, payload: bytes) -> None:
        for bi, ci, _addr, rkey in CHUNK_RES.iter_unpack(payload):
            self._remote_chunks[(bi, ci)] = rkey

    def _on_write_done(self, ok: bool, status: str) -> None:
        length = self._inflight.popleft()
        if not ok:
            if self._error is None:
                self._error = f"RDMA WRITE failed ({status}): the destination went away"
            return
        self.landed += length
        now = time.monotonic()
        if (self.landed - self._landed_told >= PLACED_EVERY or not self.outstanding
                or now - self._told_at >= PLACED_INTERVAL):
            self._landed_told, self._told_at = self.landed, now
            self.channel.send_control(Msg.PLACED, PLACED.pack(self.landed))

    @property
    def outstanding(self) -> int:
        """WRITEs posted and not yet completed."""
        return len(self._inflight)

    def _check(self) -> None:
        self.channel._check_usable()
        if self._error is not None:
            raise ConnectionLostError(self._error)

    def stream_position(self) -> int:
        """Source: the stream messages sent so far, for a later ``write_pages(after=…)``."""
        return int(self.channel.data_sent)

    def begin_round(self) -> None:
        """mignet's protocol has no registration rounds (QEMU's has): pages go any time."""

    def end_round(self, blocks: Sequence[MemoryRegion] | None = None) -> None:
        """No rounds (``begin_round``)."""

    def write_pages(self, block: MemoryRegion, offsets: np.ndarray, zero: Any = None,
                    after: int | None = None) -> int:
        """WRITE the pages at ``offsets`` (sorted byte offsets) of ``block`` into the
        destination's copy; returns the bytes written. They land only once the destination
        has processed the stream up to ``after`` (a ``stream_position``; None: all of it).
        ``zero`` is not needed: zero pages are the stream's (ZERO records) in mignet's
        protocol."""
        ch = self.channel
        # Posting a WRITE to a peer that went away still succeeds (the QP only errors after
        # its retries, seconds later): take in a disconnect that is already there first.
        ch._progress()
        if self._remote is None:
            self._local_key(block)  # register ours while the destination's list is on its way
            ch.wait_until(lambda: self._remote is not None or self._error is not None,
                          "waiting for the destination's RAM block list")
        self._check()
        assert self._remote is not None
        remote = self._remote.get(block.name)
        if remote is None or remote.length != block.size:
            raise ProtocolError(f"the destination has no RAM block {block.name!r} of "
                                f"{block.size} bytes to write into")
        # Never overtake a ZERO record the destination has not applied (module docstring).
        point = ch.data_sent if after is None else after
        if ch.peer_processed < point:
            ch.wait_until(lambda: ch.peer_processed >= point,
                          "waiting for the destination to apply the stream")
        runs = _runs(offsets)
        if remote.chunked:
            self._ensure_remote_chunks(remote, runs)
        base = block.data.ctypes.data
        total = 0
        for start, length in runs:
            if self.outstanding >= self.window:
                ch.wait_until(lambda: self.outstanding < self.window or self._error is not None,
                              "waiting for RDMA WRITE completions")
                self._check()
            ci = start // CHUNK
            lkey = self._local_key(block)
            rkey = self._remote_chunks[(remote.index, ci)] if remote.chunked else remote.rkey
            self._inflight.append(length)
            ch.post_write(lkey, base + start, length, rkey, remote.addr + start)
            total += length
        self.writes += len(runs)
        self.bytes_written += total
        return total

    def _ensure_remote_chunks(self, remote: RemoteBlock, runs: list[tuple[int, int]]) -> None:
        """Chunk mode: make sure the chunks ``runs`` touch are registered at the destination.

        Registration there (pinning, and faulting in fresh pages) costs about as much as
        the transfer itself under emulation, so the source asks ``READAHEAD_CHUNKS`` ahead
        of what it writes: the destination registers the next chunks while these are in
        flight, and only a chunk not yet registered is waited for."""
        need = {s // CHUNK for s, _ in runs}
        nchunks = -(-remote.length // CHUNK)
        last = max(need)
        ahead = range(last + 1, min(nchunks, last + 1 + READAHEAD_CHUNKS))
        # What is needed now goes in its own messages, so its answer does not wait for the
        # registration of the chunks asked ahead.
        for wanted in (sorted(need), ahead):
            ask = [ci for ci in wanted if (remote.index, ci) not in self._asked]
            step = 1024  # chunk requests per control message
            for i in range(0, len(ask), step):
                part = ask[i:i + step]
                self.channel.send_control(Msg.REG_REQUEST,
                                          b"".join(CHUNK_REQ.pack(remote.index, ci) for ci in part))
                self._asked.update((remote.index, ci) for ci in part)
        if any((remote.index, ci) not in self._remote_chunks for ci in need):
            self.channel.wait_until(
                lambda: all((remote.index, ci) in self._remote_chunks for ci in need)
                or self._error is not None,
                "waiting for the destination to register RAM chunks")
            self._check()

    def _local_key(self, block: MemoryRegion) -> int:
        """lkey of the source's registration of ``block``: whole, on its first write. Its
        pages are resident already, so this is cheap, unlike the destination's; the chunk
        mode exists for the destination's sake."""
        mr = self._src_mrs.get(block.name)
        if mr is None:
            verbs.check_memlock(verbs.pinned_bytes() + block.size)
            mr = self._register(block.data.ctypes.data, block.size, 0)
            self._src_mrs[block.name] = mr
        return int(mr.lkey)

    def fence(self) -> None:
        """Return once every WRITE posted so far has completed (landed at the destination)."""
        self.channel.wait_until(lambda: self.outstanding == 0 or self._error is not None,
                                "waiting for the last RDMA WRITEs")
        self._check()

    def describe(self) -> dict[str, Any]:
        return {"protocol": "mignet", "pin_all": self.pin_all, "writes": self.writes,
                "bytes_written": self.bytes_written, "placed_bytes": self.placed_bytes}

    # --- bookkeeping -----------------------------------------------------------------
    def _register(self, address: int, length: int, access: int) -> Any:
        mr = verbs.register(self.channel.conn.pd, address, length, access)
        self._mrs.append((mr, length))
        return mr

    def release(self) -> list[Any]:
        """The MRs to close with the connection (their pinned bytes are accounted here)."""
        verbs.unpinned(sum(n for _, n in self._mrs))
        mrs = [mr for mr, _ in self._mrs]
        self._mrs.clear()
        return mrs


def _runs(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Coalesce sorted page offsets into (start, length) runs of contiguous pages, split so
    that no run crosses a 1 MiB boundary (chunk keys, and a fine-grained window)."""
    if len(offsets) == 0:
        return []
    offs = np.asarray(offsets, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(offs) != PAGE_SIZE) + 1
    starts = offs[np.concatenate(([0], breaks))]
    ends = offs[np.concatenate((breaks - 1, [len(offs) - 1]))] + PAGE_SIZE
    runs: list[tuple[int, int]] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        while s < e:
            cut = min(e, (s // CHUNK + 1) * CHUNK, s + MAX_WRITE)
            runs.append((s, cut - s))
            s = cut
    return runs
