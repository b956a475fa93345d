"""Options are checked before anything connects or listens (issue 14): a typo on one end
must not kill the other end, and an option the command would ignore is refused. --help
shows defaults and a help text for everything, whole at 80 columns."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from mignet.cli import exits
from mignet.cli.main import build_parser
from tests.support.cli import one_line, send_into, start_recv


def _run(cmd: list[str], env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _usage_error(r: subprocess.CompletedProcess[str], pattern: str) -> str:
    assert r.returncode == exits.USAGE, r.stderr
    return one_line(r.stderr, pattern)


BAD_SENDS = [
    (["--size", "16M", "--max-bandwidth", "10Mbit/s"], "bit rates are not accepted (10Mbit/s is 1.2MiB/s)"),
    (["--size", "16M", "--live", "--dirty-rate", "fast"], "bad rate 'fast'"),
    (["--size", "16Q"], "bad size '16Q'"),
    (["--size", "0"], "more than 0"),
    (["--size", "16M", "--dirty-rate", "64MiB/s"], "--dirty-rate has no effect without --live"),
    (["--size", "16M", "--auto-converge"], "--auto-converge has no effect without --live"),
    (["--size", "16M", "--channels", "256"], "--channels: takes 1 to 255, not 256"),
    (["--image", "/dev/null", "--live"], "--live migrates a running guest: give --size, or --snapshot"),
    (["--image", "/dev/null", "--fill", "zero"], "--fill has no effect without --size"),
    (["--stream", "/dev/null", "--max-bandwidth", "1M"], "--max-bandwidth has no effect with --stream"),
    (["--size", "16M", "--rdma-pin-all"], "--rdma-pin-all has no effect without an rdma: URI"),
    (["--size", "16M", "--live", "--return-path"], "--return-path has no effect with --live"),
    (["--size", "16M", "--rdma-protocol", "qemu"], "--rdma-protocol has no effect without an rdma: URI"),
]


def test_bad_send_options_leave_the_waiting_receiver_alone(mignet_cmd: list[str],
                                                          subprocess_env: dict[str, str]) -> None:
    """Each bad command line fails in one line with the usage status and never connects:
    the receiver still waits afterwards and then takes a good migration."""
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    for args, pattern in BAD_SENDS:
        _usage_error(_run(mignet_cmd, subprocess_env, "send", uri, *args), pattern)
        assert recv.poll() is None, f"{args} reached the receiver: {recv.communicate()[1]}"
    sent, got = send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "8M", "--fill", "mixed")
    assert got["ram_digest"] == sent["ram_digest"]


def test_bit_rates_refused_with_their_byte_rate() -> None:
    from mignet.errors import SetupError
    from mignet.units import parse_rate

    for text, said in [("1Gbps", "119.2MiB/s"), ("100Mb/s", "11.9MiB/s"), ("8kbit/s", "1000B/s"),
                       ("1Mib/s", "128.0KiB/s")]:
        with pytest.raises(SetupError, match="bit rates are not accepted") as info:
            parse_rate(text)
        assert said in str(info.value)
    assert parse_rate("128MiB/s") == parse_rate("128M") == 128 << 20


def test_serve_refuses_the_other_roles_options(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                               tmp_path: Path) -> None:
    sock = tmp_path / "qmp"
    r = _run(mignet_cmd, subprocess_env, "serve", "--qmp", f"unix:{sock}", "--size", "16M",
             "--out", str(tmp_path / "x"), "--recv-model", "coroutine")
    _usage_error(r, "--out, --recv-model have no effect on a source")
    r = _run(mignet_cmd, subprocess_env, "serve", "--qmp", f"unix:{sock}", "--incoming", "defer",
             "--dirty-rate", "64MiB/s", "--fill", "zero")
    _usage_error(r, "--fill, --dirty-rate have no effect on a destination")
    r = _run(mignet_cmd, subprocess_env, "serve", "--qmp", "rdma:1.2.3.4:5", "--incoming", "defer")
    _usage_error(r, "QMP listens on unix:PATH or tcp:HOST:PORT")
    r = _run(mignet_cmd, subprocess_env, "serve", "--qmp", f"unix:{sock}", "--incoming", "defer",
             "--max-ram", "lots")
    _usage_error(r, "bad size 'lots'")
    assert not sock.exists()  # nothing listened
    assert not (tmp_path / "x").exists()


def test_recv_and_relay_check_before_listening(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                               tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    r = _run(mignet_cmd, subprocess_env, "recv", "--listen", f"unix:{path}", "--max-ram", "2X")
    _usage_error(r, "argument --max-ram: bad size '2X'")
    r = _run(mignet_cmd, subprocess_env, "recv", "--listen", f"unix:{path}", "--timeout", "-1")
    _usage_error(r, "must be more than 0 seconds")
    r = _run(mignet_cmd, subprocess_env, "recv", "--listen", "udp:1.2.3.4:5")
    _usage_error(r, "unsupported migration URI scheme 'udp'")
    r = _run(mignet_cmd, subprocess_env, "relay", "--listen", f"unix:{path}", "--to", "tcp:127.0.0.1:1",
             "--progress", "1")
    _usage_error(r, "--progress has no effect without --json")
    r = _run(mignet_cmd, subprocess_env, "relay", "--listen", f"unix:{path}", "--to", "rdma:10.0.0.1:1",
             "--channels", "2")
    _usage_error(r, "--channels (multifd) needs a tcp: or unix: --to")
    assert not path.exists()


def test_send_takes_channels_over_rdma(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """Multifd over rdma: is no usage error: send gets as far as the transport (here: no RDMA
    device on the host, or nothing listening on one that has it) and says that in one line."""
    r = _run(mignet_cmd, subprocess_env, "send", "rdma:10.9.0.1:1", "--size", "4M", "--channels", "2",
             timeout=120)
    assert r.returncode not in (0, exits.USAGE), r.stderr
    one_line(r.stderr, "")


def test_unknown_option_is_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = _run(mignet_cmd, subprocess_env, "send", "tcp:127.0.0.1:1", "--size", "1M", "--bogus")
    _usage_error(r, "unrecognized arguments: --bogus")


def _subparsers(p: argparse.ArgumentParser, path: str = "mignet") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, p)]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subparsers(sub, f"{path} {name}")
    return found


def test_every_option_and_positional_has_help() -> None:
    missing = [f"{path} {a.option_strings or a.dest}"
               for path, p in _subparsers(build_parser()) for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("command", ["send", "recv", "demo", "serve", "relay", "bench tcp",
                                     "bench live", "bench recv-model", "bench rdma", ""])
def test_help_shows_defaults_whole_at_80_columns(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                 command: str) -> None:
    env = {**subprocess_env, "COLUMNS": "80"}
    r = _run(mignet_cmd, env, *command.split(), "--help")
    assert r.returncode == 0, r.stderr
    long = [line for line in r.stdout.splitlines() if len(line) > 80]
    assert long == []
    expected = {"send": ["(default: 200MiB/s)", "(default: random)", "(default: 0)", "URI "],
                "demo": ["(default: 1G)", "(default: 100MiB/s)", "(default: mixed)", "--json", "--quiet"],
                "recv": ["this host's memory,"], "bench tcp": ["(default: 2G)", "(default: 3)"],
                "bench recv-model": ["recv-model-plots-"], "bench live": ["(default: 256MiB/s)"],
                "": ["binary", "bit rates are refused"]}.get(command, ["(default: "])
    text = "".join(r.stdout.split())  # argparse wraps lines, also at hyphens
    for words in expected:
        assert "".join(words.split()) in text, (words, r.stdout)


def test_max_ram_refusal_in_human_units(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--max-ram", "4M")
    subprocess.run([*mignet_cmd, "send", uri, "--size", "8M", "--quiet"], capture_output=True, text=True,
                   env=subprocess_env, timeout=60)
    _, stderr = recv.communicate(timeout=60)
    assert recv.returncode == exits.PEER
    one_line(stderr, "source announces 8.0 MiB of RAM, more than the 4.0 MiB this destination accepts")


def test_a_subcommands_own_check_option_is_not_the_option_check(mignet_cmd: list[str],
                                                                 subprocess_env: dict[str, str]) -> None:
    """``rxe run --check`` (dest "check") lives beside the per-command option checks."""
    r = _run(mignet_cmd, subprocess_env, "rxe", "run", "--check")
    assert "Traceback" not in r.stderr
    assert r.returncode in (0, 1), r.stderr


def test_recv_timeout_must_be_a_finite_number_of_seconds(mignet_cmd: list[str],
                                                         subprocess_env: dict[str, str]) -> None:
    """'inf' parsed as a float once reached the socket layer: an OverflowError traceback."""
    r = subprocess.run([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--timeout", "inf"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == 2
    one_line(r.stderr, "must be more than 0 seconds, not inf")



def test_qemu_rdma_protocol_refuses_what_it_cannot_carry(mignet_cmd: list[str],
                                                         subprocess_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """QEMU's RDMA protocol needs the guest re-encoded (HOOK records) and carries no return
    path or multifd here: all refused before connecting (no RDMA device is needed to say so)."""
    stream = tmp_path / "s.bin"
    stream.write_bytes(b"")
    uri = "rdma:10.9.0.1:4444"
    _usage_error(_run(mignet_cmd, subprocess_env, "send", uri, "--rdma-protocol", "qemu",
                      "--stream", str(stream)), "a --stream file is replayed as it was written")
    _usage_error(_run(mignet_cmd, subprocess_env, "send", uri, "--rdma-protocol", "qemu",
                      "--size", "8M", "--return-path"), "drop --return-path")
    _usage_error(_run(mignet_cmd, subprocess_env, "send", uri, "--rdma-protocol", "qemu",
                      "--size", "8M", "--channels", "2"), "QEMU 7.2 has no multifd over rdma:")
