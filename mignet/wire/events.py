"""Events the decoder produces. Each is a plain, immutable record of what the stream said."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SectionKind = Literal["start", "part", "end"]


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Magic and version were valid."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """The CONFIGURATION section: the source's machine type."""

    machine_type: str


@dataclass(frozen=True, slots=True)
class RamBlocks:
    """MEM_SIZE: the RAM blocks the source will send, in order, as (name, bytes)."""

    total: int
    blocks: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class RamZero:
    """A page that is entirely ``fill`` (QEMU always sends 0)."""

    block: str
    offset: int
    fill: int


@dataclass(frozen=True, slots=True)
class RamPage:
    """A full page follows. The decoder is now in its payload state: the caller places
    PAGE_SIZE bytes (``take_payload_into`` / ``payload_placed``) before asking for the next event."""

    block: str
    offset: int


@dataclass(frozen=True, slots=True)
class RamEndOfSection:
    """EOS and footer of a RAM section: one iteration of the source is complete."""

    section_id: int
    kind: SectionKind


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A SECTION_FULL: one device's state. ``fields`` holds decoded values when mignet knows
    the device's layout (its own devices); ``raw`` is always the exact field bytes, so state
    from real QEMU can be kept and re-emitted unchanged."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    raw: bytes
    fields: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The EOF section: every section has been sent; a VM description may follow."""


@dataclass(frozen=True, slots=True)
class Command:
    """A QEMU_VM_COMMAND the destination must act on (OPEN_RETURN_PATH, PING): see
    :mod:`mignet.wire.return_path`."""

    cmd: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PostcopyAdvise:
    """The source may switch to postcopy (capability ``postcopy-ram``); its page sizes."""

    page_size_summary: int
    target_page_size: int


@dataclass(frozen=True, slots=True)
class PostcopyDiscard:
    """Pages the source dirtied after sending them: throw them away, they come again.
    ``ranges`` are (start, length) in bytes, checked to lie in ``block``."""

    block: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Packaged:
    """A PACKAGED command: the next ``length`` bytes (all buffered now) hold LISTEN, the
    device state and RUN; their events follow this one."""

    length: int


@dataclass(frozen=True, slots=True)
class PostcopyListen:
    """From here on pages arrive into a guest that faults on missing ones."""


@dataclass(frozen=True, slots=True)
class PostcopyRun:
    """The destination starts running; the rest of RAM keeps streaming."""


@dataclass(frozen=True, slots=True)
class PostcopyRecvBitmap:
    """Recovery: the source asks which pages of ``block`` arrived (answered on the return
    path); it re-sends all others."""

    block: str


@dataclass(frozen=True, slots=True)
class PostcopyResume:
    """Recovery: the source is ready to go on; acknowledge, and ask again for what the
    guest still waits for."""


@dataclass(frozen=True, slots=True)
class VMDescription:
    """The JSON self-description QEMU appends after EOF."""

    description: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamFinished:
    """The input ended at a point where the stream was complete."""


Event = (
    StreamStart | Configuration | RamBlocks | RamZero | RamPage | RamEndOfSection | DeviceState
    | Command | EndOfStream | VMDescription | StreamFinished | PostcopyAdvise | PostcopyDiscard
    | Packaged | PostcopyListen | PostcopyRun | PostcopyRecvBitmap | PostcopyResume
)
