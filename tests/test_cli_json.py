"""Scripting mignet (issue 14): with --json every failure is one JSON error object on
stdout, each kind of failure has its own exit status (mignet/cli/exits.py, docs/cli.md),
and ``send --json`` keeps one shape with and without --live."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mignet.cli import exits
from tests.support.cli import one_line, send_into, start_recv
from tests.support.processes import track
from tests.support.streams import resetting_peer

ROOT = Path(__file__).resolve().parents[1]


def _error_object(stdout: str, code: int) -> dict[str, Any]:
    """The last stdout line: the one JSON error object, with the status it exited with."""
    obj = json.loads(stdout.strip().splitlines()[-1])
    assert obj["event"] == "error"
    assert obj["exit"] == code
    assert obj["kind"] == exits.KINDS[code]
    assert obj["error"] and "\n" not in obj["error"]
    return obj


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_usage_error_as_json(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "send", "tcp:127.0.0.1:1", "--size", "1M", "--max-bandwidth", "1Gbps",
                        "--json"], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.USAGE
    assert "bit rates" in _error_object(r.stdout, exits.USAGE)["error"]
    one_line(r.stderr, "bit rates")


def test_setup_error_as_json(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "send", f"tcp:127.0.0.1:{_free_port()}", "--size", "1M", "--json"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.SETUP
    assert "nothing is listening" in _error_object(r.stdout, exits.SETUP)["error"]


def test_peer_error_as_json(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    proc, uri = start_recv(mignet_cmd, subprocess_env)
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == exits.PEER, stderr
    assert "not a migration stream" in _error_object(stdout, exits.PEER)["error"]
    one_line(stderr, "not a migration stream")


def test_connection_lost_as_json(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """A server that reads a little and resets the connection."""
    with resetting_peer() as uri:
        r = subprocess.run([*mignet_cmd, "send", uri, "--size", "64M", "--json", "--quiet"],
                           capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.CONNECTION_LOST, r.stderr
    _error_object(r.stdout, exits.CONNECTION_LOST)


def test_timeout_as_json(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--timeout", "0.5", "--json",
                        "--quiet"], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.TIMEOUT, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["event"] == "listening"
    _error_object(r.stdout, exits.TIMEOUT)


def test_ctrl_c_on_serve_is_cancelled_in_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    proc = track(subprocess.Popen([*mignet_cmd, "serve", "--qmp", f"unix:{tmp_path / 'qmp'}", "--incoming",
                                   "defer", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=subprocess_env))
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["event"] == "qmp-listening"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == exits.CANCELLED
    one_line(stderr, "stopped by Ctrl-C")
    _error_object(stdout, exits.CANCELLED)


def test_ctrl_c_on_a_waiting_recv_is_cancelled(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    proc, _ = start_recv(mignet_cmd, subprocess_env)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == exits.CANCELLED, stderr
    _error_object(stdout, exits.CANCELLED)


def test_send_json_has_one_shape_with_and_without_live(mignet_cmd: list[str],
                                                       subprocess_env: dict[str, str]) -> None:
    shapes = []
    for extra in ([], ["--live", "--dirty-rate", "8MiB/s"]):
        proc, uri = start_recv(mignet_cmd, subprocess_env)
        sent, got = send_into(mignet_cmd, subprocess_env, proc, uri, "--size", "8M", *extra)
        assert sent["ram_digest"] == got["ram_digest"] and sent["digest"] == "xxh3"
        assert sent["live"] is bool(extra)
        assert (sent["migration"] is not None) is bool(extra)
        assert sent["rdma"] is None  # over rdma: which protocol ran (tests/rdma)
        shapes.append(sorted(sent))
    assert shapes[0] == shapes[1]
    assert shapes[0] == sorted(["event", "digest", "ram_digest", "block_digests", "transferred", "seconds",
                                "confirmed", "live", "migration", "multifd", "stream", "rdma"])


def test_demo_json_and_quiet(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "demo", "--size", "16M", "--dirty-rate", "4MiB/s", "--json", "--quiet"],
                       capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    done = json.loads(lines[0])
    assert done["event"] == "completed" and done["identical"] is True
    assert done["ram_digest"] == done["received_digest"] and done["digest"] == "xxh3"
    assert "demo result" not in r.stderr and "live-migrating" not in r.stderr


@pytest.mark.parametrize("code", sorted(exits.KINDS))
def test_every_exit_status_is_documented(code: int) -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert f"| {code} | `{exits.KINDS[code]}` |" in doc
    assert "docs/cli.md" in (ROOT / "README.md").read_text()
