"""The soft-RoCE guest harness (``mignet rxe run``, ``tools/rxe/run_in_guest.py``) never
leaves a guest behind, and says in one line why a run failed.

The slow tests are real: they start the harness as a process, wait until the guest's QEMU
exists (one waits for the booted guest), end it the way a CI timeout, a Ctrl-C or a closed
terminal would, and check within seconds that no process of the guest is alive — its
session, and anything carrying a marker the test put in the harness's environment — and
that the exit status is the documented one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mignet.harness import rxe_guest
from tests.support.processes import Proc, alive_now, descendants, in_session, leftovers, stop, track

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "rxe" / "run_in_guest.py"
GUEST_REASON = rxe_guest.guest_available()
needs_guest = pytest.mark.skipif(GUEST_REASON is not None,
                                 reason=f"the soft-RoCE guest cannot boot here: {GUEST_REASON}")
BOOT_TIMEOUT = 240  # TCG on 2 busy cores: 25 s idle, over a minute with another guest running
STOPPED_WITHIN = 10  # seconds from the signal to no process of the guest left


# -- fast: messages, the guest's setup script, the process helpers --------------------------

def test_setup_failure_is_one_line_naming_the_step_and_the_cause() -> None:
    marks = ["boot", "setup-failed modprobe rdma_rxe: modprobe: FATAL: Module rdma_rxe not found "
             "in directory /lib/modules/6.1.0-9-amd64"]
    line = rxe_guest.describe_failure("noise\n", marks, 125)
    assert "\n" not in line
    assert line.startswith("rxe setup failed in the guest: modprobe rdma_rxe: modprobe: FATAL")
    assert "rdma_rxe missing from the guest kernel" in line
    memlock = rxe_guest.describe_failure(
        "", ["boot", "setup-failed ulimit -l unlimited: ulimit: error setting limit"], 125)
    assert "memlock" in memlock and "\n" not in memlock


@pytest.mark.parametrize(("console", "seen"), [
    ("SeaBIOS\nbooting\n[ 1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n[ 1.3] end\n",
     "Kernel panic - not syncing"),
    ("qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory\n",
     "cannot set up guest memory"),
    ("a\nlast words\n", "last words"),
    ("", "no output at all"),
])
def test_boot_failure_is_one_line_saying_what_the_guest_showed(console: str, seen: str) -> None:
    line = rxe_guest.describe_failure(console, [], 1)
    assert "\n" not in line
    assert line.startswith("the guest did not boot (vng exit 1): ")
    assert seen in line


def test_a_missing_guest_is_one_line_and_status_125(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    reason = "kernel with rdma_rxe.ko missing (/boot/vmlinuz-*-amd64): run tools/rxe/setup.sh (as root)"
    monkeypatch.setattr(rxe_guest, "guest_available", lambda: reason)
    assert rxe_guest.main(["--", "true"]) == rxe_guest.EXIT_GUEST_FAILED
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"rxe: {reason}"]


def test_timeout_message_names_the_command_and_the_time() -> None:
    running = str(rxe_guest.GuestTimeout(["sleep", "300"], 45, "", started=True))
    assert running.startswith("timed out after 45 s: `sleep 300` was still running in the guest")
    booting = str(rxe_guest.GuestTimeout(["sleep", "300"], 7.5, "", started=False))
    assert "7.5 s" in booting and "`sleep 300` never started" in booting
    assert "\n" not in running + booting


def _setup_script(tmp_path: Path, failing: str | None) -> subprocess.CompletedProcess[str]:
    """The guest's script, run on the host with stand-ins for modprobe, ip and rdma."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("modprobe", "ip", "rdma"):
        body = 'echo "$0 $*" >&2\n'
        if failing is not None and failing.startswith(tool):
            body = f'case "$*" in "{failing.split(" ", 1)[1]}") echo "{tool}: FATAL: it failed" >&2; exit 1;; esac\n'
        (fake / tool).write_text(f"#!/bin/sh\n{body}")
        (fake / tool).chmod(0o755)
    script = rxe_guest._guest_script(["echo", "cmd ran"], tmp_path)
    script = script.replace("/tmp/rxe-setup.log", str(tmp_path / "setup.log"))
    # a container may not lift RLIMIT_MEMLOCK (the guest's root can): keep the current limit
    script = script.replace("ulimit -l unlimited >>", "ulimit -l $(ulimit -l) >>")
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=30)


def test_guest_script_reports_the_failing_setup_step(tmp_path: Path) -> None:
    result = _setup_script(tmp_path, "modprobe rdma_rxe")
    assert result.returncode == rxe_guest.EXIT_GUEST_FAILED
    marks = [line.removeprefix(rxe_guest.MARK) for line in result.stdout.splitlines()
             if line.startswith(rxe_guest.MARK)]
    assert marks == ["boot", "setup-failed modprobe rdma_rxe: modprobe: FATAL: it failed"]
    assert "cmd ran" not in result.stdout
    (tmp_path / "ok").mkdir()
    ok = _setup_script(tmp_path / "ok", None)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[-2:] == [f"{rxe_guest.MARK}ready", "cmd ran"]


def test_tracked_process_group_is_stopped_with_its_grandchildren(tmp_path: Path) -> None:
    marker = f"group-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, MIGNET_TEST_PROBE=marker)
    # a shell that ignores SIGTERM, with a grandchild: only the group's SIGKILL ends both
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait"], env=env,
                            start_new_session=True)
    track(proc, group=True)
    deadline = time.monotonic() + 10
    while len(alive_now("MIGNET_TEST_PROBE", marker)) < 2:
        assert time.monotonic() < deadline, "the shell and its sleep did not start"
        time.sleep(0.05)
    started = time.monotonic()
    stop(proc, group=True, grace=0.5)
    assert time.monotonic() - started < 5
    assert proc.returncode is not None
    assert leftovers("MIGNET_TEST_PROBE", marker, grace=2) == []


# -- slow: real guests, ended every way ----------------------------------------------------

@dataclass
class Harness:
    """A running harness process, its output files and the marker in its environment."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    marker: str
    started: float

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def guest_session(self) -> int:
        """The session of the guest (vng leads it), once the guest's QEMU runs in it."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            assert self.proc.poll() is None, f"the harness ended early ({self.proc.returncode}): {self.stderr()}"
            below = descendants(self.proc.pid)
            sessions = {p.sid for p in below if p.sid == p.pid}
            for sid in sessions:  # the VM's QEMU, not virtme-run's probes (qemu -version ...)
                if any(p.name.startswith("qemu-system") and " -kernel " in p.command for p in in_session(sid)):
                    return sid
            assert time.monotonic() < deadline, f"no QEMU after {BOOT_TIMEOUT} s: {below}"
            time.sleep(0.1)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while "rxe: guest ready" not in self.stderr():
            assert self.proc.poll() is None, f"the harness ended early ({self.proc.returncode}): {self.stderr()}"
            assert time.monotonic() < deadline, f"not ready after {BOOT_TIMEOUT} s"
            time.sleep(0.2)

    def left(self, session: int) -> list[Proc]:
        return in_session(session) + [p for p in alive_now("MIGNET_TEST_RXE", self.marker)
                                      if p.pid != self.proc.pid]

    def ended(self, session: int, within: float) -> tuple[int, float]:
        """Wait for the harness to exit; (status, seconds it took); nothing of the guest left."""
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the harness still runs {within} s later: {self.stderr()}")
        took = time.monotonic() - t0
        assert self.left(session) == [], self.stderr()
        return rc, took

    def last_line(self) -> str:
        text = self.stderr()
        assert "Traceback" not in text, text
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines, "nothing on stderr"
        return lines[-1]


def _default_signals() -> None:  # runs in the child: a caller's ignored signals are not ours
    for sig in rxe_guest.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


class Harnesses:
    """Starts harness processes; each one (and so its guest) is stopped when the test ends."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.started: list[Harness] = []

    def start(self, *args: str, via: str = "mignet") -> Harness:
        n = len(self.started)
        marker = f"{os.getpid()}-{n}-{time.monotonic_ns()}"
        entry = [sys.executable, "-m", "mignet", "rxe", "run"] if via == "mignet" else [sys.executable, str(SCRIPT)]
        out, err = self.tmp_path / f"out{n}.txt", self.tmp_path / f"err{n}.txt"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([*entry, "--mem", "1G", *args], stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL, env=dict(self.env, MIGNET_TEST_RXE=marker),
                                    cwd=ROOT, preexec_fn=_default_signals)
        h = Harness(proc, out, err, marker, time.monotonic())
        self.started.append(h)
        return h

    def close(self) -> None:
        for h in self.started:
            if h.proc.poll() is None:
                h.proc.send_signal(signal.SIGTERM)  # the harness stops its own guest
                try:
                    h.proc.wait(STOPPED_WITHIN)
                except subprocess.TimeoutExpired:
                    h.proc.kill()
                    h.proc.wait()
            for p in alive_now("MIGNET_TEST_RXE", h.marker):
                os.kill(p.pid, signal.SIGKILL)


@pytest.fixture
def harnesses(tmp_path: Path, subprocess_env: dict[str, str]) -> Iterator[Harnesses]:
    started = Harnesses(tmp_path, subprocess_env)
    try:
        yield started
    finally:
        started.close()


@needs_guest
@pytest.mark.slow
def test_sigterm_to_a_booted_guest_stops_all_of_it(harnesses: Harnesses) -> None:
    """What ``timeout 45 mignet rxe run -- sleep 300`` does once the guest is up."""
    h = harnesses.start("--", "sleep", "300")
    session = h.guest_session()
    h.wait_ready()
    h.proc.send_signal(signal.SIGTERM)
    rc, took = h.ended(session, STOPPED_WITHIN)
    assert rc == 128 + signal.SIGTERM
    assert took < STOPPED_WITHIN
    assert h.last_line() == "rxe: SIGTERM received: guest stopped (`sleep 300`)"


@needs_guest
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "via"), [(signal.SIGINT, "mignet"), (signal.SIGHUP, "script"),
                                          (signal.SIGTERM, "script")],
                         ids=["SIGINT-mignet", "SIGHUP-run_in_guest", "SIGTERM-run_in_guest"])
def test_a_signal_while_booting_stops_all_of_it(harnesses: Harnesses, sig: signal.Signals, via: str) -> None:
    h = harnesses.start("--", "sleep", "300", via=via)
    session = h.guest_session()  # QEMU is running
    h.proc.send_signal(sig)
    rc, _ = h.ended(session, STOPPED_WITHIN)
    assert rc == 128 + sig
    assert h.last_line() == f"rxe: {sig.name} received: guest stopped (`sleep 300`)"


@needs_guest
@pytest.mark.slow
def test_a_hanging_command_is_stopped_at_the_timeout(harnesses: Harnesses) -> None:
    h = harnesses.start("--timeout", "45", "--", "sleep", "300", via="script")
    session = h.guest_session()
    rc, _ = h.ended(session, 45 + STOPPED_WITHIN)
    assert rc == rxe_guest.EXIT_TIMEOUT
    elapsed = time.monotonic() - h.started
    assert 45 <= elapsed < 45 + STOPPED_WITHIN
    line = h.last_line()
    assert line.startswith("rxe: timed out after 45 s: ") and "`sleep 300`" in line, line
    assert line.endswith("guest stopped")


@needs_guest
@pytest.mark.slow
def test_normal_end_passes_the_status_and_leaves_nothing(harnesses: Harnesses) -> None:
    """A long command (paths of a deep checkout, many arguments) runs too: the guest's script
    must not ride on the kernel command line, whose 2048 bytes it once overflowed (the guest
    then never started its command, and CI waited 1200 s)."""
    long_word = "x" * 3000
    h = harnesses.start("--", "sh", "-c", "echo hello from the guest ${#1}; exit 3", "sh", long_word)
    session = h.guest_session()
    rc, _ = h.ended(session, BOOT_TIMEOUT)
    assert rc == 3, h.stderr()
    assert "hello from the guest 3000" in h.out.read_text(errors="replace")
    assert h.last_line().startswith("rxe: guest exited after ")


@needs_guest
@pytest.mark.slow
def test_a_guest_that_never_starts_its_script_is_stopped_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung boot ends at BOOT_WAIT with one line, not at the (long) command timeout; no
    process of the guest is left. Here the wait is cut to 2 s, before any guest can boot."""
    monkeypatch.setattr(rxe_guest, "BOOT_WAIT", 2.0)
    scripts_before = set(Path(rxe_guest.SCRIPT_DIR).glob("mignet-rxe-*"))
    start = time.monotonic()
    with pytest.raises(rxe_guest.GuestError, match=r"did not start its script within 2 s .*guest stopped$"):
        rxe_guest.run_in_guest(["true"], mem="1G", timeout=600, stream=False)
    assert time.monotonic() - start < 2 + STOPPED_WITHIN
    assert set(Path(rxe_guest.SCRIPT_DIR).glob("mignet-rxe-*")) <= scripts_before, "its script was left"

