"""mignet as a postcopy source (issue 16): precopy rounds, the switch (discards, the package
with LISTEN/devices/RUN), then every dirty page once — requested pages first, the rest
streamed under max-postcopy-bandwidth, which may change while it runs.

Real threads, sockets and processes throughout: a scripted destination that reads the stream
and asks for pages itself, a ``mignet recv --postcopy`` process whose vCPUs fault, and real
QEMU 7.2 as the destination."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from mignet.cli import exits
from mignet.errors import MignetError, ProtocolError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.guest.workload import Workload
from mignet.migration.dirty import page_aligned
from mignet.migration.postcopy_source import STREAM_PAGES, PostcopyParams, PostcopySource
from mignet.migration.savevm import Sender
from mignet.tcp import SocketChannel
from mignet.units import PAGE_SIZE
from mignet.wire import NEED_DATA, StreamDecoder
from mignet.wire.events import (
    EndOfStream,
    PostcopyDiscard,
    PostcopyRun,
    RamPage,
    RamZero,
)
from mignet.wire.postcopy import req_pages
from mignet.wire.return_path import rp_message, rp_shut
from tests.support.cli import one_line, send_into, start_recv
from tests.support.qemu_peer import QemuDestination, QemuSource, qemu_skip_reason

MiB = 1 << 20
BLOCK = "pc.ram"


# --- a scripted destination: reads the stream, asks for one page, checks each comes once ----
class ScriptedDestination:
    """QEMU's destination side, reduced to what the source's behaviour shows: it keeps its
    own copy of the guest's RAM, records the discarded pages and the order of the pages that
    come after RUN, asks (at RUN) for the last discarded page and, once the first page after
    RUN other than that one arrived, for that page again (already sent: the source must ignore it)."""

    def __init__(self, sock: socket.socket, ram_size: int) -> None:
        self.sock = sock
        self.ram = np.zeros(ram_size, dtype=np.uint8)
        self._view = memoryview(self.ram.data)
        self.discarded: set[int] = set()
        self.after_run: list[int] = []
        self.asked: int | None = None
        self.asked_arrived = threading.Event()
        self.error: BaseException | None = None
        self._run = False
        self._asked_again = False

    def serve(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.asked_arrived.set()

    def _serve(self) -> None:
        dec = StreamDecoder()
        page: RamPage | None = None
        got = 0
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                if dec.payload_left:
                    assert page is not None
                    at = page.offset + got
                    got += dec.take_payload_into(self._view[at:page.offset + PAGE_SIZE])
                    if got == PAGE_SIZE:
                        self._page(page.offset)
                        page, got = None, 0
                    if dec.payload_left:
                        self._feed(dec)
                    continue
                self._feed(dec)
            elif isinstance(ev, RamPage):
                page, got = ev, 0
            elif isinstance(ev, RamZero):
                self.ram[ev.offset:ev.offset + PAGE_SIZE] = ev.fill
                self._page(ev.offset)
            elif isinstance(ev, PostcopyDiscard):
                for start, length in ev.ranges:
                    self.discarded.update(range(start // PAGE_SIZE, (start + length) // PAGE_SIZE))
            elif isinstance(ev, PostcopyRun):
                self._run = True
                self.asked = max(self.discarded)
                self._ask(self.asked, BLOCK)
            elif isinstance(ev, EndOfStream):
                self.sock.sendall(rp_shut(0))
                return

    def _feed(self, dec: StreamDecoder) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the source closed before EOF")
        dec.receive_data(data)

    def _page(self, offset: int) -> None:
        if not self._run:
            return
        n = offset // PAGE_SIZE
        self.after_run.append(n)
        if n != self.asked and not self._asked_again:
            self._asked_again = True
            self._ask(n, None)  # sent already: must be ignored, never sent twice
        if n == self.asked:
            self.asked_arrived.set()

    def _ask(self, page: int, block: str | None) -> None:
        kind, data = req_pages(page * PAGE_SIZE, PAGE_SIZE, block)
        self.sock.sendall(rp_message(kind, data))


def test_requested_page_jumps_the_slow_stream_and_every_page_comes_once() -> None:
    """The background stream crawls at 256 KiB/s (one 64-page batch a second); the page
    asked for at RUN — the last in address order — must come before the stream could have
    reached it, a request for a page already sent is ignored, and raising the limit to
    unlimited while it runs lets the rest through at once."""
    ram = page_aligned(GuestRam.generate(4 * MiB, "mixed", seed=3, name=BLOCK))
    a, b = socket.socketpair()
    a.settimeout(120)
    dst = ScriptedDestination(a, ram.total)
    serving = threading.Thread(target=dst.serve, daemon=True)
    serving.start()
    params = PostcopyParams(max_bandwidth=8 * MiB, max_postcopy_bandwidth=256 << 10)
    workload = Workload(ram, 64 * MiB, seed=3)  # 8x the link: every page dirty after round 1
    source = PostcopySource(Sender(SocketChannel(b, "to-scripted"), ram, DeviceSet.example(3)),
                            workload, params)
    box: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: box.update(info=source.run()), daemon=True)
    driver.start()
    assert dst.asked_arrived.wait(120), "the requested page never came"
    assert dst.error is None, dst.error
    assert source.status == "postcopy-active"
    source.set_max_postcopy_bandwidth(0)  # the rest at once: the limit changes while it runs
    driver.join(120)
    serving.join(30)
    assert dst.error is None, dst.error
    info = box["info"]
    assert info["status"] == "completed"
    # Every discarded page came exactly once after RUN, and nothing else did.
    assert len(dst.after_run) == len(set(dst.after_run)) == len(dst.discarded) > 4 * STREAM_PAGES
    assert set(dst.after_run) == dst.discarded
    assert dst.asked is not None and dst.after_run.index(dst.asked) < 3 * STREAM_PAGES
    assert np.array_equal(dst.ram, ram[BLOCK].data)  # the destination has the frozen source
    pc = info["x-mignet"]["postcopy"]
    assert info["ram"]["postcopy-requests"] == pc["requests"] == 2
    assert pc["ignored-requests"] == 1 and pc["requested-pages-sent"] == 1
    assert pc["max-postcopy-bandwidth"] == 0
    assert info["ram"]["postcopy-bytes"] > len(dst.discarded) * 8  # at least the page words
    assert info["ram"]["precopy-bytes"] + info["ram"]["postcopy-bytes"] == info["ram"]["transferred"]
    assert not workload.running  # stopped at the switch, never restarted here
    a.close()


class VanishingDestination(ScriptedDestination):
    """Asks for a page outside guest RAM (``bad_request``) or just goes away at RUN."""

    def __init__(self, sock: socket.socket, ram_size: int, bad_request: bool) -> None:
        super().__init__(sock, ram_size)
        self.bad_request = bad_request

    def _ask(self, page: int, block: str | None) -> None:
        if self.bad_request:
            kind, data = req_pages(self.ram.size, PAGE_SIZE, BLOCK)  # one page past the end
            self.sock.sendall(rp_message(kind, data))
        else:
            self.sock.shutdown(socket.SHUT_RDWR)
        raise ConnectionError("gone")


@pytest.mark.parametrize("bad_request, error", [(False, MignetError), (True, ProtocolError)],
                         ids=["connection-lost", "request-outside-ram"])
def test_failure_after_the_switch_fails_and_never_restarts_the_vcpus(bad_request: bool,
                                                                      error: type[Exception]) -> None:
    """Once the package is out the guest belongs to the destination: a broken connection or
    a nonsense request ends the migration failed, and the vCPUs here stay stopped (running
    them again would give the guest two lives)."""
    ram = page_aligned(GuestRam.generate(4 * MiB, "random", seed=5, name=BLOCK))
    a, b = socket.socketpair()
    a.settimeout(120)
    dst = VanishingDestination(a, ram.total, bad_request)
    threading.Thread(target=dst.serve, daemon=True).start()
    workload = Workload(ram, 64 * MiB, seed=5)
    source = PostcopySource(Sender(SocketChannel(b, "to-vanishing"), ram, DeviceSet.example(5)),
                            workload, PostcopyParams(max_bandwidth=8 * MiB,
                                                     max_postcopy_bandwidth=256 << 10))
    with pytest.raises(error) as caught:
        source.run()
    if bad_request:
        assert "not whole pages inside it" in str(caught.value)
    assert source.status == "failed"
    assert not workload.running
    a.close()


# --- mignet send --live --postcopy into mignet recv --postcopy -----------------------------
def test_cli_postcopy_into_mignet_recv(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """A guest dirtying 200 MiB/s over a 32 MiB/s link never converges: after one round it
    switches; the receiver's vCPUs fault on pages still owed and ask for them."""
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy", "--vcpus", "2")
    sent, got = send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "64M", "--live", "--postcopy",
                          "--dirty-rate", "200M", "--max-bandwidth", "32M",
                          "--max-postcopy-bandwidth", "32M", timeout=240, recv_timeout=120)
    assert sent["ram_digest"] == got["ram_digest"]
    info = sent["migration"]
    assert info["status"] == "completed" and sent["confirmed"] is True
    pc_src, pc_dst = info["x-mignet"]["postcopy"], got["stats"]["postcopy"]
    assert pc_src is not None and pc_src["after-rounds"] == 1
    assert pc_dst["faults"] > 0 and pc_dst["requests"] > 0
    assert info["ram"]["postcopy-requests"] == pc_dst["requests"] == pc_src["requests"]
    assert pc_src["discarded-pages"] == pc_dst["discarded-pages"] > 0
    assert isinstance(info["downtime"], int) and info["downtime"] >= 0
    assert info["x-mignet"]["downtime-measured-at"] == "source-pong"
    assert got["stats"]["switchover_at"] >= pc_src["stopped-at"]  # RUN came after the stop
    ram = info["ram"]
    assert ram["total"] == 64 * MiB and ram["postcopy-bytes"] > 0 and ram["downtime-bytes"] == 0
    assert 1.0 < info["x-mignet"]["sent-per-ram"] <= 2.5  # each page once after the switch


def test_cli_postcopy_with_preempt_sends_requested_pages_on_the_second_connection(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """send --postcopy-preempt opens a second connection after the main one; the return-path
    thread writes each requested page there at once, and recv --postcopy-preempt reads it:
    the pages both sides count on it agree, and the guest arrives whole."""
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy", "--vcpus", "1",
                           "--postcopy-preempt")
    sent, got = send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "64M", "--live", "--postcopy",
                          "--postcopy-preempt", "--dirty-rate", "200M", "--max-bandwidth", "32M",
                          "--max-postcopy-bandwidth", "16M", timeout=240, recv_timeout=120)
    assert sent["ram_digest"] == got["ram_digest"]
    pc_src, pc_dst = sent["migration"]["x-mignet"]["postcopy"], got["stats"]["postcopy"]
    assert pc_dst["faults"] > 0 and pc_src["preempt-pages"] > 0
    assert pc_src["preempt-pages"] == pc_dst["preempt-pages"] == pc_src["requested-pages-sent"]


def test_cli_postcopy_that_converges_first_ends_as_precopy(mignet_cmd: list[str],
                                                           subprocess_env: dict[str, str]) -> None:
    """An idle guest converges in its first round: no switch, a precopy end (QEMU's too)."""
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy", "--vcpus", "0")
    sent, got = send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "16M", "--live", "--postcopy",
                          "--dirty-rate", "0", "--postcopy-after", "3")
    assert sent["ram_digest"] == got["ram_digest"]
    info = sent["migration"]
    assert info["status"] == "completed" and info["x-mignet"]["postcopy"] is None
    assert got["stats"]["postcopy"]["discarded-pages"] == 0 and sent["confirmed"] is True


# --- real QEMU 7.2 as the destination -------------------------------------------------------
@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_cli_postcopy_into_real_qemu(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                     tmp_path: Path) -> None:
    """A QEMU guest received with recv --out runs here (--live --snapshot: its vCPUs write
    200 MiB/s) and is postcopied into QEMU 7.2 with postcopy-ram. QEMU's RAM lives on
    /dev/shm (userfaultfd serves shared memory there, not on a disk file system); the guest
    stays paused, so the pages arrive by the background stream."""
    snap = tmp_path / "snap"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(snap))
    with QemuSource(tmp_path / "src", mem_mib=64, fill="mixed", seed=13) as src:
        src.migrate(uri, timeout=120)
    _, stderr = recv.communicate(timeout=120)
    assert recv.returncode == 0, stderr
    blocks = [b["name"] for b in json.loads((snap / "manifest.json").read_text())["blocks"]]
    shm = Path("/dev/shm") / f"mignet-test-{tmp_path.name}"
    try:
        with QemuDestination(shm, mem_mib=64) as dst:
            dst.migrate_incoming("tcp:127.0.0.1:0", capabilities={"postcopy_ram": True})
            qemu_uri = dst.listen_uri()
            assert qemu_uri is not None
            r = subprocess.run([*mignet_cmd, "send", qemu_uri, "--snapshot", str(snap), "--live",
                                "--postcopy", "--dirty-rate", "200M", "--max-bandwidth", "32M",
                                "--json", "--quiet"],
                               capture_output=True, text=True, env=subprocess_env, timeout=240)
            assert r.returncode == 0, r.stderr + "\n" + dst.log_path.read_text()[-3000:]
            sent = json.loads(r.stdout.strip().splitlines()[-1])
            assert dst.wait_migration(timeout=120)["status"] == "completed"
            info = sent["migration"]
            assert sent["confirmed"] is True and info["status"] == "completed"
            pc = info["x-mignet"]["postcopy"]
            assert pc is not None and pc["discarded-pages"] > 0
            assert info["ram"]["postcopy-bytes"] > 0
            received = np.fromfile(dst.image_path, np.uint8)
            assert xxhash.xxh3_128(received.data).hexdigest() == sent["block_digests"][blocks.index("m0")]
            assert dst.status() in ("paused", "prelaunch")  # -S: it waits for cont
    finally:
        subprocess.run(["rm", "-rf", str(shm)], check=False)


# --- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, extra, message", [
    ("tcp:127.0.0.1:9", ["--size", "16M", "--postcopy"], "--postcopy switches a running guest over: add --live"),
    ("tcp:127.0.0.1:9", ["--size", "16M", "--live", "--postcopy", "--channels", "2"],
     "--postcopy with --channels (multifd) is not supported"),
    ("rdma:127.0.0.1:9", ["--size", "16M", "--live", "--postcopy"], "--postcopy needs plain tcp: or unix:"),
    ("tcp:127.0.0.1:9", ["--size", "16M", "--live", "--postcopy", "--tls-creds", "/nonexistent"],
     "--postcopy needs plain tcp: or unix:"),
    ("tcp:127.0.0.1:9", ["--size", "16M", "--live", "--postcopy-after", "2"],
     "--postcopy-after has no effect without --postcopy"),
    ("tcp:127.0.0.1:9", ["--size", "16M", "--live", "--max-postcopy-bandwidth", "1M"],
     "--max-postcopy-bandwidth has no effect without --postcopy"),
])
def test_postcopy_options_refused_before_connecting(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                    uri: str, extra: list[str], message: str) -> None:
    r = subprocess.run([*mignet_cmd, "send", uri, *extra], capture_output=True, text=True,
                       env=subprocess_env, timeout=60)
    assert r.returncode == exits.USAGE, r.stderr  # a connect attempt would fail otherwise
    one_line(r.stderr, message)
