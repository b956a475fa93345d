"""``mignet bench``: every benchmark's subcommand. The benchmarks themselves live in
:mod:`mignet.bench`, outside the core, and are imported only when one runs."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from mignet.cli import options
from mignet.wire.multifd import MAX_CHANNELS


def add_parser(sub: Any) -> None:
    """Add ``bench`` with its subcommands tcp, recv-model, live, channels, cli and rdma."""
    b = sub.add_parser("bench", help="benchmarks (figures side by side in one run)",
                       description=f"Benchmarks; each says up front what it runs. {options.SIZES}.")
    bsub = b.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("tcp", help="mignet migration vs a raw socket loop over loopback")
    t.add_argument("--size", default="2G", type=options.size, metavar="SIZE",
                   help="guest RAM per run (binary: 2G = 2 GiB)")
    t.add_argument("--repeat", type=options.count1, default=3, metavar="N",
                   help="runs of each kind; the figures are medians")
    t.add_argument("--json-out", metavar="FILE", type=_json_out, help="also write the figures as JSON")
    t.set_defaults(func=cmd_bench_tcp)

    r = bsub.add_parser("recv-model", help="threaded vs coroutine loader: throughput, QMP latency, "
                                           "big-lock holds, main-loop stalls")
    # defaults: loads long enough for >= 500 answers at one query per 2 ms, five runs
    r.add_argument("--size", default="4G", type=_size_text, metavar="SIZE",
                   help="RAM of the RAM-heavy stream and of the source side (binary)")
    r.add_argument("--blobs", type=options.count0, default=6000, metavar="N",
                   help="64 KiB device sections in the device-heavy stream")
    r.add_argument("--repeat", type=options.count1, default=5, metavar="N",
                   help="runs of each model and stream, each reported on its own")
    r.add_argument("--plots", metavar="DIR",
                   help="where the PNG plots go (default: a new folder ./recv-model-plots-TIME, "
                        "named when the run starts)")
    r.add_argument("--listen", default="tcp:127.0.0.1:0", metavar="URI", type=options.uri,
                   help="where destinations listen, e.g. rdma:10.9.0.1:7480 inside the soft-RoCE guest")
    r.add_argument("--json-out", metavar="FILE", type=_json_out, help="also write the figures as JSON")
    r.set_defaults(func=cmd_bench_recv_model)

    v = bsub.add_parser(
        "live", help="live precopy over dirty rates: rounds, downtime vs limit, tracking cost")
    v.add_argument("--size", default="512M", type=options.size, metavar="SIZE", help="guest RAM (binary)")
    v.add_argument("--max-bandwidth", default="256MiB/s", metavar="RATE", type=_link_rate,
                   help="the link, bytes per second")
    v.add_argument("--rates", default="0,32M,64M,128M,256M,512M", metavar="LIST", type=_rates,
                   help="vCPU write rates, bytes per second, comma separated")
    v.add_argument("--downtime-limit", type=options.count0, default=300, metavar="MS",
                   help="milliseconds, as QEMU's downtime-limit")
    v.add_argument("--give-up", type=options.seconds, default=20.0, metavar="S",
                   help="force the switchover of a run that has not converged after S seconds")
    v.add_argument("--track-size", default="2G", type=options.size, metavar="SIZE",
                   help="guest size for the tracking-cost figure")
    v.add_argument("--json-out", metavar="FILE", type=_json_out, help="also write the figures as JSON")
    v.set_defaults(func=cmd_bench_live)

    pc = bsub.add_parser(
        "postcopy", help="precopy vs postcopy (with and without preempt) at dirty rates below "
                         "and above the link: downtime, time, bytes, fault latency")
    pc.add_argument("--size", default="256M", type=options.size, metavar="SIZE", help="guest RAM (binary)")
    pc.add_argument("--max-bandwidth", default="64MiB/s", metavar="RATE", type=_link_rate,
                    help="the link (max-bandwidth and max-postcopy-bandwidth), bytes per second")
    pc.add_argument("--rates", default="16M,256M", metavar="LIST", type=_rates,
                    help="vCPU write rates, bytes per second, comma separated")
    pc.add_argument("--downtime-limit", type=options.count0, default=300, metavar="MS",
                    help="milliseconds, as QEMU's downtime-limit")
    pc.add_argument("--give-up", type=options.seconds, default=10.0, metavar="S",
                    help="force the switchover of a precopy run that has not converged after S s")
    pc.add_argument("--vcpus", type=options.count_range(1, 16), default=1, metavar="N",
                    help="destination threads reading every page once the guest runs there")
    pc.add_argument("--repeat", type=options.count1, default=1, metavar="N",
                    help="times each (rate, mode) runs, the modes alternating")
    pc.add_argument("--json-out", metavar="FILE", type=_json_out, help="also write the figures as JSON")
    pc.set_defaults(func=cmd_bench_postcopy)

    c = bsub.add_parser(
        "channels", help="multifd: mignet send/recv with N channels vs a raw N-connection loop and "
                         "QEMU 7.2 multifd, CPU s/GiB")
    c.add_argument("--size", default="1G", type=options.size, metavar="SIZE",
                   help="guest RAM per run (binary), a random image in /dev/shm")
    c.add_argument("--channels", default="1,2,4", type=_channel_list, metavar="LIST",
                   help="channel counts to compare, comma separated (1: no multifd)")
    c.add_argument("--repeat", type=options.count1, default=3, metavar="N",
                   help="alternations; the figures are medians of the runs that succeeded")
    c.add_argument("--json-out", metavar="FILE", type=_json_out, help="also write every run as JSON")
    c.set_defaults(func=cmd_bench_channels)

    u = bsub.add_parser(
        "cli", help="mignet send --image → recv --out in /dev/shm vs a raw pair, process start to exit")
    u.add_argument("--size", default="2G", type=options.size, metavar="SIZE",
                   help="guest RAM per run (binary), a random image in /dev/shm")
    u.add_argument("--repeat", type=options.count1, default=3, metavar="N",
                   help="alternations; the figures are medians of the runs that succeeded")
    u.add_argument("--json-out", metavar="FILE", type=_json_out, help="also write every run as JSON")
    u.set_defaults(func=cmd_bench_cli)

    d = bsub.add_parser(
        "rdma", help="mignet RDMA vs ib_write_bw vs mignet TCP (run inside the soft-RoCE guest)")
    d.add_argument("--size", default="64M", type=options.size, metavar="SIZE",
                   help="guest RAM per migration (binary)")
    d.add_argument("--repeat", type=options.count1, default=3, metavar="N",
                   help="runs of each kind; the figures are medians of the runs that succeeded")
    d.add_argument("--addr", default=None, help="RDMA netdev address (default $MIGNET_RDMA_ADDR "
                                                 "or 10.9.0.1)")
    d.add_argument("--json-out", metavar="FILE", type=_json_out, help="also write the figures as JSON")
    d.set_defaults(func=cmd_bench_rdma)


def _size_text(text: str) -> str:
    options.size(text)  # checked now; the benchmark passes the text on to mignet send
    return text


def _link_rate(text: str) -> int:
    n = int(options.rate(text))
    if n <= 0:
        raise argparse.ArgumentTypeError("the benchmark needs a link rate, not 0 (unlimited)")
    return n


def _channel_list(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected channel counts like 1,2,4, not {text!r}") from None
    if not counts or any(not 1 <= c <= MAX_CHANNELS for c in counts):
        raise argparse.ArgumentTypeError(f"every channel count must be 1 to {MAX_CHANNELS}")
    return counts


def _rates(text: str) -> list[int]:
    return [int(options.rate(r)) for r in text.split(",")]


def _json_out(text: str) -> str:
    """Checked before a run of minutes, not when its figures are ready to be written."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a folder you can write")
    return text


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def cmd_bench_channels(args: argparse.Namespace) -> int:
    from mignet.bench.channels import bench_channels

    _write_json(args.json_out, bench_channels(args.size, args.channels, args.repeat))
    return 0


def cmd_bench_cli(args: argparse.Namespace) -> int:
    from mignet.bench.cli import bench_cli

    _write_json(args.json_out, bench_cli(args.size, args.repeat))
    return 0


def cmd_bench_tcp(args: argparse.Namespace) -> int:
    from mignet.bench.tcp import bench_tcp

    _write_json(args.json_out, bench_tcp(args.size, args.repeat))
    return 0


def cmd_bench_recv_model(args: argparse.Namespace) -> int:
    from mignet.bench.recv_model import bench_recv_model

    plots = Path(args.plots) if args.plots else Path(time.strftime("recv-model-plots-%Y%m%d-%H%M%S"))
    _write_json(args.json_out, bench_recv_model(args.size, args.blobs, plots, args.repeat, args.listen))
    return 0


def cmd_bench_live(args: argparse.Namespace) -> int:
    from mignet.bench.live import bench_live

    result = bench_live(args.size, args.max_bandwidth, args.rates, args.downtime_limit,
                        args.give_up, args.track_size)
    _write_json(args.json_out, result)
    return 0


def cmd_bench_postcopy(args: argparse.Namespace) -> int:
    from mignet.bench.postcopy import bench_postcopy

    result = bench_postcopy(args.size, args.max_bandwidth, args.rates, args.downtime_limit,
                            args.give_up, args.vcpus, args.repeat)
    _write_json(args.json_out, result)
    return 0


def cmd_bench_rdma(args: argparse.Namespace) -> int:
    from mignet.bench.rdma import bench_rdma

    addr = args.addr or os.environ.get("MIGNET_RDMA_ADDR", "10.9.0.1")
    _write_json(args.json_out, bench_rdma(args.size, args.repeat, addr))
    return 0
