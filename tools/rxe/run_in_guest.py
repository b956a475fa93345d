"""Run a command inside a soft-RoCE (rdma_rxe) guest: a thin wrapper kept for scripts.

The harness lives in ``mignet.harness.rxe_guest`` (also ``mignet rxe run -- CMD``); this file
re-exports it so ``tools/test.sh`` and ``from run_in_guest import ...`` keep working. Same
exit statuses and the same clean-up: on CMD's end, the timeout (124), SIGTERM, SIGINT or
SIGHUP (128 + N) or an exception, the whole guest is stopped and waited for.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for mignet

from mignet.harness.rxe_guest import (  # noqa: E402
    EXIT_GUEST_FAILED,
    EXIT_TIMEOUT,
    GUEST_ADDR,
    STOP_SIGNALS,
    GuestError,
    GuestSignalled,
    GuestTimeout,
    find_kernel,
    guest_available,
    main,
    run_in_guest,
)

__all__ = ["EXIT_GUEST_FAILED", "EXIT_TIMEOUT", "GUEST_ADDR", "STOP_SIGNALS", "GuestError",
           "GuestSignalled", "GuestTimeout", "find_kernel", "guest_available", "main", "run_in_guest"]

if __name__ == "__main__":
    sys.exit(main())
