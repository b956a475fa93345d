"""The import rules of docs/design.md ("Rooms and rules"), checked on the source with ast.

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy
import hides a dependency from the import system, not from a reader. A room may import only
the rooms its rule lists; no module may take part in an import cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mignet"

#: Module (or package prefix) -> room. The longest matching prefix decides.
ROOMS: dict[str, str] = {
    "mignet": "base",
    "mignet.__main__": "cli",
    "mignet.errors": "base",
    "mignet.units": "base",
    "mignet.runtime": "runtime",
    "mignet.wire": "wire",
    "mignet.channel": "io",
    "mignet.uri": "io",
    "mignet.tcp": "tcp",
    "mignet.rdma": "rdma",
    "mignet.transport": "transport",
    "mignet.guest": "guest",
    "mignet.migration": "migration",
    "mignet.control": "control",
    "mignet.ui": "ui",
    "mignet.bench": "bench",
    "mignet.harness": "harness",
    "mignet.cli": "cli",
}

_CORE = {"base", "runtime", "wire", "io", "tcp", "rdma", "transport", "guest", "migration", "control"}

#: Room -> the rooms it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "runtime": {"base"},
    "wire": {"base"},  # sans-I/O: no runtime, no channel, no guest
    "io": {"base", "runtime"},
    "tcp": {"base", "io"},  # transports: pure I/O
    "rdma": {"base", "io"},
    "transport": {"base", "io", "tcp", "rdma"},
    "guest": {"base", "runtime", "wire"},
    "migration": {"base", "runtime", "wire", "io", "transport", "guest"},
    "control": {"base", "runtime", "wire", "io", "transport", "tcp", "guest", "migration"},
    "ui": {"base", "runtime", "io", "guest", "migration"},  # shows migrations to people
    "bench": _CORE | {"ui"},
    "harness": {"base"},
    "cli": _CORE | {"ui", "bench", "harness"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> str:
    best = max((prefix for prefix in ROOMS if module == prefix or module.startswith(prefix + ".")),
               key=len)
    return ROOMS[best]


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported mignet module, line) for every import statement in ``path``."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mignet":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "mignet":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = all_modules()
    known = set(modules)
    return {m: list(imports_of(m, p, known)) for m, p in modules.items()}


def test_every_module_has_a_room() -> None:
    for module in all_modules():
        assert room_of(module) in ALLOWED, module


def test_rooms_import_only_what_their_rule_allows() -> None:
    broken = []
    for module, edges in import_graph().items():
        room = room_of(module)
        for target, line in edges:
            other = room_of(target)
            if other != room and other not in ALLOWED[room]:
                broken.append(f"{module}:{line} ({room}) imports {target} ({other})")
    assert not broken, "\n".join(broken)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in graph:
        if colour[start]:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(graph[start]))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt, 2) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(graph[nxt])))
                path.append(nxt)
    return None


def test_no_import_cycles() -> None:
    graph = {m: [t for t, _ in edges if t != m and not m.startswith(t + ".")]
             for m, edges in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": ["b"], "b": ["c"], "c": ["a"]}, True),
    ({"a": ["b"], "b": ["c"], "c": []}, False),
    ({"a": ["a2"], "a2": [], "b": ["a", "a2"]}, False),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, list[str]], cyclic: bool) -> None:
    """The guard itself can fail: a planted cycle is found, a DAG is not flagged."""
    assert (find_cycle(graph) is not None) is cyclic


def test_the_rule_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """A transport importing the wire codec, written as real source, is caught."""
    fake = PACKAGE / "tcp" / "socket_channel.py"
    edges = list(imports_of("mignet.tcp.socket_channel", fake, set(all_modules())))
    assert all(room_of(t) in ALLOWED["tcp"] | {"tcp"} for t, _ in edges)
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from mignet.wire.constants import PAGE_SIZE\n")
    edges = list(imports_of("mignet.tcp.x", planted, set(all_modules())))
    assert [(room_of(t), line) for t, line in edges] == [("wire", 2)]
    assert "wire" not in ALLOWED["tcp"]
