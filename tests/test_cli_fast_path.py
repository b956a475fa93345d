"""The user's path as fast as the wire (issue 15): a command starts without numpy's BLAS
thread pool (0.2 s of start-up here, for routines mignet never calls), and ``mignet bench
cli`` runs the raw pair and the real CLI, with and without a digest, in one run. Real
processes over real sockets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.cli import start_recv


def test_a_command_starts_no_blas_threads(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    env = {k: v for k, v in subprocess_env.items() if k != "OPENBLAS_NUM_THREADS"}
    proc, _ = start_recv(mignet_cmd, env)  # listening: numpy and the loader are imported
    try:
        threads = os.listdir(f"/proc/{proc.pid}/task")
        assert len(threads) == 1, f"{len(threads)} threads in a receiver that waits for a source"
    finally:
        proc.kill()
        proc.wait()


def test_a_users_blas_setting_is_kept(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    proc, _ = start_recv(mignet_cmd, {**subprocess_env, "OPENBLAS_NUM_THREADS": "3"})
    try:
        assert len(os.listdir(f"/proc/{proc.pid}/task")) > 1  # OpenBLAS: main + its workers
    finally:
        proc.kill()
        proc.wait()


def test_bench_cli_runs_raw_and_cli_with_and_without_digest(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    r = subprocess.run([*mignet_cmd, "bench", "cli", "--size", "16M", "--repeat", "1", "--json-out", str(out)],
                       capture_output=True, text=True, env={**subprocess_env, "COLUMNS": "80"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bench cli: a 16 MiB image in /dev/shm into /dev/shm")
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    result = json.loads(out.read_text())
    assert sorted(run["kind"] for run in result["runs"]) == ["cli", "cli-none", "raw"]
    assert all(run["seconds"] and not run["error"] for run in result["runs"]), result["runs"]
    assert all(run["rss_peak"] >= 16 << 20 for run in result["runs"])  # the file's pages, mapped
    assert set(result["ratios"]) == {"raw", "cli", "cli-none"} and result["ratios"]["raw"] == 1.0
    assert not list(Path("/dev/shm").glob("mignet-bench-out-*"))
