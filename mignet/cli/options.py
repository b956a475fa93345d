"""How every ``mignet`` command reads its command line.

All values are parsed by argparse (``type=`` below), and each command's ``check`` runs on
the parsed options before the command starts, so nothing connects or listens with a bad
or ignored option. A usage error is one line and exit status 2 (``exits.USAGE``), not
argparse's usage block. ``--help`` shows each option's default.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from mignet.cli.exits import UsageError
from mignet.errors import MignetError
from mignet.guest.ram import DEFAULT_DIGEST, DIGESTS
from mignet.units import human_bytes, parse_rate, parse_size
from mignet.uri import parse_uri

_UNSET: Any = object()
_GIVEN = "_given"
_PROG = "_prog"


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the default says nothing
    (None, False, an empty list) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        says_nothing = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if says_nothing or "default" in text.lower() or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """ArgumentParser with one-line usage errors, defaults in --help, no abbreviated
    options (a prefix of one option could become ambiguous as options are added), and a
    record of which options the user gave (:func:`given`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        # Every option starts as _UNSET: what is still _UNSET afterwards was not given,
        # and gets its default here (a subcommand's parser runs this again on its own).
        # Options that add to their value (append, count) start from their default.
        ns = namespace if namespace is not None else argparse.Namespace()
        mine = [a for a in self._actions if a.dest != argparse.SUPPRESS and a.default != argparse.SUPPRESS
                and not hasattr(ns, a.dest)]
        for action in mine:
            setattr(ns, action.dest, action.default if _accumulates(action) else _UNSET)
        ns, rest = super().parse_known_args(args, ns)
        given = set(getattr(ns, _GIVEN, ()))
        for action in mine:
            value = getattr(ns, action.dest)
            if value is _UNSET:
                default = action.default
                if isinstance(default, str) and action.type is not None:
                    default = self._get_value(action, default)
                setattr(ns, action.dest, default)
            elif not (_accumulates(action) and value is action.default):
                given.add(action.dest)
        setattr(ns, _GIVEN, given)
        if not hasattr(ns, _PROG):  # the innermost subcommand names itself in errors
            setattr(ns, _PROG, self.prog)
        return ns, rest


def _accumulates(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._AppendAction, argparse._AppendConstAction,
                               argparse._CountAction, argparse._ExtendAction))


def prog(args: argparse.Namespace) -> str:
    """The command as typed, e.g. "mignet send", for error lines."""
    return str(getattr(args, _PROG, "mignet"))


def given(args: argparse.Namespace, *dests: str) -> list[str]:
    """Which of ``dests`` the user wrote on the command line (not defaults)."""
    seen: set[str] = getattr(args, _GIVEN, set())
    return [d for d in dests if d in seen]


def flag(dest: str) -> str:
    """The option as the user types it: ``dirty_rate`` -> ``--dirty-rate``."""
    return "--" + dest.replace("_", "-")


def refuse_unless(args: argparse.Namespace, condition: bool, dests: Sequence[str], why: str) -> None:
    """Refuse options that the command would ignore unless ``condition``: one line naming
    them and ``why`` they need it (e.g. "only with --live")."""
    extra = given(args, *dests)
    if extra and not condition:
        names = ", ".join(flag(d) for d in extra)
        raise UsageError(f"{names} {'has' if len(extra) == 1 else 'have'} no effect {why}",
                         prog(args))


def _typed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except MignetError as exc:  # argparse shows it as "argument --x: MESSAGE"
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = what  # argparse names the type in its own messages
    return convert


def _positive_size(text: str) -> int:
    n = parse_size(text)
    if n <= 0:
        raise UsageError(f"a size must be more than 0, not {text!r}")
    return n


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if high is not None and not low <= n <= high:
            raise argparse.ArgumentTypeError(f"takes {low} to {high}, not {n}")
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {n}")
        return n
    convert.__name__ = "count"
    return convert


def count_range(low: int, high: int) -> Callable[[str], int]:
    """``type=`` for a whole number from ``low`` to ``high``."""
    return _count(low, high)


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(s) or not s > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return s


def _uri(text: str) -> str:
    parse_uri(text)  # checked now; commands keep the text, as they print it
    return text


#: ``type=`` for sizes (binary: 1G = 1 GiB), more than 0.
size = _typed(_positive_size, "size")
#: ``type=`` for sizes where 0 means "none" or "unlimited".
size_or_zero = _typed(parse_size, "size")
#: ``type=`` for rates in bytes per second (bit rates refused); 0 = unlimited or idle.
rate = _typed(parse_rate, "rate")
#: ``type=`` for a migration URI (tcp:, unix:, rdma:), kept as text.
uri = _typed(_uri, "uri")
#: ``type=`` for a whole number >= 0 / >= 1.
count0 = _count(0)
count1 = _count(1)
#: ``type=`` for a duration in seconds, more than 0.
seconds = _seconds


def _idle(text: str) -> float | None:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(s) or s < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (never) or more seconds, not {text}")
    return s or None


#: ``type=`` for an idle limit: seconds, 0 meaning none (None).
idle_seconds = _idle
IDLE_HELP = ("seconds the peer may send or take nothing before the migration gives up "
             "(0: wait forever)")

SIZES = "sizes are binary: 1M = 1 MiB, 1G = 1 GiB"
RATES = "rates are bytes per second, binary: 128MiB/s; bit rates are refused"


def add_max_ram(p: argparse.ArgumentParser, role: str = "") -> None:
    """``--max-ram`` of every command that receives a guest (recv, relay, serve); ``role``
    prefixes the help (``destination: ``) where the command has more than one."""
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    p.add_argument("--max-ram", default=str(phys), metavar="SIZE", type=size,
                   help=f"{role}refuse sources with more RAM (default: this host's memory, {human_bytes(phys)})")


def add_digest(p: argparse.ArgumentParser, what: str, choices: tuple[str, ...] = DIGESTS) -> None:
    """``--digest`` of every command that prints or writes RAM digests; ``what`` says which."""
    p.add_argument("--digest", choices=choices, default=DEFAULT_DIGEST,
                   help=f"{what}: xxh3 (XXH3-128, fast), blake3, sha256 (sha256sum of a block "
                        f"file){', none' if 'none' in choices else ''}; default {DEFAULT_DIGEST}")

