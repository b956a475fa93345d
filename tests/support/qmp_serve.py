"""A ``mignet serve`` process driven by QEMU's own QMP client (qemu.qmp), over a real UNIX
socket: shared by the QMP tests on the host and the QMP-over-RDMA test in the guest."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.support.processes import track

FINAL = ("completed", "failed", "cancelled")
ROOT = Path(__file__).resolve().parent.parent.parent


class Serve:
    """One ``mignet serve`` process and a connected QMPClient."""

    def __init__(self, proc: subprocess.Popen[str], path: Path, client: QMPClient) -> None:
        self.proc, self.path, self.client = proc, path, client

    async def x(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(cmd, args)

    async def error(self, cmd: str, args: dict[str, Any] | None = None) -> tuple[str, str]:
        """Run a command that must fail; returns (class, desc)."""
        with pytest.raises(ExecuteError) as info:
            await self.x(cmd, args)
        err = info.value.error.error
        return err.class_, err.desc

    async def wait_status(self, *statuses: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = await self.x("query-migrate")
            if info.get("status") in statuses:
                return info
            assert time.monotonic() < deadline, f"still {info} after {timeout} s"
            await asyncio.sleep(0.02)

    def events(self, name: str = "MIGRATION") -> list[Any]:
        """Events received so far (drained), ``data`` only for MIGRATION ones' status."""
        return [e for e in self.client.events.clear() if e["event"] == name]

    async def incoming_uri(self) -> str:
        await self.x("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        addr = (await self.x("query-migrate"))["socket-address"][0]
        return f"tcp:{addr['host']}:{addr['port']}"


@asynccontextmanager
async def serve(tmp: Path, name: str, *args: str) -> AsyncIterator[Serve]:
    path = tmp / f"{name}.qmp"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = track(subprocess.Popen([sys.executable, "-m", "mignet", "serve",
                                   "--qmp", f"unix:{path}", "--json", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert json.loads(line)["qmp"] == [f"unix:{path}"], proc.stderr.read() if proc.stderr else ""
        client = QMPClient(name)
        await client.connect(str(path))
        try:
            yield Serve(proc, path, client)
        finally:
            try:
                await asyncio.wait_for(client.execute("quit"), 5)
            except Exception:  # noqa: BLE001 - the process may close first
                pass
            try:
                await client.disconnect()
            except (EOFError, OSError):  # quit closes the connection, as QEMU's does
                pass
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def migrate_completes(src: Serve, dst: Serve, uri: str, timeout: float = 60,
                            dst_timeout: float | None = None) -> tuple[Any, Any]:
    """``migrate`` ``src`` to ``uri``, where ``dst`` listens: both must end completed (the
    source within ``timeout``, then the destination within ``dst_timeout``, default the
    same), holding the same RAM. Returns both final ``query-migrate`` answers."""
    await src.x("migrate", {"uri": uri})
    done = await src.wait_status(*FINAL, timeout=timeout)
    assert done["status"] == "completed", done
    got = await dst.wait_status(*FINAL, timeout=timeout if dst_timeout is None else dst_timeout)
    assert got["status"] == "completed", got
    a, b = await src.x("x-mignet-query-guest"), await dst.x("x-mignet-query-guest")
    assert a["ram-sha256"] == b["ram-sha256"]
    return done, got


def statuses(events: list[Any]) -> list[str]:
    return [e["data"]["status"] for e in events]
