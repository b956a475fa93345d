"""Terminal output: progress bars while bytes move, and a stats table at the end (rich).

Everything goes to stderr, so stdout stays free for machine-readable lines (``--json``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mignet.runtime.threads import start_thread

console = Console(stderr=True, highlight=False)
T = TypeVar("T")


@contextmanager
def transfer_progress(label: str, poll: Callable[[], tuple[int, int | None, str]],
                      enabled: bool = True, interval: float = 0.1) -> Iterator[None]:
    """Show a bar that refreshes from ``poll() -> (done, total, note)`` every ``interval``
    seconds while the body runs (the work itself runs in another thread)."""
    if not enabled:
        yield
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"), console=console, transient=False,
    )
    stop = threading.Event()
    with progress:
        task = progress.add_task(label, total=None, note="")

        def refresh() -> None:
            while not stop.wait(interval):
                done, total, note = poll()
                progress.update(task, completed=done, total=total, note=note)
        t = threading.Thread(target=refresh, name="ui/progress", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            done, total, note = poll()
            progress.update(task, completed=done, total=total, note=note)


def run_with_progress(work: Callable[[], T], *, label: str,
                      poll: Callable[[], tuple[int, int | None, str]], cancel: Callable[[], None],
                      quiet: bool, thread_name: str = "mig/src/main",
                      force_after: tuple[float, Callable[[], None]] | None = None) -> T:
    """Run ``work`` in its own thread while the main thread shows progress; Ctrl-C calls
    ``cancel`` and raises MigrationCancelled; ``work``'s error is re-raised here.
    ``force_after`` = (seconds, action) runs ``action`` once after that long (benchmarks)."""
    from mignet.errors import MigrationCancelled

    timer = threading.Timer(force_after[0], force_after[1]) if force_after else None
    try:
        with transfer_progress(label, poll, enabled=not quiet):
            t, future = start_thread(work, thread_name)
            if timer is not None:
                timer.start()
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        cancel()
        t.join(5)
        raise MigrationCancelled("cancelled by Ctrl-C") from None
    finally:
        if timer is not None:
            timer.cancel()
    return future.result()


def stats_table(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)

