"""Migration options: capabilities and parameters as ONE option set, with QEMU 7.2's names,
types and defaults (qapi/migration.json), QEMU's validation messages, and an explicit lock.

Why one set: management software sets both kinds before a migration and the migration reads
both; a rule such as "nothing changes while a migration runs" must cover both, or it is
broken the first time someone adds a capability that depends on a parameter.

The option lock. A migration takes it (:meth:`OptionSet.begin`) when it first uses its
options — at ``migrate`` and at ``migrate-incoming`` — and releases it (:meth:`OptionSet.end`)
when it ends, however it ends. While held, every change is refused with
:class:`OptionLockedError`, except the parameters in :data:`ALLOWLIST`. The lock is a set of
blocked operations per holder, guarded by its own mutex: it is *not* inferred from the
status value and does *not* depend on the big lock. (QEMU had exactly that bug: its checks
assumed the big lock serialised them against the migration, and once the destination stopped
holding the big lock during load, capabilities could change mid-load.)
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mignet.errors import InvalidOptionError, MisuseError, OptionLockedError
from mignet.units import PAGE_SIZE

SIZE_MAX = (1 << 64) - 1
MAX_MIGRATE_DOWNTIME_MS = 2_000_000  # QEMU's MAX_MIGRATE_DOWNTIME_SECONDS (2000 s) in ms

# QEMU 7.2's MigrationCapability, in its order; every one defaults to false.
CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path", "pause-before-switchover",
    "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
)
# Capabilities mignet can honour when enabled. The others change the stream or need a
# return path; accepting them and then migrating without them would silently lie.
# auto-converge throttles the source's vCPUs (mignet.live); rdma-pin-all, on the source,
# picks the RDMA registration mode, which the destination follows (as in QEMU).
# multifd: N connections besides the main stream on tcp:/unix: (QEMU 7.2's framing).
# postcopy-ram: an incoming migration takes a source's switch to postcopy; an outgoing one
# switches on migrate-start-postcopy (control/migrations.py).
# postcopy-preempt: with it, the incoming side takes QEMU's second, preempt connection,
# and an outgoing postcopy opens one.
# postcopy-blocktime: an incoming postcopy reports how long its vCPUs waited for pages.
SUPPORTED_CAPABILITIES = frozenset({"events", "late-block-activate", "auto-converge", "rdma-pin-all",
                                    "multifd", "postcopy-ram", "postcopy-preempt",
                                    "postcopy-blocktime"})
# Why some refused capabilities are refused, beyond "not supported": the ones a user of a
# supported neighbour is likely to try.
_UNSUPPORTED_WHY: dict[str, str] = {}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: QAPI type ('uint8', 'uint32', 'uint64', 'size', 'bool', 'str' or an
    enum tuple), default, and the inclusive range QEMU's migrate_params_check enforces."""

    qtype: str | tuple[str, ...]
    default: Any
    lo: int | None = None
    hi: int | None = None
    expects: str = ""  # QEMU's wording of the range, for "Parameter 'x' expects ..."


# QEMU 7.2's MigrationParameters, in query-migrate-parameters order.
PARAMETERS: dict[str, ParamSpec] = {
    "announce-initial": ParamSpec("size", 50, 1, 100_000, "a value between 1 and 100000"),
    "announce-max": ParamSpec("size", 550, 1, 100_000, "a value between 1 and 100000"),
    "announce-rounds": ParamSpec("size", 5, 1, 1000, "a value between 1 and 1000"),
    "announce-step": ParamSpec("size", 100, 1, 10_000, "a value between 1 and 10000"),
    "compress-level": ParamSpec("uint8", 1, 0, 9, "a value between 0 and 9"),
    "compress-threads": ParamSpec("uint8", 8, 1, 255, "a value between 1 and 255"),
    "compress-wait-thread": ParamSpec("bool", True),
    "decompress-threads": ParamSpec("uint8", 2, 1, 255, "a value between 1 and 255"),
    "throttle-trigger-threshold": ParamSpec("uint8", 50, 1, 100, "an integer in the range of 1 to 100"),
    "cpu-throttle-initial": ParamSpec("uint8", 20, 1, 99, "an integer in the range of 1 to 99"),
    "cpu-throttle-increment": ParamSpec("uint8", 10, 1, 99, "an integer in the range of 1 to 99"),
    "cpu-throttle-tailslow": ParamSpec("bool", False),
    "tls-creds": ParamSpec("str", ""),
    "tls-hostname": ParamSpec("str", ""),
    "tls-authz": ParamSpec("str", ""),
    "max-bandwidth": ParamSpec("size", 134_217_728, 0, SIZE_MAX,
                               f"an integer in the range of 0 to {SIZE_MAX} bytes/second"),
    "downtime-limit": ParamSpec("uint64", 300, 0, MAX_MIGRATE_DOWNTIME_MS,
                                "an integer in the range of 0 to 2000 seconds"),
    "x-checkpoint-delay": ParamSpec("uint32", 20_000),
    "block-incremental": ParamSpec("bool", False),
    "multifd-channels": ParamSpec("uint8", 2, 1, 255, "a value between 1 and 255"),
    "xbzrle-cache-size": ParamSpec("size", 67_108_864, PAGE_SIZE, SIZE_MAX,
                                   "a power of two no less than the target page size"),
    "max-postcopy-bandwidth": ParamSpec("size", 0),
    "max-cpu-throttle": ParamSpec("uint8", 99, 1, 99, "an integer in the range of 1 to 99"),
    "multifd-compression": ParamSpec(("none", "zlib", "zstd"), "none"),
    "multifd-zlib-level": ParamSpec("uint8", 1, 0, 9, "a value between 0 and 9"),
    "multifd-zstd-level": ParamSpec("uint8", 1, 0, 20, "a value between 0 and 20"),
}

# Parameters that may change at any time, even while a migration runs:
ALLOWLIST = frozenset({
    # downtime-limit: only read when deciding whether the remaining dirty RAM fits the
    # allowed pause; management raises it mid-migration to make a busy guest converge.
    "downtime-limit",
    # max-bandwidth: read by the rate limiter at each 100 ms window, never baked into the
    # stream or the peer; throttling a running migration is its whole point.
    "max-bandwidth",
    # max-postcopy-bandwidth: the same limiter role for the postcopy phase; a change only
    # alters the pacing of pages that are sent anyway.
    "max-postcopy-bandwidth",
})

_UINT_BITS = {"uint8": 8, "uint32": 32, "uint64": 64, "size": 64}


class Operation(enum.Enum):
    """The operations the option lock can block."""

    SET_CAPABILITIES = "migrate-set-capabilities"
    SET_PARAMETERS = "migrate-set-parameters"  # all but ALLOWLIST


#: What a running migration blocks: every option change outside the allowlist.
MIGRATION_BLOCKS = frozenset({Operation.SET_CAPABILITIES, Operation.SET_PARAMETERS})


@dataclass(frozen=True)
class OptionsSnapshot:
    """The options a migration started with (read-only)."""

    capabilities: Mapping[str, bool]
    parameters: Mapping[str, Any]


Observer = Callable[[str, Any], None]


class OptionSet:
    """The process's migration options. Thread-safe: QMP handlers change them on the main
    loop, migration threads read them, and the lock is checked under one private mutex."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._caps = {name: False for name in CAPABILITIES}
        self._params = {name: spec.default for name, spec in PARAMETERS.items()}
        self._holders: dict[str, frozenset[Operation]] = {}
        self._observers: list[Observer] = []

    # --- reading ---------------------------------------------------------------------
    def capability(self, name: str) -> bool:
        return self._caps[name]

    def parameter(self, name: str) -> Any:
        return self._params[name]

    def query_capabilities(self) -> list[dict[str, Any]]:
        with self._mutex:
            return [{"capability": n, "state": v} for n, v in self._caps.items()]

    def query_parameters(self) -> dict[str, Any]:
        with self._mutex:
            return dict(self._params)

    # --- the lock --------------------------------------------------------------------
    def blocked(self) -> frozenset[Operation]:
        with self._mutex:
            return frozenset().union(*self._holders.values())

    def holders(self) -> list[str]:
        with self._mutex:
            return list(self._holders)

    def begin(self, holder: str, config: Mapping[str, Any] | None = None,
              blocks: frozenset[Operation] = MIGRATION_BLOCKS) -> OptionsSnapshot:
        """Take the lock for ``holder`` (e.g. 'outgoing'), first applying ``config``
        ({"capabilities": ..., "parameters": ...}) atomically: no other change can slip in
        between setting the options and the migration using them."""
        caps, params = parse_config(config) if config else ({}, {})
        with self._mutex:
            if holder in self._holders:
                raise MisuseError(f"the {holder} migration holds the option lock already")
            self._check_locked(caps, params)
            merged = {**self._caps, **caps}
            check_capabilities(merged)
            self._caps = merged
            self._params.update(params)
            self._holders[holder] = blocks
            snapshot = OptionsSnapshot(MappingProxyType(dict(self._caps)),
                                       MappingProxyType(dict(self._params)))
        self._notify(params)
        return snapshot

    def end(self, holder: str) -> None:
        """Release ``holder``'s part of the lock (idempotent: every exit path calls it)."""
        with self._mutex:
            self._holders.pop(holder, None)

    # --- changing --------------------------------------------------------------------
    def set_capabilities(self, caps: Iterable[Any]) -> None:
        """``migrate-set-capabilities``: a list of {"capability": name, "state": bool}."""
        self._apply(parse_capabilities(caps), {})

    def set_parameters(self, params: Mapping[str, Any]) -> None:
        """``migrate-set-parameters``: a subset of the parameters, all or nothing."""
        self._apply({}, parse_parameters(params))

    def add_observer(self, fn: Observer) -> Callable[[], None]:
        """Call ``fn(name, value)`` after each parameter change; returns the remover."""
        with self._mutex:
            self._observers.append(fn)

        def remove() -> None:
            with self._mutex:
                if fn in self._observers:
                    self._observers.remove(fn)
        return remove

    def _apply(self, caps: dict[str, bool], params: dict[str, Any]) -> None:
        with self._mutex:
            self._check_locked(caps, params)
            merged = {**self._caps, **caps}
            check_capabilities(merged)
            self._caps = merged
            self._params.update(params)
        self._notify(params)

    def _check_locked(self, caps: Mapping[str, bool], params: Mapping[str, Any]) -> None:
        """Refuse the whole request if any part of it is blocked (mutex held)."""
        blocked = frozenset().union(*self._holders.values())
        who = " and ".join(self._holders)
        if caps and Operation.SET_CAPABILITIES in blocked:
            raise OptionLockedError(
                f"There's a migration process in progress ({who}): capabilities cannot change "
                "until it ends")
        locked = sorted(set(params) - ALLOWLIST)
        if locked and Operation.SET_PARAMETERS in blocked:
            raise OptionLockedError(
                f"There's a migration process in progress ({who}): parameter(s) "
                f"{', '.join(locked)} cannot change until it ends; only "
                f"{', '.join(sorted(ALLOWLIST))} may")

    def _notify(self, params: Mapping[str, Any]) -> None:
        with self._mutex:
            observers = list(self._observers)
        for name, value in params.items():
            for fn in observers:
                fn(name, value)


# --- validation, as QEMU's QAPI visitor and migrate_{caps,params}_check word it --------
def parse_capabilities(caps: Any) -> dict[str, bool]:
    if not isinstance(caps, list):
        raise InvalidOptionError("Invalid parameter type for 'capabilities', expected: array")
    out: dict[str, bool] = {}
    for i, item in enumerate(caps):
        where = f"capabilities[{i}]"
        if not isinstance(item, dict):
            raise InvalidOptionError(f"Invalid parameter type for '{where}', expected: object")
        for key in item:
            if key not in ("capability", "state"):
                raise InvalidOptionError(f"Parameter '{where}.{key}' is unexpected")
        if "capability" not in item:
            raise InvalidOptionError(f"Parameter '{where}.capability' is missing")
        if "state" not in item:
            raise InvalidOptionError(f"Parameter '{where}.state' is missing")
        name, state = item["capability"], item["state"]
        if not isinstance(name, str):
            raise InvalidOptionError(f"Invalid parameter type for '{where}.capability', expected: string")
        if name not in CAPABILITIES:
            raise InvalidOptionError(f"Parameter '{where}.capability' does not accept value '{name}'")
        if not isinstance(state, bool):
            raise InvalidOptionError(f"Invalid parameter type for '{where}.state', expected: boolean")
        if state and name not in SUPPORTED_CAPABILITIES:
            why = _UNSUPPORTED_WHY.get(name)
            raise InvalidOptionError(f"Capability '{name}' is not supported by mignet"
                                     + (f": {why}" if why else ""))
        out[name] = state
    return out


def check_capabilities(caps: Mapping[str, bool]) -> None:
    """Cross-capability rules of QEMU's migrate_caps_check that apply to a full set."""
    if caps.get("postcopy-preempt") and not caps.get("postcopy-ram"):
        raise InvalidOptionError("Postcopy preempt requires postcopy-ram")
    if caps.get("zero-copy-send") and not caps.get("multifd"):
        raise InvalidOptionError("Zero copy only available with multifd")


def parse_parameters(params: Any) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise InvalidOptionError("Invalid parameter type for 'parameters', expected: object")
    out: dict[str, Any] = {}
    for name, value in params.items():
        spec = PARAMETERS.get(name)
        if spec is None:
            raise InvalidOptionError(f"Parameter '{name}' is unexpected")
        out[name] = _check_value(name, spec, value)
    return out


def _check_value(name: str, spec: ParamSpec, value: Any) -> Any:
    q = spec.qtype
    if isinstance(q, tuple):
        if not isinstance(value, str):
            raise InvalidOptionError(f"Invalid parameter type for '{name}', expected: string")
        if value not in q:
            raise InvalidOptionError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    if q == "bool":
        if not isinstance(value, bool):
            raise InvalidOptionError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if q == "str":
        if not isinstance(value, str):
            raise InvalidOptionError(f"Invalid parameter type for '{name}', expected: string")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"Invalid parameter type for '{name}', expected: integer")
    bits = _UINT_BITS[q]
    if not 0 <= value < (1 << bits):
        raise InvalidOptionError(f"Parameter '{name}' expects {q}" + ("_t" if q != "size" else ""))
    if spec.lo is not None and spec.hi is not None and not spec.lo <= value <= spec.hi:
        raise InvalidOptionError(f"Parameter '{name}' expects {spec.expects}")
    if name == "xbzrle-cache-size" and value & (value - 1):
        raise InvalidOptionError(f"Parameter '{name}' expects {spec.expects}")
    return value


def parse_config(config: Any) -> tuple[dict[str, bool], dict[str, Any]]:
    """The optional ``config`` of migrate / migrate-incoming (a mignet extension):
    {"capabilities": [{"capability", "state"}...], "parameters": {name: value}}."""
    if not isinstance(config, Mapping):
        raise InvalidOptionError("Invalid parameter type for 'config', expected: object")
    for key in config:
        if key not in ("capabilities", "parameters"):
            raise InvalidOptionError(f"Parameter 'config.{key}' is unexpected")
    caps = parse_capabilities(config.get("capabilities", []))
    params = parse_parameters(config.get("parameters", {}))
    return caps, params
