"""The big lock's guards catch misuse, as QEMU's assertions do."""

from __future__ import annotations

import threading

import pytest

from mignet.errors import BqlMisuseError
from mignet.guest.devices import DeviceSet, RawSection
from mignet.runtime.bql import bql_held, bql_lock, bql_locked, bql_released, bql_unlock


def test_held_and_released_nest_correctly() -> None:
    assert not bql_locked()
    with bql_held():
        assert bql_locked()
        with bql_held():  # BQL_LOCK_GUARD: no-op when already held
            assert bql_locked()
        with bql_released():
            assert not bql_locked()
        assert bql_locked()
    assert not bql_locked()


def test_misuse_is_caught() -> None:
    with pytest.raises(BqlMisuseError):
        with bql_released():
            pass
    with pytest.raises(BqlMisuseError):
        bql_unlock()
    bql_lock()
    try:
        with pytest.raises(BqlMisuseError, match="already holds"):
            bql_lock()
    finally:
        bql_unlock()
    with pytest.raises(BqlMisuseError, match="released inside a bql_held"):
        with bql_held():
            bql_unlock()


def test_other_thread_cannot_unlock() -> None:
    errors: list[BaseException] = []
    with bql_held():
        t = threading.Thread(target=lambda: _catch(errors, bql_unlock))
        t.start()
        t.join()
    assert isinstance(errors[0], BqlMisuseError)


def test_device_state_needs_the_lock() -> None:
    devs = DeviceSet.empty()
    with pytest.raises(BqlMisuseError, match="loading device state"):
        devs.load("mignet-serial", 0, 1, b"", None)
    with bql_held():
        devs.load("x", 0, 1, b"raw", None)
    assert devs.raw == [RawSection("x", 0, 1, b"raw")]


def _catch(errors: list[BaseException], fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
