"""Run a command inside a small soft-RoCE (rdma_rxe) guest and return its result.

Why a guest: the host kernel has no RDMA support at all, so ``rdma link add ... type rxe``
cannot work here. Debian's ``linux-image-amd64`` ships ``rdma_rxe.ko``; virtme-ng boots
that kernel under QEMU with the host's root filesystem shared read-only over 9p, so the
guest runs this very checkout, venv and Python unchanged. KVM cannot run Linux guests on
this machine kind (nested virtualisation is software-only), so the guest uses TCG:
budget ~20 s to boot and a few seconds per Python start-up, and batch all RDMA tests
into one boot.

Inside the guest a setup script loads ``rdma_rxe``, creates a dummy netdev ``dum0``
(MTU 9000, 10.9.0.1/24), adds ``rxe0`` on it and lifts RLIMIT_MEMLOCK; then CMD runs
from the caller's working directory with the venv's ``bin`` first on PATH.

Writing results back: the guest's / is read-only and /tmp, /var, /home ... are
overlays that vanish when the guest exits. Pass ``--rwdir DIR`` (repeatable) to make a
host directory writable from the guest at the same path (9p, written through at once).

CLI (``tools/rxe/run_in_guest.py`` is the same entry point, kept for scripts)::

    mignet rxe run [--mem 2G] [--timeout 900] [--rwdir DIR] -- CMD...
    python tools/rxe/run_in_guest.py [--mem 2G] [--timeout 900] [--rwdir DIR] -- CMD...

Exit status: CMD's; 124 on timeout; 125 if the guest could not boot or set up rxe;
128+N when the harness was stopped by signal N (130 SIGINT, 129 SIGHUP, 143 SIGTERM).

No guest is ever left behind. The guest (vng, virtme-run, QEMU) runs in its own session
and carries a marker in its environment; on every way out — CMD's end, the timeout,
SIGTERM, SIGINT, SIGHUP, an exception — each of its processes gets SIGTERM (QEMU exits,
virtme-run removes its temporary files), what is left after 3 s SIGKILL, and the harness
waits until none of them is alive (a few seconds at most).

Prerequisites: ``tools/rxe/setup.sh`` (as root).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from mignet.errors import MignetError

REPO_ROOT = Path(__file__).resolve().parents[2]  # mignet/harness/rxe_guest.py -> checkout
VENV = REPO_ROOT / ".venv"
RXE_KO_GLOB = "kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko*"
GUEST_ADDR = "10.9.0.1"
RXE_DEVICE = "rxe0"

#: Lines the guest prints to talk to us; they are not passed on to the caller.
MARK = "@@rxe-harness:"

#: Exit status of the CLI when the guest itself failed (boot or rxe setup).
EXIT_GUEST_FAILED = 125
EXIT_TIMEOUT = 124

#: Signals that stop the harness, and with it the guest: Ctrl-C, a closed terminal, ``kill``
#: or a CI timeout. The exit status is then 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)

#: Seconds the guest's processes get to exit on SIGTERM before what is left is SIGKILLed.
STOP_GRACE = 3.0

#: Seconds until the guest's init must have started our script (20-25 s when idle under TCG,
#: over a minute beside another guest). A guest silent for longer is stuck, not slow.
BOOT_WAIT = 300.0

#: Where the guest's script is written: the host's /tmp is the lower layer of the guest's /tmp
#: overlay, so the guest reads it at the same path (a tmpfs such as /dev/shm would not be).
SCRIPT_DIR = "/tmp"

#: Environment variable set (to a fresh value) for each guest: it finds every process of that
#: guest, even one that left the guest's session.
GUEST_MARKER_ENV = "MIGNET_RXE_GUEST"

#: The guest's setup, one command per step: (command, what its failure usually means).
SETUP_STEPS: tuple[tuple[str, str], ...] = (
    ("modprobe rdma_rxe", "rdma_rxe missing from the guest kernel: run tools/rxe/setup.sh"),
    ("modprobe dummy", "the dummy netdev driver is missing from the guest kernel"),
    ("ip link add dum0 type dummy", ""),
    ("ip link set dum0 mtu 9000", ""),
    (f"ip addr add {GUEST_ADDR}/24 dev dum0", ""),
    ("ip link set dum0 up", ""),
    (f"rdma link add {RXE_DEVICE} type rxe netdev dum0", "could not create the rxe device"),
    ("ulimit -l unlimited", "memlock: could not lift RLIMIT_MEMLOCK in the guest"),
)
SETUP_SCRIPT = "".join(f"{command}\n" for command, _ in SETUP_STEPS)
_SETUP_LOG = "/tmp/rxe-setup.log"

#: What to look for in the console of a guest that did not boot, most telling first.
_BOOT_CLUES = ("Kernel panic", "qemu-system-x86_64:", "memlock", "Cannot allocate memory",
               "FATAL", "error:", "Error:", "not found")


class GuestError(MignetError):
    """The guest did not boot, or its rxe setup failed, so CMD never ran."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


class GuestTimeout(MignetError, subprocess.TimeoutExpired):
    """CMD (or the boot before it) ran past the timeout; the guest has been stopped.

    ``cmd`` is CMD (not vng's command line), ``output`` what the guest printed, ``started``
    whether CMD had started (the guest was ready).
    """

    def __init__(self, cmd: Sequence[str], timeout: float, output: str, started: bool) -> None:
        super().__init__(list(cmd), timeout, output)
        self.started = started

    def __str__(self) -> str:
        what = shlex.join(self.cmd)
        if self.started:
            return f"timed out after {self.timeout:g} s: `{what}` was still running in the guest; guest stopped"
        return f"timed out after {self.timeout:g} s: the guest was still booting, `{what}` never started; guest stopped"


class GuestSignalled(SystemExit):
    """The harness got SIGTERM or SIGHUP; the guest has been stopped. ``code`` is 128 + N.

    A SystemExit on purpose (like MigrationCancelled, outside the MignetError root): the
    process is asked to end, and no ``except Exception`` on the way may stop that.

    (SIGINT raises KeyboardInterrupt, as everywhere in Python, after the same clean-up.)
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"{signal.Signals(self.signum).name} received"


def _version_key(name: str) -> list[int | str]:
    """Sort key that orders kernel versions naturally (6.1.0-9 < 6.1.0-56)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find_kernel() -> tuple[Path, str] | None:
    """Return (vmlinuz path, version) of the newest ``*-amd64`` kernel that has rdma_rxe.

    Why "has rdma_rxe": only a kernel whose module tree ships the driver can create rxe0;
    a kernel without its /lib/modules tree cannot even load the 9p/virtio modules.
    """
    found: list[tuple[Path, str]] = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*-amd64"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if any(Path("/lib/modules", version).glob(RXE_KO_GLOB)):
            found.append((vmlinuz, version))
    if not found:
        return None
    return max(found, key=lambda kv: _version_key(kv[1]))


def _venv_bin() -> Path:
    """The venv whose tools (vng, virtme-run, python) the harness uses."""
    if (VENV / "bin" / "vng").exists():
        return VENV / "bin"
    return Path(sys.executable).parent


def _host_env() -> dict[str, str]:
    """Environment for vng: the venv's bin first, since vng execs ``virtme-run`` by name."""
    env = dict(os.environ)
    env["PATH"] = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    return env


def guest_available() -> str | None:
    """Return None if a soft-RoCE guest can boot here, else a one-line reason with the fix.

    Cheap (no boot): checks the pieces a boot needs, so test suites can skip with a
    useful message instead of failing slowly.
    """
    fix = "run tools/rxe/setup.sh (as root)"
    vng = shutil.which("vng", path=_host_env()["PATH"])
    if vng is None:
        return f"virtme-ng (vng) not installed in {VENV}: {fix}"
    if shutil.which("qemu-system-x86_64") is None:
        return f"qemu-system-x86_64 missing: {fix}"
    if find_kernel() is None:
        return f"kernel with rdma_rxe.ko missing (/boot/vmlinuz-*-amd64): {fix}"
    if not any(shutil.which(b) for b in ("busybox", "busybox-static")) and not Path(
        "/bin/busybox"
    ).exists():
        return f"busybox missing (virtme-ng's initramfs needs it): {fix}"
    if shutil.which("rdma") is None:
        return f"iproute2's rdma tool missing: {fix}"
    if not Path("/usr/lib/python3/dist-packages/pyverbs").is_dir():
        return f"python3-pyverbs missing: {fix}"
    return None


def _guest_script(cmd: Sequence[str], cwd: Path) -> str:
    """Shell script run as the guest's command: rxe setup, then CMD in ``cwd``.

    Each setup step that fails prints ``MARK setup-failed STEP: its last line of output``
    (and its whole log), so the host can say in one line what went wrong.
    """
    lines = [
        f"echo '{MARK}boot'",
        f"export PATH={shlex.quote(str(_venv_bin()))}:$PATH",
        "rxe_fail() {",
        f'  echo "{MARK}setup-failed $1: $(tail -n 1 {_SETUP_LOG})"; cat {_SETUP_LOG}; exit {EXIT_GUEST_FAILED}',
        "}",
    ]
    # every step in this shell (not a subshell), so that ulimit carries over to CMD
    lines += [f"{command} >>{_SETUP_LOG} 2>&1 || rxe_fail {shlex.quote(command)}"
              for command, _ in SETUP_STEPS]
    where = shlex.quote(str(cwd))
    lines += [
        f"cd {where} >>{_SETUP_LOG} 2>&1 || rxe_fail {shlex.quote(f'cd {cwd}')}",
        f"echo '{MARK}ready'",
        shlex.join(cmd),
    ]
    return "\n".join(lines)


def describe_failure(output: str, marks: Sequence[str], status: int | None) -> str:
    """One line saying what the guest showed when it failed before CMD ran."""
    for mark in marks:
        if mark.startswith("setup-failed"):
            detail = mark.removeprefix("setup-failed").strip()
            step = next((s for s in SETUP_STEPS if detail.startswith(s[0] + ":")), None)
            hint = f" ({step[1]})" if step is not None and step[1] else ""
            return f"rxe setup failed in the guest: {detail}{hint}"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    seen = next((line for clue in _BOOT_CLUES for line in lines if clue in line), None)
    if seen is None:
        seen = lines[-1] if lines else "no output at all"
    if len(seen) > 300:
        seen = seen[:297] + "..."
    what = "the guest's setup ended early" if "boot" in marks else "the guest did not boot"
    return f"{what} (vng exit {status}): {seen}"


# -- the guest's processes ---------------------------------------------------------------

def _stat(pid: int) -> tuple[str, str, int] | None:
    """(command name, state, session id) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    close = data.rfind(b")")
    fields = data[close + 2:].split()
    if len(fields) < 4:
        return None
    return data[data.find(b"(") + 1:close].decode(errors="replace"), fields[0].decode(), int(fields[3])


def _has_env(pid: int, token: bytes) -> bool:
    try:
        return token in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def guest_processes(session: int | None, marker: str) -> list[tuple[int, str]]:
    """Live (not zombie) processes of one guest as (pid, name): those in its session, and
    any that carries its marker in the environment it started with."""
    token = f"{GUEST_MARKER_ENV}={marker}".encode()
    me = os.getpid()
    found: list[tuple[int, str]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        info = _stat(pid)
        if info is None or info[1] in ("Z", "X"):
            continue
        if info[2] == session or _has_env(pid, token):
            found.append((pid, info[0]))
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_guest(proc: subprocess.Popen[str] | None, marker: str,
               grace: float = STOP_GRACE) -> list[tuple[int, str]]:
    """Stop every process of one guest and wait for them; return survivors (normally none).

    Each process of the guest gets SIGTERM, also one started while we stop it (vng may be
    about to start virtme-run, virtme-run QEMU): QEMU exits, virtme-run removes its temporary
    files and exits. What is still alive after ``grace`` seconds is SIGKILLed.
    """
    session = proc.pid if proc is not None else None
    signalled: set[int] = set()
    deadline = time.monotonic() + grace
    kill_deadline = deadline + 5
    while True:
        if proc is not None:
            proc.poll()  # reap vng as soon as it ends
        members = guest_processes(session, marker)
        now = time.monotonic()
        if not members or now >= kill_deadline:
            break
        if now < deadline:
            fresh = [pid for pid, _ in members if pid not in signalled]
            _signal_all(fresh, signal.SIGTERM)
            signalled.update(fresh)
        else:
            _signal_all([pid for pid, _ in members], signal.SIGKILL)
        time.sleep(0.05)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            members = members or [(proc.pid, "vng")]
    return members


class _Signals:
    """While a guest runs, SIGTERM/SIGHUP raise :class:`GuestSignalled` and SIGINT
    KeyboardInterrupt in the main thread; while it is being stopped they are only remembered
    (a second Ctrl-C must not cut the clean-up short). Signals the caller ignores (nohup, a
    background job) stay ignored; outside the main thread nothing is installed."""

    def __init__(self) -> None:
        self.old: dict[int, Any] = {}
        self.deferring = False
        self.pending: list[int] = []

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN:
                    continue
                self.old[sig] = signal.SIG_DFL if old is None else old  # None: set outside Python
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            self.pending.append(signum)
            return
        raise interruption(signum)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)
        if exc is None and self.pending:
            raise interruption(self.pending[0])


def interruption(signum: int) -> BaseException:
    """The exception a stop signal turns into: KeyboardInterrupt for SIGINT, else
    :class:`GuestSignalled`."""
    return KeyboardInterrupt() if signum == signal.SIGINT else GuestSignalled(signum)


class _Console:
    """Reads the guest's console in a thread: keeps CMD's lines, notes our marks, echoes."""

    def __init__(self, stream: bool, start: float) -> None:
        self.stream = stream  # progress lines on stderr
        self.echo = stream  # the guest's lines on stdout
        self.start = start
        self.lines: list[str] = []
        self.marks: list[str] = []
        self.ready = threading.Event()

    def read(self, pipe: IO[str]) -> None:
        # readline in a loop (not iteration) so lines are passed on as they arrive
        for line in iter(pipe.readline, ""):
            if line.startswith(MARK):
                mark = line[len(MARK):].strip()
                self.marks.append(mark)
                if mark == "ready":
                    self.ready.set()
                    self.say(f"rxe: guest ready after {time.monotonic() - self.start:.1f} s")
                continue
            self.lines.append(line)
            if self.echo:
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except (OSError, ValueError):  # our stdout is gone: keep draining the guest
                    self.echo = False

    def say(self, text: str) -> None:
        if self.stream:
            try:
                print(text, file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    @property
    def output(self) -> str:
        return "".join(self.lines)


def run_in_guest(
    cmd: list[str],
    mem: str = "2G",
    timeout: float = 900,
    *,
    rwdirs: Sequence[str | os.PathLike[str]] = (),
    cwd: str | os.PathLike[str] | None = None,
    stream: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Boot one soft-RoCE guest, run ``cmd`` in it, return its exit code and output.

    The guest's script (rxe setup, then ``cmd``) goes into a file the guest reads, never onto
    the kernel command line: that line holds 2048 bytes, and a deep checkout's paths once
    overflowed it, so the guest's init silently never ran the command.

    ``stdout`` of the result holds CMD's stdout and stderr interleaved (the guest's
    console merges them); with ``stream`` the lines are also echoed live to our stdout.
    ``rwdirs`` are host directories made writable from the guest (same path), the only
    way to bring files back.

    Raises :class:`GuestError` if CMD never ran (boot or rxe setup failed; the message is
    one line saying what the guest showed), :class:`GuestTimeout` (a
    ``subprocess.TimeoutExpired``) after ``timeout`` seconds, :class:`GuestSignalled` on
    SIGTERM/SIGHUP and KeyboardInterrupt on SIGINT (when called from the main thread). On
    every way out the whole guest has been stopped and waited for.
    """
    reason = guest_available()
    if reason is not None:
        raise GuestError(reason, "")
    kernel = find_kernel()
    assert kernel is not None
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    argv = [
        "vng", "--run", str(kernel[0]), "--disable-kvm", "--memory", mem,
    ]
    for d in rwdirs:
        argv += ["--rwdir", str(Path(d).resolve())]
    script_dir = Path(tempfile.mkdtemp(prefix="mignet-rxe-", dir=SCRIPT_DIR))
    script = script_dir / "guest.sh"
    script.write_text(_guest_script(cmd, workdir.resolve()) + "\n")
    argv += ["--exec", f"sh {shlex.quote(str(script))}"]
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"
    env = _host_env()
    env[GUEST_MARKER_ENV] = marker

    start = time.monotonic()
    console = _Console(stream, start)
    expired = False
    silent = False  # no sign of the guest's init by BOOT_WAIT
    proc: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    with _Signals() as signals:
        try:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=workdir,
                    text=True,
                    errors="replace",
                    start_new_session=True,  # its own session: nothing of it hears our terminal
                )
            except OSError as exc:
                raise GuestError(f"could not start vng: {exc}", "") from exc
            assert proc.stdout is not None
            reader = threading.Thread(target=console.read, args=(proc.stdout,),
                                      name="rxe-console", daemon=True)
            reader.start()
            deadline = start + timeout
            while reader.is_alive():  # until every holder of the console has closed it
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    expired = True
                    break
                if now - start > BOOT_WAIT and not console.marks:
                    silent = True
                    break
                reader.join(min(left, 0.25))
            if not expired and not silent:
                try:
                    proc.wait(timeout=STOP_GRACE)  # the console closes as vng exits
                except subprocess.TimeoutExpired:
                    pass
        finally:
            signals.deferring = True
            if expired or silent or sys.exc_info()[0] is not None:
                console.echo = False  # what a guest prints while it is stopped is noise
            left_over = stop_guest(proc, marker)
            if reader is not None:
                reader.join(5)
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
            shutil.rmtree(script_dir, ignore_errors=True)
            if left_over:
                console.say("rxe: could not stop guest processes: "
                            + ", ".join(f"{pid} ({name})" for pid, name in left_over))
    assert proc is not None
    if silent:
        raise GuestError(f"the guest did not start its script within {BOOT_WAIT:g} s (a hung boot: "
                         "vng --verbose shows the kernel's messages); guest stopped", console.output)
    if expired:
        raise GuestTimeout(cmd, timeout, console.output, console.ready.is_set())
    rc = proc.returncode
    console.say(f"rxe: guest exited after {time.monotonic() - start:.1f} s (status {rc})")
    if not console.ready.is_set():
        raise GuestError(describe_failure(console.output, console.marks, rc), console.output)
    return subprocess.CompletedProcess(cmd, rc, console.output, None)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``mignet rxe run`` and ``tools/rxe/run_in_guest.py``."""
    ap.add_argument("--mem", default="2G", help="guest memory (default 2G)")
    ap.add_argument("--timeout", type=float, default=900,
                    help=f"seconds, boot included (default 900); then exit {EXIT_TIMEOUT}")
    ap.add_argument("--rwdir", action="append", default=[],
                    help="host directory the guest may write (same path, 9p); repeatable")
    ap.add_argument("--check", action="store_true",
                    help="only report whether a guest can boot here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")


def run_cli(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """Run the parsed command line: boot, run CMD, return its exit status.

    Failures end with one line on stderr: the guest's (125), the timeout's (124, naming CMD
    and the time) or the signal's (128 + N); the guest is stopped in every case.
    """
    if args.check:
        reason = guest_available()
        print(reason or "ok", file=sys.stderr)
        return 0 if reason is None else 1
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    what = shlex.join(cmd)
    try:
        result = run_in_guest(cmd, mem=args.mem, timeout=args.timeout, rwdirs=args.rwdir)
    except GuestError as err:  # the guest's console was streamed already
        print(f"rxe: {err}", file=sys.stderr)
        return EXIT_GUEST_FAILED
    except GuestTimeout as err:
        print(f"rxe: {err}", file=sys.stderr)
        return EXIT_TIMEOUT
    except GuestSignalled as err:
        print(f"rxe: {err}: guest stopped (`{what}`)", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"rxe: SIGINT received: guest stopped (`{what}`)", file=sys.stderr)
        return 128 + signal.SIGINT
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    """CLI wrapper around :func:`run_in_guest`."""
    ap = argparse.ArgumentParser(
        description="Run CMD inside a soft-RoCE (rdma_rxe) guest; exit with CMD's status.",
        usage="%(prog)s [--mem 2G] [--timeout 900] [--rwdir DIR]... -- CMD...",
    )
    add_arguments(ap)
    return run_cli(ap.parse_args(argv), ap)


if __name__ == "__main__":
    sys.exit(main())
