"""The benchmarks as a user runs them (issue 14, item 6): they write only where told, say
up front what a long run does, refuse a run count of 0, never count a failed run as 0, and
print no notice about a choice the user did not make."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mignet.bench.rdma import RunFailed, ib_write_bw_result, median_of_ok
from mignet.cli import exits
from tests.support.cli import one_line

# ib_write_bw's result table (perftest 4.5), as it prints it after a good and a failed run.
_HEADER = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n"
GOOD = _HEADER + " 1048576    64               22.20              22.17                0.000022\n"
ZERO = _HEADER + " 1048576    64               0.00               0.00                 0.000000\n"


def test_bench_tcp_refuses_zero_runs(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "bench", "tcp", "--repeat", "0"], capture_output=True, text=True,
                       env=subprocess_env, timeout=60)
    assert r.returncode == exits.USAGE
    one_line(r.stderr, "argument --repeat: must be at least 1, not 0")


@pytest.mark.slow
def test_bench_recv_model_writes_plots_into_a_new_folder_it_names(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    r = subprocess.run([*mignet_cmd, "bench", "recv-model", "--size", "8M", "--blobs", "4", "--repeat", "1"],
                       capture_output=True, text=True, env={**subprocess_env, "COLUMNS": "80"}, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "docs").exists()
    [folder] = [p for p in tmp_path.iterdir() if p.name.startswith("recv-model-plots-")]
    assert f"plots will go to {folder.name}/" in r.stderr
    # one latency figure per stream and one for the source side, a panel per run in each
    assert sorted(p.name for p in folder.iterdir()) == [
        "recv-model-bql.png", "recv-model-latency-devices.png", "recv-model-latency-ram.png",
        "recv-model-latency-source.png"]
    first = r.stderr.splitlines()[0]
    assert first.startswith("mignet bench recv-model: 5 loads")
    # the table reads whole at 80 columns: one figure per row, nothing cut
    table = [line for line in r.stderr.splitlines() if line.startswith("│")]
    assert table and all(len(line) <= 80 and "…" not in line for line in table), r.stderr
    assert any("query p99 per run (ms)" in line for line in table)


def test_bench_live_says_what_it_runs_and_nothing_it_was_not_asked(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "bench", "live", "--size", "8M", "--rates", "0",
                        "--max-bandwidth", "64MiB/s", "--track-size", "8M", "--give-up", "5"],
                       capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("mignet bench live: 1 live migrations of a 8.0 MiB guest")
    assert "as asked" not in r.stderr
    assert "page-hash fallback" in r.stderr  # the figure still says what it compares


def test_bench_rdma_without_ib_write_bw_says_so_before_starting(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "bench", "rdma", "--size", "4M"], capture_output=True, text=True,
                       env={**subprocess_env, "PATH": "/nonexistent"}, timeout=60)
    assert r.returncode == exits.SETUP
    one_line(r.stderr, "ib_write_bw missing")


def test_a_failed_ib_write_bw_run_is_failed_not_zero() -> None:
    assert ib_write_bw_result(GOOD) == 22.17
    with pytest.raises(RunFailed, match="reported 0.0 MiB/s"):
        ib_write_bw_result(ZERO)
    with pytest.raises(RunFailed, match="printed no result"):
        ib_write_bw_result("Couldn't connect to 10.9.0.1:19504\n")
    assert median_of_ok([None, 22.2, 21.1]) == pytest.approx(21.65)  # seen: [0.0, 22.2, 21.1]
    assert median_of_ok([None, None]) is None


def test_bench_channels_runs_every_kind_and_fits_80_columns(mignet_cmd: list[str],
                                                             subprocess_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    """mignet, the raw loop and (where it is installed) QEMU 7.2 → QEMU 7.2 multifd, each N,
    in one run: every run succeeds, QEMU's figures are its own (it sent at least the random
    image, its CPU is not zero) and the ratio against mignet is the ratio of the medians."""
    from tests.support.qemu_peer import qemu_skip_reason

    no_qemu = qemu_skip_reason()
    r = subprocess.run([*mignet_cmd, "bench", "channels", "--size", "64M", "--channels", "1,2",
                        "--repeat", "1", "--json-out", str(tmp_path / "runs.json")], capture_output=True, text=True,
                       env=subprocess_env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    runs = [line for line in lines if " N=" in line]
    assert len(runs) == (4 if no_qemu else 6) and not any("FAILED" in line for line in runs), r.stdout
    tables = "\n".join(lines).split("\nN  ")
    rows = {line.split()[0]: line for line in tables[1].splitlines()[1:]}
    assert set(rows) == {"1", "2"} and all(row.rstrip().endswith("0/0") for row in rows.values())
    result = json.loads((tmp_path / "runs.json").read_text())
    for run in (run for run in result["runs"] if run["kind"] != "qemu"):  # CPU by side, in full
        split = run["detail"]
        assert set(split) == {"send_user", "send_sys", "recv_user", "recv_sys"}, run
        assert split["send_user"] > 0 and split["recv_user"] > 0, run
        assert sum(split.values()) == pytest.approx(run["cpu"]), run
    if no_qemu:
        assert f"no QEMU → QEMU runs: {no_qemu}" in r.stdout
        return
    assert len(tables) == 3 and tables[2].startswith("qemu MiB/s"), r.stdout
    qrows = {line.split()[0]: line.split() for line in tables[2].splitlines()[1:]}
    assert set(qrows) == {"1", "2"}, r.stdout
    by_n = {run["channels"]: run for run in result["runs"] if run["kind"] == "qemu"}
    mignet = {run["channels"]: run for run in result["runs"] if run["kind"] == "mignet"}
    for n, row in qrows.items():
        q = by_n[int(n)]
        assert q["seconds"] > 0 and q["detail"]["transferred"] >= 64 << 20, q
        assert 0 < q["cpu"] <= q["detail"]["cpu_life"], q
        assert q["detail"]["total_time_ms"] > 0, q
        assert float(row[1]) == pytest.approx(q["mib_s"], abs=1), row
        assert float(row[2]) == pytest.approx(mignet[int(n)]["mib_s"] / q["mib_s"], abs=0.01), row
        assert row[3] == ("mignet" if float(row[2]) > 1 else "qemu") and row[-1] == "0", row


def test_bench_channels_reports_a_failed_run_and_leaves_it_out(tmp_path: Path) -> None:
    """A run whose sender cannot start is recorded as failed with its reason; the summary
    counts it and takes no figure from it."""
    from mignet.bench.channels import Results, run_once, summary

    failed = run_once("mignet", 2, tmp_path / "missing.img", 16 << 20, timeout=60)
    assert failed.seconds is None and failed.error, failed
    results = Results(16 << 20, [failed])
    row = summary(results, [2])[1]
    assert row.split()[1] == "0" and "n/a" in row and row.rstrip().endswith("1/0")


def test_a_json_out_path_that_cannot_be_written_is_refused_before_the_run(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """Not after minutes of runs, with a traceback."""
    r = subprocess.run([*mignet_cmd, "bench", "tcp", "--json-out", str(tmp_path / "no" / "x.json")],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.USAGE
    one_line(r.stderr, "is not a folder you can write")


def test_bench_postcopy_runs_each_mode_side_by_side_whole_at_80_columns(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "bench", "postcopy", "--size", "16M", "--rates", "256M",
                        "--max-bandwidth", "32MiB/s", "--give-up", "3"],
                       capture_output=True, text=True, env={**subprocess_env, "COLUMNS": "80"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("mignet bench postcopy: 3 migrations of a 16.0 MiB guest")
    table = [line for line in r.stderr.splitlines() if line.startswith("│")]
    assert "FAILED" not in r.stderr, r.stderr
    assert [line.split("│")[2].strip() for line in table if "RAM identical" in line] == ["yes"] * 3
    assert table and all(len(line) <= 80 and "…" not in line for line in table), r.stderr
    assert sum("fault latency p50/p99/max" in line for line in table) == 2  # the postcopy runs
