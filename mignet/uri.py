"""Migration addresses in QEMU's URI syntax: ``tcp:HOST:PORT``, ``unix:PATH``, ``rdma:HOST:PORT``.

Parsing is separate from connecting so that bad input is rejected before any socket exists,
with one message that shows the accepted forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mignet.errors import SetupError

Scheme = Literal["tcp", "unix", "rdma"]

_FORMS = "expected tcp:HOST:PORT, unix:PATH or rdma:HOST:PORT"


@dataclass(frozen=True)
class Address:
    """A parsed migration address. ``port`` is 0 for unix sockets (and may be 0 to listen
    on an ephemeral TCP port)."""

    scheme: Scheme
    host: str
    port: int = 0

    @property
    def path(self) -> str:
        """The socket path of a ``unix:`` address."""
        return self.host

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}:{host}:{self.port}"


def parse_uri(uri: str) -> Address:
    """Parse a migration URI; raise ``SetupError`` naming the accepted forms on bad input."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise SetupError(f"bad migration URI {uri!r}: {_FORMS}")
    if scheme == "unix":
        return Address("unix", rest)
    if scheme not in ("tcp", "rdma"):
        raise SetupError(f"unsupported migration URI scheme {scheme!r} in {uri!r}: {_FORMS}")
    if rest.startswith("["):  # [v6addr]:port
        host, bracket, port_text = rest[1:].partition("]:")
        if not bracket:
            raise SetupError(f"bad migration URI {uri!r}: {_FORMS}")
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise SetupError(f"bad migration URI {uri!r}: {_FORMS}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SetupError(f"bad port {port_text!r} in migration URI {uri!r}: {_FORMS}")
    return Address(scheme, host, int(port_text))  # type: ignore[arg-type]
