"""One cancel path: a flag that, once set, turns whatever the interrupted I/O raised into
:class:`~mignet.errors.MigrationCancelled`, raised here and nowhere else.

Cancelling shuts the channel down from another thread (QEMU's ``migrate_cancel`` does the
same), so the blocked read or write fails with whatever the transport says — a closed
channel, a reset. Those are not failures when we asked for them: :meth:`Cancel.guard`
re-raises them as the cancellation they are. ``MigrationCancelled`` is a BaseException
(trio's ``Cancelled`` is one for the same reason), so an ``except Exception`` in between
cannot swallow it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mignet.errors import MignetError, MigrationCancelled


class Cancel:
    """``cancel()`` may be called from any thread (upper half); ``check`` and ``guard``
    run in the migration's own thread (bottom half)."""

    def __init__(self, what: str, on_cancel: Callable[[], None] | None = None) -> None:
        self.what = what  # e.g. "incoming migration"
        self.flag = threading.Event()  # for waits that end early on cancel (rate limit)
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Ask the migration to stop; wakes its blocked I/O through ``on_cancel``."""
        self.flag.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def requested(self) -> bool:
        return self.flag.is_set()

    def check(self) -> None:
        """Raise MigrationCancelled if cancel was asked for."""
        if self.flag.is_set():
            raise MigrationCancelled(f"{self.what} cancelled")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Errors raised inside while (or because) cancel was asked for become the
        cancellation; other errors pass unchanged."""
        try:
            yield
        except MignetError:
            self.check()
            raise
        self.check()
