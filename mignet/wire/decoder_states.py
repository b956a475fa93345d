"""The decoder's state machine, as one explicit table (in the spirit of h11's ``_state.py``).

Every transition the decoder makes goes through ``check_transition``; a transition not in
the table is a bug in mignet, never a peer's fault, so it raises ``MisuseError``.
"""

from __future__ import annotations

import enum

from mignet.errors import MisuseError


class DecoderState(enum.Enum):
    HEADER = "header"  # expecting magic + version
    TOP = "top"  # expecting a section type byte
    DEVICES = "devices"  # expecting a section type byte, device state has begun: read ahead
    RAM_RECORDS = "ram-records"  # inside a RAM section, expecting a record word
    ZERO_RECORDS = "zero-records"  # ... after a ZERO record: the next records are read ahead
    PAGE_PAYLOAD = "page-payload"  # PAGE_SIZE bytes of page data are being placed
    RAM_FOOTER = "ram-footer"  # after EOS, expecting the section footer
    DEVICE_TAIL = "device-tail"  # an unknown device section: buffer to the end, walk later
    AFTER_EOF = "after-eof"  # EOF seen; a VMDESCRIPTION may follow
    DONE = "done"  # the stream is complete
    ERROR = "error"  # a ProtocolError was raised; the decoder is unusable


_S = DecoderState

#: Every legal change of state, ERROR included (reachable from every state but itself,
#: never left). A change not listed is a bug in mignet, never the peer's fault.
TRANSITIONS: dict[DecoderState, frozenset[DecoderState]] = {
    _S.HEADER: frozenset({_S.TOP, _S.ERROR}),
    _S.TOP: frozenset({_S.TOP, _S.DEVICES, _S.RAM_RECORDS, _S.DEVICE_TAIL, _S.AFTER_EOF, _S.DONE,
                       _S.ERROR}),
    _S.DEVICES: frozenset({_S.TOP, _S.DEVICES, _S.RAM_RECORDS, _S.DEVICE_TAIL, _S.AFTER_EOF,
                           _S.DONE, _S.ERROR}),
    # -> DONE: a records-only channel (postcopy preempt) ends at its EOS
    _S.RAM_RECORDS: frozenset({_S.RAM_RECORDS, _S.ZERO_RECORDS, _S.PAGE_PAYLOAD, _S.RAM_FOOTER,
                               _S.DONE, _S.ERROR}),
    _S.ZERO_RECORDS: frozenset({_S.ZERO_RECORDS, _S.PAGE_PAYLOAD, _S.RAM_FOOTER, _S.DONE,
                                _S.ERROR}),
    _S.PAGE_PAYLOAD: frozenset({_S.RAM_RECORDS, _S.ERROR}),
    _S.RAM_FOOTER: frozenset({_S.TOP, _S.ERROR}),
    _S.DEVICE_TAIL: frozenset({_S.DONE, _S.ERROR}),
    _S.AFTER_EOF: frozenset({_S.DONE, _S.ERROR}),
    _S.DONE: frozenset({_S.ERROR}),  # bytes after the end
    _S.ERROR: frozenset(),
}

#: Bytes to ask for beyond what is needed, by state (see ``StreamDecoder.wanted``): the
#: only states where the driver may pull more than the next record into the decoder.
#: After a ZERO record the next records are likely ZERO too: read up to this many bytes of
#: them at once (a page that follows instead has at most this much copied from the buffer).
ZERO_READAHEAD = 9 * 455
#: Device sections come after the last RAM record: reading ahead there copies no page data,
#: and lets the loader apply a burst of sections under one hold of the big lock.
DEVICE_READAHEAD = 1 << 20
READ_AHEAD: dict[DecoderState, int] = {_S.ZERO_RECORDS: ZERO_READAHEAD, _S.DEVICES: DEVICE_READAHEAD}

#: States that expect a record word or a section byte (``_step`` dispatches on these).
RECORD_STATES = frozenset({_S.RAM_RECORDS, _S.ZERO_RECORDS})
TOP_STATES = frozenset({_S.TOP, _S.DEVICES})


def check_transition(old: DecoderState, new: DecoderState) -> None:
    if new not in TRANSITIONS[old]:
        raise MisuseError(f"decoder bug: illegal transition {old.value} -> {new.value}")


# States in which the input may end without the stream being truncated.
FINAL_STATES = frozenset({_S.AFTER_EOF, _S.DONE, _S.DEVICE_TAIL})
