"""Zero-copy page placement: the source RDMA-WRITEs pages straight into the destination's RAM.

Destination (``register_destination_ram``): each numpy RAM block is registered for remote
writes (local + remote write, never remote read), either whole (pin-all) or, as QEMU does
without the ``rdma-pin-all`` capability, in 1 MiB chunks registered when the source first
asks for them. It then tells the source each block's address, length and rkey.

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
section (64 MiB), since only the section header precedes the pages.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import ConnectionLostError, ProtocolError
from ..ram import GuestRam, RamBlock
from ..stream import PAGE_SIZE
from . import verbs
from .control import CHUNK_REQ, CHUNK_RES, Msg, RemoteBlock, pack_blocks, unpack_blocks

CHUNK = 1 << 20
MAX_WRITE = 1 << 20


def pin_all_default() -> bool:
    """``MIGNET_RDMA_PIN_ALL=0`` selects on-demand 1 MiB chunks (QEMU's default mode)."""
    return os.environ.get("MIGNET_RDMA_PIN_ALL", "1") not in ("0", "no", "false")


class RdmaPlacement:
    """``RemotePagePlacement`` for an :class:`~mignet.rdma.channel.RdmaChannel`."""

    def __init__(self, channel: Any, pin_all: bool | None = None) -> None:
        from .channel import WRITE_WINDOW

        self.channel = channel
        self.pin_all = pin_all_default() if pin_all is None else pin_all
        self.window = WRITE_WINDOW
        self._mrs: list[tuple[Any, int]] = []  # (MR, bytes) to release on close
        # destination
        self._local_blocks: list[RamBlock] = []
        self._dst_chunks: dict[tuple[int, int], Any] = {}
        # source
        self._remote: dict[str, RemoteBlock] | None = None
        self._remote_chunks: dict[tuple[int, int], int] = {}
        self._src_mrs: dict[tuple[str, int], Any] = {}  # (block, chunk or -1) -> MR
        self.outstanding = 0
        self.writes = 0
        self.bytes_written = 0
        self._error: str | None = None
        channel.on_message(Msg.BLOCKS, self._on_blocks)
        channel.on_message(Msg.REG_REQUEST, self._on_reg_request)
        channel.on_message(Msg.REG_RESULT, self._on_reg_result)
        channel.on_write_done = self._on_write_done

    # --- destination -----------------------------------------------------------------
    def register_destination_ram(self, ram: GuestRam) -> None:
        """Register every block for remote writes and send the block list to the source."""
        e = self.channel._e
        if self.pin_all:
            verbs.check_memlock(verbs.pinned_bytes() + ram.total)
        entries = []
        for i, block in enumerate(ram):
            # Pages now change behind the loader's back: nothing is known to be pristine, so
            # a later ZERO record must really clear its page.
            block.pristine = None
            self._local_blocks.append(block)
            rkey = 0
            if self.pin_all:
                mr = self._register(block.data.ctypes.data, block.size,
                                    e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
                rkey = mr.rkey
            entries.append(RemoteBlock(i, block.name, block.data.ctypes.data, block.size, rkey))
        self.channel.send_control(Msg.BLOCKS, pack_blocks(entries))

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
            mr = self._dst_chunks.get((bi, ci))
            if mr is None:
                length = min(CHUNK, block.size - start)
                verbs.check_memlock(verbs.pinned_bytes() + length)
                mr = self._register(block.data.ctypes.data + start, length,
                                    e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
                self._dst_chunks[(bi, ci)] = mr
            out += CHUNK_RES.pack(bi, ci, block.data.ctypes.data + start, mr.rkey)
        self.channel.send_control(Msg.REG_RESULT, bytes(out))

    # --- source ----------------------------------------------------------------------
    def _on_blocks(self, payload: bytes) -> None:
        self._remote = {b.name: b for b in unpack_blocks(payload)}

    def _on_reg_result(self, payload: bytes) -> None:
        for bi, ci, _addr, rkey in CHUNK_RES.iter_unpack(payload):
            self._remote_chunks[(bi, ci)] = rkey

    def _on_write_done(self, ok: bool, status: str) -> None:
        self.outstanding -= 1
        if not ok and self._error is None:
            self._error = f"RDMA WRITE failed ({status}): the destination went away"

    def _check(self) -> None:
        self.channel._check_usable()
        if self._error is not None:
            raise ConnectionLostError(self._error)

    def write_pages(self, block: RamBlock, offsets: np.ndarray) -> int:
        """WRITE the pages at ``offsets`` (sorted byte offsets) of ``block`` into the
        destination's copy; returns the bytes written."""
        ch = self.channel
        if self._remote is None:
            ch.wait_until(lambda: self._remote is not None or self._error is not None,
                          "waiting for the destination's RAM block list")
        self._check()
        assert self._remote is not None
        remote = self._remote.get(block.name)
        if remote is None or remote.length != block.size:
            raise ProtocolError(f"the destination has no RAM block {block.name!r} of "
                                f"{block.size} bytes to write into")
        # Never overtake a ZERO record the destination has not applied (module docstring).
        if ch.peer_processed < ch.data_sent:
            ch.wait_until(lambda: ch.peer_processed >= ch.data_sent,
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
            lkey = self._local_key(block, ci if remote.chunked else -1)
            rkey = self._remote_chunks[(remote.index, ci)] if remote.chunked else remote.rkey
            self.outstanding += 1
            ch.post_write(lkey, base + start, length, rkey, remote.addr + start)
            total += length
        self.writes += len(runs)
        self.bytes_written += total
        return total

    def _ensure_remote_chunks(self, remote: RemoteBlock, runs: list[tuple[int, int]]) -> None:
        want = sorted({s // CHUNK for s, _ in runs} -
                      {ci for (bi, ci) in self._remote_chunks if bi == remote.index})
        if not want:
            return
        step = 1024  # chunk requests per control message
        for i in range(0, len(want), step):
            part = want[i:i + step]
            self.channel.send_control(Msg.REG_REQUEST,
                                      b"".join(CHUNK_REQ.pack(remote.index, ci) for ci in part))
        self.channel.wait_until(
            lambda: all((remote.index, ci) in self._remote_chunks for ci in want),
            "waiting for the destination to register RAM chunks")

    def _local_key(self, block: RamBlock, chunk: int) -> int:
        """lkey of the source's own registration (whole block, or the 1 MiB chunk)."""
        mr = self._src_mrs.get((block.name, chunk))
        if mr is None:
            if chunk < 0:
                start, length = 0, block.size
            else:
                start, length = chunk * CHUNK, min(CHUNK, block.size - chunk * CHUNK)
            verbs.check_memlock(verbs.pinned_bytes() + length)
            mr = self._register(block.data.ctypes.data + start, length, 0)
            self._src_mrs[(block.name, chunk)] = mr
        return int(mr.lkey)

    def fence(self) -> None:
        """Return once every WRITE posted so far has completed (landed at the destination)."""
        self.channel.wait_until(lambda: self.outstanding == 0 or self._error is not None,
                                "waiting for the last RDMA WRITEs")
        self._check()

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
    for s, e in zip(starts.tolist(), ends.tolist()):
        while s < e:
            cut = min(e, (s // CHUNK + 1) * CHUNK, s + MAX_WRITE)
            runs.append((s, cut - s))
            s = cut
    return runs
