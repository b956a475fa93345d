"""``mignet rxe run -- CMD``: run CMD inside the soft-RoCE (rdma_rxe) guest harness.

The harness itself lives outside the core (:mod:`mignet.harness.rxe_guest`); it is imported
only when the command runs, so ``mignet --help`` works on any host.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Add ``mignet rxe run``."""
    from mignet.harness.rxe_guest import add_arguments

    rxe = sub.add_parser("rxe", help="soft-RoCE (rdma_rxe) guest harness")
    rsub = rxe.add_subparsers(dest="rxe", required=True)
    run = rsub.add_parser(
        "run", help="boot a soft-RoCE guest (rxe0 at 10.9.0.1), run CMD in it, return its status",
        usage="mignet rxe run [--mem 2G] [--timeout 900] [--rwdir DIR]... -- CMD...")
    add_arguments(run)
    run.set_defaults(func=lambda args: _rxe_run(args, run))


def _rxe_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mignet.harness.rxe_guest import run_cli

    return run_cli(args, parser)
