"""The decoder's one state table: every change of state, ERROR and the read-ahead states
included, goes through it (h11's rule)."""

from __future__ import annotations

import pytest

from mignet.errors import MisuseError, ProtocolError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, RamBlock
from mignet.units import PAGE_SIZE
from mignet.wire import StreamDecoder
from mignet.wire import decoder_states as ds
from mignet.wire.decoder_states import TRANSITIONS, DecoderState
from tests.support.streams import encode_stream
from tests.test_stream_codec import decode_all


def test_error_is_reachable_from_every_state_and_never_left() -> None:
    for state, targets in TRANSITIONS.items():
        assert (DecoderState.ERROR in targets) is (state is not DecoderState.ERROR), state
    assert TRANSITIONS[DecoderState.ERROR] == frozenset()
    assert set(TRANSITIONS) == set(DecoderState)


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[DecoderState, DecoderState]]:
    seen: list[tuple[DecoderState, DecoderState]] = []
    real = ds.check_transition

    def check(old: DecoderState, new: DecoderState) -> None:
        seen.append((old, new))
        real(old, new)
    monkeypatch.setattr("mignet.wire.decoder.check_transition", check)
    return seen


def test_every_state_change_goes_through_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    ram = GuestRam([RamBlock.anonymous("a", 64 * PAGE_SIZE)])
    ram["a"].data[:8 * PAGE_SIZE] = 1  # data pages, then a run of zero pages
    data = encode_stream(ram, DeviceSet.example(1))
    seen = _recording(monkeypatch)
    events, _ = decode_all(data, chunk=97)  # odd chunks: states change mid-buffer too
    assert events
    # The read-ahead states are real states, entered through the table.
    assert (DecoderState.RAM_RECORDS, DecoderState.ZERO_RECORDS) in seen
    assert (DecoderState.TOP, DecoderState.DEVICES) in seen
    # Replaying the recorded changes from HEADER reproduces the final state: nothing
    # changed the state behind the table's back.
    state = DecoderState.HEADER
    for old, new in seen:
        assert old is state
        state = new
    assert state is DecoderState.DONE


def test_read_ahead_only_where_the_table_says(monkeypatch: pytest.MonkeyPatch) -> None:
    dec = StreamDecoder()
    dec.state = DecoderState.RAM_RECORDS
    exact = dec.wanted()
    dec.state = DecoderState.ZERO_RECORDS
    assert dec.wanted() == ds.ZERO_READAHEAD > exact
    dec.state = DecoderState.DEVICES
    assert dec.wanted() == ds.DEVICE_READAHEAD


def test_a_protocol_error_moves_to_error_through_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _recording(monkeypatch)
    dec = StreamDecoder()
    dec.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError):
        dec.next_event()
    assert seen == [(DecoderState.HEADER, DecoderState.ERROR)]
    assert dec.state is DecoderState.ERROR
    with pytest.raises(MisuseError):
        dec.next_event()
