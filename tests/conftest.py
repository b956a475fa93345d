"""Shared fixtures. Tests use real sockets, real threads and real processes throughout."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.support


@pytest.fixture(autouse=True)
def _no_bql_leak() -> Iterator[None]:
    """Every test must leave the big lock free."""
    from mignet.runtime.bql import BQL

    yield
    assert BQL._owner is None, "a test leaked the big lock"


@pytest.fixture
def mignet_cmd() -> list[str]:
    return [sys.executable, "-m", "mignet"]


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "120"
    return env


# -- processes: none outlives its test, none outlives the session ---------------------------

_SESSION_MARK = f"{os.getpid()}-{os.urandom(8).hex()}"


def _interrupted(signum: int, frame: object) -> None:
    import signal

    raise KeyboardInterrupt(f"pytest got {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM and SIGHUP (a CI timeout, a closed terminal) end the session like Ctrl-C, so
    fixtures are torn down and the processes tests started are stopped. Signals already
    ignored or handled stay as they are."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _interrupted)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Mark every process this session starts (children inherit the environment), so that
    the end of the session can find even those that left pytest's process tree."""
    from tests.support.processes import SESSION_ENV

    os.environ[SESSION_ENV] = _SESSION_MARK


@pytest.fixture(autouse=True)
def _stop_test_processes() -> Iterator[None]:
    """Processes a test started through tests/support helpers (``track``) are stopped and
    waited for when the test ends: passed, failed, timed out or interrupted."""
    from tests.support.processes import scope

    with scope():
        yield


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of the fixtures still set up
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any process it started is still alive (listing and killing them):
    descendants of pytest, and any process carrying this session's marker."""
    from tests.support.processes import SESSION_ENV, kill_all, leftovers, stop_session_processes

    stop_session_processes()
    left = leftovers(SESSION_ENV, _SESSION_MARK, root=os.getpid())
    if not left:
        return
    lines = [f"{len(left)} process(es) started by this test session were still alive (now killed):",
             *(f"  {proc}" for proc in left)]
    kill_all(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line, file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
