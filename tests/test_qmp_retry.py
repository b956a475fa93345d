"""A ``mignet serve --incoming defer`` destination whose load failed or was cancelled takes
a new ``migrate-incoming`` (QEMU 7.2 exits instead; a management layer can then retry on
the same process): real processes, real QMP, a real source that sends garbage first."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from tests.support.qmp_serve import FINAL, migrate_completes, serve
from tests.support.streams import resetting_peer


def _connect(uri: str) -> socket.socket:
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    return socket.create_connection((host, int(port)))


def test_a_failed_then_a_cancelled_incoming_migration_is_followed_by_a_good_one(tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--out", str(out), "--digest", "sha256") as dst, \
                serve(tmp_path, "src", "--size", "16M", "--fill", "mixed", "--seed", "2") as src:
            # 1: a source that is not a migration stream
            uri = await dst.incoming_uri()
            bad = await asyncio.to_thread(_connect, uri)
            bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
            failed = await dst.wait_status(*FINAL)
            bad.close()
            assert failed["status"] == "failed" and "error-desc" in failed
            assert (await dst.x("query-status"))["status"] == "inmigrate"
            # 2: cancelled while listening
            await dst.incoming_uri()
            await dst.x("migrate-cancel")
            assert (await dst.wait_status(*FINAL))["status"] == "cancelled"
            # 3: a real migration completes, into the same --out folder
            uri = await dst.incoming_uri()
            await src.x("migrate-set-parameters", {"max-bandwidth": 0})
            await migrate_completes(src, dst, uri)
            # once completed, the guest is here: no further incoming migration
            cls, desc = await dst.error("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            assert cls == "GenericError" and "'-incoming' was not specified" in desc
    asyncio.run(main())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["digest"] == "sha256"  # the retry kept serve's --digest


def test_a_running_source_whose_migration_failed_runs_on_and_migrates_again(tmp_path: Path) -> None:
    """The destination vanishes mid-RAM: the source ends 'failed', its vCPUs run on (QEMU
    resumes the guest), and the next migrate completes with the same RAM on both ends."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "64M", "--fill", "mixed", "--dirty-rate", "8MiB/s") as src:
            with resetting_peer(1 << 20) as rude:
                await src.x("migrate-set-parameters", {"max-bandwidth": 32 << 20})
                await src.x("migrate", {"uri": rude})
                failed = await src.wait_status(*FINAL, timeout=60)
            assert failed["status"] == "failed", failed
            assert (await src.x("query-status"))["status"] == "running"
            uri = await dst.incoming_uri()
            await src.x("migrate-set-parameters", {"max-bandwidth": 0})
            await migrate_completes(src, dst, uri)
    asyncio.run(main())
