"""One error root: every exception class mignet defines derives from MignetError, bar the
two deliberate BaseExceptions that mean "stop" (cancel, and the harness's signal exit)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import mignet
from mignet.errors import ClosedChannelError, MignetError, MigrationCancelled, MisuseError
from mignet.harness.rxe_guest import GuestSignalled

STOP_SIGNALS = {MigrationCancelled, GuestSignalled}


def _exception_classes() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for info in pkgutil.walk_packages(mignet.__path__, "mignet."):
        if info.name == "mignet.__main__":
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.append(obj)
    return found


def test_every_exception_is_under_the_one_root() -> None:
    classes = _exception_classes()
    assert len(classes) > 15  # the walk really found mignet's exceptions
    stray = [f"{c.__module__}.{c.__qualname__}" for c in classes
             if c not in STOP_SIGNALS and not issubclass(c, MignetError)]
    assert stray == []


def test_cancellation_cannot_be_swallowed_by_except_exception() -> None:
    for cls in STOP_SIGNALS:
        assert not issubclass(cls, Exception)
    try:
        try:
            raise MigrationCancelled("cancelled")
        except Exception:  # noqa: BLE001 - what the rule protects against
            raise AssertionError("except Exception caught a cancellation") from None
    except MigrationCancelled:
        pass


def test_closed_by_us_is_not_misuse() -> None:
    """trio's split: ClosedResourceError (we closed it) is no programming error."""
    assert not issubclass(ClosedChannelError, MisuseError)
