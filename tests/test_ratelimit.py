"""RateLimiter's windows and limits, driven by a fake clock: no wall time at all (except one
test that checks the real wake-up path between threads, with no timing in its assertions)."""

from __future__ import annotations

import threading

import pytest

from mignet.migration.ratelimit import WINDOW, RateLimiter


class FakeTime:
    """A clock that only moves when told to, or when the limiter 'sleeps' on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []
        self.during_wait: list[object] = []  # callables run inside the next waits

    def clock(self) -> float:
        return self.now

    def wait(self, event: threading.Event, timeout: float) -> bool:
        self.waits.append(timeout)
        if self.during_wait:
            action = self.during_wait.pop(0)
            assert callable(action)
            action()
            if event.is_set():
                return True  # woken early: no time passes
        self.now += timeout
        return False


def make(limit: int) -> tuple[RateLimiter, FakeTime]:
    t = FakeTime()
    return RateLimiter(limit, clock=t.clock, wait=t.wait), t


def test_unlimited_never_waits() -> None:
    lim, t = make(0)
    assert lim.limit == 0
    for _ in range(100):
        assert lim.consume(1 << 30) == 0.0
    assert t.waits == [] and t.now == 100.0


def test_under_the_window_budget_no_wait() -> None:
    lim, t = make(1000)  # 100 bytes per 100 ms window
    assert lim.consume(60) == 0.0
    assert lim.consume(39) == 0.0
    assert t.waits == []


def test_spending_the_budget_sleeps_to_the_window_end() -> None:
    lim, t = make(1000)
    assert lim.consume(60) == 0.0
    t.now += 0.04
    assert lim.consume(40) == pytest.approx(0.06)  # the window ends 100 ms after it began
    assert t.waits == [pytest.approx(0.06)]
    assert t.now == pytest.approx(100.1)
    # The new window started at the wake-up with nothing charged: a full budget again.
    assert lim.consume(99) == 0.0
    assert len(t.waits) == 1


def test_overshoot_carries_over_so_the_long_run_rate_holds() -> None:
    lim, t = make(1000)
    # 250 bytes at 1000 B/s: two windows' budget must pass before 50 (< 100) remain.
    assert lim.consume(250) == pytest.approx(0.2)
    assert t.waits == [pytest.approx(WINDOW), pytest.approx(WINDOW)]
    # About 50 remain charged (QEMU-like integer accounting may round one byte away).
    assert lim.consume(40) == 0.0
    assert lim.consume(20) == pytest.approx(WINDOW)  # the budget is spent: wait once more
    assert len(t.waits) == 3


def test_idle_time_resets_the_window_without_waiting() -> None:
    lim, t = make(1000)
    assert lim.consume(90) == 0.0
    t.now += 5.0  # a long pause: its budget is far more than what was used
    assert lim.consume(90) == 0.0
    assert lim.consume(9) == 0.0
    assert t.waits == []


def test_set_limit_starts_a_fresh_window_and_clamps() -> None:
    lim, t = make(1000)
    assert lim.consume(99) == 0.0
    lim.set_limit(500)  # 50 bytes per window, and the 99 already sent are not charged
    assert lim.limit == 500
    assert lim.consume(49) == 0.0
    assert lim.consume(1) == pytest.approx(WINDOW)
    lim.set_limit(-5)
    assert lim.limit == 0
    assert lim.consume(10**9) == 0.0
    assert len(t.waits) == 1


def test_set_limit_while_sleeping_wakes_the_sender_at_once() -> None:
    lim, t = make(10)  # 1 byte per window: 1000 bytes would take 100 s
    t.during_wait.append(lambda: lim.set_limit(0))  # "another thread" lifts the limit
    assert lim.consume(1000) == 0.0  # woken before any time passed, and then unlimited
    assert t.waits == [pytest.approx(WINDOW)]


def test_should_stop_ends_the_wait() -> None:
    lim, t = make(1000)
    stop = threading.Event()
    stop.set()
    assert lim.consume(10_000, stop) == 0.0
    assert t.waits == []
    stop.clear()
    t.during_wait.append(stop.set)
    assert lim.consume(0, stop) == pytest.approx(WINDOW)  # one window, then it sees the stop
    assert len(t.waits) == 1


def test_real_clock_and_event_wait_are_woken_by_set_limit() -> None:
    """The default wait really blocks on the wake event: set_limit from another thread
    releases a sender that would otherwise sleep for hours."""
    entered = threading.Event()
    def wait(ev: threading.Event, timeout: float) -> bool:
        entered.set()
        return ev.wait(timeout)

    lim = RateLimiter(1, wait=wait)
    out: list[float] = []
    sender = threading.Thread(target=lambda: out.append(lim.consume(10**6)), daemon=True)
    sender.start()
    assert entered.wait(30)
    lim.set_limit(0)
    sender.join(60)
    assert not sender.is_alive() and len(out) == 1
