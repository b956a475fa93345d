#!/usr/bin/env python3
"""Fuzz what a hostile peer controls: the stream decoder with the VM-description walker, the
real loader on a real socket, the device-tail splitter, the multifd records and the QMP
framer. Each target takes bytes and may only fail with mignet's own errors (MignetError):
anything else — a traceback, a hang, a runaway allocation — is a finding.

Coverage-guided with atheris (libFuzzer) where it is installed, otherwise hypothesis
generating from the same seeds. Seeds are real streams made by mignet's encoder (RAM,
devices, VM description), multifd records, QMP commands and, when ``--seed-dir`` names
one, files such as a stream captured from QEMU 7.2 (``tests/support/qemu_peer.py``'s
``capture_stream``, or ``mignet recv --stream-out``).

    python tools/fuzz.py stream                    # atheris until Ctrl-C (or -max_total_time=S)
    python tools/fuzz.py all --runs 2000           # a bounded pass over every target (CI)
    python tools/fuzz.py loader --engine hypothesis --runs 500

Exit status 0: no finding; 1: a finding (the input is printed, and written to
``fuzz-crash-TARGET-*.bin`` with atheris).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if sys.argv[1:2] == ["--child"]:  # the libFuzzer child: mignet's code instrumented for coverage
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs; optional

    with atheris.instrument_imports(include=["mignet"]):
        import mignet.control.qmp_server
        import mignet.migration.loadvm
        import mignet.wire.device_tail
        import mignet.wire.multifd
        import mignet.wire.summary  # noqa: F401

import numpy as np  # noqa: E402

from mignet.control.qmp_server import JsonSplitter  # noqa: E402
from mignet.errors import MignetError  # noqa: E402
from mignet.guest.devices import DeviceSet  # noqa: E402
from mignet.guest.ram import GuestRam  # noqa: E402
from mignet.migration.loadvm import Loader  # noqa: E402
from mignet.tcp import SocketChannel  # noqa: E402
from mignet.wire import StreamEncoder  # noqa: E402
from mignet.wire.device_tail import split_device_tail  # noqa: E402
from mignet.wire.multifd import (  # noqa: E402
    INIT_SIZE,
    PACKET_LEN,
    build_init,
    build_packet,
    check_offsets,
    parse_init,
    parse_packet,
)
from mignet.wire.summary import summarise  # noqa: E402

MAX_LEN = 1 << 16  # inputs stay below a socket buffer: the loader target needs no thread
#: Targets that read whole streams take a real QEMU capture whole (318 KiB, see below).
MAX_LENS = {"stream": 1 << 19, "device-tail": 1 << 19}
#: A real QEMU 7.2 stream (a paused 2 MiB zero guest: RAM blocks, BIOS pages, every device
#: section of a pc machine, the VM description), captured with tests/support/qemu_peer.py's
#: capture_stream and kept gzipped: the seed for the targets that read streams.
QEMU_SEED = Path(__file__).resolve().parents[1] / "tests" / "data" / "qemu-7.2-2M-zero.stream.gz"


def max_len(target: str) -> int:
    return MAX_LENS.get(target, MAX_LEN)


def _qemu_stream() -> list[bytes]:
    import gzip

    return [gzip.decompress(QEMU_SEED.read_bytes())] if QEMU_SEED.exists() else []
MAX_RAM = 16 << 20  # what the loader target accepts (a fuzzed MEM_SIZE may not ask more)


# --- seeds ---------------------------------------------------------------------------------
def _stream(devices: bool = True, blocks: tuple[tuple[str, int], ...] = (("pc.ram", 64 << 10),)) -> bytes:
    ram = GuestRam.generate(sum(size for _, size in blocks), "mixed", seed=1) if len(blocks) == 1 else None
    enc = StreamEncoder()
    out: list[bytes] = [enc.header(), enc.configuration("pc-i440fx-7.2"), enc.ram_start(list(blocks)),
                        enc.ram_section(False)]
    name, size = blocks[0]
    offs = np.arange(0, size, 4096, dtype=np.uint64)
    if ram is not None:
        block = next(iter(ram))
        zero = block.zero_mask(0, block.pages)
        out.append(enc.zero_records(name, offs[zero]))
        out += [bytes(x) for x in enc.page_records(name, block.data, offs[~zero])]
    else:
        out.append(enc.zero_records(name, offs))
    out += [enc.ram_section_close(), enc.ram_section(True), enc.ram_section_close()]
    description: dict[str, object] = {"page_size": 4096, "devices": []}
    if devices:
        for dev in DeviceSet.example(1).devices:
            out.append(enc.device_section(dev.idstr, dev.instance_id, dev.vmsd.version_id,
                                          dev.vmsd.encode(dev.values)))
            description["devices"].append(dev.vmsd.describe(dev.idstr, dev.instance_id))  # type: ignore[attr-defined]
        # a device mignet does not model: its end comes from the description's sizes
        out.append(enc.device_section("timer", 0, 2, b"\x01" * 16))
        description["devices"].append({"name": "timer", "instance_id": 0, "vmsd_name": "timer",  # type: ignore[attr-defined]
                                        "version": 2, "fields": [{"name": "a", "type": "uint64", "size": 8},
                                                                 {"name": "b", "type": "uint64", "size": 8}]})
    out += [enc.eof(), enc.vmdescription(description)]
    return b"".join(bytes(x) for x in out)


def seeds(target: str, seed_dir: Path | None = None) -> list[bytes]:
    extra = [p.read_bytes() for p in sorted(seed_dir.iterdir())] if seed_dir else []
    if target in ("stream", "loader"):
        found = [_stream(), _stream(devices=False),
                 _stream(blocks=(("pc.ram", 16 << 10), ("vga.vram", 8 << 10), ("pc.bios", 4 << 10))),
                 *_qemu_stream(), *extra]
        return [seed[:max_len(target)] for seed in found]
    if target == "device-tail":
        full = _stream()
        return [full[full.index(b"mignet-cpu") - 6:]]  # from the first device section's header
    if target == "multifd":
        return [build_init(bytes(range(16)), 1) + bytes(build_packet(block="pc.ram", offsets=[0, 4096])),
                build_init(bytes(16), 0) + bytes(build_packet(flags=1))]
    if target == "qmp":
        cmds = [{"execute": "qmp_capabilities"}, {"execute": "query-migrate"},
                {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1 << 20}},
                {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}, "id": [1, {"a": "\\u00e9"}]}]
        return [b" ".join(json.dumps(c).encode() for c in cmds), b'{"execute": "x"' + b"[" * 2000]
    raise SystemExit(f"fuzz: unknown target {target!r} (one of {', '.join(TARGETS)} or all)")


# --- targets: bytes in; only MignetError may come out ----------------------------------------
def t_stream(data: bytes) -> None:
    """The sans-I/O decoder with the VM-description walker (as ``mignet inspect``), whole
    and split at a point the input chooses."""
    for chunks in ([data], [data[: data[0] if data else 0], data[data[0] if data else 0:]]):
        try:
            summarise(chunks)
        except MignetError:
            pass


def t_loader(data: bytes) -> None:
    """The real loader (threaded model) reading the input from a real socket."""
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        ch = SocketChannel(b, "fuzz")
        try:
            Loader(ch, devices=DeviceSet.empty(), max_ram_bytes=MAX_RAM, idle_timeout=5).run()
        except MignetError:
            pass
    finally:
        a.close()
        b.close()


def t_device_tail(data: bytes) -> None:
    try:
        split_device_tail(data, 0)
    except MignetError:
        pass


def t_multifd(data: bytes) -> None:
    try:
        parse_init(data[:INIT_SIZE].ljust(INIT_SIZE, b"\0"))
    except MignetError:
        pass
    try:
        header = parse_packet(data[INIT_SIZE:INIT_SIZE + PACKET_LEN].ljust(PACKET_LEN, b"\0"))
        check_offsets(header, 1 << 20)
    except MignetError:
        pass


def t_qmp(data: bytes) -> None:
    """The QMP framer fed in pieces; each text it yields must parse or be an error item."""
    splitter = JsonSplitter(max_bytes=1 << 14, max_depth=64)
    step = max(1, data[0] if data else 1)
    for i in range(0, len(data), step):
        for item in splitter.feed(data[i:i + step]):
            if isinstance(item, bytes):
                try:
                    json.loads(item)
                except (ValueError, RecursionError):
                    pass  # the server answers these with QMP's own error reply


TARGETS: dict[str, Callable[[bytes], None]] = {
    "stream": t_stream, "loader": t_loader, "device-tail": t_device_tail, "multifd": t_multifd,
    "qmp": t_qmp,
}


# --- engines ------------------------------------------------------------------------------
def run_hypothesis(target: str, runs: int, seed_dir: Path | None) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = seeds(target, seed_dir)
    fn = TARGETS[target]

    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(base)))
        for _ in range(draw(st.integers(0, 8))):
            kind = draw(st.integers(0, 3))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == 0 and data:
                data[pos] = draw(st.integers(0, 255))
            elif kind == 1:
                data[pos:pos] = draw(st.binary(max_size=16))
            elif kind == 2:
                del data[pos:pos + draw(st.integers(1, 64))]
            else:
                data = data[:pos]
        return bytes(data[:max_len(target)])

    @settings(max_examples=runs, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.composite(mutate)())
    def check(data: bytes) -> None:
        fn(data)

    t0 = time.monotonic()
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - a finding: say what and stop
        print(f"fuzz {target}: FINDING {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"fuzz {target}: {runs} cases (hypothesis) in {time.monotonic() - t0:.1f} s, no finding")
    return 0


def run_atheris(target: str, runs: int | None, seed_dir: Path | None, extra: list[str]) -> int:
    """libFuzzer in a child process (it exits the process when done); the corpus starts
    from the seeds in a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as corpus:
        for i, s in enumerate(seeds(target, seed_dir)):
            Path(corpus, f"seed-{i}").write_bytes(s)
        args = [sys.executable, __file__, "--child", target, corpus, f"-max_len={max_len(target)}",
                f"-artifact_prefix=fuzz-crash-{target}-", "-timeout=20", "-rss_limit_mb=2048"]
        if runs is not None:
            args.append(f"-runs={runs}")
        t0 = time.monotonic()
        proc = subprocess.Popen([*args, *extra], stderr=subprocess.PIPE, text=True, errors="replace")
        done = ""
        assert proc.stderr is not None
        for line in proc.stderr:  # libFuzzer's log, passed on; its last "Done N runs" kept
            sys.stderr.write(line)
            if line.startswith("Done "):
                done = line.split(" in ")[0].removeprefix("Done ")
        rc = proc.wait()
    verdict = "no finding" if rc == 0 else f"FINDING (libFuzzer exit {rc})"
    print(f"fuzz {target}: {done or 'some'} (atheris) in {time.monotonic() - t0:.1f} s, {verdict}")
    return 0 if rc == 0 else 1


def child(target: str, argv: list[str]) -> None:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs; optional

    fn = TARGETS[target]
    atheris.Setup([sys.argv[0], *argv], fn)
    atheris.Fuzz()


def have_atheris() -> bool:
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description="fuzz mignet's parsers of peer input",
                                 epilog="arguments after -- go to libFuzzer (atheris)")
    ap.add_argument("target", choices=[*TARGETS, "all"])
    ap.add_argument("--runs", type=int, default=None,
                    help="cases per target (default: until stopped with atheris, 1000 with hypothesis)")
    ap.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto",
                    help="auto: atheris if installed, else hypothesis")
    ap.add_argument("--seed-dir", type=Path, help="more seed files (e.g. a captured QEMU stream)")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    engine = args.engine if args.engine != "auto" else ("atheris" if have_atheris() else "hypothesis")
    targets = list(TARGETS) if args.target == "all" else [args.target]
    failed = 0
    for target in targets:
        if engine == "atheris":
            failed |= run_atheris(target, args.runs, args.seed_dir, extra)
        else:
            failed |= run_hypothesis(target, args.runs or 1000, args.seed_dir)
    return failed


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
