"""The option set, its lock, the state machine and QMP framing, in-process (no mocks: the
real objects, real threads)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from mignet.control.options import ALLOWLIST, CAPABILITIES, Operation, OptionSet
from mignet.control.qmp_server import JsonSplitter
from mignet.errors import InvalidOptionError, MisuseError, OptionLockedError, RequestRefused
from mignet.migration.status import PUBLIC_STATUS, TRANSITIONS, MigrationState, MigrationStatus, Phase
from mignet.runtime.bql import bql_held


def test_defaults_are_qemu_7_2s() -> None:
    o = OptionSet()
    p = o.query_parameters()
    assert p["downtime-limit"] == 300 and p["max-bandwidth"] == 134217728
    assert p["multifd-channels"] == 2 and p["xbzrle-cache-size"] == 64 << 20
    assert p["multifd-compression"] == "none" and p["compress-wait-thread"] is True
    assert p["tls-creds"] == "" and p["max-cpu-throttle"] == 99
    caps = o.query_capabilities()
    assert [c["capability"] for c in caps] == list(CAPABILITIES) and not any(c["state"] for c in caps)


def refusal(call: Callable[[], object]) -> str:
    """Run a real request; it must be refused the way the QMP layer answers a client (a
    ``RequestRefused``, not a ``MisuseError`` bug). Returns the message the client would see."""
    try:
        call()
    except MisuseError as exc:
        pytest.fail(f"a bad request was treated as a bug: {exc!r}")
    except RequestRefused as exc:
        return str(exc)
    pytest.fail("the request was accepted")


def test_errors_are_request_refusals_not_bugs() -> None:
    o = OptionSet()
    assert refusal(lambda: o.set_parameters({"bogus": 1})) == "Parameter 'bogus' is unexpected"
    assert refusal(lambda: o.set_capabilities([{"capability": "bogus", "state": True}])) == (
        "Parameter 'capabilities[0].capability' does not accept value 'bogus'")
    o.begin("outgoing")
    assert refusal(lambda: o.set_parameters({"multifd-channels": 3})) == (
        "There's a migration process in progress (outgoing): parameter(s) multifd-channels cannot "
        "change until it ends; only downtime-limit, max-bandwidth, max-postcopy-bandwidth may")
    # Refused requests change nothing.
    assert o.parameter("multifd-channels") == 2 and "bogus" not in o.query_parameters()


def test_lock_blocks_all_but_the_allowlist_and_refusals_are_all_or_nothing() -> None:
    o = OptionSet()
    seen: list[tuple[str, object]] = []
    o.add_observer(lambda n, v: seen.append((n, v)))
    snap = o.begin("incoming")
    assert o.blocked() == {Operation.SET_CAPABILITIES, Operation.SET_PARAMETERS}
    with pytest.raises(OptionLockedError, match=r"in progress \(incoming\)"):
        o.set_capabilities([{"capability": "events", "state": True}])
    with pytest.raises(OptionLockedError, match="multifd-channels"):
        o.set_parameters({"max-bandwidth": 1, "multifd-channels": 4})
    assert o.parameter("max-bandwidth") == 134217728 and seen == []
    for name in sorted(ALLOWLIST):
        o.set_parameters({name: 1000})
    assert o.parameter("max-bandwidth") == 1000 and ("max-bandwidth", 1000) in seen
    assert snap.parameters["max-bandwidth"] == 134217728  # the snapshot is what it started with
    with pytest.raises(MisuseError):
        o.begin("incoming")
    o.begin("outgoing")  # both directions may hold it; released separately
    o.end("incoming")
    with pytest.raises(OptionLockedError, match=r"\(outgoing\)"):
        o.set_parameters({"compress-level": 2})
    o.end("outgoing")
    o.end("outgoing")  # idempotent: every exit path releases
    o.set_parameters({"compress-level": 2})
    o.set_capabilities([{"capability": "events", "state": True}])
    assert o.capability("events")


def test_config_is_applied_atomically_with_the_start() -> None:
    o = OptionSet()
    snap = o.begin("outgoing", {"capabilities": [{"capability": "events", "state": True}],
                                "parameters": {"downtime-limit": 42}})
    assert snap.capabilities["events"] and snap.parameters["downtime-limit"] == 42
    with pytest.raises(OptionLockedError):  # a second migration may not re-configure
        o.begin("incoming", {"parameters": {"multifd-channels": 3}})
    assert "incoming" not in o.holders()
    o.end("outgoing")
    with pytest.raises(InvalidOptionError, match="'config.bogus' is unexpected"):
        o.begin("outgoing", {"bogus": 1})
    assert o.holders() == []  # a refused start takes no lock


def test_the_lock_does_not_depend_on_the_big_lock() -> None:
    """QEMU's bug: checks that relied on the big lock let options change mid-load once the
    loader stopped holding it. Here the lock holds whoever has the big lock."""
    o = OptionSet()
    o.begin("incoming")
    errors: list[BaseException] = []

    def change() -> None:  # another thread, no big lock at all
        try:
            o.set_parameters({"multifd-channels": 8})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    with bql_held():  # the main loop dispatching a command, say
        t = threading.Thread(target=change)
        t.start()
        t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], OptionLockedError)


@pytest.mark.parametrize("params, message", [
    ({"compress-level": 10}, "Parameter 'compress-level' expects a value between 0 and 9"),
    ({"max-bandwidth": -1}, "Parameter 'max-bandwidth' expects size"),
    ({"max-bandwidth": True}, "Invalid parameter type for 'max-bandwidth', expected: integer"),
    ({"xbzrle-cache-size": 5000}, "expects a power of two no less than the target page size"),
    ({"tls-creds": 1}, "Invalid parameter type for 'tls-creds', expected: string"),
    ({"block-incremental": "yes"}, "Invalid parameter type for 'block-incremental', expected: boolean"),
])
def test_parameter_validation_messages(params: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        OptionSet().set_parameters(params)
    assert message in str(info.value)


def test_status_and_phase_tables() -> None:
    assert {s.value for s in MigrationStatus} == {
        "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
        "postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug"}
    assert set(PUBLIC_STATUS) == set(Phase) == set(TRANSITIONS)
    seen: list[tuple[str, MigrationStatus]] = []
    st = MigrationState(on_status=lambda d, s: seen.append((d, s)))
    out = st.outgoing
    with pytest.raises(MisuseError):
        out.to(Phase.DONE)  # none -> completed is not a migration
    out.to(Phase.CONNECTING)
    out.to(Phase.RAM)
    out.to(Phase.DEVICES)  # internal change, same public status: no event
    assert out.move(frozenset({Phase.RAM, Phase.DEVICES}), Phase.CANCELLING)
    # Completion racing with a cancel loses, as in QEMU.
    assert not out.move(frozenset({Phase.RAM, Phase.DEVICES}), Phase.SWITCHOVER)
    out.to(Phase.CANCELLED)
    assert [s.value for _, s in seen] == ["setup", "active", "cancelling", "cancelled"]
    assert st.current() is out and st.incoming.status is MigrationStatus.NONE


def test_json_splitter_frames_objects_without_newlines() -> None:
    sp = JsonSplitter()
    assert sp.feed(b'{"a": "}{\\"x"') == []
    assert sp.feed(b'}  {"b": [1, {"c": 2}]}\n{"d"') == [b'{"a": "}{\\"x"}', b'{"b": [1, {"c": 2}]}']
    assert sp.feed(b": 1}") == [b'{"d": 1}']
    assert sp.feed(b"42 ") == [b"42"]


def test_query_migrate_names_the_rdma_protocol_as_an_x_member() -> None:
    """Over rdma: query-migrate says which protocol the connection speaks (QEMU's own or
    mignet's) in ``x-mignet-rdma``, a member QEMU's reply lacks; without RDMA it is absent."""
    from mignet.migration.status import RamCounters, query_migrate

    state = MigrationState()
    side = state.incoming
    side.to(Phase.LISTENING)
    side.to(Phase.RAM)
    side.counters = RamCounters
    assert "x-mignet-rdma" not in query_migrate(side, 300)
    side.rdma = lambda: {"protocol": "qemu", "pin_all": False, "registered_bytes": 4096}
    info = query_migrate(side, 300)
    assert info["status"] == "active"
    assert info["x-mignet-rdma"] == {"protocol": "qemu", "pin-all": False, "registered-bytes": 4096}
