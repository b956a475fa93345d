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

Exit status: CMD's; 124 on timeout; 125 if the guest could not boot or set up rxe.
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
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # mignet/rdma/rxe_guest.py -> checkout
VENV = REPO_ROOT / ".venv"
RXE_KO_GLOB = "kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko*"
GUEST_ADDR = "10.9.0.1"
RXE_DEVICE = "rxe0"

#: Lines the guest prints to talk to us; they are not passed on to the caller.
MARK = "@@rxe-harness:"

#: Exit status of the CLI when the guest itself failed (boot or rxe setup).
EXIT_GUEST_FAILED = 125
EXIT_TIMEOUT = 124

SETUP_SCRIPT = f"""\
set -e
modprobe rdma_rxe
modprobe dummy
ip link add dum0 type dummy
ip link set dum0 mtu 9000
ip addr add {GUEST_ADDR}/24 dev dum0
ip link set dum0 up
rdma link add {RXE_DEVICE} type rxe netdev dum0
ulimit -l unlimited
"""


class GuestError(RuntimeError):
    """The guest did not boot, or its rxe setup failed, so CMD never ran."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


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
    """Shell script run as the guest's command: rxe setup, then CMD in ``cwd``."""
    setup = SETUP_SCRIPT.strip().replace("\n", "; ")
    return "\n".join(
        [
            f"echo '{MARK}boot'",
            f"export PATH={shlex.quote(str(_venv_bin()))}:$PATH",
            f"if ! ( {setup} ) >/tmp/rxe-setup.log 2>&1; then",
            f"  echo '{MARK}setup-failed'; cat /tmp/rxe-setup.log; exit {EXIT_GUEST_FAILED}",
            "fi",
            # the subshell's ulimit does not carry over: lift it in this shell as well
            "ulimit -l unlimited",
            f"cd {shlex.quote(str(cwd))}",
            f"echo '{MARK}ready'",
            shlex.join(cmd),
        ]
    )


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

    ``stdout`` of the result holds CMD's stdout and stderr interleaved (the guest's
    console merges them); with ``stream`` the lines are also echoed live to our stdout.
    ``rwdirs`` are host directories made writable from the guest (same path), the only
    way to bring files back. Raises :class:`GuestError` if CMD never ran (boot or rxe
    setup failed) and :class:`subprocess.TimeoutExpired` after ``timeout`` seconds.
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
    argv += ["--exec", _guest_script(cmd, workdir.resolve())]

    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_host_env(),
        cwd=workdir,
        text=True,
        errors="replace",
        start_new_session=True,  # so a timeout can kill vng, qemu and all helpers
    )
    assert proc.stdout is not None
    lines: list[str] = []
    marks: list[str] = []
    expired = threading.Event()

    def kill_on_timeout() -> None:
        # A silent hung guest would block readline forever: kill the whole group instead.
        expired.set()
        os.killpg(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout, kill_on_timeout)
    watchdog.start()
    try:
        # readline in a loop (not iteration) so lines are passed on as they arrive
        for line in iter(proc.stdout.readline, ""):
            if line.startswith(MARK):
                mark = line[len(MARK):].strip()
                marks.append(mark)
                if mark == "ready" and stream:
                    print(f"rxe: guest ready after {time.monotonic() - start:.1f} s",
                          file=sys.stderr, flush=True)
                continue
            lines.append(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
        rc = proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): leave nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if expired.is_set():
        raise subprocess.TimeoutExpired(argv, timeout, "".join(lines))
    if stream:
        print(f"rxe: guest exited after {time.monotonic() - start:.1f} s (status {rc})",
              file=sys.stderr, flush=True)
    output = "".join(lines)
    if "ready" not in marks:
        what = "rxe setup failed" if "setup-failed" in marks else "guest did not boot"
        raise GuestError(f"{what} (vng exit {rc})", output)
    return subprocess.CompletedProcess(cmd, rc, output, None)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``mignet rxe run`` and ``tools/rxe/run_in_guest.py``."""
    ap.add_argument("--mem", default="2G", help="guest memory (default 2G)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds (default 900)")
    ap.add_argument("--rwdir", action="append", default=[],
                    help="host directory the guest may write (same path); repeatable")
    ap.add_argument("--check", action="store_true",
                    help="only report whether a guest can boot here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")


def run_cli(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """Run the parsed command line: boot, run CMD, return its exit status."""
    if args.check:
        reason = guest_available()
        print(reason or "ok", file=sys.stderr)
        return 0 if reason is None else 1
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    try:
        result = run_in_guest(cmd, mem=args.mem, timeout=args.timeout, rwdirs=args.rwdir)
    except GuestError as err:
        sys.stdout.write(err.output)
        print(f"rxe: {err}", file=sys.stderr)
        return EXIT_GUEST_FAILED
    except subprocess.TimeoutExpired:
        print(f"rxe: timed out after {args.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT
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
