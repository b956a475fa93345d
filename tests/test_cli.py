"""The command line, as separate processes over real loopback sockets."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mignet.guest.ram import GuestRam, block_filename
from tests.support.cli import one_line_error, send_into, start_recv
from tests.support.streams import resetting_peer


def test_send_to_recv_between_processes_digest_matches(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "guest"
    proc, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    sent, got = send_into(mignet_cmd, subprocess_env, proc, uri,
                          "--size", "48M", "--fill", "mixed", "--seed", "5")
    assert got["ram_digest"] == sent["ram_digest"]
    expected = GuestRam.generate(48 << 20, "mixed", seed=5)
    assert got["ram_digest"] == expected.digest("xxh3")
    ram_file = out / block_filename("pc.ram")
    assert np.array_equal(np.fromfile(ram_file, np.uint8), expected["pc.ram"].data)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ram_digest"] == expected.digest("xxh3") and manifest["digest"] == "xxh3"
    devices = json.loads((out / "devices.json").read_text())
    assert [d["idstr"] for d in devices["devices"]] == ["mignet-cpu/0", "mignet-cpu/1", "mignet-serial", "mignet-timer"]


def test_bad_uri(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "send", "http://x", "--size", "1M"], capture_output=True, text=True,
                       env=subprocess_env, timeout=60)
    one_line_error(r, "tcp:HOST:PORT")


def test_port_in_use(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = subprocess.run([*mignet_cmd, "recv", "--listen", f"tcp:127.0.0.1:{port}"], capture_output=True,
                           text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "already in use")


def test_nothing_listening(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    r = subprocess.run([*mignet_cmd, "send", f"tcp:127.0.0.1:{port}", "--size", "1M"], capture_output=True,
                       text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "nothing is listening")


def test_peer_that_is_not_a_migration_source(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    proc, uri = start_recv(mignet_cmd, subprocess_env)
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _, stderr = proc.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), "not a migration stream")


def test_peer_that_is_not_a_migration_destination(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """A server that reads a little and hangs up: the sender reports a lost connection."""
    with resetting_peer() as uri:
        r = subprocess.run([*mignet_cmd, "send", uri, "--size", "64M", "--quiet"],
                           capture_output=True, text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "connection lost")


def test_send_requires_a_source(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "send", "tcp:127.0.0.1:1"], capture_output=True, text=True,
                       env=subprocess_env, timeout=60)
    one_line_error(r, "--image FILE or --size")


@pytest.mark.slow
def test_demo_says_ok(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "demo", "--size", "64M"], capture_output=True, text=True,
                       env=subprocess_env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "identical to the source" in r.stderr
