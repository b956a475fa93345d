"""Processes started by tests: stopped on every exit path, and none left behind.

Three nets, from fine to coarse:

* :func:`track` — helpers that start a process (``start_recv``, ``serve``, QEMU peers)
  register it; ``tests/conftest.py`` stops (SIGTERM, then SIGKILL) and waits for whatever a
  test registered when that test ends, passed, failed or interrupted.
* :func:`leftovers` — at the end of the session ``tests/conftest.py`` lists every process
  still alive that descends from pytest or carries the session's marker in its environment
  (``MIGNET_TEST_SESSION``, inherited by everything a test starts, even a process that left
  pytest's process tree), kills them and fails the run, naming them.
* The command line (``python tests/support/processes.py --env KEY=VALUE``) does the same for
  ``tools/test.sh``, whose runs carry ``MIGNET_TEST_RUN``: no QEMU, virtme-run or other
  process of a test run outlives it.

Only ``/proc`` is read (no psutil); zombies count as gone (they hold no memory, ports or
files). Standard library only, so the command line runs without the venv's packages.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

#: Set (to a fresh value) for the whole pytest session by ``tests/conftest.py``.
SESSION_ENV = "MIGNET_TEST_SESSION"
#: Set (to a fresh value) for a whole ``tools/test.sh`` run.
RUN_ENV = "MIGNET_TEST_RUN"


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc/PID/stat`` and ``cmdline`` show it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    name: str

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")

    @property
    def command(self) -> str:
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return self.name
        return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or self.name

    def __str__(self) -> str:
        command = self.command
        if len(command) > 160:
            command = command[:157] + "..."
        return f"pid {self.pid} ({self.name}, session {self.sid}): {command}"


def read(pid: int) -> Proc | None:
    """The process ``pid``, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    close = data.rfind(b")")  # the name may hold spaces and parentheses
    fields = data[close + 2:].split()
    if len(fields) < 4:
        return None
    name = data[data.find(b"(") + 1:close].decode(errors="replace")
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode(), name)


def processes() -> list[Proc]:
    """Every process now (threads excluded)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            proc = read(int(entry.name))
            if proc is not None:
                found.append(proc)
    return found


def has_env(pid: int, key: str, value: str) -> bool:
    """Whether ``pid`` started with ``KEY=VALUE`` in its environment."""
    try:
        return f"{key}={value}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def descendants(root: int, among: Sequence[Proc] | None = None) -> list[Proc]:
    """The processes below ``root`` in the process tree."""
    among = processes() if among is None else among
    children: dict[int, list[Proc]] = {}
    for proc in among:
        children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def ancestors(pid: int) -> set[int]:
    """``pid`` and the processes above it."""
    found = set()
    while pid > 0 and pid not in found:
        found.add(pid)
        proc = read(pid)
        if proc is None:
            break
        pid = proc.ppid
    return found


def in_session(sid: int) -> list[Proc]:
    """Live processes of session ``sid`` (a process started with ``start_new_session``)."""
    return [p for p in processes() if p.sid == sid and p.alive]


def alive_now(key: str | None = None, value: str | None = None, root: int | None = None) -> list[Proc]:
    """Live processes that carry ``KEY=VALUE`` or descend from ``root``, but never this
    process nor its ancestors."""
    everything = processes()
    mine = ancestors(os.getpid())
    chosen: dict[int, Proc] = {}
    if root is not None:
        chosen.update((p.pid, p) for p in descendants(root, everything))
    if key is not None and value is not None:
        chosen.update((p.pid, p) for p in everything if p.pid not in chosen and has_env(p.pid, key, value))
    return [p for p in chosen.values() if p.alive and p.pid not in mine]


def leftovers(key: str | None = None, value: str | None = None, root: int | None = None,
              grace: float = 5.0) -> list[Proc]:
    """What :func:`alive_now` finds once ``grace`` seconds allowed them to finish exiting."""
    deadline = time.monotonic() + grace
    while True:
        found = alive_now(key, value, root)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def kill_all(procs: Iterable[Proc], timeout: float = 5.0) -> list[Proc]:
    """SIGKILL ``procs`` and wait until they are gone; return those that are not."""
    pids = [p.pid for p in procs]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while True:
        survivors = [p for p in (read(pid) for pid in pids) if p is not None and p.alive]
        if not survivors or time.monotonic() >= deadline:
            return survivors
        time.sleep(0.05)


# -- processes started by tests -----------------------------------------------------------

_scopes: list[list[tuple[subprocess.Popen[Any], bool]]] = [[]]
_P = TypeVar("_P", bound="subprocess.Popen[Any]")


def track(proc: _P, *, group: bool = False) -> _P:
    """Register ``proc`` (started by a test or a helper): it is stopped and waited for when the
    current test ends (or, outside a test, when the session ends). ``group``: ``proc`` leads
    its own process group (``start_new_session``), which is stopped as a whole."""
    _scopes[-1].append((proc, group))
    return proc


def stop(proc: subprocess.Popen[Any], *, group: bool = False, grace: float = 3.0) -> None:
    """Stop ``proc`` (SIGTERM, then SIGKILL after ``grace`` s) and wait for it; with ``group``
    its whole process group, even if ``proc`` itself has ended."""

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive() -> bool:
        return group and any(p.pgid == proc.pid and p.alive for p in processes())

    if proc.poll() is None or group_alive():
        send(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (proc.poll() is None or group_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None or group_alive():
            send(signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


@contextmanager
def scope() -> Iterator[None]:
    """Processes tracked inside are stopped on the way out, however it is left."""
    _scopes.append([])
    try:
        yield
    finally:
        for proc, group in reversed(_scopes.pop()):
            stop(proc, group=group)


def stop_session_processes() -> None:
    """Stop what was tracked outside any test (module or session fixtures)."""
    while _scopes[0]:
        proc, group = _scopes[0].pop()
        stop(proc, group=group)


def main(argv: list[str] | None = None) -> int:
    """``processes.py --env KEY=VALUE [--root PID]``: list (and kill) processes that are left."""
    ap = argparse.ArgumentParser(description="Fail if any process of a test run is still alive; kill it.")
    ap.add_argument("--env", required=True, metavar="KEY=VALUE",
                    help="the marker every process of the run inherited")
    ap.add_argument("--what", default="test run", help="what to call the run in messages")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds to let them exit first")
    args = ap.parse_args(argv)
    key, _, value = args.env.partition("=")
    if not key or not value:
        ap.error("--env wants KEY=VALUE with a non-empty value")
    left = leftovers(key, value, grace=args.grace)
    if not left:
        return 0
    print(f"processes left behind by the {args.what}: {len(left)} (killed)", file=sys.stderr)
    for proc in left:
        print(f"  {proc}", file=sys.stderr)
    kill_all(left)
    return 1


if __name__ == "__main__":
    sys.exit(main())
