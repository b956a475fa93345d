"""QEMU's migration stream (version 3), sans-I/O: bytes in, events out; the codec never
touches a socket. See ``docs/design.md`` for the layout."""

from __future__ import annotations

from mignet.wire.constants import PAGE_SIZE
from mignet.wire.decoder import NEED_DATA, StreamDecoder, match_page_run
from mignet.wire.encoder import StreamEncoder
from mignet.wire.events import (
    Configuration,
    DeviceState,
    EndOfStream,
    Event,
    RamBlocks,
    RamEndOfSection,
    RamPage,
    RamZero,
    StreamFinished,
    StreamStart,
    VMDescription,
)

__all__ = [
    "NEED_DATA", "PAGE_SIZE", "Configuration", "DeviceState", "EndOfStream", "Event",
    "RamBlocks", "RamEndOfSection", "RamPage", "RamZero", "StreamDecoder", "StreamEncoder",
    "StreamFinished", "StreamStart", "VMDescription", "match_page_run",
]
