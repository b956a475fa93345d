from __future__ import annotations

import pytest

from mignet.errors import SetupError
from mignet.uri import Address, parse_uri


@pytest.mark.parametrize("uri,expected", [
    ("tcp:127.0.0.1:4444", Address("tcp", "127.0.0.1", 4444)),
    ("tcp:localhost:0", Address("tcp", "localhost", 0)),
    ("tcp:[::1]:5", Address("tcp", "::1", 5)),
    ("unix:/tmp/x.sock", Address("unix", "/tmp/x.sock")),
    ("rdma:10.9.0.1:7471", Address("rdma", "10.9.0.1", 7471)),
])
def test_parse(uri: str, expected: Address) -> None:
    assert parse_uri(uri) == expected
    assert str(parse_uri(str(expected))) == str(expected)


@pytest.mark.parametrize("uri", ["", "tcp", "tcp:", "tcp:host", "tcp:host:99999", "tcp:host:x",
                                 "http://x", "file:/x", "tcp::5", "unix:"])
def test_bad(uri: str) -> None:
    with pytest.raises(SetupError, match="tcp:HOST:PORT"):
        parse_uri(uri)
