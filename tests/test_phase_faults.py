"""The fault matrix, per phase: a fault injected exactly when the migration reaches setup
(block list sent, no page yet), RAM (mid-pages), device state (the first device section)
or switchover (the source sent EOF and waits for the destination's SHUT), over TCP and
UNIX sockets, with one stream and (RAM) two multifd channels.

Real ``mignet send --return-path`` and ``mignet recv --out`` processes, with a real
forwarding proxy between them that finds the phase with mignet's own decoder
(tests/support/phase_proxy.py). Faults: a reset (RST both ways), a stall (nothing more
forwarded, both sides must give up by their idle timeout), one side killed (SIGKILL) and
one side cancelled (SIGINT to the sender, SIGTERM to the receiver). Every survivor must
end non-zero with one line, within 2 s of the fault (a stall: of its idle timeout), the
receiver's manifest must not claim completion and no process may be left. The measured
times are printed (``pytest -s``) and, with ``MIGNET_FAULT_LOG=FILE``, appended to FILE as
JSON lines; docs/reliability.md records them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mignet.cli import exits
from tests.support.cli import one_line, start_recv
from tests.support.phase_proxy import PHASES, Fault, Phase, PhaseProxy
from tests.support.processes import leftovers, track

DETECT = 2.0  # the bound, from the fault to a survivor's exit
SLACK = 1.0  # process exit on a loaded 2-core machine
IDLE = 3.0  # --idle-timeout on both ends, the bound of a stall

CASES = ["reset", "stall", "kill-source", "kill-destination"]
CANCELS = ["cancel-source", "cancel-destination"]


def _params() -> list[object]:
    out: list[object] = []
    for transport in ("tcp", "unix"):
        for phase in PHASES:
            for case in CASES:
                out.append(pytest.param(transport, phase, case, 1, id=f"{transport}-{phase}-{case}"))
        for case in CASES:
            out.append(pytest.param(transport, "ram", case, 2, id=f"{transport}-ram-{case}-multifd2"))
    for phase in PHASES:
        for case in CANCELS:
            out.append(pytest.param("tcp", phase, case, 1, id=f"tcp-{phase}-{case}"))
    return out


def _log(record: dict[str, object]) -> None:
    print(f"\n{json.dumps(record)}")
    path = os.environ.get("MIGNET_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.mark.parametrize(("transport", "phase", "case", "channels"), _params())
def test_a_fault_at_a_phase_ends_both_sides_promptly_and_claims_nothing(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path,
        transport: str, phase: Phase, case: str, channels: int) -> None:
    out = tmp_path / "out"
    listen = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/m.sock"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out), "--digest", "none",
                           "--idle-timeout", str(IDLE), uri=listen)
    target: tuple[str, int] | str
    if transport == "tcp":
        host, port = uri.removeprefix("tcp:").rsplit(":", 1)
        target = (host, int(port))
    else:
        target = uri.removeprefix("unix:")
    fault: Fault = case if case in ("reset", "stall") else "hold"  # type: ignore[assignment]
    proxy = PhaseProxy(target, phase, fault, unix_path=tmp_path / "p.sock" if transport == "unix" else None)
    try:
        send = track(subprocess.Popen(
            [*mignet_cmd, "send", proxy.uri, "--size", "16M", "--fill", "random", "--return-path",
             "--idle-timeout", str(IDLE), "--channels", str(channels), "--digest", "none", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env))
        procs = {"source": send, "destination": recv}
        ended: dict[str, float] = {}
        errors: dict[str, str] = {}

        def wait(name: str) -> None:
            _, errors[name] = procs[name].communicate(timeout=60)
            ended[name] = time.monotonic()
        waiters = [threading.Thread(target=wait, args=(n,), daemon=True) for n in procs]
        for w in waiters:
            w.start()
        deadline = time.monotonic() + 60
        while not proxy.reached.wait(0.05):
            assert not ended, f"ended before the phase: {errors}"
            assert time.monotonic() < deadline, "the phase never came"
        victim = case.partition("-")[2] or None
        t0 = proxy.at
        if case.startswith("kill-"):
            procs[victim].send_signal(signal.SIGKILL)  # type: ignore[index]
            t0 = time.monotonic()
        elif case.startswith("cancel-"):
            procs[victim].send_signal(signal.SIGINT if victim == "source" else signal.SIGTERM)  # type: ignore[index]
            t0 = time.monotonic()
        assert t0 is not None
        for w in waiters:
            w.join(60)
        assert proxy.error is None, repr(proxy.error)
        took = {name: round(at - t0, 2) for name, at in ended.items()}
        _log({"transport": transport, "phase": phase, "case": case, "channels": channels, "took": took,
              "rc": {n: p.returncode for n, p in procs.items()},
              "errors": {n: e.strip() for n, e in errors.items()}})
        bound = DETECT + (IDLE if case == "stall" else 0) + SLACK
        for name, proc in procs.items():
            if case.startswith("kill-") and name == victim:
                assert proc.returncode == -signal.SIGKILL
                continue
            assert proc.returncode not in (0, None), (name, errors[name])
            line = one_line(errors[name], "")
            if case.startswith("cancel-") and name == victim:
                assert proc.returncode == 130, (name, line)
            assert took[name] < bound, f"{name} ended {took[name]} s after the fault"
            if case == "stall":  # it waited for its idle limit, not for something else
                assert took[name] > IDLE * 0.8, f"{name} ended {took[name]} s after the stall"
                assert proc.returncode == exits.TIMEOUT, (name, line)
        manifest = out / "manifest.json"
        if manifest.exists():
            assert json.loads(manifest.read_text())["complete"] is False
        assert not leftovers(root=os.getpid(), grace=3.0)
    finally:
        proxy.close()
