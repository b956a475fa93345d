"""Which side of a thread boundary a method runs on (qemu.qmp's ``@upper_half`` /
``@bottom_half``).

A migration has two sides: the *upper half* is whoever controls it — the main loop with
the big lock (QMP), the CLI's main thread, Ctrl-C — and calls ``cancel``,
``set_max_bandwidth``, queries; the *bottom half* is the migration's own thread
(``mig/src/main``, ``mig/dst/main``) doing the I/O. Upper-half methods must return at once
and only set flags or shut channels; bottom-half methods may block. The marks are for the
reader (and ``help()``); they change nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


def upper_half(fn: F) -> F:
    """Runs in the controlling thread (main loop, CLI): never blocks on the migration."""
    fn.__doc__ = f"[upper half] {fn.__doc__ or ''}"
    return fn


def bottom_half(fn: F) -> F:
    """Runs in the migration's own thread: does the I/O and may block."""
    fn.__doc__ = f"[bottom half] {fn.__doc__ or ''}"
    return fn
