"""CLI plugin: ``mignet rxe run -- CMD`` (the soft-RoCE guest) and ``mignet bench rdma``.

Imports nothing RDMA-specific at load time, so ``mignet --help`` works on any host.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, bench_subparsers: Any) -> None:
    """Add the ``rxe`` command and the ``bench rdma`` benchmark."""
    rxe = subparsers.add_parser("rxe", help="soft-RoCE (rdma_rxe) guest harness")
    rsub = rxe.add_subparsers(dest="rxe", required=True)
    run = rsub.add_parser(
        "run", help="boot a soft-RoCE guest (rxe0 at 10.9.0.1), run CMD in it, return its status",
        usage="mignet rxe run [--mem 2G] [--timeout 900] [--rwdir DIR]... -- CMD...")
    from .rxe_guest import add_arguments

    add_arguments(run)
    run.set_defaults(func=lambda args: _rxe_run(args, run))

    b = bench_subparsers.add_parser(
        "rdma", help="mignet RDMA vs ib_write_bw vs mignet TCP (run inside the soft-RoCE guest)")
    b.add_argument("--size", default="64M", help="guest RAM per migration (default 64M)")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--addr", default=None, help="RDMA netdev address (default $MIGNET_RDMA_ADDR "
                                                 "or 10.9.0.1)")
    b.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    b.set_defaults(func=_bench_rdma)


def _rxe_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .rxe_guest import run_cli

    return run_cli(args, parser)


def _bench_rdma(args: argparse.Namespace) -> int:
    import json
    import os

    from ..ram import parse_size
    from .bench import bench_rdma

    addr = args.addr or os.environ.get("MIGNET_RDMA_ADDR", "10.9.0.1")
    result = bench_rdma(parse_size(args.size), args.repeat, addr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
