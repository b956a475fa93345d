"""Ctrl-C while the CLI waits for its migration thread: the command must not go on (and
close the channel the thread still uses) before the thread has ended. On CPython 3.11 a
KeyboardInterrupt that interrupts ``Thread.join`` marks the still-running thread stopped,
so a second ``join`` returned at once: an RDMA source then died of SIGSEGV in its worker.
Real signal, real threads, in a child process so the signal is its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, signal, threading, time
    from mignet.errors import MigrationCancelled
    from mignet.ui.terminal import run_with_progress

    asked = threading.Event()
    ended = threading.Event()

    def work() -> None:
        while not asked.is_set():
            time.sleep(0.01)
        time.sleep(1.0)  # a cancel that takes a while to finish (teardown in the thread)
        ended.set()

    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        run_with_progress(work, label="x", poll=lambda: (0, None, ""), cancel=asked.set, quiet=True)
    except MigrationCancelled:
        print("ended" if ended.is_set() else "still running")
""")


def test_ctrl_c_waits_for_the_migration_thread_to_end(subprocess_env: dict[str, str]) -> None:
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60,
                           env=subprocess_env)
        assert r.stdout.strip() == "ended", (r.stdout, r.stderr)
