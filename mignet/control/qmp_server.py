"""The QMP protocol server (QEMU Machine Protocol), on asyncio in the main loop.

Wire protocol as in QEMU's docs/interop/qmp-spec: on connect the server sends a greeting
``{"QMP": {"version": ..., "capabilities": []}}``; the client must first run
``qmp_capabilities``; then ``{"execute": NAME, "arguments": {...}, "id": ANY}`` is answered
by ``{"return": ..., "id": ...}`` or ``{"error": {"class": ..., "desc": ...}, "id": ...}``,
and asynchronous ``{"event": ..., "data": ..., "timestamp": {"seconds", "microseconds"}}``
messages may arrive at any time. Input is a stream of JSON objects (no framing required);
output is one object per line, CRLF-terminated like QEMU's.

Threading: like QEMU's main loop, the loop holds the big lock while it *dispatches* a
command and not while it waits for input (the selector), so a loader thread that needs the
lock for a device section waits at most one command, and a command never waits for RAM
loading, which does not take the lock at all. Events come from migration threads through
:meth:`QmpServer.emit`, which is thread-safe and never needs the big lock.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from mignet import __version__
from mignet.errors import MignetError, RequestRefused, SetupError
from mignet.runtime.bql import bql_held
from mignet.tcp.socket_listener import bind_unix
from mignet.uri import parse_uri

#: The QEMU whose qapi/migration.json this server implements; clients gate features on it.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}

Handler = Callable[[dict[str, Any]], Any]

class QmpError(RequestRefused):
    """An error reply: ``cls`` is QEMU's ErrorClass (GenericError, CommandNotFound, ...)."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc

def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}

#: QEMU's json-streamer limits (qobject/json-streamer.c): one text at most 64 MiB, nesting
#: at most 1024 deep. Past either, QEMU answers GenericError and drops what it buffered.
MAX_TEXT_BYTES = 64 << 20
MAX_NESTING = 1024

_STRUCTURAL = re.compile(rb'[][{}"]')
_IN_STRING = re.compile(rb'["\\]')
_SPACE = b" \t\r\n"


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts by bracket depth (QEMU's json-streamer
    does the same), so clients need not send newlines.

    Linear: the scan state (depth, inside a string, escape) survives between feeds, so every
    byte is looked at once however the input is split; the scanner jumps from one
    structural byte to the next with a regex. A text over ``max_bytes`` or nested deeper
    than ``max_depth`` yields a :class:`QmpError` in its place and is dropped, as in QEMU."""

    def __init__(self, max_bytes: int = MAX_TEXT_BYTES, max_depth: int = MAX_NESTING) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0  # next byte of _buf to scan
        self._start: int | None = None  # where the current text began
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._scalar = False  # a bare scalar runs to the next whitespace

    def feed(self, data: bytes) -> list[bytes | QmpError]:
        out: list[bytes | QmpError] = []
        buf = self._buf
        buf += data
        while self._pos < len(buf):
            if self._start is None:
                while self._pos < len(buf) and buf[self._pos] in _SPACE:
                    self._pos += 1
                if self._pos == len(buf):
                    break
                self._start = self._pos
                self._scalar = buf[self._pos] not in b"{["
            if self._scalar:
                end = self._pos
                while end < len(buf) and buf[end] not in _SPACE:
                    end += 1
                self._pos = end
                if end == len(buf):
                    break
                out.append(bytes(buf[self._start:end]))
                self._start, self._scalar = None, False
                continue
            if self._in_str:
                if self._esc:
                    self._esc = False
                    self._pos += 1
                    continue
                m = _IN_STRING.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    break
                self._pos = m.end()
                if m.group() == b"\\":
                    self._esc = True
                else:
                    self._in_str = False
                continue
            m = _STRUCTURAL.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                break
            self._pos = m.end()
            c = m.group()
            if c == b'"':
                self._in_str = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > self.max_depth:
                    # Drop the text so far and go on with what follows, as QEMU does.
                    out.append(QmpError("GenericError", "JSON nesting depth limit exceeded"))
                    del buf[:self._pos]
                    self._pos, self._start, self._depth = 0, None, 0
            else:
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start:self._pos]))
                    self._start = None
        if self._start is not None and len(buf) - self._start > self.max_bytes:
            out.append(QmpError("GenericError", "JSON token size limit exceeded"))
            buf.clear()
            self._pos, self._start, self._depth = 0, None, 0
            self._in_str = self._esc = self._scalar = False
            return out
        keep = self._start if self._start is not None else self._pos
        if keep:
            del buf[:keep]  # amortised: at most what was scanned since the last cut
            self._pos -= keep
            if self._start is not None:
                self._start = 0
        return out


class QmpServer:
    """Serves QMP on any number of UNIX/TCP addresses; commands come from ``handlers``."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self.loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._sessions: set[_Session] = set()
        self._unix_paths: list[str] = []
        self.addresses: list[str] = []
        self.quit = asyncio.Event()

    # --- listening -------------------------------------------------------------------
    async def listen(self, uri: str) -> str:
        """Listen on ``unix:PATH`` (socket mode 0600: whoever reaches it controls the
        guest) or ``tcp:HOST:PORT``; returns the address (with the real port)."""
        self.loop = asyncio.get_running_loop()
        address = parse_uri(uri)
        if address.scheme == "unix":
            sock = _unix_socket_0600(str(address.path))
            server = await asyncio.start_unix_server(self._client, sock=sock)
            self._unix_paths.append(str(address.path))
            real = f"unix:{address.path}"
        elif address.scheme == "tcp":
            try:
                server = await asyncio.start_server(self._client, address.host, address.port)
            except OSError as exc:
                raise SetupError(f"cannot listen for QMP on {uri}: {exc.strerror}") from exc
            real = f"tcp:{address.host}:{server.sockets[0].getsockname()[1]}"
        else:
            raise SetupError(f"QMP listens on unix:PATH or tcp:HOST:PORT, not {uri}")
        self._servers.append(server)
        self.addresses.append(real)
        return real

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            session.writer.close()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # --- events ----------------------------------------------------------------------
    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client; callable from any thread. The
        timestamp is taken here, when it happened, not when the loop gets to it."""
        msg: dict[str, Any] = {"event": event, "timestamp": timestamp()}
        if data is not None:
            msg["data"] = data
        if self.loop is None or self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self._broadcast, msg)
        except RuntimeError:  # the loop is shutting down
            pass

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for session in list(self._sessions):
            if session.negotiated:
                session.send(msg)

    # --- one client ------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(writer)
        self._sessions.add(session)
        try:
            session.send({"QMP": {"version": {"qemu": QEMU_VERSION, "package": f"mignet {__version__}"},
                                  "capabilities": []}})
            splitter = JsonSplitter()
            while not reader.at_eof():
                data = await reader.read(65536)
                if not data:
                    break
                for text in splitter.feed(data):
                    if isinstance(text, QmpError):
                        session.send({"error": {"class": text.cls, "desc": text.desc}})
                        continue
                    await self._handle(session, text)
                    await writer.drain()
                    if self.quit.is_set():
                        return
        except (ConnectionError, OSError):
            pass
        finally:
            self._sessions.discard(session)
            writer.close()

    async def _handle(self, session: _Session, text: bytes) -> None:
        msg_id: Any = None
        has_id = False
        try:
            try:
                msg = json.loads(text)
            except (ValueError, UnicodeDecodeError) as exc:
                raise QmpError("GenericError", f"JSON parse error, {exc}") from None
            except RecursionError:
                raise QmpError("GenericError", "JSON nesting depth limit exceeded") from None
            if not isinstance(msg, dict):
                raise QmpError("GenericError", "QMP input must be a JSON object")
            has_id, msg_id = "id" in msg, msg.get("id")
            for key in msg:
                if key not in ("execute", "arguments", "id"):
                    raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
            name = msg.get("execute")
            if name is None:
                raise QmpError("GenericError", "QMP input lacks member 'execute'")
            if not isinstance(name, str):
                raise QmpError("GenericError", "QMP input member 'execute' must be a string")
            args = msg.get("arguments", {})
            if not isinstance(args, dict):
                raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
            result = await self._dispatch(session, name, args)
            reply: dict[str, Any] = {"return": result}
        except QmpError as exc:
            reply = {"error": {"class": exc.cls, "desc": exc.desc}}
        if has_id:
            reply["id"] = msg_id
        session.send(reply)

    async def _dispatch(self, session: _Session, name: str, args: dict[str, Any]) -> Any:
        if name == "qmp_capabilities":
            if session.negotiated:
                raise QmpError("CommandNotFound",
                               "Capabilities negotiation is already complete, command ignored")
            enable = args.get("enable", [])
            if not isinstance(enable, list):
                raise QmpError("GenericError", "Invalid parameter type for 'enable', expected: array")
            if set(args) - {"enable"}:
                raise QmpError("GenericError", f"Parameter '{sorted(set(args) - {'enable'})[0]}' is unexpected")
            if enable:
                raise QmpError("GenericError", f"Capability '{enable[0]}' not available")
            session.negotiated = True
            return {}
        if not session.negotiated:
            raise QmpError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        handler = self.handlers.get(name)
        if handler is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        try:
            with bql_held():  # QEMU's model: commands run with the big lock held
                result = handler(args)
            if inspect.isawaitable(result):  # slow work (hashing RAM) runs without it
                result = await result
        except QmpError:
            raise
        except MignetError as exc:
            raise QmpError("GenericError", str(exc)) from None
        except Exception as exc:  # a bug in a handler: answer it, keep the session
            raise QmpError("GenericError", f"internal error in {name}: {exc!r}") from exc
        return result

class _Session:
    """One client connection: negotiation state and a line-oriented writer."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")

def _unix_socket_0600(path: str) -> socket.socket:
    """A QMP UNIX socket that is mode 0600 from the moment it exists: whoever can connect
    controls the guest."""
    sock = bind_unix(path, mode=0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock
