"""Terminal output: progress bars while bytes move, and a stats table at the end (rich).

Everything goes to stderr, so stdout stays free for machine-readable lines (``--json``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mignet.runtime.threads import finished, start_thread
from mignet.units import PAGE_SIZE, human_bytes

console = Console(stderr=True, highlight=False)
T = TypeVar("T")

#: Bytes each multifd channel has moved so far, by channel id.
ChannelBytes = Callable[[], Mapping[int, int]]


def multifd_channels(describe: Callable[[], Mapping[str, Any]]) -> ChannelBytes:
    """Per-channel bytes from a multifd sender's or receiver's ``describe()``: the same
    counters that QMP's ``x-mignet-query-multifd`` and ``--json`` report, so the bars and
    the figures never disagree. Counts guest pages (packet headers are not data moved)."""
    def read() -> Mapping[int, int]:
        return {int(cid): int(pages) * PAGE_SIZE for cid, pages in describe()["pages"].items()}
    return read


class _Amount(ProgressColumn):
    """'33.4 MiB/64.0 MiB' (or '33.4 MiB' while the total is unknown): IEC, like every
    other figure mignet prints."""

    def render(self, task: Task) -> Text:
        done = human_bytes(int(task.completed))
        return Text(done if task.total is None else f"{done}/{human_bytes(int(task.total))}",
                    style="green")


class _Rate(ProgressColumn):
    """Bytes per second over rich's recent window, in MiB/s (not decimal MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{human_bytes(int(speed))}/s", style="red")


class _Bar(ProgressColumn):
    """The total's bar; a channel's row has none (how much each channel will carry is not
    known ahead: its bytes and rate say what it does)."""

    def __init__(self, bar_width: int) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=bar_width)

    def render(self, task: Task) -> RenderableType:
        return Text("") if task.fields.get("channel") else self._bar.render(task)


class _NotedProgress(Progress):
    """One bar row that fits 80 columns, and the note (round, dirty rate, ...) on its own
    line below, folded at the terminal's width instead of squeezing the bar's columns."""

    note = ""

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.note:
            yield Text(self.note, overflow="fold")


@contextmanager
def transfer_progress(label: str, poll: Callable[[], tuple[int, int | None, str]],
                      enabled: bool = True, interval: float = 0.1,
                      channels: ChannelBytes | None = None) -> Iterator[None]:
    """Show a bar that refreshes from ``poll() -> (done, total, note)`` every ``interval``
    seconds while the body runs (the work itself runs in another thread). ``channels``:
    multifd's per-channel bytes (:func:`multifd_channels`), one row each under the total,
    added as the channels appear (a receiver learns of them as they connect)."""
    if not enabled:
        yield
        return
    progress = _NotedProgress(
        TextColumn("[bold]{task.description}"), _Bar(bar_width=16), _Amount(), _Rate(),
        TimeElapsedColumn(), console=console, transient=False,
    )
    stop = threading.Event()
    with progress:
        task = progress.add_task(label, total=None)
        rows: dict[int, Any] = {}  # channel id -> its task

        def update() -> None:
            done, total, note = poll()
            progress.note = note
            progress.update(task, completed=done, total=total)
            for cid, nbytes in sorted((channels() if channels is not None else {}).items()):
                if cid not in rows:
                    rows[cid] = progress.add_task(f"  channel {cid}", total=None, channel=True)
                progress.update(rows[cid], completed=nbytes)

        def refresh() -> None:
            while not stop.wait(interval):
                update()
        t = threading.Thread(target=refresh, name="ui/progress", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            update()


def run_with_progress(work: Callable[[], T], *, label: str,
                      poll: Callable[[], tuple[int, int | None, str]], cancel: Callable[[], None],
                      quiet: bool, thread_name: str = "mig/src/main",
                      force_after: tuple[float, Callable[[], None]] | None = None,
                      channels: ChannelBytes | None = None) -> T:
    """Run ``work`` in its own thread while the main thread shows progress; Ctrl-C calls
    ``cancel`` and raises MigrationCancelled; ``work``'s error is re-raised here.
    ``force_after`` = (seconds, action) runs ``action`` once after that long (benchmarks);
    ``channels``: one row per multifd channel (:func:`transfer_progress`)."""
    from mignet.errors import MigrationCancelled

    timer = threading.Timer(force_after[0], force_after[1]) if force_after else None
    try:
        with transfer_progress(label, poll, enabled=not quiet, channels=channels):
            t, future = start_thread(work, thread_name)
            if timer is not None:
                timer.start()
            while not finished(future, 0.2):
                pass
    except KeyboardInterrupt:
        cancel()
        finished(future, 10)  # not t.join: see runtime.threads.finished
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

