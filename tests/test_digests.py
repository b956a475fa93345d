"""Digests (issue 15): a fast default (XXH3-128), ``--digest`` on every command that prints
one, each block hashed once and the RAM digest derived from the block digests, the manifest
naming its algorithm, and ``sha256`` giving what ``sha256sum`` prints for a block file.
Real ``mignet send``/``recv`` processes over real sockets."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import xxhash

from mignet.cli import exits
from mignet.guest.ram import GuestRam, RamBlock, combine_digests
from tests.support.cli import one_line, send_into, start_recv


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def test_default_digest_is_xxh3_per_block_and_the_ram_digest_derives_from_them(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "guest"
    proc, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    sent, got = send_into(mignet_cmd, subprocess_env, proc, uri, "--size", "24M", "--fill", "mixed")
    manifest = _manifest(out)
    assert sent["digest"] == got["digest"] == manifest["digest"] == "xxh3"
    [block] = manifest["blocks"]
    file_digest = xxhash.xxh3_128((out / block["file"]).read_bytes()).hexdigest()  # xxh128sum's
    assert block["digest"] == file_digest == got["block_digests"][0] == sent["block_digests"][0]
    derived = combine_digests("xxh3", [("pc.ram", 24 << 20, file_digest)])
    assert manifest["ram_digest"] == got["ram_digest"] == sent["ram_digest"] == derived
    assert len(derived) == 32  # 128 bits, in full in the JSON and the manifest


def test_sha256_per_block_is_what_sha256sum_prints(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum here")
    out = tmp_path / "guest"
    proc, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out), "--digest", "sha256")
    sent, got = send_into(mignet_cmd, subprocess_env, proc, uri, "--size", "16M", "--fill", "random",
                          "--digest", "sha256")
    manifest = _manifest(out)
    assert manifest["digest"] == got["digest"] == sent["digest"] == "sha256"
    [block] = manifest["blocks"]
    printed = subprocess.run(["sha256sum", str(out / block["file"])], capture_output=True, text=True,
                             check=True).stdout.split()[0]
    assert block["digest"] == printed == got["block_digests"][0] == sent["block_digests"][0]
    assert got["ram_digest"] == sent["ram_digest"] == manifest["ram_digest"]


def test_blake3_both_ends_agree_and_match_b3sum_of_the_file(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "guest"
    proc, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out), "--digest", "blake3")
    sent, got = send_into(mignet_cmd, subprocess_env, proc, uri, "--size", "8M", "--digest", "blake3")
    [block] = _manifest(out)["blocks"]
    assert block["digest"] == blake3.blake3((out / block["file"]).read_bytes()).hexdigest()
    assert got["ram_digest"] == sent["ram_digest"] and got["digest"] == "blake3"


def test_digest_none_computes_and_writes_none(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                              tmp_path: Path) -> None:
    out = tmp_path / "guest"
    proc, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out), "--digest", "none")
    sent, got = send_into(mignet_cmd, subprocess_env, proc, uri, "--size", "8M", "--digest", "none")
    for event in (sent, got):
        assert event["digest"] is None and event["ram_digest"] is None and event["block_digests"] is None
    manifest = _manifest(out)
    assert manifest["complete"] is True and manifest["digest"] is None and manifest["ram_digest"] is None
    assert [b["digest"] for b in manifest["blocks"]] == [None]


def test_the_table_names_the_algorithm_and_says_it_shortens(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    recv = subprocess.Popen([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env)
    try:
        assert recv.stdout is not None
        uri = json.loads(recv.stdout.readline())["uri"]
        send = subprocess.run([*mignet_cmd, "send", uri, "--size", "4M"], capture_output=True, text=True,
                              env={**subprocess_env, "COLUMNS": "80"}, timeout=60)
        assert send.returncode == 0, send.stderr
        _, err = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
    for text in (send.stdout + send.stderr, err):
        assert "RAM xxh3" in text and "(of 32 hex; --json: all)" in text
        assert "sha256" not in text


def test_digest_refused_where_it_would_be_ignored(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    stream = tmp_path / "s.bin"
    stream.write_bytes(b"x")
    r = subprocess.run([*mignet_cmd, "send", "tcp:127.0.0.1:9", "--stream", str(stream), "--digest", "none"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.USAGE
    one_line(r.stderr, "--digest has no effect with --stream")
    r = subprocess.run([*mignet_cmd, "serve", "--qmp", f"unix:{tmp_path}/q", "--size", "4M",
                        "--digest", "sha256"], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.USAGE
    one_line(r.stderr, "--digest has no effect on a source")
    r = subprocess.run([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--digest", "md5"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == exits.USAGE
    one_line(r.stderr, "invalid choice: 'md5'")


def test_ram_digest_of_several_blocks_is_derived_from_their_digests_in_order() -> None:
    rng = np.random.default_rng(3)
    blocks = [RamBlock.anonymous(name, size) for name, size in (("pc.ram", 1 << 20), ("vga.vram", 64 << 10),
                                                                 ("/rom@etc/acpi/tables", 8 << 10))]
    for b in blocks:
        b.data[:] = rng.integers(0, 256, b.size, dtype=np.uint8)
    ram = GuestRam(blocks)
    for algorithm in ("xxh3", "blake3", "sha256"):
        digests = ram.digests(algorithm)
        assert digests is not None
        assert digests.blocks == [b.digest(algorithm) for b in blocks]  # threads, same order
        assert digests.ram == combine_digests(algorithm, [(b.name, b.size, d)
                                                          for b, d in zip(blocks, digests.blocks, strict=True)])
        reordered = GuestRam([blocks[1], blocks[0], blocks[2]])
        assert reordered.digest(algorithm) != digests.ram  # the order is part of the guest
    assert ram.digests("none") is None
