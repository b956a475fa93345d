"""``mignet bench recv-model``: the threaded loader against the coroutine loader, for real.

For each receive model and each stream shape, a destination ``mignet serve --incoming defer
--recv-model MODEL`` is driven over QMP exactly as management software would: the benchmark
sends ``query-migrate`` every 10 ms during the load and times each answer (the control
plane's latency), sends a ``migrate-set-capabilities`` mid-load (which must be refused in
both models: the option lock does not depend on the big lock), and afterwards asks the
destination for its big-lock hold times and main-loop stalls (``x-mignet-loop-stats``).
The source is a separate process, so the client's timings are not disturbed by it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mignet.bench.tcp import warm_free_memory
from mignet.errors import MignetError
from mignet.runtime.mainloop import summarize
from mignet.ui.terminal import console, stats_table
from mignet.units import parse_size

POLL_INTERVAL = 0.010


@dataclass
class Shape:
    name: str
    size: str
    blobs: int

    def describe(self) -> str:
        extra = f" + {self.blobs} x 64 KiB device sections" if self.blobs else ""
        return f"{self.size} random RAM{extra}"


@dataclass
class ModelRun:
    model: str
    shape: str
    seconds: float = 0.0
    nbytes: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds
    latency_times: list[float] = field(default_factory=list)  # since the load started
    set_caps_refused: bool | None = None
    set_caps_error: str = ""
    loop_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds else 0.0


async def run_one(model: str, shape: Shape, workdir: Path, listen: str = "tcp:127.0.0.1:0") -> ModelRun:
    """One load of ``shape`` into a fresh ``mignet serve`` destination using ``model``, with
    QMP polled throughout: the unit the benchmark repeats (and a test runs once)."""
    from qemu.qmp import QMPClient
    from qemu.qmp.qmp_client import ExecuteError

    sock = workdir / f"dst-{model}-{shape.name}.qmp"
    dst = subprocess.Popen([sys.executable, "-m", "mignet", "serve", "--qmp", f"unix:{sock}",
                            "--incoming", "defer", "--recv-model", model, "--json"],
                           stdout=subprocess.PIPE, text=True)
    run = ModelRun(model, shape.name)
    src: subprocess.Popen[str] | None = None
    qmp = QMPClient(f"bench-{model}")
    try:
        assert dst.stdout is not None
        await asyncio.to_thread(dst.stdout.readline)  # {"event": "qmp-listening", ...}
        await qmp.connect(str(sock))
        await qmp.execute("x-mignet-loop-stats", {"reset": True})
        await qmp.execute("migrate-incoming", {"uri": listen})
        info: dict[str, Any] = await qmp.execute("query-migrate")  # type: ignore[assignment]  # qemu.qmp returns object
        where = info["socket-address"][0]
        uri = f"{listen.partition(':')[0]}:{where['host']}:{where['port']}"
        src = subprocess.Popen([sys.executable, "-m", "mignet.bench.source", "-",
                                "--size", shape.size, "--blobs", str(shape.blobs)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert src.stdin is not None and src.stdout is not None
        await asyncio.to_thread(src.stdout.readline)  # the source guest exists
        warm_free_memory(parse_size(shape.size) + (256 << 20))  # as bench tcp: same for both models
        src.stdin.write(uri + "\n")
        src.stdin.flush()
        started: float | None = None
        status = ""
        while status not in ("completed", "failed", "cancelled"):
            t0 = time.perf_counter()
            info = await qmp.execute("query-migrate")  # type: ignore[assignment]  # qemu.qmp returns object
            t1 = time.perf_counter()
            status = info.get("status", "")
            if status == "active":
                if started is None:
                    started = t0
                run.latencies.append(t1 - t0)
                run.latency_times.append(t0 - started)
                if run.set_caps_refused is None:  # the first answer while the load runs
                    try:
                        await qmp.execute("migrate-set-capabilities", {"capabilities": [
                            {"capability": "events", "state": True}]})
                        run.set_caps_refused = False
                    except ExecuteError as exc:
                        run.set_caps_refused = True
                        run.set_caps_error = exc.error.error.desc
            await asyncio.sleep(max(0.0, POLL_INTERVAL - (time.perf_counter() - t0)))
        if status != "completed":
            raise MignetError(f"{model} load ended {status}: {info.get('error-desc', '')}")
        ram = info["ram"]
        run.nbytes = int(ram["total"])
        run.seconds = (info["total-time"] - info.get("setup-time", 0)) / 1000
        run.loop_stats = await qmp.execute("x-mignet-loop-stats", {"samples": True})  # type: ignore[assignment]
        await qmp.execute("quit")
    finally:
        try:
            await qmp.disconnect()
        except (EOFError, ConnectionError):
            pass  # after quit the destination closes first
        for proc in (src, dst):
            if proc is not None:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return run


def _plot(runs: list[ModelRun], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r.shape for r in runs})

    def figure(name: str, draw: Any) -> Path:
        """One panel per stream shape; ``draw(ax, shape)`` plots it."""
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes, strict=True):
            draw(ax, shape)
            ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def latency(ax: Any, shape: str) -> None:
        for r in (r for r in runs if r.shape == shape):
            ax.plot(r.latency_times, [x * 1000 for x in r.latencies], ".", ms=3,
                    label=f"{r.model} (p99 {summarize(r.latencies)['p99-ms']:.1f} ms)")
        ax.set_yscale("log")
        ax.set_xlabel("seconds into the load")
        ax.set_ylabel("query-migrate latency (ms)")
        ax.set_title(f"control plane during a load: {shape}")

    def holds(ax: Any, shape: str) -> None:
        for r in (r for r in runs if r.shape == shape):
            ms = sorted(x * 1000 for x in r.loop_stats.get("bql-hold-samples", []))
            if ms:
                ax.plot(ms, [i / len(ms) for i in range(1, len(ms) + 1)], label=r.model)
        ax.set_xscale("log")
        ax.set_xlabel("big-lock hold time (ms)")
        ax.set_ylabel("fraction of holds (CDF)")
        ax.set_title(f"big-lock holds: {shape}")

    paths = [figure("recv-model-latency.png", latency), figure("recv-model-bql.png", holds)]
    return paths


def bench_recv_model(size: str, blobs: int, out_dir: Path | None, repeat: int = 1,
                     listen: str = "tcp:127.0.0.1:0") -> dict[str, Any]:
    shapes = [Shape("ram", size, 0), Shape("devices", "64M", blobs)]
    runs: list[ModelRun] = []
    console.print(f"mignet bench recv-model: {repeat * len(shapes) * 2} loads into fresh destinations "
                  f"({', '.join(s.describe() for s in shapes)}), each polled over QMP; with the "
                  "defaults this takes a few minutes")
    if out_dir is not None:  # said now, so the user knows before the run what it will write
        console.print(f"plots will go to {out_dir}/ (--plots DIR chooses)")
    with tempfile.TemporaryDirectory(prefix="mignet-bench-") as tmp:
        for i in range(repeat):
            for shape in shapes:
                for model in (("thread", "coroutine") if i % 2 == 0 else ("coroutine", "thread")):
                    console.print(f"  {model:9s} loading {shape.describe()} …")
                    run = asyncio.run(run_one(model, shape, Path(tmp), listen))
                    runs.append(run)
    rows: list[tuple[str, Any]] = []
    result: dict[str, Any] = {"runs": [], "summary": []}
    for r in runs:
        result["runs"].append({
            "model": r.model, "shape": r.shape, "gbps": round(r.gbps, 3), "seconds": round(r.seconds, 3),
            "query_migrate_latency": summarize(r.latencies),
            "bql_holds": r.loop_stats.get("bql-holds", {}),
            "main_loop_stalls": r.loop_stats.get("main-loop-stalls", {}),
            "set_capabilities_refused": r.set_caps_refused, "set_capabilities_error": r.set_caps_error,
        })
    for shape in shapes:  # one row per (stream, model): throughput median, samples pooled
        for model in ("thread", "coroutine"):
            group = [r for r in runs if r.shape == shape.name and r.model == model]
            gbps = statistics.median(r.gbps for r in group)
            lat = summarize([x for r in group for x in r.latencies])
            holds = summarize([x for r in group for x in r.loop_stats.get("bql-hold-samples", [])])
            stall = max(r.loop_stats.get("main-loop-stalls", {}).get("max-ms", 0.0) for r in group)
            refused = all(r.set_caps_refused for r in group)
            mib_s = [f"{r.gbps * 1e9 / (1 << 20):.0f}" for r in group]
            rows.append((f"{shape.name} stream, {model} model:", ""))
            rows += [
                ("  throughput, median (runs)", f"{gbps * 1e9 / (1 << 20):.0f} MiB/s ({', '.join(mib_s)})"),
                (f"  query-migrate p50 / p99 / max (n={lat['count']})",
                 f"{lat['p50-ms']:.1f} / {lat['p99-ms']:.1f} / {lat['max-ms']:.1f} ms"),
                ("  big-lock hold p50 / p99 / max",
                 f"{holds['p50-ms']:.2f} / {holds['p99-ms']:.1f} / {holds['max-ms']:.1f} ms"),
                ("  longest main-loop stall", f"{stall:.1f} ms"),
                ("  set-capabilities mid-load", "refused" if refused else "NOT refused"),
            ]
            result["summary"].append({"shape": shape.name, "model": model, "gbps_median": round(gbps, 3),
                                      "query_migrate_latency": lat, "bql_holds": holds,
                                      "longest_stall_ms": stall, "set_capabilities_refused": refused})
    stats_table(f"mignet bench recv-model ({listen.partition(':')[0]}; destination driven over QMP)", rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result["plots"] = [str(p) for p in _plot(runs, out_dir)]
        console.print(f"plots: {', '.join(result['plots'])}")
    return result


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bench_recv_model("256M", 200, None), indent=1))
