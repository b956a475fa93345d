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
    RAM_RECORDS = "ram-records"  # inside a RAM section, expecting a record word
    PAGE_PAYLOAD = "page-payload"  # PAGE_SIZE bytes of page data are being placed
    RAM_FOOTER = "ram-footer"  # after EOS, expecting the section footer
    DEVICE_TAIL = "device-tail"  # an unknown device section: buffer to the end, walk later
    AFTER_EOF = "after-eof"  # EOF seen; a VMDESCRIPTION may follow
    DONE = "done"  # the stream is complete
    ERROR = "error"  # a ProtocolError was raised; the decoder is unusable


_S = DecoderState

TRANSITIONS: dict[DecoderState, frozenset[DecoderState]] = {
    _S.HEADER: frozenset({_S.TOP}),
    _S.TOP: frozenset({_S.TOP, _S.RAM_RECORDS, _S.DEVICE_TAIL, _S.AFTER_EOF, _S.DONE}),
    _S.RAM_RECORDS: frozenset({_S.RAM_RECORDS, _S.PAGE_PAYLOAD, _S.RAM_FOOTER}),
    _S.PAGE_PAYLOAD: frozenset({_S.RAM_RECORDS}),
    _S.RAM_FOOTER: frozenset({_S.TOP}),
    _S.DEVICE_TAIL: frozenset({_S.DONE}),
    _S.AFTER_EOF: frozenset({_S.DONE}),
    _S.DONE: frozenset(),
    _S.ERROR: frozenset(),
}
# Any state may move to ERROR; no state leaves it.


def check_transition(old: DecoderState, new: DecoderState) -> None:
    if new is _S.ERROR:
        return
    if new not in TRANSITIONS[old]:
        raise MisuseError(f"decoder bug: illegal transition {old.value} -> {new.value}")


# States in which the input may end without the stream being truncated.
FINAL_STATES = frozenset({_S.AFTER_EOF, _S.DONE, _S.DEVICE_TAIL})
