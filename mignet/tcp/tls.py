"""TLS over a connected TCP channel, configured the way QEMU's ``tls-creds-x509`` is.

A credentials folder holds QEMU's file names: ``ca-cert.pem``, and ``server-cert.pem`` +
``server-key.pem`` (the listening end) or ``client-cert.pem`` + ``client-key.pem`` (the
connecting end; optional unless the server verifies peers). As in QEMU the server verifies
the client's certificate by default (``verify-peer``), and the client always verifies the
server's against the CA and the host name (``tls-hostname``, else the URI's host). The
handshake happens before a single byte of the stream, so an unauthenticated peer never gets
a page in or out.

Pure I/O: it knows sockets and certificates, never the migration stream.
"""

from __future__ import annotations

import fnmatch
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from mignet.channel import Buffer, IOCondition, ShutdownHow, WritableBuffer
from mignet.errors import ConnectionLostError, SetupError
from mignet.tcp.socket_channel import _SHUT, SocketChannel

HANDSHAKE_TIMEOUT = 30.0


class TlsChannel(SocketChannel):
    """A SocketChannel whose socket is an ``ssl.SSLSocket``: SSL sockets have no vectored
    calls and no MSG_PEEK, so reads fill one buffer at a time, writes send one buffer, and
    the kernel's low-water hint is off (decrypted bytes may wait inside the SSL object).
    A peek decrypts into a small buffer of this channel that the next reads drain first, so
    a listener can tell what a connection is after its handshake (multifd's init record or
    a stream's magic), as it does on a plain socket."""

    duplex_threads = False  # one SSL object: a read and a write must not overlap

    def __init__(self, sock: socket.socket, name: str | None = None) -> None:
        super().__init__(sock, name)
        self._peeked = bytearray()  # decrypted by a peek, not yet read

    def hint_bulk_reads(self, low_water: int) -> None:
        pass

    def wait_cond(self, cond: IOCondition, timeout: float | None = None) -> bool:
        """Bytes already decrypted (peeked, or a record's rest inside the SSL object) are
        ready although the socket underneath may have nothing more to say."""
        if cond & IOCondition.IN and not self.closed and self._buffered():
            return True
        return super().wait_cond(cond, timeout)

    def _buffered(self) -> int:
        sock = self.sock
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        return len(self._peeked) + pending

    def _readv(self, bufs: Sequence[WritableBuffer]) -> int | None:
        if self._peeked:
            n = 0
            for buf in bufs:
                view = memoryview(buf).cast("B")
                take = min(len(view), len(self._peeked) - n)
                view[:take] = self._peeked[n:n + take]
                n += take
                if n == len(self._peeked):
                    break
            del self._peeked[:n]
            return n
        return self._io(lambda: self.sock.recv_into(bufs[0]))

    def _writev(self, bufs: Sequence[Buffer]) -> int | None:
        return self._io(lambda: self.sock.send(bufs[0]))

    def _io(self, call: Callable[[], int]) -> int | None:
        """One SSL read or write: None when it would block, one-line errors otherwise."""
        try:
            return call()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            return None
        except ssl.SSLError as exc:
            raise ConnectionLostError(f"{self.name}: TLS error: {exc.reason or exc}") from exc
        except OSError as exc:
            raise self._lost(exc) from exc

    def _peek(self, size: int) -> bytes | None:
        """Up to ``size`` bytes, decrypting more into the peek buffer when it holds fewer
        (one read, and with bytes already there only one that cannot block); None when
        there is nothing yet."""
        if len(self._peeked) < size and (not self._peeked or self._buffered() > len(self._peeked)
                                         or self._ready.poll(0)):
            more = bytearray(size - len(self._peeked))
            n = self._io(lambda: self.sock.recv_into(more))
            if n is None and not self._peeked:
                return None
            self._peeked += more[:n or 0]
        return bytes(self._peeked[:size])

    def _shutdown(self, how: ShutdownHow) -> None:
        """No half-close: ``SSLSocket.shutdown`` drops the TLS state, after which reads
        return raw records (a source awaiting QEMU's SHUT on the return path read TLS
        headers as messages). The stream's own end tells the peer it is complete; a
        cancel's shutdown goes to the socket underneath, keeping the TLS state."""
        if how is ShutdownHow.WRITE:
            return
        try:
            socket.socket.shutdown(self.sock, _SHUT[how])
        except OSError:
            pass


def _load(ctx: ssl.SSLContext, creds: Path, cert: str, key: str, required: bool) -> None:
    c, k = creds / cert, creds / key
    if not c.exists() and not required:
        return
    try:
        ctx.load_cert_chain(c, k)
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(f"TLS credentials in {creds}: cannot load {cert}/{key} ({exc}): "
                         "give the folder QEMU's tls-creds-x509 would use") from None


def _context(creds: Path, server: bool, verify_peer: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(creds / "ca-cert.pem")
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(f"TLS credentials in {creds}: cannot load ca-cert.pem ({exc})") from None
    if server:
        _load(ctx, creds, "server-cert.pem", "server-key.pem", required=True)
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
        # No TLS 1.3 session tickets: a source never reads them (a migration source only
        # writes), and a socket closed with unread input sends a reset, which throws away the
        # stream's last bytes still in flight to us.
        ctx.num_tickets = 0
    else:
        _load(ctx, creds, "client-cert.pem", "client-key.pem", required=False)
    return ctx


def _handshake(channel: SocketChannel, ctx: ssl.SSLContext, server: bool, hostname: str | None,
               timeout: float, on_wrapped: Callable[[TlsChannel], None] | None) -> TlsChannel:
    """The handshake on ``channel``'s socket. Wrapping detaches the socket from ``channel``
    (its descriptor now belongs to the SSL socket), so the TlsChannel exists before the
    handshake and ``on_wrapped`` gets it first: whoever may have to interrupt the
    handshake (a receiver that stops) shuts down the live descriptor, not the dead one."""
    sock = channel.sock
    try:
        tls = TlsChannel(ctx.wrap_socket(sock, server_side=server, do_handshake_on_connect=False,
                                         server_hostname=None if server else hostname), channel.name)
    except (OSError, ValueError) as exc:
        sock.close()
        raise ConnectionLostError(f"{channel.name}: TLS failed to start ({exc})") from None
    if on_wrapped is not None:
        on_wrapped(tls)
    ssock = cast(ssl.SSLSocket, tls.sock)
    ssock.settimeout(timeout)
    try:
        ssock.do_handshake()
    except (ssl.SSLError, ssl.CertificateError) as exc:
        tls.close()
        who = "client" if server else "server"
        raise ConnectionLostError(f"{channel.name}: TLS handshake failed: the {who} is not "
                                  f"authenticated ({getattr(exc, 'reason', None) or exc})") from None
    except TimeoutError:
        tls.close()
        if server:
            raise ConnectionLostError(f"{channel.name}: the client did not complete the TLS "
                                      f"handshake in {timeout:g} s") from None
        raise ConnectionLostError(f"{channel.name}: the destination did not complete the TLS "
                                  f"handshake in {timeout:g} s: check that it has tls-creds") from None
    except OSError as exc:
        tls.close()
        raise ConnectionLostError(f"{channel.name}: TLS handshake failed ({exc})") from None
    ssock.settimeout(None)
    return tls


def peer_dname(channel: TlsChannel) -> str:
    """The client certificate's distinguished name as QEMU's authz rules see it (GnuTLS's
    RFC 4514 form, most specific first: ``CN=laptop,O=Example Org,C=GB``); "" if none."""
    sock = channel.sock
    cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    if not cert:
        return ""
    subject: Any = cert.get("subject", ())  # ((("commonName", "x"),), ...) in certificate order
    rdns = ["+".join(f"{_SHORT.get(k, k)}={v}" for k, v in rdn) for rdn in subject]
    return ",".join(reversed(rdns))


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "localityName": "L", "stateOrProvinceName": "ST", "countryName": "C",
          "emailAddress": "emailAddress", "domainComponent": "DC"}


def tls_server_context(creds: Path, verify_peer: bool = True) -> ssl.SSLContext:
    """The listening end's credentials, loaded once for every connection it will accept, so
    a folder that cannot serve is a SetupError before anyone connects (QEMU loads them
    when its tls-creds-x509 object is made). ``verify_peer``: require a client
    certificate; authorization (``tls_server``'s ``authorize``) needs it."""
    return _context(creds, True, verify_peer)


def tls_server(channel: SocketChannel, ctx: ssl.SSLContext,
               authorize: Callable[[str], bool] | None = None,
               timeout: float = HANDSHAKE_TIMEOUT,
               on_wrapped: Callable[[TlsChannel], None] | None = None) -> TlsChannel:
    """The listening end's handshake on an accepted connection (``ctx`` from
    :func:`tls_server_context`); refused peers never get in.

    ``authorize``: given the client's distinguished name (``CN=laptop,O=Example Org``), as
    QEMU's ``tls-authz``; None lets in every verified client. ``timeout``: how long a peer
    may take to complete it. ``on_wrapped``: given the channel before its handshake
    starts (see :func:`_handshake`)."""
    if authorize is not None and ctx.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("tls_server: authorization needs a context that verifies peers")
    tls = _handshake(channel, ctx, True, None, timeout, on_wrapped)
    if authorize is not None:
        dname = peer_dname(tls)
        if not authorize(dname):
            tls.close()
            raise ConnectionLostError(f"{channel.name}: TLS client {dname or '(no certificate)'!r} is "
                                      "not authorized: add it to the authorization rules")
    return tls


def glob_rules(rules: Sequence[str]) -> Callable[[str], bool] | None:
    """``recv --tls-authz`` rules: a client is let in when any glob matches its name."""
    if not rules:
        return None
    return lambda dname: any(fnmatch.fnmatchcase(dname, rule) for rule in rules)


def tls_client(channel: SocketChannel, creds: Path, hostname: str,
               timeout: float = HANDSHAKE_TIMEOUT) -> TlsChannel:
    """The connecting end's handshake, checking the server's certificate for ``hostname``;
    ``timeout``: how long a destination may take to complete it."""
    return _handshake(channel, _context(creds, False, True), False, hostname, timeout, None)


__all__ = ["TlsChannel", "peer_dname", "tls_client", "tls_server", "tls_server_context"]
