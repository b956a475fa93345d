"""A real, *running* guest for migration tests: Linux + busybox printing ``tick N`` forever.

Why this exists: the paused (``-S``) QEMU of :mod:`tests.support.qemu_peer` proves that RAM
bytes arrive, but not that a machine survives migration — device state (CPU registers,
timers, the serial port, interrupt controllers) only matters once guest code runs. This
guest makes survival visible from outside: its ``/init`` writes ``tick 1``, ``tick 2``, ...
to the first serial port several times a second, and QEMU's ``-serial file:LOG`` records
it. A guest that was really migrated goes on from the source's last tick + 1 on the
destination; one that rebooted starts again at 1, and one that is broken stops.

Pieces:

* :func:`build_initramfs` writes a tiny initramfs (cpio ``newc``, Python's stdlib only):
  busybox-static as ``/bin/busybox``, ``/dev`` nodes and the ``/init`` script. It is cached
  under a directory the caller owns (e.g. pytest's ``tmp_path_factory``), keyed by the
  content, so a test session builds it once.
* :class:`CountingGuest` is a :class:`~tests.support.qemu_peer.QemuVM` (same QMP plumbing,
  same ``qemu.qmp`` client on a private loop, same retrying connect) with a command line
  that boots Debian's kernel under TCG with file-backed RAM, optionally ``-incoming
  defer``. QEMU runs in its own process group, and :meth:`CountingGuest.close` kills that
  whole group and reaps it on every exit path (normal exit, exceptions, failed start-up).
* :func:`parse_ticks`, :meth:`CountingGuest.wait_ticks` and
  :meth:`CountingGuest.last_tick` read the serial log.

Usage::

    initrd = build_initramfs(tmp_path_factory.mktemp("initramfs"))
    with CountingGuest(tmp / "src", initrd) as src, \\
            CountingGuest(tmp / "dst", initrd, incoming=True) as dst:
        src.wait_ticks(3)
        dst.migrate_incoming("tcp:127.0.0.1:0")
        src.migrate(dst.listen_uri())
        dst.wait_ticks(src.last_tick() + 3)
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from tests.support.qemu_peer import (
    UNLIMITED_BANDWIDTH,
    QemuError,
    QemuVM,
    qemu_binary,
    qemu_skip_reason,
)

__all__ = [
    "TICK_INTERVAL_US",
    "CountingGuest",
    "GuestTimeout",
    "build_initramfs",
    "busybox_path",
    "counting_guest_skip_reason",
    "kernel_path",
    "parse_ticks",
]

#: How often the guest ticks (microseconds): 5 per second is enough to see a pause or a
#: restart and cheap enough for an emulated CPU on a loaded 2-core host.
TICK_INTERVAL_US = 200_000

#: The guest's /init. ``#!/bin/busybox sh`` makes the kernel run it with busybox's ash.
#: devtmpfs is mounted in case the /dev nodes of the archive are shadowed; the counter
#: lives in the shell, so only a real migration (RAM + CPU + devices) keeps it going.
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t proc proc /proc 2>/dev/null
i=1
while true; do
    echo "tick $i" > /dev/ttyS0
    i=$((i + 1))
    /bin/busybox usleep {TICK_INTERVAL_US}
done
"""

_TICK_RE = re.compile(rb"^tick (\d+)\r?\n", re.MULTILINE)
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class GuestTimeout(QemuError):
    """The guest did not reach the expected tick in time (the message quotes its log)."""


# --- what the host must have -----------------------------------------------------------
def kernel_path() -> Path | None:
    """Debian's newest installed kernel (``/boot/vmlinuz-*``), or ``None``.

    ``$MIGNET_GUEST_KERNEL`` overrides it. Versions are compared naturally (6.1.0-10 after
    6.1.0-9), so a host with several kernels picks the newest one.
    """
    override = os.environ.get("MIGNET_GUEST_KERNEL")
    if override:
        return Path(override) if os.access(override, os.R_OK) else None
    found = [p for p in glob.glob("/boot/vmlinuz-*") if os.access(p, os.R_OK)]
    if not found:
        return None

    def natural(path: str) -> list[Any]:
        return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", path)]

    return Path(max(found, key=natural))


def busybox_path() -> Path | None:
    """A *static* busybox (Debian's busybox-static), or ``None``.

    The initramfs holds no libraries, so a dynamically linked busybox would not start.
    ``$MIGNET_GUEST_BUSYBOX`` overrides the lookup.
    """
    override = os.environ.get("MIGNET_GUEST_BUSYBOX")
    candidates = [override] if override else [*_BUSYBOX_CANDIDATES, shutil.which("busybox")]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK) and _is_static_elf(Path(cand)):
            return Path(cand)
    return None


def _is_static_elf(path: Path) -> bool:
    """True for an ELF file without a PT_INTERP program header (statically linked)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only: that is what Debian ships here
        return False
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[32:40], order)
    phentsize = int.from_bytes(data[54:56], order)
    phnum = int.from_bytes(data[56:58], order)
    for i in range(phnum):
        p_type = int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], order)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def counting_guest_skip_reason() -> str | None:
    """Why a counting guest cannot run here (``None`` when it can); for ``skipif``."""
    reason = qemu_skip_reason()
    if reason is not None:
        return reason
    if kernel_path() is None:
        return "no readable /boot/vmlinuz-* (apt-get install linux-image-amd64)"
    if busybox_path() is None:
        return "no static busybox (apt-get install busybox-static)"
    return None


# --- the initramfs -----------------------------------------------------------------------
def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 0) -> bytes:
    """One ``newc`` cpio entry (header, NUL-terminated name, data; each padded to 4)."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    out = bytearray(head + name.encode() + b"\0")
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs_bytes(busybox: bytes, init_script: str = INIT_SCRIPT) -> bytes:
    """The uncompressed cpio archive: directories, /dev nodes, busybox and /init.

    /dev/console and /dev/ttyS0 are in the archive so that the kernel can open the console
    for init before anything is mounted; devtmpfs (mounted by /init) would provide them too.
    """
    entries = [
        ("bin", stat.S_IFDIR | 0o755, b"", (0, 0)),
        ("dev", stat.S_IFDIR | 0o755, b"", (0, 0)),
        ("proc", stat.S_IFDIR | 0o755, b"", (0, 0)),
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
        ("dev/ttyS0", stat.S_IFCHR | 0o660, b"", (4, 64)),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox, (0, 0)),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", (0, 0)),
        ("init", stat.S_IFREG | 0o755, init_script.encode(), (0, 0)),
    ]
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        out += _cpio_entry(name, mode, data, rdev, ino)
    out += _cpio_entry("TRAILER!!!", 0)
    return bytes(out)


def build_initramfs(cache_dir: Path, busybox: Path | None = None,
                    init_script: str = INIT_SCRIPT) -> Path:
    """Return a gzip'd initramfs for the counting guest, building it in ``cache_dir`` once.

    The file name carries a digest of busybox and the script, so a changed input never
    reuses a stale archive, and the file is written under a temporary name then renamed,
    so a concurrent or interrupted build never leaves a truncated archive behind.
    """
    busybox = busybox or busybox_path()
    if busybox is None:
        raise QemuError("no static busybox: apt-get install busybox-static")
    payload = busybox.read_bytes()
    key = hashlib.sha256(payload + init_script.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"counting-initramfs-{key}.cpio.gz"
    if target.exists():
        return target
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(initramfs_bytes(payload, init_script), compresslevel=6,
                                  mtime=0))
    os.replace(tmp, target)
    return target


# --- reading the serial log --------------------------------------------------------------
def parse_ticks(text: bytes) -> list[int]:
    """Every complete ``tick N`` line in a serial log, in order.

    Only whole lines count (up to their newline; the tty adds ``\\r``): kernel messages, a
    line cut in half by the switchover and a last line still being written are skipped
    instead of misread (``tick 4`` may yet become ``tick 42``).
    """
    return [int(m.group(1)) for m in _TICK_RE.finditer(text)]



def assert_resumed(last: int, dst_log: bytes) -> list[int]:
    """The oracle for "the whole machine moved": the destination's serial counter goes on
    from the source's ``last`` tick (+2 when the switchover cut a line in half), never
    from 1, and without gaps. Returns the destination's ticks."""
    dst_ticks = parse_ticks(dst_log)
    assert dst_ticks, "the destination printed no tick"
    assert 1 not in dst_ticks, "the destination restarted the guest instead of resuming it"
    assert dst_ticks[0] in (last + 1, last + 2), (last, dst_ticks[:5])
    assert dst_ticks == list(range(dst_ticks[0], dst_ticks[-1] + 1)), "a tick went missing"
    return dst_ticks

# --- the guest ---------------------------------------------------------------------------
class CountingGuest(QemuVM):
    """QEMU 7.2 running the counting guest under TCG, with file-backed RAM and QMP.

    ``workdir`` holds ``<name>.img`` (guest RAM, ``memory-backend-file`` with
    ``share=on``, removed on close unless ``keep_image``), ``<name>.serial`` (the guest's
    serial port), ``<name>.log`` (QEMU's own stdout/stderr) and ``<name>.qmp``.

    ``incoming=True`` adds ``-incoming defer`` (drive it with :meth:`migrate_incoming`);
    ``paused=True`` adds ``-S`` (then the guest only runs after ``cont``). Source and
    destination must be built with the same ``mem_mib``, kernel and initramfs: QEMU checks
    that the RAM blocks match.
    """

    def __init__(
        self,
        workdir: Path,
        initramfs: Path,
        *,
        name: str = "guest",
        mem_mib: int = 128,
        incoming: bool = False,
        paused: bool = False,
        kernel: Path | None = None,
        extra_args: list[str] | None = None,
        keep_image: bool = False,
    ) -> None:
        # QemuVM names its files after ``image_name``: one per instance, not per class.
        self.image_name = f"{name}.img"
        super().__init__(Path(workdir), mem_mib=mem_mib, fill=None, incoming=incoming,
                         extra_args=extra_args, keep_image=keep_image)
        self.initramfs = Path(initramfs)
        self.kernel = kernel or kernel_path()
        self.paused = paused
        self.serial_path = self.workdir / f"{name}.serial"

    # -- lifecycle ----------------------------------------------------------------------
    def command_line(self) -> list[str]:
        """QEMU's command line: TCG, pc machine, file-backed RAM, kernel + initramfs."""
        binary = qemu_binary()
        if binary is None:
            raise QemuError("qemu-system-x86_64 not found")
        if self.kernel is None:
            raise QemuError("no /boot/vmlinuz-* to boot (apt-get install linux-image-amd64)")
        mem = f"{self.mem_mib}M"
        args = [
            binary,
            "-accel", "tcg",
            "-nodefaults", "-display", "none",
            "-machine", "pc,memory-backend=m0",
            "-m", mem,
            "-object",
            f"memory-backend-file,id=m0,size={mem},mem-path={self.image_path},share=on",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initramfs),
            "-append", "console=ttyS0 quiet",
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self._qmp_path},server=on,wait=off",
        ]
        if self.paused:
            args.append("-S")
        if self.incoming:
            args += ["-incoming", "defer"]
        return args + self.extra_args

    def __enter__(self) -> Self:
        # A previous run's serial log would be read as this guest's ticks until QEMU
        # truncates it: remove it before QEMU starts.
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_path.unlink(missing_ok=True)
        super().__enter__()
        return self

    def close(self) -> None:
        """Quit QEMU, then SIGKILL its whole process group and reap it, whatever happened.

        QemuVM.close asks politely (QMP ``quit``) and kills only when QEMU is still alive;
        the group kill after it also ends anything QEMU may have spawned, and runs even if
        the polite part raised.
        """
        proc = self._proc
        try:
            super().close()
        finally:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        """True while the QEMU process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- the serial log -----------------------------------------------------------------
    def serial_text(self) -> bytes:
        """Everything the guest wrote to its serial port so far (empty before it starts)."""
        try:
            return self.serial_path.read_bytes()
        except FileNotFoundError:
            return b""

    def ticks(self) -> list[int]:
        """All complete ticks in this guest's serial log, in order."""
        return parse_ticks(self.serial_text())

    def last_tick(self) -> int | None:
        """The last complete tick, or ``None`` if the guest has not ticked yet."""
        ticks = self.ticks()
        return ticks[-1] if ticks else None

    def wait_ticks(self, count: int, timeout: float = 120, poll: float = 0.1) -> int:
        """Wait until the log shows a tick numbered at least ``count``; return the last tick.

        On a migration destination the numbers go on from the source's, so "at least K"
        means "the counter reached K", not "K lines were written here". Raises
        :class:`GuestTimeout` (with the log tails) on timeout, or at once if QEMU exits.
        """
        deadline = time.monotonic() + timeout
        while True:
            last = self.last_tick()
            if last is not None and last >= count:
                return last
            if not self.running:
                raise GuestTimeout(f"QEMU exited while waiting for tick {count}\n"
                                   + self.describe())
            if time.monotonic() > deadline:
                raise GuestTimeout(f"no tick {count} within {timeout:.0f} s (last: {last})\n"
                                   + self.describe())
            time.sleep(poll)

    def describe(self, n: int = 1500) -> str:
        """The tails of the serial log and of QEMU's own output, for failure messages."""
        serial = self.serial_text()[-n:].decode(errors="replace")
        return (f"--- serial {self.serial_path} (tail) ---\n{serial}\n"
                f"--- qemu {self.log_path} (tail) ---\n{self._log_tail(n)}")

    # -- migration ----------------------------------------------------------------------
    def migrate(self, uri: str, timeout: float = 120,
                capabilities: Mapping[str, bool] | None = None,
                parameters: Mapping[str, object] | None = None) -> dict[str, Any]:
        """Migrate (live: the guest keeps running until switchover) and wait for the end.

        Bandwidth is unlimited unless ``parameters`` says otherwise (QEMU's 128 MiB/s
        default only slows tests down). Returns the final ``query-migrate``; raises
        :class:`~tests.support.qemu_peer.QemuMigrationError` with QEMU's error-desc.
        """
        if capabilities:
            self.set_capabilities(**capabilities)
        self.set_parameters(**{"max_bandwidth": UNLIMITED_BANDWIDTH, **(parameters or {})})
        self.qmp("migrate", {"uri": uri})
        return self.wait_migration(timeout=timeout)

    def migrate_incoming(self, uri: str = "tcp:127.0.0.1:0") -> str:
        """``migrate-incoming`` on a ``-incoming defer`` guest; return the URI it listens on.

        With port 0 QEMU picks a free port itself (no race with other tests), read back
        from ``query-migrate``'s socket-address.
        """
        if not self.incoming:
            raise QemuError("migrate_incoming needs a guest built with incoming=True")
        self.qmp("migrate-incoming", {"uri": uri})
        if not uri.startswith("tcp:"):
            return uri
        for addr in self.query_migrate().get("socket-address", []):
            if addr.get("type") == "inet":
                return f"tcp:{addr['host']}:{addr['port']}"
        raise QemuError(f"QEMU did not report the address it listens on for {uri}")
