"""QMP input framing: linear in the input, bounded like QEMU's json-streamer, and hostile
input answered with GenericError while the session (and the server) carry on."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

from mignet.control.qmp_server import JsonSplitter, QmpError
from tests.support.qmp_serve import serve


def test_split_anywhere_gives_the_same_texts() -> None:
    stream = b'{"a": "}{\\"x\\\\"}  {"b": [1, {"c": 2}]}\n7 {"d": "\\u007b"}\n'
    whole = JsonSplitter().feed(stream)
    assert whole == [b'{"a": "}{\\"x\\\\"}', b'{"b": [1, {"c": 2}]}', b"7", b'{"d": "\\u007b"}']
    for cut in range(1, len(stream)):
        sp = JsonSplitter()
        assert sp.feed(stream[:cut]) + sp.feed(stream[cut:]) == whole, cut


def test_framing_is_linear_in_the_input() -> None:
    """A 256 KiB object fed one byte at a time: a splitter that rescans its buffer on every
    feed does ~3e10 steps here (hours); a linear one a few hundred thousand (about a second)."""
    text = b'{"execute": "x", "arguments": {"s": "' + b"y" * (256 << 10) + b'"}}'
    sp = JsonSplitter()
    t0 = time.perf_counter()
    got: list[bytes | QmpError] = []
    for i in range(len(text)):
        got += sp.feed(text[i:i + 1])
    assert got == [text]
    assert time.perf_counter() - t0 < 30  # ~1 s measured; margin for a loaded machine


def test_limits_yield_an_error_and_the_next_text_still_parses() -> None:
    sp = JsonSplitter(max_bytes=1000, max_depth=8)
    out = sp.feed(b"[" * 9)
    assert len(out) == 1 and isinstance(out[0], QmpError) and "nesting" in out[0].desc
    assert sp.feed(b'\n{"ok": 1}') == [b'{"ok": 1}']
    out = sp.feed(b'{"s": "' + b"z" * 2000)
    assert len(out) == 1 and isinstance(out[0], QmpError) and "size" in out[0].desc
    assert sp.feed(b' {"ok": 2}') == [b'{"ok": 2}']


def _raw_session(path: Path) -> tuple[socket.socket, Any]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(path))
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    return s, f


def test_hostile_qmp_input_gets_generic_error_and_the_session_lives(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst:
            def talk() -> list[dict[str, Any]]:
                s, f = _raw_session(dst.path)
                s.sendall(b'{"execute": "qmp_capabilities", "arguments": {"enable": 5}, "id": 1}\n'
                          + b"[" * 5000 + b"]" * 5000 + b"\n"  # deeper than QEMU allows
                          + b'{"execute": "qmp_capabilities", "id": 2}\n'
                          + b'{"execute": "query-status", "id": 3}\n')
                replies: list[dict[str, Any]] = []
                while not replies or replies[-1].get("id") != 3:
                    replies.append(json.loads(f.readline()))
                s.close()
                return replies
            replies = await asyncio.to_thread(talk)
            by_id = {r["id"]: r for r in replies if "id" in r}
            anonymous = [r for r in replies if "id" not in r]
            assert by_id[1]["error"]["class"] == "GenericError"
            assert "enable" in by_id[1]["error"]["desc"]
            # The deep text is refused (how many errors depends on how reads split it).
            assert anonymous and all(r["error"]["class"] == "GenericError" for r in anonymous)
            assert {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"} in [
                r["error"] for r in anonymous]
            assert by_id[2] == {"return": {}, "id": 2}
            assert by_id[3]["return"]["status"] == "inmigrate"
            # and the server still serves other clients
            assert (await dst.x("query-status"))["status"] == "inmigrate"
    asyncio.run(main())
