"""Run a real QEMU (7.2, Debian's qemu-system-x86) as a migration peer for tests.

Why this exists: mignet reimplements QEMU's migration stream, and the only
trustworthy oracle for that format is QEMU itself.  These helpers start a
*paused* (``-S``) QEMU whose guest RAM is a ``memory-backend-file`` we fill
ourselves, so that

* as a **source** (:class:`QemuSource`) QEMU emits a real stream whose RAM
  content we know byte-for-byte (it is the image file), and
* as a **destination** (:class:`QemuDestination`, ``-incoming defer``) QEMU
  checks a stream we produce, and afterwards its RAM image can be compared
  with what we sent.

Because the guest never runs code, KVM works even on hosts where it could not
run a real guest, and RAM never changes behind our back.  ``-accel kvm -accel
tcg`` makes QEMU fall back to emulation where ``/dev/kvm`` is unusable.

QMP is driven with QEMU's own client library, ``qemu.qmp`` (asyncio).  Tests
are synchronous, so each VM owns a private event loop running in a daemon
thread and every public method is a blocking wrapper around a coroutine
submitted to that loop.  That keeps the tests free of asyncio and never
touches (or conflicts with) an event loop that pytest or the test might own.

Processes never leak: ``__exit__`` (and a ``weakref.finalize`` safety net
for objects that are dropped without ``with``) asks QEMU to ``quit``, waits,
then SIGKILLs the process group if it is still alive.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np

from tests.support.processes import track

__all__ = [
    "QEMU_BINARY_NAME",
    "QemuError",
    "QemuMigrationError",
    "QemuVM",
    "QemuSource",
    "QemuDestination",
    "qemu_binary",
    "qemu_skip_reason",
    "fill_image",
    "capture_stream",
    "UNLIMITED_BANDWIDTH",
]

QEMU_BINARY_NAME = "qemu-system-x86_64"

#: ``max-bandwidth`` used when the caller asks for "unlimited" (bytes/s).
#: QEMU's default is only 128 MiB/s (32 MiB/s before 8.x); 10 GiB/s means the
#: socket, not QEMU's rate limiter, sets the pace.
UNLIMITED_BANDWIDTH = 10 * 1024**3

Fill = Literal["random", "zero", "mixed"]

_T = TypeVar("_T")

_PAGE = 4096
_CHUNK = 16 * 1024 * 1024  # fill the image 16 MiB at a time: fast, bounded memory
_FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


class QemuError(RuntimeError):
    """QEMU could not be started, connected to, or driven."""


class QemuMigrationError(QemuError):
    """A migration ended in ``failed``/``cancelled`` (or timed out).

    ``info`` is the last ``query-migrate`` result, so a test failure shows
    QEMU's own ``error-desc`` instead of a bare status.
    """

    def __init__(self, message: str, info: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.info: dict[str, Any] = dict(info or {})


def qemu_binary() -> str | None:
    """Return the path of ``qemu-system-x86_64``, or ``None`` if not installed.

    ``$MIGNET_QEMU`` overrides the lookup so a test run can point at another
    build; tests skip (rather than fail) when this returns ``None``.
    """
    override = os.environ.get("MIGNET_QEMU")
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which(QEMU_BINARY_NAME)


def qemu_skip_reason() -> str | None:
    """Why QEMU-backed tests cannot run here, or ``None`` when they can.

    Usage: ``pytest.mark.skipif(qemu_skip_reason() is not None,
    reason=qemu_skip_reason() or "")``.
    """
    if qemu_binary() is None:
        return f"{QEMU_BINARY_NAME} not installed (set MIGNET_QEMU to override)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "python package qemu.qmp not installed"
    return None


#: Convenience constant for ``skipif`` decorators (evaluated at import time).
QEMU_SKIP_REASON: str | None = qemu_skip_reason()


def fill_image(path: Path, mem_mib: int, fill: Fill = "random", seed: int = 0) -> None:
    """Create ``path`` as a ``mem_mib`` MiB guest-RAM image.

    * ``random``: every byte from ``numpy.random.default_rng(seed)`` (no zero
      pages in practice, so QEMU sends everything as PAGE records);
    * ``zero``: all zero (QEMU sends ZERO records only);
    * ``mixed``: pages are randomly (seeded) either zero or random, ~50/50,
      which exercises both record kinds and the CONTINUE flag.

    Written chunk by chunk so a multi-GiB image neither takes long nor needs
    the whole image in memory.  Deterministic for a given (mem_mib, fill, seed),
    so a test can regenerate the expected RAM instead of reading the file.
    """
    size = mem_mib * 1024 * 1024
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        if fill == "zero":
            f.truncate(size)
            return
        remaining = size
        while remaining:
            n = min(_CHUNK, remaining)
            buf = np.frombuffer(rng.bytes(n), dtype=np.uint8)
            if fill == "mixed":
                pages = buf.reshape(-1, _PAGE).copy()
                pages[rng.random(pages.shape[0]) < 0.5] = 0
                buf = pages.reshape(-1)
            elif fill != "random":
                raise ValueError(f"unknown fill {fill!r}")
            f.write(buf.tobytes())
            remaining -= n


class _LoopThread:
    """A private asyncio loop in a daemon thread; ``run`` blocks on a coroutine.

    Why: ``qemu.qmp`` is asyncio-only and binds its client to the loop it
    connected on, so all calls of one client must run on one loop.  A
    dedicated thread gives that without asking the tests to be async.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._main, name=f"qemu-peer-{name}", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        fut: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def _kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL QEMU's process group if it is still running (safety net)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class QemuVM:
    """One paused QEMU with file-backed RAM and a QMP connection.

    Base of :class:`QemuSource` and :class:`QemuDestination`; usable directly
    for anything else a test needs (``vm.qmp("query-status")``).
    """

    #: file name of the RAM image inside ``workdir``; subclasses override.
    image_name = "vm.img"

    def __init__(
        self,
        workdir: Path,
        mem_mib: int = 256,
        fill: Fill | None = "random",
        seed: int = 0,
        incoming: bool = False,
        extra_args: list[str] | None = None,
        keep_image: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.mem_mib = mem_mib
        self.fill: Fill | None = fill
        self.seed = seed
        self.incoming = incoming
        self.extra_args = list(extra_args or [])
        self.keep_image = keep_image
        stem = Path(self.image_name).stem
        self._qmp_path = self.workdir / f"{stem}.qmp"
        self._log_path = self.workdir / f"{stem}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: _LoopThread | None = None
        self._client: Any = None  # qemu.qmp.QMPClient, imported lazily
        self._finalizer: weakref.finalize | None = None
        #: seconds spent in ``__enter__`` (image fill, QEMU start, QMP connect).
        self.start_seconds: float = 0.0
        self.fill_seconds: float = 0.0

    # -- properties -----------------------------------------------------
    @property
    def image_path(self) -> Path:
        """The guest-RAM backing file (== the guest's RAM while paused)."""
        return self.workdir / self.image_name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        """QEMU's stdout/stderr, useful when a test fails."""
        return self._log_path

    # -- lifecycle --------------------------------------------------------
    def command_line(self) -> list[str]:
        """The exact QEMU command line (exposed for debugging/logging)."""
        binary = qemu_binary()
        if binary is None:
            raise QemuError(f"{QEMU_BINARY_NAME} not found")
        mem = f"{self.mem_mib}M"
        args = [
            binary,
            "-accel", "kvm", "-accel", "tcg",
            "-nodefaults", "-display", "none", "-S",
            "-machine", "pc,memory-backend=m0",
            "-m", mem,
            "-object",
            f"memory-backend-file,id=m0,size={mem},mem-path={self.image_path},share=on",
            "-qmp", f"unix:{self._qmp_path},server=on,wait=off",
        ]
        if self.incoming:
            args += ["-incoming", "defer"]
        return args + self.extra_args

    def __enter__(self) -> QemuVM:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.fill is not None:
            fill_image(self.image_path, self.mem_mib, self.fill, self.seed)
        elif not self.image_path.exists():
            fill_image(self.image_path, self.mem_mib, "zero")
        self.fill_seconds = time.monotonic() - t0
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        from qemu.qmp import QMPClient

        self._qmp_path.unlink(missing_ok=True)
        log = open(self._log_path, "wb")
        try:
            # New session => own process group, so cleanup can kill exactly it.
            self._proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        track(self._proc, group=True)  # stopped when the test ends, even without close()
        self._finalizer = weakref.finalize(self, _kill_process, self._proc)
        self._loop = _LoopThread(self.image_name)
        self._client = QMPClient(self.image_name)
        self._loop.run(self._connect(), timeout=60)

    async def _connect(self) -> None:
        """Connect to QMP, retrying: the socket file exists before QEMU listens."""
        assert self._proc is not None
        deadline = time.monotonic() + 30
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise QemuError(
                    f"QEMU exited with {self._proc.returncode} before QMP was up:\n"
                    + self._log_tail()
                )
            if self._qmp_path.exists():
                try:
                    await self._client.connect(str(self._qmp_path))
                    return
                except Exception as e:  # ConnectError, ConnectionRefusedError...
                    last = e
            await asyncio.sleep(0.05)
        raise QemuError(f"could not connect to QMP at {self._qmp_path}: {last!r}")

    def close(self) -> None:
        """Quit QEMU (QMP ``quit``), wait, kill if needed, remove the image.

        Idempotent and safe to call after partial start-up failures.
        """
        try:
            if self._client is not None and self._loop is not None:
                try:
                    self._loop.run(self._quit(), timeout=10)
                except Exception:
                    pass
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                _kill_process(self._proc)
        finally:
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            if self._loop is not None:
                self._loop.stop()
                self._loop = None
            self._client = None
            self._qmp_path.unlink(missing_ok=True)
            if not self.keep_image:
                self.image_path.unlink(missing_ok=True)

    async def _quit(self) -> None:
        from qemu.qmp import Runstate

        try:
            if self._client.runstate == Runstate.RUNNING:
                try:
                    await asyncio.wait_for(self._client.execute("quit"), 5)
                except Exception:
                    pass  # QEMU may drop the connection before replying
        finally:
            try:
                await asyncio.wait_for(self._client.disconnect(), 5)
            except Exception:
                pass

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- QMP --------------------------------------------------------------
    def qmp(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 30
    ) -> Any:
        """Execute one QMP command and return its ``return`` value.

        Raises ``qemu.qmp.ExecuteError`` when QEMU answers with an error.
        """
        if self._loop is None or self._client is None:
            raise QemuError("QEMU is not running (use the object as a context manager)")
        return self._loop.run(self._client.execute(cmd, args), timeout=timeout)

    def set_capabilities(self, **caps: bool) -> None:
        """``migrate-set-capabilities``, e.g. ``set_capabilities(multifd=True)``.

        Keyword names use ``_`` for QEMU's ``-`` (``auto_converge``).
        """
        if caps:
            self.qmp(
                "migrate-set-capabilities",
                {
                    "capabilities": [
                        {"capability": k.replace("_", "-"), "state": bool(v)}
                        for k, v in caps.items()
                    ]
                },
            )

    def set_parameters(self, **params: object) -> None:
        """``migrate-set-parameters``, e.g. ``set_parameters(multifd_channels=4)``."""
        if params:
            self.qmp(
                "migrate-set-parameters",
                {k.replace("_", "-"): v for k, v in params.items()},
            )

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.qmp("query-migrate"))

    def wait_migration(self, timeout: float = 120, poll: float = 0.05) -> dict[str, Any]:
        """Poll ``query-migrate`` until completed/failed/cancelled.

        Returns the final dict on ``completed``; raises
        :class:`QemuMigrationError` (with QEMU's ``error-desc``) otherwise.
        """
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while True:
            info = self.query_migrate()
            status = info.get("status")
            if status in _FINAL_STATES:
                break
            if self._proc is not None and self._proc.poll() is not None:
                raise QemuMigrationError(
                    f"QEMU exited ({self._proc.returncode}) during migration:\n"
                    + self._log_tail(),
                    info,
                )
            if time.monotonic() > deadline:
                raise QemuMigrationError(
                    f"migration still {status!r} after {timeout}s", info
                )
            time.sleep(poll)
        if info["status"] != "completed":
            desc = info.get("error-desc", "(no error-desc)")
            raise QemuMigrationError(
                f"migration {info['status']}: {desc}\n{self._log_tail()}", info
            )
        return info

    def status(self) -> str:
        """Runstate from ``query-status`` (e.g. ``prelaunch``, ``postmigrate``)."""
        return str(self.qmp("query-status")["status"])

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status once it exits within ``timeout`` s, else None (QEMU 7.2 ends
        itself when an incoming migration fails to load, and its QMP goes with it)."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class QemuSource(QemuVM):
    """A paused QEMU whose RAM (``workdir/src.img``) is filled with known bytes.

    >>> with QemuSource(tmp_path, mem_mib=64) as src:
    ...     info = src.migrate(f"tcp:127.0.0.1:{port}")
    ...     ram = src.image_path.read_bytes()   # what the receiver must rebuild
    """

    image_name = "src.img"

    def __init__(
        self,
        workdir: Path,
        mem_mib: int = 256,
        fill: Fill = "random",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(workdir, mem_mib=mem_mib, fill=fill, seed=seed, **kwargs)

    def __enter__(self) -> QemuSource:
        super().__enter__()
        return self

    def migrate(
        self,
        uri: str,
        max_bandwidth: int | None = None,
        timeout: float = 120,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, object] | None = None,
    ) -> dict[str, Any]:
        """Migrate to ``uri`` and block until done; return final ``query-migrate``.

        ``max_bandwidth`` is bytes/s; ``None`` means effectively unlimited
        (:data:`UNLIMITED_BANDWIDTH`) because QEMU's default cap would make
        tests slow.  ``capabilities``/``parameters`` are applied first (same
        key style as :meth:`set_capabilities`/:meth:`set_parameters`).
        Raises :class:`QemuMigrationError` on failure, incl. ``error-desc``.
        """
        if capabilities:
            self.set_capabilities(**capabilities)
        self.set_parameters(
            max_bandwidth=UNLIMITED_BANDWIDTH if max_bandwidth is None else max_bandwidth,
            **(parameters or {}),
        )
        self.qmp("migrate", {"uri": uri})
        return self.wait_migration(timeout=timeout)

    def start_postcopy(self, uri: str, switch_after: int = 4 << 20, timeout: float = 60,
                       postcopy_bandwidth: int = 0, preempt: bool = False) -> None:
        """Migrate with postcopy-ram and switch to postcopy once ``switch_after`` bytes went
        (``migrate-start-postcopy``); returns at the switch. 16 MiB/s in precopy makes the
        first round last seconds, so the switch always comes mid-round, with pages still
        owed. ``postcopy_bandwidth``: max-postcopy-bandwidth (0: unlimited), to make the
        postcopy phase last. ``preempt``: capability postcopy-preempt (a second connection
        for the requested pages)."""
        self.set_capabilities(postcopy_ram=True, postcopy_preempt=preempt)
        self.set_parameters(max_bandwidth=16 << 20, max_postcopy_bandwidth=postcopy_bandwidth)
        self.qmp("migrate", {"uri": uri})
        deadline = time.monotonic() + timeout
        while self.query_migrate().get("ram", {}).get("transferred", 0) < switch_after:
            if time.monotonic() > deadline:
                raise QemuMigrationError(f"not {switch_after} bytes sent after {timeout} s",
                                         self.query_migrate())
            time.sleep(0.05)
        self.qmp("migrate-start-postcopy")

    def migrate_postcopy(self, uri: str, timeout: float = 120,
                         postcopy_bandwidth: int = 0, preempt: bool = False) -> dict[str, Any]:
        """:meth:`start_postcopy`, then wait for the end: the final ``query-migrate``."""
        self.start_postcopy(uri, postcopy_bandwidth=postcopy_bandwidth, preempt=preempt)
        return self.wait_migration(timeout=timeout)


class QemuDestination(QemuVM):
    """A paused QEMU started with ``-incoming defer`` (RAM at ``workdir/dst.img``).

    The image starts all-zero by default (``fill="zero"``), so after an
    incoming migration completes, ``image_path`` holds exactly the RAM that
    was received and can be compared with the source image.
    """

    image_name = "dst.img"

    def __init__(
        self,
        workdir: Path,
        mem_mib: int = 256,
        fill: Fill = "zero",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("incoming", True)
        super().__init__(workdir, mem_mib=mem_mib, fill=fill, seed=seed, **kwargs)

    def __enter__(self) -> QemuDestination:
        super().__enter__()
        return self

    def migrate_incoming(
        self,
        uri: str,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, object] | None = None,
    ) -> None:
        """Start listening (``migrate-incoming``); returns once QEMU listens.

        For ``tcp:HOST:0`` QEMU picks a port: read it back with
        :meth:`listen_uri`.
        """
        if capabilities:
            self.set_capabilities(**capabilities)
        if parameters:
            self.set_parameters(**parameters)
        self.qmp("migrate-incoming", {"uri": uri})

    def listen_uri(self) -> str | None:
        """The actual listening address (``socket-address``) as a tcp: URI."""
        info = self.query_migrate()
        for addr in info.get("socket-address", []):
            if addr.get("type") == "inet":
                return f"tcp:{addr['host']}:{addr['port']}"
        return None


def capture_stream(
    workdir: Path,
    mem_mib: int,
    out: Path,
    seed: int = 0,
    fill: Fill = "random",
    keep_image: bool = False,
    timeout: float = 300,
) -> Path:
    """Migrate a paused QEMU into ``exec:cat > out``; return ``out``.

    QEMU 7.2 has no ``file:`` URI, so ``exec:`` with ``cat`` is the way to
    get a real stream file for decoder tests.  With ``keep_image=True`` the
    RAM image stays at ``workdir/src.img`` to compare against.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with QemuSource(
        workdir, mem_mib=mem_mib, fill=fill, seed=seed, keep_image=keep_image
    ) as src:
        quoted = str(out).replace("'", "'\\''")
        src.migrate(f"exec:cat > '{quoted}'", timeout=timeout)
    return out
