"""TLS like QEMU's: credentials folders in QEMU's layout (made here with openssl), mignet ↔
mignet over TLS, peers without the right certificate refused before a page moves, and real
QEMU 7.2 (``tls-creds-x509``) migrating into ``mignet recv --tls-creds``. Real processes,
real sockets, real handshakes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mignet.cli import exits
from mignet.guest.directory import block_filename
from tests.support.cli import one_line, start_recv
from tests.support.qemu_peer import QemuSource, qemu_skip_reason
from tests.support.tls import make_creds

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_creds(tmp_path_factory.mktemp("tls"))


def _send(cmd: list[str], env: dict[str, str], uri: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, "send", uri, "--size", "16M", "--fill", "mixed", "--json", "--quiet", *extra],
                          capture_output=True, text=True, env=env, timeout=120)


def test_mignet_to_mignet_over_tls(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                   creds: dict[str, Path]) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]))
    sent = _send(mignet_cmd, subprocess_env, uri, "--tls-creds", str(creds["client"]))
    stdout, stderr = recv.communicate(timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert recv.returncode == 0, stderr
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got["ram_digest"] == json.loads(sent.stdout.strip().splitlines()[-1])["ram_digest"]


@pytest.mark.parametrize("client", ["rogue", "anon"], ids=["other-CA", "no-certificate"])
def test_an_unauthenticated_source_is_refused_before_a_page(
        mignet_cmd: list[str], subprocess_env: dict[str, str], creds: dict[str, Path],
        tmp_path: Path, client: str) -> None:
    """Refused at the handshake, before a byte of the stream; the receiver says so and keeps
    listening (issue 13: a stranger must not take the migration's place), so the real
    source that comes next gets in."""
    out = tmp_path / "out"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]), "--out", str(out))
    assert recv.stdout is not None
    sent = _send(mignet_cmd, subprocess_env, uri, "--tls-creds", str(creds[client]))
    assert sent.returncode != 0
    refused = json.loads(recv.stdout.readline())
    assert refused["event"] == "refused" and "TLS handshake failed" in refused["reason"], refused
    assert not list(out.glob("*.ram"))  # not a page was placed
    good = _send(mignet_cmd, subprocess_env, uri, "--tls-creds", str(creds["client"]))
    stdout, stderr = recv.communicate(timeout=60)
    assert good.returncode == 0 and recv.returncode == 0, good.stderr + stderr
    assert json.loads(stdout.splitlines()[-1])["ram_digest"] == json.loads(good.stdout)["ram_digest"]
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_a_stalled_stranger_does_not_take_the_tls_listener(
        mignet_cmd: list[str], subprocess_env: dict[str, str], creds: dict[str, Path]) -> None:
    """A client that connects and says nothing does not hold up the source that comes
    after it: every connection is handshaken in its own thread, so the source completes
    while the stranger still waits for its handshake grace (TLS_GRACE) to pass — no
    refusal comes before the completion."""
    import socket

    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]))
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port))):  # the stranger: connected, silent
        sent = _send(mignet_cmd, subprocess_env, uri, "--tls-creds", str(creds["client"]))
        stdout, stderr = recv.communicate(timeout=60)
    assert sent.returncode == 0 and recv.returncode == 0, sent.stderr + stderr
    events = [json.loads(line)["event"] for line in stdout.splitlines()]
    assert events[-1] == "completed" and "refused" not in events, events


def test_a_destination_the_source_cannot_verify_is_refused(
        mignet_cmd: list[str], subprocess_env: dict[str, str], creds: dict[str, Path]) -> None:
    # the receiver refuses the aborted handshake, says so and goes on listening
    for extra, says in (((), "TLS handshake failed: the server is not authenticated"),
                        (("--tls-hostname", "elsewhere.example"), "TLS handshake failed")):
        folder = "wrong-ca" if not extra else "client"
        recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]))
        assert recv.stdout is not None
        sent = _send(mignet_cmd, subprocess_env, uri, "--tls-creds", str(creds[folder]), *extra)
        assert sent.returncode != 0
        one_line(sent.stderr, says)
        assert json.loads(recv.stdout.readline())["event"] == "refused"
        assert recv.poll() is None  # still listening for the real source
        recv.kill()
        recv.wait()


def test_a_source_that_never_came_points_at_the_refused(
        mignet_cmd: list[str], subprocess_env: dict[str, str], creds: dict[str, Path]) -> None:
    """recv --timeout with only a refused client meanwhile: the timeout's one line says how
    many were refused and where to read why (with TLS they did connect)."""
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]), "--timeout", "4")
    assert _send(mignet_cmd, subprocess_env, uri, "--tls-creds", str(creds["rogue"])).returncode != 0
    stdout, stderr = recv.communicate(timeout=60)
    assert recv.returncode == exits.TIMEOUT, stderr
    one_line(stderr, "(1 refused: see the refused events)")
    assert [json.loads(line)["event"] for line in stdout.splitlines()] == ["refused", "error"]


def test_recv_with_a_bad_credentials_folder_fails_at_start(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """The server's credentials are loaded once, before listening: a folder without them is
    a setup error in one line at once, not a refusal of every source that comes (and,
    without --timeout, a wait for ever)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--quiet",
                           "--tls-creds", str(empty)],
                          capture_output=True, text=True, env=subprocess_env, timeout=30)
    assert done.returncode == exits.SETUP, done
    one_line(done.stderr, "cannot load ca-cert.pem")
    assert "listening" not in done.stdout


def test_migrate_incoming_with_unusable_credentials_is_an_error_reply(
        tmp_path: Path, creds: dict[str, Path]) -> None:
    """QMP: a tls-creds-x509 object whose folder has the CA but no server certificate
    (object-add checks only the CA): migrate-incoming answers the error and does not
    listen, instead of refusing every source later."""
    import asyncio

    from tests.support.qmp_serve import serve

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst:
            await dst.x("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                       "dir": str(creds["anon"]), "endpoint": "server"})
            await dst.x("migrate-set-parameters", {"tls-creds": "tls0"})
            cls, desc = await dst.error("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            assert cls == "GenericError" and "server-cert.pem" in desc and "\n" not in desc, desc
            assert (await dst.x("query-migrate")).get("status") in (None, "none")
    asyncio.run(main())


@pytest.mark.parametrize("multifd", [False, True], ids=["one-stream", "multifd"])
def test_migrate_cancel_cuts_a_tls_handshake_under_way(tmp_path: Path, creds: dict[str, Path],
                                                       multifd: bool) -> None:
    """serve with tls-creds: a client stalls half-way through its ClientHello, then
    migrate-cancel. The handshake is cut at once (not after its 30 s limit): cancelled
    within seconds, and the client reads EOF."""
    import asyncio
    import socket

    from tests.support.qmp_serve import FINAL, serve

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst:
            await dst.x("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                       "dir": str(creds["server"]), "endpoint": "server"})
            await dst.x("migrate-set-capabilities",
                        {"capabilities": [{"capability": "multifd", "state": multifd}]})
            await dst.x("migrate-set-parameters", {"tls-creds": "tls0"})
            host, port = (await dst.incoming_uri()).removeprefix("tcp:").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as stranger:
                stranger.sendall(bytes.fromhex("16030100c8010000c40303"))  # half a ClientHello
                await asyncio.sleep(0.5)  # accepted, its handshake waiting for the rest
                await dst.x("migrate-cancel")
                got = await dst.wait_status(*FINAL, timeout=5)
                assert got["status"] == "cancelled", got
                assert await asyncio.to_thread(stranger.recv, 1) == b""
    asyncio.run(main())


qemu = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")


@pytest.mark.qemu
@qemu
def test_real_qemu_with_tls_into_recv(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                      creds: dict[str, Path], tmp_path: Path) -> None:
    """QEMU 7.2 with ``object-add tls-creds-x509,endpoint=client`` and ``tls-creds`` set
    migrates a paused 64 MiB guest into ``mignet recv --tls-creds``: byte-identical."""
    out = tmp_path / "received"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]), "--out", str(out))
    with QemuSource(tmp_path, mem_mib=64, fill="random", seed=3) as src:
        src.qmp("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(creds["client"]),
                               "endpoint": "client", "verify-peer": True})
        info = src.migrate(uri, parameters={"tls_creds": "tls0", "tls_hostname": "localhost"}, timeout=120)
        assert info["status"] == "completed", info
        _, stderr = recv.communicate(timeout=60)
        assert recv.returncode == 0, stderr
        assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8),
                              np.fromfile(src.image_path, np.uint8))


def test_listening_beyond_loopback_without_tls_warns_in_one_line(mignet_cmd: list[str],
                                                                 subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "recv", "--listen", "tcp:0.0.0.0:0", "--timeout", "0.5", "--quiet"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 2, r.stderr  # the warning, then the timeout
    assert "is reachable from other hosts and not encrypted or authenticated: use --tls-creds" in lines[0]
    quiet = subprocess.run([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--timeout", "0.5",
                            "--quiet"], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert "warning" not in quiet.stderr


@pytest.mark.qemu
@qemu
def test_replay_into_real_qemu_over_tls(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                        creds: dict[str, Path], tmp_path: Path) -> None:
    """mignet as QEMU's TLS source: a captured guest replayed with ``send --snapshot
    --tls-creds`` into ``qemu -incoming`` whose ``tls-creds-x509,endpoint=server`` verifies
    the client; QEMU completes, confirms on the return path, and holds the same RAM."""
    from tests.support.qemu_peer import QemuDestination

    snap = tmp_path / "snap"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(snap))
    with QemuSource(tmp_path / "src", mem_mib=64, fill="random", seed=8) as src:
        assert src.migrate(uri, timeout=120)["status"] == "completed"
    _, stderr = recv.communicate(timeout=60)
    assert recv.returncode == 0, stderr
    with QemuDestination(tmp_path / "dst", mem_mib=64) as dst:
        dst.qmp("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(creds["server"]),
                               "endpoint": "server", "verify-peer": True})
        dst.migrate_incoming("tcp:127.0.0.1:0", parameters={"tls_creds": "tls0"})
        target = dst.listen_uri()
        assert target is not None
        sent = subprocess.run([*mignet_cmd, "send", target, "--snapshot", str(snap), "--json", "--quiet",
                               "--tls-creds", str(creds["client"]), "--tls-hostname", "localhost"],
                              capture_output=True, text=True, env=subprocess_env, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout.strip().splitlines()[-1])["confirmed"] is True
        assert dst.wait_migration(timeout=120)["status"] == "completed"
        assert np.array_equal(np.fromfile(dst.image_path, np.uint8),
                              np.fromfile(snap / block_filename("m0"), np.uint8))


@pytest.mark.parametrize(("rules", "allowed"), [
    (["CN=mignet test client"], True),
    (["CN=someone else", "CN=mignet test *"], True),
    (["CN=someone else"], False),
], ids=["exact", "glob", "not-listed"])
def test_authz_lets_in_only_listed_client_names(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                creds: dict[str, Path], rules: list[str], allowed: bool) -> None:
    """``--tls-authz`` as QEMU's authz-list (policy deny): a verified client whose name no
    rule matches is refused in one line before a page moves."""
    extra = [a for rule in rules for a in ("--tls-authz", rule)]
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--tls-creds", str(creds["server"]), *extra)
    assert recv.stdout is not None
    sent = _send(mignet_cmd, subprocess_env, uri, "--tls-creds", str(creds["client"]))
    if allowed:
        stdout, stderr = recv.communicate(timeout=60)
        assert sent.returncode == 0 and recv.returncode == 0, sent.stderr + stderr
    else:  # refused and said; the receiver keeps listening for an authorized source
        assert sent.returncode != 0
        refused = json.loads(recv.stdout.readline())
        assert "TLS client 'CN=mignet test client' is not authorized" in refused["reason"], refused
        assert recv.poll() is None
        recv.kill()
        recv.wait()


def test_tls_options_without_creds_are_refused(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--tls-authz", "CN=x"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == 2
    one_line(r.stderr, "--tls-authz has no effect without --tls-creds")


# --- over QMP, as QEMU is configured ------------------------------------------------------
def _tls_objects(creds: Path, endpoint: str) -> dict[str, object]:
    return {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(creds), "endpoint": endpoint,
            "verify-peer": True}


@pytest.mark.parametrize("allowed", [True, False], ids=["authorized", "not-authorized"])
def test_serve_to_serve_over_tls_with_authz(tmp_path: Path, creds: dict[str, Path], allowed: bool) -> None:
    """object-add tls-creds-x509 and authz-list, migrate-set-parameters tls-creds/tls-authz
    on both ends, as management software does it with QEMU."""
    import asyncio

    from tests.support.qmp_serve import FINAL, serve

    rule = "CN=mignet test *" if allowed else "CN=someone else"

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "16M", "--fill", "mixed") as src:
            await dst.x("object-add", _tls_objects(creds["server"], "server"))
            await dst.x("object-add", {"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                                       "rules": [{"match": rule, "policy": "allow", "format": "glob"}]})
            await dst.x("migrate-set-parameters", {"tls-creds": "tls0", "tls-authz": "auth0"})
            uri = await dst.incoming_uri()
            await src.x("object-add", _tls_objects(creds["client"], "client"))
            await src.x("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "localhost"})
            await src.x("migrate", {"uri": uri})
            done, got = await src.wait_status(*FINAL, timeout=60), await dst.wait_status(*FINAL, timeout=60)
            if allowed:
                assert done["status"] == got["status"] == "completed", (done, got)
                a, b = await src.x("x-mignet-query-guest"), await dst.x("x-mignet-query-guest")
                assert a["ram-sha256"] == b["ram-sha256"]
            else:
                assert done["status"] == got["status"] == "failed", (done, got)
                assert "not authorized" in got["error-desc"]
    asyncio.run(main())


def test_tls_objects_are_checked_as_qemu_does(tmp_path: Path, creds: dict[str, Path]) -> None:
    import asyncio

    from tests.support.qmp_serve import serve

    async def main() -> None:
        async with serve(tmp_path, "src", "--size", "4M") as src:
            await src.x("object-add", _tls_objects(creds["client"], "client"))
            cls, desc = await src.error("object-add", _tls_objects(creds["client"], "client"))
            assert cls == "GenericError" and "duplicate property 'tls0'" in desc
            _, desc = await src.error("object-add", {"qom-type": "memory-backend-ram", "id": "m"})
            assert "qom-type" in desc
            await src.x("migrate-set-parameters", {"tls-creds": "nope"})
            _, desc = await src.error("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert desc == "No TLS credentials with id 'nope'"
            await src.x("migrate-set-parameters", {"tls-creds": "tls0"})  # not locked by the refusal
            await src.x("object-del", {"id": "tls0"})
            _, desc = await src.error("object-del", {"id": "tls0"})
            assert desc == "object 'tls0' not found"
    asyncio.run(main())


@pytest.mark.qemu
@qemu
def test_real_qemu_with_tls_into_serve(tmp_path: Path, creds: dict[str, Path]) -> None:
    """The same QMP on both ends: QEMU 7.2 with tls-creds into a serve destination with
    tls-creds and tls-authz; byte-identical."""
    import asyncio

    from tests.support.qmp_serve import FINAL, serve

    out = tmp_path / "received"

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--out", str(out)) as dst:
            await dst.x("object-add", _tls_objects(creds["server"], "server"))
            await dst.x("object-add", {"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                                       "rules": [{"match": "CN=mignet test client", "policy": "allow"}]})
            await dst.x("migrate-set-parameters", {"tls-creds": "tls0", "tls-authz": "auth0"})
            uri = await dst.incoming_uri()
            with QemuSource(tmp_path / "q", mem_mib=64, fill="random", seed=4) as src:
                src.qmp("object-add", _tls_objects(creds["client"], "client"))
                info = await asyncio.to_thread(src.migrate, uri, None, 120, None,
                                               {"tls_creds": "tls0", "tls_hostname": "localhost"})
                assert info["status"] == "completed", info
                assert (await dst.wait_status(*FINAL, timeout=60))["status"] == "completed"
                assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8),
                                      np.fromfile(src.image_path, np.uint8))
    asyncio.run(main())


def test_a_tls_listener_ends_at_its_timeout_in_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                        creds: dict[str, Path]) -> None:
    """--timeout bounds the wait for a source that completes the handshake, strangers or not."""
    import subprocess as sp
    r = sp.run([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--tls-creds", str(creds["server"]),
                "--timeout", "1", "--quiet"], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.TIMEOUT
    one_line(r.stderr, "within 1")


def test_a_tls_channel_peeks_without_consuming(creds: dict[str, Path]) -> None:
    """What a destination classifies a connection by, after its handshake: a peek decrypts
    into the channel's own buffer, the next reads return those bytes first (vectored reads
    across it too), and a waiter sees them as ready although the socket has nothing new."""
    import threading

    from mignet.channel import IOCondition
    from mignet.tcp import connect_socket, listen_socket
    from mignet.tcp.tls import TlsChannel, tls_client, tls_server, tls_server_context
    from mignet.uri import parse_uri

    with listen_socket(parse_uri("tcp:127.0.0.1:0")) as listener:
        box: dict[str, TlsChannel] = {}
        t = threading.Thread(target=lambda: box.update(
            server=tls_server(listener.accept(timeout=10), tls_server_context(creds["server"]), timeout=10)))
        t.start()
        client = tls_client(connect_socket(listener.address), creds["client"], "localhost", timeout=10)
        t.join(10)
    server = box["server"]
    with client, server:
        client.write_all(b"QEVM\x00\x00\x00\x03rest")
        server.set_idle_timeout(read=5)
        assert server.peek(4) == b"QEVM"
        assert server.peek(8) == b"QEVM\x00\x00\x00\x03"  # more is decrypted into the buffer
        assert server.wait_cond(IOCondition.IN, timeout=0)
        head, tail = bytearray(2), bytearray(10)
        assert server.readv_into([head, tail]) == 12
        assert bytes(head + tail) == b"QEVM\x00\x00\x00\x03rest"
        client.close()
        assert server.peek(1) == b""  # the end, once the buffer is drained
