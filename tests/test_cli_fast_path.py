"""The user's path as fast as the wire (issue 15): a command starts without numpy's BLAS
thread pool (0.2 s of start-up here, for routines mignet never calls), and ``mignet bench
cli`` runs the raw pair and the real CLI, with and without a digest, in one run. Real
processes over real sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _threads_after_import(env: dict[str, str]) -> int:
    """Threads of a fresh process that has imported the command line (numpy included), as
    ``mignet`` does before parsing its options."""
    r = subprocess.run([sys.executable, "-c", "import os, mignet.cli.main; print(len(os.listdir('/proc/self/task')))"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_a_command_starts_no_blas_threads(subprocess_env: dict[str, str]) -> None:
    env = {k: v for k, v in subprocess_env.items() if k != "OPENBLAS_NUM_THREADS"}
    assert _threads_after_import(env) == 1


def test_a_users_blas_setting_is_kept(subprocess_env: dict[str, str]) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("OpenBLAS starts no threads on one CPU")
    assert _threads_after_import({**subprocess_env, "OPENBLAS_NUM_THREADS": "2"}) == 2


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
