"""The exception hierarchy of mignet.

Callers need to tell apart *who* is at fault, because each calls for a different reaction:

* ``ProtocolError`` — the peer sent a stream we must not trust (bad magic, unknown section,
  an offset outside its RAM block). Retrying will not help; the peer or its version is wrong.
* ``ConnectionLostError`` — the transport broke (peer closed mid-read, reset, RDMA
  disconnect). The stream may have been fine; retrying the migration may work.
* ``MisuseError`` — *we* used an API wrongly (BQL taken twice). A bug in the caller, never
  the peer's fault.
* ``ClosedChannelError`` — I/O on a channel this side closed (trio's ClosedResourceError, as
  against ``ConnectionLostError``, trio's BrokenResourceError: the world broke it).
* ``SetupError`` — the environment refused a resource we asked for (bad URI, port in use,
  no RDMA device). The message names the fix.
* ``MigrationCancelled`` — someone asked us to stop; not a failure of either side, and a
  BaseException outside the root (see its docstring).
* ``RequestRefused`` — a control request (QMP) was refused: bad argument or wrong moment
  (``InvalidOptionError``, ``OptionLockedError``). The requester can fix it.
"""

from __future__ import annotations


class MignetError(Exception):
    """Base class: every error mignet raises on purpose derives from it."""


class ProtocolError(MignetError):
    """The peer's stream is malformed or uses a feature mignet does not implement.

    ``offset`` is the stream offset (bytes from the start) where the problem was found,
    when known, so a capture can be inspected with QEMU's analyze-migration.py.
    """

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        self.offset = offset
        where = f" (at stream offset {offset})" if offset is not None else ""
        super().__init__(f"{message}{where}")


class ConnectionLostError(MignetError):
    """The connection ended or broke while more data was expected."""


class PeerFailedError(MignetError):
    """The peer said it could not complete the migration (QEMU's return-path SHUT with an
    error): the stream arrived, the destination refused or failed to load it. Its own log
    says why (for QEMU: a machine type or RAM size that differs, a device it lacks)."""


class StreamTruncatedError(ConnectionLostError):
    """The input ended in the middle of the stream: the source went away (or was killed)
    before sending EOF. The bytes that came were valid; there were not enough of them."""


class TimedOut(MignetError, TimeoutError):
    """A peer did not connect, answer or send within the time allowed. Raised the same
    way by every transport (accept, connect, a wait with a deadline); also a builtin
    ``TimeoutError``, so generic code that waits may catch it as one."""


class MisuseError(MignetError):
    """A local programming error: an API was used against its contract."""


class ClosedChannelError(MignetError):
    """I/O on a channel that this side closed or shut down (trio's ClosedResourceError):
    we did it, but not necessarily by mistake — a cancel shuts channels down on purpose."""


class BqlMisuseError(MisuseError):
    """The big lock was taken twice, released while not held, or held where it must not be."""


class SetupError(MignetError):
    """A resource could not be set up: bad address, port in use, missing device."""


class MigrationCancelled(BaseException):
    """The migration was cancelled on request (``migrate-cancel``, Ctrl-C).

    Not an error and deliberately not under :class:`MignetError`: like trio's ``Cancelled``
    it is a BaseException, so no ``except Exception`` / ``except MignetError`` on the way
    out can swallow it. Raised in one place only, :class:`mignet.runtime.cancel.Cancel`."""


class RequestRefused(MignetError):
    """A control-plane request (a QMP command) was refused: a bad argument, or the wrong
    moment (``migrate`` while one runs). Neither a bug in mignet nor the peer's fault — the
    requester can fix it, and nothing changed. QMP reports it as ``GenericError``."""


class InvalidOptionError(RequestRefused):
    """A migration capability or parameter name, type or value is not acceptable."""


class OptionLockedError(RequestRefused):
    """A migration option may not change now: a running migration (outgoing or incoming)
    holds the option lock. Only the allowlisted parameters may change at any time."""
