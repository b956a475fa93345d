"""``mignet bench recv-model``: the threaded loader against the coroutine loader, for real,
and the control plane of a migrating source.

For each receive model and each stream shape, a destination ``mignet serve --incoming defer
--recv-model MODEL`` is driven over QMP exactly as management software would: the benchmark
sends ``query-migrate`` every 2 ms during the load and times each answer (the control
plane's latency), sends a ``migrate-set-capabilities`` mid-load (which must be refused in
both models: the option lock does not depend on the big lock), and afterwards asks the
destination for its big-lock hold times and main-loop stalls (``x-mignet-loop-stats``).
The source is a separate process, so the client's timings are not disturbed by it. Then the
same on the other side: ``query-migrate`` on a ``mignet serve`` source while it migrates.

One slow answer decides a p99 of a few dozen samples, and one lucky run hides a bad one, so
every run is reported on its own (p99, max, samples) next to the spread across runs and the
pooled figure. To say *where* a slow answer waited, each query is bracketed by reads of
``/proc/<pid>/task/<tid>/schedstat``: the run-queue wait of the served process's main
thread (runnable, no CPU) and of the benchmark's own thread during that answer; and every
thread's CPU time and run-queue wait over the load.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mignet.bench.tcp import warm_free_memory
from mignet.errors import MignetError
from mignet.runtime.mainloop import summarize
from mignet.ui.terminal import console, stats_table
from mignet.units import parse_size

POLL_INTERVAL = 0.002
MIN_SAMPLES = 500  # per run; fewer and the p99 is one or two answers
P99_TARGET_MS, MAX_TARGET_MS = 10.0, 25.0
SLOW_MS = 10.0  # answers slower than this are taken apart
COLOURS = {"thread": "tab:blue", "coroutine": "tab:orange", "source": "tab:green"}


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
    model: str  # "thread", "coroutine", or "source" (the sending side's control plane)
    shape: str
    seconds: float = 0.0
    nbytes: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds
    latency_times: list[float] = field(default_factory=list)  # since the load started
    # per answer, from schedstat: where its time went (seconds)
    rq_main: list[float] = field(default_factory=list)  # served main thread runnable, no CPU
    cpu_main: list[float] = field(default_factory=list)  # served main thread on a CPU
    rq_bulk: list[float] = field(default_factory=list)  # its mig/* threads runnable (summed)
    rq_client: list[float] = field(default_factory=list)  # the benchmark's thread runnable
    cpu_client: list[float] = field(default_factory=list)  # the benchmark's thread on a CPU
    steal: list[float] = field(default_factory=list)  # the VM's CPUs taken by its host (all CPUs)
    threads: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> cpu/wait/load s
    set_caps_refused: bool | None = None
    set_caps_error: str = ""
    loop_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def mib_s(self) -> float:
        return self.gbps * 1e9 / (1 << 20)

    def slow(self) -> list[dict[str, float]]:
        """Each answer slower than SLOW_MS taken apart: the served main thread runnable, on a
        CPU, and the rest, when it slept although the request had arrived — the GIL (it
        waits for nothing else once the request is readable); the client runnable or on a CPU
        (its own part); and how long the mig/* threads were runnable meanwhile."""
        out = []
        for i, lat in enumerate(self.latencies):
            if lat * 1000 > SLOW_MS:
                part = {"at": self.latency_times[i],  # seconds into the load
                        "latency": lat, "main runnable": self.rq_main[i], "main on CPU": self.cpu_main[i],
                        "client runnable": self.rq_client[i], "client on CPU": self.cpu_client[i],
                        "mig/* runnable": self.rq_bulk[i], "host steal": self.steal[i]}
                part["client"] = part["client runnable"] + part["client on CPU"]
                part["main blocked (GIL)"] = max(0.0, lat - part["main runnable"] - part["main on CPU"]
                                                 - part["client"])
                out.append(part)
        return out


def _schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(CPU time, run-queue wait) of one thread in seconds; zeros where /proc has none."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            cpu, wait, _ = f.read().split()
        return int(cpu) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def _steal() -> float:
    """CPU time the hypervisor took from this VM, all CPUs, in seconds (/proc/stat; 10 ms
    steps). Inside a VM a thread descheduled by the host still counts as *on a CPU*."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _thread_table(pid: int) -> dict[int, tuple[str, float, float]]:
    """tid -> (name, CPU s, run-queue wait s) for every thread of ``pid`` (the main thread is
    named "main loop"; the others by their kernel name, which mignet's threads set)."""
    out: dict[int, tuple[str, float, float]] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = "main loop" if tid == pid else f.read().strip()
        except OSError:
            continue
        cpu, wait = _schedstat(pid, tid)
        out[tid] = (name, cpu, wait)
    return out


def _thread_deltas(first: dict[int, tuple[str, float, float]], last: dict[int, tuple[str, float, float]],
                   seconds: float) -> dict[str, dict[str, float]]:
    """Per thread name: CPU and run-queue wait during the load (threads of one name summed)."""
    out: dict[str, dict[str, float]] = {}
    for tid, (name, cpu, wait) in last.items():
        _, cpu0, wait0 = first.get(tid, (name, 0.0, 0.0))
        acc = out.setdefault(name, {"cpu_s": 0.0, "wait_s": 0.0, "load_s": seconds})
        acc["cpu_s"] += cpu - cpu0
        acc["wait_s"] += wait - wait0
    return out


async def _poll(qmp: Any, pid: int, run: ModelRun,
                first_active: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Send ``query-migrate`` every POLL_INTERVAL until the migration ends; time each answer
    while it is active, with the run-queue waits around it. Returns the last answer."""
    me = threading.get_native_id()
    # The client's own collections (tens of ms over qemu.qmp's objects) would be counted
    # as the server's latency: none while it measures.
    gc.collect()
    gc.disable()
    try:
        return await _poll_loop(qmp, pid, run, me, first_active)
    finally:
        gc.enable()


async def _poll_loop(qmp: Any, pid: int, run: ModelRun, me: int,
                     first_active: Callable[[], Awaitable[None]] | None) -> dict[str, Any]:
    started: float | None = None
    first: dict[int, tuple[str, float, float]] = {}
    last: dict[int, tuple[str, float, float]] = {}
    status = ""
    info: dict[str, Any] = {}
    while status not in ("completed", "failed", "cancelled"):
        before, c0, s0 = _thread_table(pid), _schedstat(os.getpid(), me), _steal()
        t0 = time.perf_counter()
        info = await qmp.execute("query-migrate")
        t1 = time.perf_counter()
        last, c1, s1 = _thread_table(pid), _schedstat(os.getpid(), me), _steal()
        status = info.get("status", "")
        if status == "active":
            waits = {tid: last[tid][2] - before[tid][2] for tid in last if tid in before}
            if started is None:
                started, first = t0, last
                if first_active is not None:
                    await first_active()
            run.latencies.append(t1 - t0)
            run.latency_times.append(t0 - started)
            run.rq_main.append(waits.get(pid, 0.0))
            run.cpu_main.append(last[pid][1] - before[pid][1] if pid in last and pid in before else 0.0)
            run.rq_bulk.append(sum(w for tid, w in waits.items() if last[tid][0].startswith("mig/")))
            run.rq_client.append(c1[1] - c0[1])
            run.cpu_client.append(c1[0] - c0[0])
            run.steal.append(s1 - s0)
        await asyncio.sleep(max(0.0, POLL_INTERVAL - (time.perf_counter() - t0)))
    if first:
        run.threads = _thread_deltas(first, last, run.latency_times[-1] if run.latency_times else 0.0)
    return info


async def _serve(args: list[str], sock: Path) -> subprocess.Popen[str]:
    """Start ``mignet serve --qmp unix:SOCK ARGS --json`` and wait until QMP listens."""
    proc = subprocess.Popen([sys.executable, "-m", "mignet", "serve", "--qmp", f"unix:{sock}", *args, "--json"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)  # {"event": "qmp-listening", ...}
    if not line:
        proc.wait(60)
        raise MignetError(f"mignet serve {' '.join(args)} ended before listening (exit {proc.returncode})")
    return proc


def _reap(procs: list[subprocess.Popen[str] | None]) -> None:
    for proc in procs:
        if proc is not None:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _incoming(qmp: Any, listen: str) -> str:
    """``migrate-incoming`` on a deferred destination; returns the URI a source connects to."""
    await qmp.execute("migrate-incoming", {"uri": listen})
    info: dict[str, Any] = await qmp.execute("query-migrate")
    where = info["socket-address"][0]
    return f"{listen.partition(':')[0]}:{where['host']}:{where['port']}"


def _finish(run: ModelRun, info: dict[str, Any], what: str) -> None:
    if info.get("status") != "completed":
        raise MignetError(f"{what} ended {info.get('status')}: {info.get('error-desc', '')}")
    run.nbytes = int(info["ram"]["total"])
    run.seconds = (info["total-time"] - info.get("setup-time", 0)) / 1000


async def run_one(model: str, shape: Shape, workdir: Path, listen: str = "tcp:127.0.0.1:0") -> ModelRun:
    """One load of ``shape`` into a fresh ``mignet serve`` destination using ``model``, with
    QMP polled throughout: the unit the benchmark repeats (and a test runs once)."""
    from qemu.qmp import QMPClient
    from qemu.qmp.qmp_client import ExecuteError

    sock = workdir / f"dst-{model}-{shape.name}.qmp"
    run = ModelRun(model, shape.name)
    dst: subprocess.Popen[str] | None = None
    src: subprocess.Popen[str] | None = None
    qmp = QMPClient(f"bench-{model}")
    try:
        dst = await _serve(["--incoming", "defer", "--recv-model", model], sock)
        await qmp.connect(str(sock))
        await qmp.execute("x-mignet-loop-stats", {"reset": True})
        uri = await _incoming(qmp, listen)
        src = subprocess.Popen([sys.executable, "-m", "mignet.bench.source", "-",
                                "--size", shape.size, "--blobs", str(shape.blobs)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert src.stdin is not None and src.stdout is not None
        await asyncio.to_thread(src.stdout.readline)  # the source guest exists
        warm_free_memory(parse_size(shape.size) + (256 << 20))  # as bench tcp: same for both models
        src.stdin.write(uri + "\n")
        src.stdin.flush()

        async def set_caps() -> None:  # the first answer while the load runs
            try:
                await qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]})
                run.set_caps_refused = False
            except ExecuteError as exc:
                run.set_caps_refused = True
                run.set_caps_error = exc.error.error.desc
        _finish(run, await _poll(qmp, dst.pid, run, set_caps), f"{model} load")
        run.loop_stats = await qmp.execute("x-mignet-loop-stats", {"samples": True})  # type: ignore[assignment]
        await qmp.execute("quit")
    finally:
        try:
            await qmp.disconnect()
        except (EOFError, ConnectionError):
            pass  # after quit the destination closes first
        _reap([src, dst])
    return run


async def run_source(size: str, workdir: Path, listen: str = "tcp:127.0.0.1:0") -> ModelRun:
    """One migration out of a ``mignet serve`` source (a paused ``size`` guest) into a
    ``mignet serve`` destination, with the *source's* QMP polled throughout: its sending
    thread competes with its main loop as the loader does on the other side."""
    from qemu.qmp import QMPClient

    run = ModelRun("source", "ram")
    dst = src = None
    qdst, qsrc = QMPClient("bench-dst"), QMPClient("bench-src")
    try:
        dst = await _serve(["--incoming", "defer"], workdir / "src-dst.qmp")
        src = await _serve(["--size", size, "--fill", "random"], workdir / "src.qmp")
        await qdst.connect(str(workdir / "src-dst.qmp"))
        await qsrc.connect(str(workdir / "src.qmp"))
        await qsrc.execute("x-mignet-loop-stats", {"reset": True})
        # full speed, as the loads into a destination (QEMU's default cap is 128 MiB/s)
        await qsrc.execute("migrate-set-parameters", {"max-bandwidth": 64 << 30})
        uri = await _incoming(qdst, listen)
        warm_free_memory(parse_size(size) + (256 << 20))
        await qsrc.execute("migrate", {"uri": uri})
        _finish(run, await _poll(qsrc, src.pid, run), "migration")
        run.loop_stats = await qsrc.execute("x-mignet-loop-stats", {"samples": True})  # type: ignore[assignment]
        for q in (qsrc, qdst):
            await q.execute("quit")
    finally:
        for q in (qsrc, qdst):
            try:
                await q.disconnect()
            except (EOFError, ConnectionError):
                pass
        _reap([src, dst])
    return run


def _machine() -> str:
    """What the figures were measured on, for a plot's caption."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs{f' ({model})' if model else ''}, Linux {os.uname().release}, "
            f"{time.strftime('%Y-%m-%d')}")


def _plot(runs: list[ModelRun], out_dir: Path, streams: dict[str, str] | None = None) -> list[Path]:
    """Per stream (and the source side), one panel per run with every model in its own
    colour; the targets as lines; legends below the panels, never over the points; a
    caption with the stream, its sizes and the machine (``streams``: name -> description)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    groups = [(s, [r for r in runs if r.shape == s and r.model != "source"]) for s in _shapes(runs)]
    groups.append(("source", [r for r in runs if r.model == "source"]))
    for name, group in groups:
        if not group:
            continue
        models = [m for m in COLOURS if any(r.model == m for r in group)]
        n = max(sum(1 for r in group if r.model == m) for m in models)
        cols = min(n, 5)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, 3.2 * cols), 2.9 * rows + 1.0), squeeze=False,
                                 sharey=True)
        for i in range(rows * cols):
            ax = axes[i // cols][i % cols]
            if i >= n:
                ax.set_visible(False)
                continue
            title = [f"run {i + 1}, p99 / max:"]
            for m in models:
                mine = [r for r in group if r.model == m]
                if i < len(mine):
                    r = mine[i]
                    s = summarize(r.latencies)
                    ax.plot(r.latency_times, [x * 1000 for x in r.latencies], ".", ms=2, color=COLOURS[m],
                            label=m)
                    title.append(f"{m} {s['p99-ms']:.1f} / {s['max-ms']:.0f} ms")
            for y, style in ((P99_TARGET_MS, ":"), (MAX_TARGET_MS, "--")):
                ax.axhline(y, color="grey", lw=0.8, ls=style)
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.1)  # a loopback answer takes longer; below is empty space
            ax.set_title("\n".join(title), fontsize=7)  # above the panel: no point is covered
            ax.set_xlabel("s into the load", fontsize=8)
            if i % cols == 0:
                ax.set_ylabel("query-migrate (ms)", fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        handles += [plt.Line2D([], [], color="grey", ls=":"), plt.Line2D([], [], color="grey", ls="--")]
        labels += [f"p99 target {P99_TARGET_MS:.0f} ms", f"max target {MAX_TARGET_MS:.0f} ms"]
        where = "source side (mignet serve migrating out)" if name == "source" else f"{name} stream, destination"
        what = (streams or {}).get(name, "")
        fig.suptitle(f"control plane during a load: {where}\n{what}{'; ' if what else ''}"
                     f"query-migrate every {POLL_INTERVAL * 1000:.0f} ms; {_machine()}", fontsize=9)
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False,
                   markerscale=3)  # below the panels, never over the points
        fig.tight_layout(rect=(0, 0.08, 1, 0.94))
        path = out_dir / f"recv-model-latency-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    shapes = _shapes(runs)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for m in ("thread", "coroutine"):
            ms = sorted(x * 1000 for r in runs if r.shape == shape and r.model == m
                        for x in r.loop_stats.get("bql-hold-samples", []))
            if ms:
                ax.plot(ms, [i / len(ms) for i in range(1, len(ms) + 1)], color=COLOURS[m], label=m)
        ax.set_xscale("log")
        ax.set_xlabel("big-lock hold time (ms)")
        ax.set_ylabel("fraction of holds (CDF)")
        ax.set_title(f"big-lock holds, all runs: {shape}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)  # a CDF is empty down there
    fig.tight_layout()
    path = out_dir / "recv-model-bql.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def _shapes(runs: list[ModelRun]) -> list[str]:
    return list(dict.fromkeys(r.shape for r in runs if r.model != "source"))


def _per_run(label: str, values: list[str]) -> list[tuple[str, str]]:
    """One row of per-run figures, six to a row so the table reads whole at 80 columns."""
    chunks = [values[i:i + 6] for i in range(0, len(values), 6)] or [[]]
    return [(label if i == 0 else "", "  ".join(c)) for i, c in enumerate(chunks)]


def summarize_group(group: list[ModelRun]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The rows and the JSON summary of one (stream, model): per run, spread, pooled."""
    per = [summarize(r.latencies) for r in group]
    pooled = summarize([x for r in group for x in r.latencies])
    holds = summarize([x for r in group for x in r.loop_stats.get("bql-hold-samples", [])])
    stall = max(r.loop_stats.get("main-loop-stalls", {}).get("max-ms", 0.0) for r in group)
    p99s = [float(s["p99-ms"]) for s in per]
    maxes = [float(s["max-ms"]) for s in per]
    ok = sum(1 for p, m in zip(p99s, maxes, strict=True) if p <= P99_TARGET_MS and m <= MAX_TARGET_MS)
    slow = [s for r in group for s in r.slow()]
    slow_total = sum(s["latency"] for s in slow)
    shares = {k: sum(s[k] for s in slow) / slow_total if slow_total else 0.0
              for k in ("main runnable", "main on CPU", "main blocked (GIL)", "client", "mig/* runnable",
                        "host steal")}
    threads: dict[str, list[float]] = {}
    for r in group:
        for name, t in r.threads.items():
            if t["load_s"] > 0:
                threads.setdefault(name, []).append(t["wait_s"] / t["load_s"] * 1000)
    rows = _per_run("  throughput per run (MiB/s)", [f"{r.mib_s:.0f}" for r in group])
    rows += _per_run("  answers per run", [str(s["count"]) for s in per])
    rows += _per_run("  query p99 per run (ms)", [f"{p:.1f}" for p in p99s])
    rows += _per_run("  query max per run (ms)", [f"{m:.1f}" for m in maxes])
    rows += [
        ("  p99 spread across runs", f"{min(p99s):.1f} - {max(p99s):.1f} ms"),
        (f"  pooled p50 / p99 / max (n={pooled['count']})",
         f"{pooled['p50-ms']:.1f} / {pooled['p99-ms']:.1f} / {pooled['max-ms']:.1f} ms"),
        (f"  runs with p99 <= {P99_TARGET_MS:.0f} and max <= {MAX_TARGET_MS:.0f} ms", f"{ok} of {len(group)}"),
        (f"  answers > {SLOW_MS:.0f} ms (all runs)", str(len(slow))),
        ("    of their time: main loop runnable", f"{shares['main runnable'] * 100:.0f} %"),
        ("    of their time: main loop on a CPU", f"{shares['main on CPU'] * 100:.0f} %"),
        ("    of their time: main loop blocked (GIL)", f"{shares['main blocked (GIL)'] * 100:.0f} %"),
        ("    of their time: the client's own", f"{shares['client'] * 100:.0f} %"),
        ("    meanwhile mig/* threads runnable", f"{shares['mig/* runnable'] * 100:.0f} %"),
        ("    meanwhile the host took (steal)", f"{shares['host steal'] * 100:.0f} %"),
    ]
    for name in sorted(threads, key=lambda n: (n != "main loop", n)):
        if name.startswith("mig/") or name == "main loop":
            rows.append((f"  run-queue wait, {name}", f"{statistics.median(threads[name]):.0f} ms/s"))
    if group[0].model != "source":
        rows += [("  big-lock hold p50 / p99 / max",
                  f"{holds['p50-ms']:.2f} / {holds['p99-ms']:.1f} / {holds['max-ms']:.1f} ms"),
                 ("  longest main-loop stall", f"{stall:.1f} ms")]
    if any(r.set_caps_refused is not None for r in group):
        rows.append(("  set-capabilities mid-load",
                     "refused" if all(r.set_caps_refused for r in group) else "NOT refused"))
    summary = {"gbps_median": round(statistics.median(r.gbps for r in group), 3),
               "p99_ms_per_run": p99s, "max_ms_per_run": maxes, "samples_per_run": [s["count"] for s in per],
               "query_migrate_latency": pooled, "runs_meeting_targets": ok, "bql_holds": holds,
               "longest_stall_ms": stall, "slow_answers": len(slow),
               "slow_answer_shares": {k: round(v, 3) for k, v in shares.items()},
               "run_queue_wait_ms_per_s": {k: round(statistics.median(v), 1) for k, v in threads.items()}}
    return rows, summary


def bench_recv_model(size: str, blobs: int, out_dir: Path | None, repeat: int = 1,
                     listen: str = "tcp:127.0.0.1:0", source: bool = True) -> dict[str, Any]:
    shapes = [Shape("ram", size, 0), Shape("devices", "64M", blobs)]
    runs: list[ModelRun] = []
    loads = repeat * (len(shapes) * 2 + (1 if source else 0))
    console.print(f"mignet bench recv-model: {loads} loads into fresh destinations "
                  f"({', '.join(s.describe() for s in shapes)}), each polled over QMP every "
                  f"{POLL_INTERVAL * 1000:.0f} ms" + ("; then a mignet serve source's QMP while it sends "
                  f"{size}" if source else "") + "; this takes a few minutes")
    if out_dir is not None:  # said now, so the user knows before the run what it will write
        console.print(f"plots will go to {out_dir}/ (--plots DIR chooses)")
    with tempfile.TemporaryDirectory(prefix="mignet-bench-") as tmp:
        for i in range(repeat):
            for shape in shapes:
                for model in (("thread", "coroutine") if i % 2 == 0 else ("coroutine", "thread")):
                    console.print(f"  run {i + 1}: {model:9s} loading {shape.describe()} …")
                    runs.append(asyncio.run(run_one(model, shape, Path(tmp), listen)))
            if source:
                console.print(f"  run {i + 1}: a mignet serve source sending {size} …")
                runs.append(asyncio.run(run_source(size, Path(tmp), listen)))
    few = [r for r in runs if len(r.latencies) < MIN_SAMPLES]
    if few:
        console.print(f"[yellow]{len(few)} run(s) gave fewer than {MIN_SAMPLES} answers: their p99 rests on "
                      "a handful; a larger --size / --blobs makes the loads longer[/yellow]")
    rows: list[tuple[str, Any]] = []
    result: dict[str, Any] = {"poll_interval_ms": POLL_INTERVAL * 1000, "runs": [], "summary": []}
    for r in runs:
        result["runs"].append({
            "model": r.model, "shape": r.shape, "gbps": round(r.gbps, 3), "seconds": round(r.seconds, 3),
            "query_migrate_latency": summarize(r.latencies),
            "bql_holds": r.loop_stats.get("bql-holds", {}),
            "main_loop_stalls": r.loop_stats.get("main-loop-stalls", {}),
            "threads": r.threads,
            "slow_answers_ms": [{k: round(v * 1000, 2) for k, v in s.items()} for s in r.slow()],  # "at" too
            "set_capabilities_refused": r.set_caps_refused, "set_capabilities_error": r.set_caps_error,
        })
    groups = [(shape.name, model) for shape in shapes for model in ("thread", "coroutine")]
    if source:
        groups.append(("ram", "source"))
    for shape_name, model in groups:
        group = [r for r in runs if r.shape == shape_name and r.model == model]
        title = (f"source side ({size}), mignet serve migrating out:" if model == "source"
                 else f"{shape_name} stream, {model} model:")
        group_rows, summary = summarize_group(group)
        rows.append((title, ""))
        rows += group_rows
        result["summary"].append({"shape": shape_name, "model": model, **summary})
    stats_table(f"mignet bench recv-model ({listen.partition(':')[0]}; driven over QMP)", rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        streams = {shape.name: shape.describe() for shape in shapes}
        streams["source"] = f"{size} of random RAM sent by a mignet serve source"
        result["plots"] = [str(p) for p in _plot(runs, out_dir, streams)]
        console.print(f"plots: {', '.join(result['plots'])}")
    return result


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bench_recv_model("256M", 200, None), indent=1))
