"""QOM objects a migration refers to by id, as QEMU's ``object-add``/``object-del`` make
them: ``tls-creds-x509`` (a credentials folder, its endpoint, verify-peer) and
``authz-list`` (who may connect). ``migrate-set-parameters tls-creds/tls-authz`` name them;
``migrate`` and ``migrate-incoming`` look them up when they start.

Why a registry apart from the options: QEMU keeps objects in the QOM tree, independent of
migration; parameters only hold their ids, and an id that names nothing is an error at
``migrate`` time, not when the parameter is set.
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mignet.errors import RequestRefused


@dataclass(frozen=True)
class TlsCredsX509:
    id: str
    dir: Path
    endpoint: str  # "client" or "server"
    verify_peer: bool


@dataclass(frozen=True)
class AuthzRule:
    match: str
    policy: str  # "allow" or "deny"
    format: str  # "exact" or "glob"


@dataclass(frozen=True)
class AuthzList:
    """QEMU's authz-list: the first rule that matches the identity decides, else ``policy``."""

    id: str
    rules: tuple[AuthzRule, ...]
    policy: str

    def allows(self, identity: str) -> bool:
        for rule in self.rules:
            hit = (fnmatch.fnmatchcase(identity, rule.match) if rule.format == "glob"
                   else identity == rule.match)
            if hit:
                return rule.policy == "allow"
        return self.policy == "allow"


QemuObject = TlsCredsX509 | AuthzList


def _str(props: dict[str, Any], key: str, default: str | None = None) -> str:
    value = props.get(key, default)
    if not isinstance(value, str):
        if value is None:
            raise RequestRefused(f"Parameter '{key}' is missing")
        raise RequestRefused(f"Invalid parameter type for '{key}', expected: string")
    return value


def _choice(props: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = _str(props, key, default)
    if value not in choices:
        raise RequestRefused(f"Parameter '{key}' does not accept value '{value}'")
    return value


class Objects:
    """The process's objects by id (thread-safe: QMP adds them, migration threads read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, QemuObject] = {}

    def add(self, args: dict[str, Any]) -> None:
        """``object-add``: qom-type, id and the type's properties, checked as QEMU does."""
        props = dict(args)
        qom_type, oid = _str(props, "qom-type"), _str(props, "id")
        props.pop("qom-type")
        props.pop("id")
        obj: QemuObject
        if qom_type == "tls-creds-x509":
            allowed = {"dir", "endpoint", "verify-peer", "priority", "sanity-check"}
            folder = Path(_str(props, "dir"))
            endpoint = _choice(props, "endpoint", ("client", "server"), "client")
            verify = props.get("verify-peer", True)
            if not isinstance(verify, bool):
                raise RequestRefused("Invalid parameter type for 'verify-peer', expected: boolean")
            if not (folder / "ca-cert.pem").exists():
                raise RequestRefused(f"Unable to access credentials {folder}/ca-cert.pem: "
                                     "No such file or directory")
            obj = TlsCredsX509(oid, folder, endpoint, verify)
        elif qom_type == "authz-list":
            allowed = {"rules", "policy"}
            rules = []
            for i, rule in enumerate(props.get("rules", [])):
                if not isinstance(rule, dict):
                    raise RequestRefused(f"Invalid parameter type for 'rules[{i}]', expected: object")
                rules.append(AuthzRule(_str(rule, "match"), _choice(rule, "policy", ("allow", "deny"), "deny"),
                                       _choice(rule, "format", ("exact", "glob"), "exact")))
            obj = AuthzList(oid, tuple(rules), _choice(props, "policy", ("allow", "deny"), "deny"))
        else:
            raise RequestRefused(f"Invalid parameter 'qom-type': mignet knows tls-creds-x509 and "
                                 f"authz-list, not '{qom_type}'")
        unknown = set(props) - allowed
        if unknown:
            raise RequestRefused(f"Property '{qom_type}.{sorted(unknown)[0]}' not found")
        with self._lock:
            if oid in self._by_id:
                raise RequestRefused(f"attempt to add duplicate property '{oid}' to object "
                                     "(type 'container')")
            self._by_id[oid] = obj

    def delete(self, oid: str) -> None:
        with self._lock:
            if self._by_id.pop(oid, None) is None:
                raise RequestRefused(f"object '{oid}' not found")

    def tls_creds(self, oid: str, endpoint: str) -> TlsCredsX509:
        """The credentials ``migrate-set-parameters tls-creds`` names, for ``endpoint``."""
        with self._lock:
            obj = self._by_id.get(oid)
        if not isinstance(obj, TlsCredsX509):
            raise RequestRefused(f"No TLS credentials with id '{oid}'")
        if obj.endpoint != endpoint:
            raise RequestRefused(f"Expected TLS credentials for a {endpoint} endpoint")
        return obj

    def authz(self, oid: str) -> AuthzList:
        with self._lock:
            obj = self._by_id.get(oid)
        if not isinstance(obj, AuthzList):
            raise RequestRefused(f"No authorization object with id '{oid}'")
        return obj
