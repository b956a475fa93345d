"""Multifd with TLS, as QEMU 7.2 does it: every connection (the main stream and each multifd
channel) has its own TLS session, and the destination completes the handshake, with its
authorization, on every connection before it reads the first byte that says what the
connection is. Real ``mignet send``/``recv`` processes, real QEMU 7.2 on either end, real
handshakes with certificates made by the test (tests/support/tls.py)."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from mignet.guest.directory import block_filename
from mignet.wire.multifd import build_init
from tests.support.cli import one_line, start_recv
from tests.support.processes import track
from tests.support.proxy import CuttableProxy
from tests.support.qemu_peer import QemuDestination, QemuSource, qemu_skip_reason
from tests.support.tls import make_creds

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
qemu = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_creds(tmp_path_factory.mktemp("tls"))


def _send(cmd: list[str], env: dict[str, str], uri: str, *extra: str,
          timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, "send", uri, "--json", "--quiet", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.strip().splitlines()]


# --- mignet -> mignet ---------------------------------------------------------------------
@pytest.mark.parametrize("channels", [2, 4])
def test_send_channels_over_tls_into_recv(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                         creds: dict[str, Path], tmp_path: Path, channels: int) -> None:
    """``send --channels N --tls-creds`` -> ``recv --tls-creds --tls-authz``: every channel
    carried pages, the guest lands byte-identical (the digests of both ends, and the
    files against the source image)."""
    image = tmp_path / "guest.img"
    rng = np.random.default_rng(channels)
    data = rng.integers(0, 256, 24 << 20, dtype=np.uint8)
    data[: 4 << 20] = 0  # some zero pages: they travel on the main stream
    data.tofile(image)
    out = tmp_path / "received"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]),
                           "--tls-authz", "CN=mignet test client", "--out", str(out))
    sent = _send(mignet_cmd, subprocess_env, uri, "--image", str(image), "--block-name", "pc.ram",
                 "--channels", str(channels), "--tls-creds", str(creds["client"]))
    stdout, stderr = recv.communicate(timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert recv.returncode == 0, stderr
    done, got = _events(sent.stdout)[-1], _events(stdout)[-1]
    assert done["ram_digest"] == got["ram_digest"]
    assert done["multifd"]["channels"] == got["stats"]["multifd"]["channels"] == channels
    assert all(n > 0 for n in done["multifd"]["pages"].values()), done["multifd"]
    assert got["stats"]["multifd"]["refused"] == []
    assert np.array_equal(np.fromfile(out / block_filename("pc.ram"), np.uint8), data)


def test_a_stalled_channel_handshake_ends_both_sides_within_the_idle_timeout(
        mignet_cmd: list[str], subprocess_env: dict[str, str], creds: dict[str, Path]) -> None:
    """The destination never answers one channel's handshake: the source gives up within
    its idle limit (one line naming the handshake), the destination then sees its main
    stream end and fails too, long before its own idle limit; neither hangs."""
    idle, recv_idle = 3.0, 60.0
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]),
                           "--idle-timeout", str(recv_idle))
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    proxy = CuttableProxy((host, int(port)), stall=1)  # the first multifd channel
    try:
        t0 = time.monotonic()
        send = track(subprocess.Popen(
            [*mignet_cmd, "send", proxy.uri, "--size", "8M", "--channels", "2", "--quiet",
             "--tls-creds", str(creds["client"]), "--tls-hostname", "localhost",
             "--idle-timeout", str(idle)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env))
        _, send_err = send.communicate(timeout=60)
        send_took = time.monotonic() - t0
        _, recv_err = recv.communicate(timeout=60)
        recv_took = time.monotonic() - t0
    finally:
        proxy.close()
    assert send.returncode != 0 and recv.returncode != 0
    one_line(send_err, f"did not complete the TLS handshake in {idle:g} s: check that it has tls-creds")
    assert "Traceback" not in recv_err and len(recv_err.strip().splitlines()) == 1, recv_err
    # the handshake's limit is the idle limit; margins for a loaded 2-core machine
    assert idle - 0.5 < send_took < idle + 10, send_took
    # it failed because the source's main stream ended, not by its own idle limit
    assert recv_took < idle + 15 < recv_idle, recv_took


# --- strangers ----------------------------------------------------------------------------
def _tls_stranger(uri: str, folder: Path | None, payload: bytes) -> socket.socket | None:
    """A client that tries to join: a TLS handshake with ``folder``'s certificate (None: a
    raw half handshake that then stalls), then ``payload``; the socket, or None if the
    destination refused it during the handshake."""
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=30)
    if folder is None:
        raw.sendall(bytes.fromhex("16030100c8010000c40303"))  # the start of a ClientHello
        return raw
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(folder / "ca-cert.pem")
    ctx.check_hostname = False  # a stranger does not care who we are
    if (folder / "client-cert.pem").exists():
        ctx.load_cert_chain(folder / "client-cert.pem", folder / "client-key.pem")
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(payload)  # TLS 1.3: a refused client learns it only when it reads
        tls.recv(1)
    except (ssl.SSLError, OSError):
        raw.close()
        return None
    return tls


@pytest.mark.qemu
@qemu
def test_real_qemu_multifd_with_tls_into_recv(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                              creds: dict[str, Path], tmp_path: Path) -> None:
    """QEMU 7.2, capabilities multifd (2 channels) and tls-creds, into ``recv --tls-creds``:
    byte-identical, and both channels carried pages."""
    out = tmp_path / "received"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]), "--out", str(out))
    with QemuSource(tmp_path, mem_mib=128, fill="random", seed=21) as src:
        src.qmp("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(creds["client"]),
                               "endpoint": "client", "verify-peer": True})
        info = src.migrate(uri, capabilities={"multifd": True},
                           parameters={"multifd_channels": 2, "tls_creds": "tls0",
                                       "tls_hostname": "localhost"}, timeout=180)
        assert info["status"] == "completed", info
        stdout, stderr = recv.communicate(timeout=120)
        assert recv.returncode == 0, stderr
        assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8),
                              np.fromfile(src.image_path, np.uint8))
    mf = _events(stdout)[-1]["stats"]["multifd"]
    assert mf["channels"] == 2 and all(n > 0 for n in mf["pages"].values()), mf


@pytest.mark.qemu
@qemu
def test_strangers_are_refused_while_real_qemu_migrates_with_multifd_and_tls(
        mignet_cmd: list[str], subprocess_env: dict[str, str], creds: dict[str, Path],
        tmp_path: Path) -> None:
    """While QEMU's multifd+TLS migration runs, clients with another CA's certificate or
    none try to add a multifd channel, one with a good certificate sends a multifd init
    of another migration, and one stalls in its handshake: each with a valid-looking
    init record. The bad certificates are refused at the handshake (one line each, before
    a byte of theirs is read), the wrong UUID by the channel checks; the migration
    completes byte-identical with QEMU's own 2 channels."""
    out = tmp_path / "received"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]), "--out", str(out))
    strangers: list[socket.socket] = []
    with QemuSource(tmp_path, mem_mib=128, fill="random", seed=22) as src:
        src.qmp("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(creds["client"]),
                               "endpoint": "client", "verify-peer": True})
        src.set_capabilities(multifd=True)
        src.set_parameters(multifd_channels=2, tls_creds="tls0", tls_hostname="localhost",
                           max_bandwidth=32 << 20)
        src.qmp("migrate", {"uri": uri})
        deadline = time.monotonic() + 60
        while src.query_migrate().get("ram", {}).get("transferred", 0) < (8 << 20):
            assert time.monotonic() < deadline, src.query_migrate()
            time.sleep(0.05)
        init = build_init(bytes(range(16)), 0)
        for folder in (creds["rogue"], creds["anon"], creds["client"], None):
            s = _tls_stranger(uri, folder, init)
            if s is not None:
                strangers.append(s)
        stalled = strangers[-1]  # half a ClientHello, then nothing
        src.set_parameters(max_bandwidth=1 << 40)
        info = src.wait_migration(timeout=180)
        assert info["status"] == "completed", info
        stdout, stderr = recv.communicate(timeout=120)
        stalled.settimeout(5)
        assert stalled.recv(1) == b""  # let go when recv ended, never answered before
        for s in strangers:
            s.close()
        assert recv.returncode == 0, stderr
        assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8),
                              np.fromfile(src.image_path, np.uint8))
    events = _events(stdout)
    refused = [str(e["reason"]) for e in events if e["event"] == "refused"]
    assert sum("TLS handshake failed: the client is not authenticated" in r for r in refused) == 2, refused
    assert any("UUID 00010203-0405-0607-0809-0a0b0c0d0e0f" in r or "after the first RAM sync" in r
               for r in refused), refused
    assert all("\n" not in r for r in refused)
    # completed while the stalled one was still in its handshake: not refused for it first
    assert not any("did not complete the TLS handshake" in r for r in refused), refused
    assert events[-1]["stats"]["multifd"]["channels"] == 2


# --- mignet -> real QEMU ------------------------------------------------------------------
@pytest.mark.qemu
@qemu
def test_send_channels_over_tls_into_real_qemu(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                               creds: dict[str, Path], tmp_path: Path) -> None:
    """``send --snapshot --channels 2 --tls-creds`` into ``qemu -incoming`` with multifd and
    ``tls-creds-x509,endpoint=server,verify-peer=on``: QEMU completes (and confirms on the
    return path) with the same RAM."""
    snap = tmp_path / "snap"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(snap))
    with QemuSource(tmp_path / "src", mem_mib=128, fill="random", seed=23) as src:
        assert src.migrate(uri, timeout=120)["status"] == "completed"
        source = np.fromfile(src.image_path, np.uint8)
    _, stderr = recv.communicate(timeout=120)
    assert recv.returncode == 0, stderr
    with QemuDestination(tmp_path / "dst", mem_mib=128) as dst:
        dst.qmp("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(creds["server"]),
                               "endpoint": "server", "verify-peer": True})
        dst.migrate_incoming("tcp:127.0.0.1:0", capabilities={"multifd": True},
                             parameters={"multifd_channels": 2, "tls_creds": "tls0"})
        target = dst.listen_uri()
        assert target is not None
        sent = _send(mignet_cmd, subprocess_env, target, "--snapshot", str(snap), "--channels", "2",
                     "--tls-creds", str(creds["client"]), "--tls-hostname", "localhost")
        assert sent.returncode == 0, sent.stderr
        done = _events(sent.stdout)[-1]
        assert done["confirmed"] is True
        assert all(n > 0 for n in done["multifd"]["pages"].values()), done["multifd"]
        assert dst.wait_migration(timeout=120)["status"] == "completed"
        received = np.fromfile(dst.image_path, np.uint8)
        assert np.array_equal(received, source)


# --- over QMP: serve, as management software drives QEMU -------------------------------------
def _tls_object(creds: Path, endpoint: str) -> dict[str, object]:
    return {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(creds), "endpoint": endpoint,
            "verify-peer": True}


async def _multifd_tls_destination(dst: Any, creds: dict[str, Path], rule: str) -> str:
    await dst.x("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
    await dst.x("object-add", _tls_object(creds["server"], "server"))
    await dst.x("object-add", {"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                               "rules": [{"match": rule, "policy": "allow", "format": "glob"}]})
    await dst.x("migrate-set-parameters", {"multifd-channels": 2, "tls-creds": "tls0", "tls-authz": "auth0"})
    return str(await dst.incoming_uri())


@pytest.mark.parametrize("allowed", [True, False], ids=["authorized", "not-authorized"])
def test_serve_to_serve_multifd_over_tls(tmp_path: Path, creds: dict[str, Path], allowed: bool) -> None:
    """multifd (2 channels) with tls-creds and tls-authz on both serve ends: each channel
    handshakes and is authorized. Authorized: completed, same RAM, both channels carried
    pages. Not authorized: the source fails; the destination refuses every connection
    (one MIGNET_CONNECTION_REFUSED each, as QEMU reports a failed incoming handshake and
    keeps listening), loads nothing, and stays cancellable."""
    import asyncio

    from tests.support.qmp_serve import FINAL, serve

    rule = "CN=mignet test *" if allowed else "CN=someone else"

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "32M", "--fill", "mixed") as src:
            uri = await _multifd_tls_destination(dst, creds, rule)
            await src.x("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
            await src.x("object-add", _tls_object(creds["client"], "client"))
            await src.x("migrate-set-parameters", {"multifd-channels": 2, "tls-creds": "tls0",
                                                   "tls-hostname": "localhost"})
            await src.x("migrate", {"uri": uri})
            done = await src.wait_status(*FINAL, timeout=60)
            if allowed:
                got = await dst.wait_status(*FINAL, timeout=60)
                assert done["status"] == got["status"] == "completed", (done, got)
                a, b = await src.x("x-mignet-query-guest"), await dst.x("x-mignet-query-guest")
                assert a["ram-sha256"] == b["ram-sha256"]
                got_ch = (await dst.x("x-mignet-query-multifd"))["incoming"]
                assert got_ch["channels"] == 2 and all(n > 0 for n in got_ch["pages"].values())
                assert got_ch["refused"] == []
            else:
                assert done["status"] == "failed", done
                refused: list[str] = []
                deadline = time.monotonic() + 30
                while not refused:  # the destination reports in its own time
                    assert time.monotonic() < deadline, "no MIGNET_CONNECTION_REFUSED"
                    refused += [e["data"]["reason"] for e in dst.events("MIGNET_CONNECTION_REFUSED")]
                    await asyncio.sleep(0.05)
                assert all("is not authorized" in r for r in refused), refused
                info = await dst.x("query-migrate")
                assert info["status"] not in FINAL and info.get("ram", {}).get("transferred", 0) == 0, info
                await dst.x("migrate-cancel")
                assert (await dst.wait_status(*FINAL, timeout=10))["status"] == "cancelled"
    asyncio.run(main())


@pytest.mark.qemu
@qemu
def test_real_qemu_multifd_with_tls_into_serve(tmp_path: Path, creds: dict[str, Path]) -> None:
    """QEMU 7.2 with multifd (2 channels) and tls-creds into ``serve --incoming defer``
    with multifd, tls-creds and tls-authz set over QMP: byte-identical."""
    import asyncio

    from tests.support.qmp_serve import FINAL, serve

    out = tmp_path / "received"

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--out", str(out)) as dst:
            uri = await _multifd_tls_destination(dst, creds, "CN=mignet test client")
            with QemuSource(tmp_path / "q", mem_mib=128, fill="random", seed=24) as src:
                src.qmp("object-add", _tls_object(creds["client"], "client"))
                info = await asyncio.to_thread(src.migrate, uri, None, 180, {"multifd": True},
                                               {"multifd_channels": 2, "tls_creds": "tls0",
                                                "tls_hostname": "localhost"})
                assert info["status"] == "completed", info
                assert (await dst.wait_status(*FINAL, timeout=60))["status"] == "completed"
                got_ch = (await dst.x("x-mignet-query-multifd"))["incoming"]
                assert got_ch["channels"] == 2 and all(n > 0 for n in got_ch["pages"].values())
                assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8),
                                      np.fromfile(src.image_path, np.uint8))
    asyncio.run(main())


# --- the receiver itself ------------------------------------------------------------------
def _classify_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mig/dst/multifd-classify"]


def _tls_receiver(server_creds: Path, **kwargs: Any) -> Any:
    """A MultifdReceiver on a fresh tcp: listener, handshaking every connection with
    ``server_creds`` (as recv --tls-creds), already accepting."""
    from mignet.errors import MignetError
    from mignet.migration.multifd import MultifdReceiver, PollableListener
    from mignet.tcp import SocketChannel
    from mignet.tcp.tls import tls_server, tls_server_context
    from mignet.transport import listen

    ctx = tls_server_context(server_creds)
    listener = listen("tcp:127.0.0.1:0")
    rx = MultifdReceiver(cast(PollableListener, listener), handshake=lambda raw, on_wrapped: tls_server(
        cast(SocketChannel, raw), ctx, on_wrapped=on_wrapped), **kwargs)
    threading.Thread(target=lambda: pytest.raises(MignetError, rx.accept_main), daemon=True).start()
    return rx


def _stalled_in_handshake(rx: Any) -> socket.socket:
    """A stranger that sent half a ClientHello, once the receiver's handshake with it runs."""
    stranger = _tls_stranger(str(rx.listener.address), None, b"")
    assert stranger is not None
    deadline = time.monotonic() + 10
    while not _classify_threads():  # accepted: its handshake has begun
        assert time.monotonic() < deadline, "the stranger was never accepted"
        time.sleep(0.02)
    time.sleep(0.3)  # well into the handshake, which waits for the rest of the hello
    return stranger


def test_closing_the_receiver_interrupts_a_handshake_under_way(creds: dict[str, Path]) -> None:
    """A stranger that stalls in its TLS handshake, then the receiver is closed (a cancel,
    the migration's end): the handshake is cut at once, not after its 30 s limit; the
    classify thread is gone within a second and the stranger reads EOF."""
    rx = _tls_receiver(creds["server"])
    stranger = _stalled_in_handshake(rx)
    try:
        rx.close()
        deadline = time.monotonic() + 1.0
        while _classify_threads() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _classify_threads(), "the handshake outlived close()"
        stranger.settimeout(2.0)
        assert stranger.recv(1) == b""  # EOF: the destination let go of it
    finally:
        stranger.close()


def test_a_stranger_stalled_in_its_handshake_does_not_hold_the_first_sync(creds: dict[str, Path]) -> None:
    """At the first RAM end-of-section the receiver settles the connections still being
    classified (QEMU's channels are all there by then); a stranger stalled in its handshake
    has nothing more to say and is not waited for, however long the settle limit is."""
    rx = _tls_receiver(creds["server"], settle_timeout=30.0)
    stranger = _stalled_in_handshake(rx)
    try:
        t0 = time.monotonic()
        rx._settle()
        took = time.monotonic() - t0
        assert took < 5.0, f"the first sync waited {took:.1f} s for a stalled handshake"
    finally:
        rx.close()
        stranger.close()
