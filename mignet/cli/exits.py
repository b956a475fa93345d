"""The exit statuses of every ``mignet`` command, in one place.

A script that runs mignet must tell "fix your command line" from "the peer is wrong" from
"the network broke, try again" without parsing messages; each is its own status, chosen
here from the exception's class (:mod:`mignet.errors`). docs/cli.md lists them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.markup import escape

from mignet.errors import (
    ConnectionLostError,
    MignetError,
    MigrationCancelled,
    PeerFailedError,
    ProtocolError,
    RequestRefused,
    SetupError,
    TimedOut,
)
from mignet.ui.terminal import console

OK = 0
FAILED = 1  #: the command ran but its check failed (demo: RAM differs), or a mignet bug
USAGE = 2  #: the command line: a bad value, a missing or an ignored option
SETUP = 3  #: this host refused: address, port in use, file, device, memory
PEER = 4  #: the peer: not a migration stream, a stream mignet cannot load, a refused load
CONNECTION_LOST = 5  #: the connection broke or ended early: retrying may work
TIMEOUT = 6  #: the peer did not connect, answer or send in time
CANCELLED = 130  #: Ctrl-C (128 + SIGINT, as a shell reports it)

#: Name of each status in JSON error objects ("kind").
KINDS = {FAILED: "failed", USAGE: "usage", SETUP: "setup", PEER: "peer",
         CONNECTION_LOST: "connection-lost", TIMEOUT: "timeout", CANCELLED: "cancelled"}


class UsageError(MignetError):
    """The command line is wrong: a value that does not parse, options that do not go
    together, or an option the command would ignore. Found before anything connects or
    listens, so a peer waiting on the other end is never disturbed by a typo."""

    def __init__(self, message: str, prog: str = "mignet") -> None:
        self.prog = prog
        super().__init__(message)


def exit_code(exc: BaseException) -> int:
    """The status for ``exc``; the order matters where classes nest (TimedOut is
    also a TimeoutError, StreamTruncatedError a ConnectionLostError)."""
    if isinstance(exc, (MigrationCancelled, KeyboardInterrupt)):
        return CANCELLED
    if isinstance(exc, UsageError):
        return USAGE
    if isinstance(exc, TimedOut):
        return TIMEOUT
    if isinstance(exc, ConnectionLostError):
        return CONNECTION_LOST
    if isinstance(exc, (ProtocolError, PeerFailedError, RequestRefused)):
        return PEER
    if isinstance(exc, SetupError):
        return SETUP
    return FAILED


def emit_json(obj: dict[str, Any]) -> None:
    """One JSON object as one line on stdout, flushed (a script reads it as it comes)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def report(exc: BaseException, *, json_out: bool) -> int:
    """Say what went wrong in one line on stderr (and, with ``--json``, as one JSON object
    on stdout); return the exit status."""
    code = exit_code(exc)
    if isinstance(exc, UsageError):
        prog = exc.prog
        line = f"{exc} (see {prog} --help)"
    else:
        prog = "mignet"
        line = str(exc) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            line = str(exc) or "interrupted"
    if code == CANCELLED:
        console.print(f"{prog}: {escape(line)}", soft_wrap=True)
    else:
        console.print(f"[red]{escape(prog)}: error:[/] {escape(line)}", soft_wrap=True)
    if json_out:
        emit_json({"event": "error", "error": line, "kind": KINDS[code], "exit": code})
    return code
