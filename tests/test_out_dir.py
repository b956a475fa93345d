"""``recv --out DIR`` against a careless user and a hostile neighbour (issue 13): links planted
in DIR, block names too long for a file name, a full disk, a read-only folder, a folder
others can write, and receives that fail or are interrupted. Real processes, real sockets,
real tmpfs mounts (the mount tests need root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from mignet.guest.directory import open_snapshot
from mignet.guest.ram import block_filename
from tests.support.cli import one_line, one_line_error, send_into, start_recv
from tests.support.processes import track

NAME_MAX = 255


@contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``where`` for the test, unmounted however the test ends."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def manifest(out: Path) -> dict[str, object]:
    assert not (out / "manifest.json").is_symlink()
    m = json.loads((out / "manifest.json").read_text())
    assert isinstance(m, dict)
    return m


def refused_before_listening(cmd: list[str], env: dict[str, str], out: Path, pattern: str,
                             *extra: str) -> str:
    """``recv --out OUT`` must fail in one line without ever listening."""
    r = subprocess.run([*cmd, "recv", "--listen", "tcp:127.0.0.1:0", "--json", "--timeout", "10",
                        "--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=60)
    assert "listening" not in r.stdout, r.stdout
    one_line_error(r, pattern)
    return r.stderr


# --- links planted in DIR ----------------------------------------------------------------

PLANTED = [("manifest.json", "existing"), ("devices.json", "dangling"),
           ("vmdescription.json", "existing"), ("device-state.bin", "dangling"),
           (block_filename("pc.ram"), "existing"), (block_filename("pc.ram"), "dangling")]


@pytest.mark.parametrize(("name", "kind"), PLANTED)
def test_a_link_planted_after_the_start_up_check_never_writes_outside(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path, name: str,
        kind: str) -> None:
    """The receiver has checked and opened DIR; then a link appears under a name it will
    write. The file outside keeps its bytes, a dangling link's target is never created, and
    the receive either completes (the manifest replaces the link) or fails in one line with
    the manifest saying incomplete."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    target = victim if kind == "existing" else outside / "created"
    out = tmp_path / "guest"
    proc, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    (out / name).unlink(missing_ok=True)  # manifest.json exists already (complete: false)
    os.symlink(target, out / name)
    subprocess.run([*mignet_cmd, "send", uri, "--size", "4M", "--quiet"], capture_output=True,
                   text=True, env=subprocess_env, timeout=120)
    _, stderr = proc.communicate(timeout=60)
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    if name == "manifest.json":
        assert proc.returncode == 0, stderr
        assert manifest(out)["complete"] is True
    else:
        assert proc.returncode not in (0, 130), stderr
        one_line(stderr, "exists already")
        assert manifest(out)["complete"] is False


def test_a_folder_others_can_write_or_own_is_refused(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    refused_before_listening(mignet_cmd, subprocess_env, shared, "others can write")
    if os.geteuid() != 0:
        return  # only root can give a folder or a link away
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    refused_before_listening(mignet_cmd, subprocess_env, theirs, "belongs to user 65534")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "link"
    os.symlink(mine, link)
    os.lchown(link, 65534, 65534)  # a stranger's link to a folder of mine
    refused_before_listening(mignet_cmd, subprocess_env, link, "belongs to user 65534")
    assert list(mine.iterdir()) == []


# --- block names -------------------------------------------------------------------------

LONG_NAMES = ["/" * 85, "é" * 127, "/rom@etc/" + "x" * 246]


def test_block_file_names_are_short_and_unique() -> None:
    assert block_filename("pc.ram") == "pc.ram.ram"  # short names keep their readable file
    assert block_filename("/rom@etc/acpi/tables") == "%2From@etc%2Facpi%2Ftables.ram"
    names = [*LONG_NAMES, "/" * 84 + "x", "é" * 126 + "e", "x" * 255, "x" * 254 + "y"]
    files = [block_filename(n) for n in names]
    assert all(len(f.encode()) <= NAME_MAX and "/" not in f and f.endswith(".ram") for f in files)
    assert len(set(files)) == len(files)


@pytest.mark.parametrize("name", LONG_NAMES[:2], ids=["slashes", "accents"])
def test_a_long_block_name_is_received_and_replayed(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                    tmp_path: Path, name: str) -> None:
    image = tmp_path / "img"
    data = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
    data.tofile(image)
    out = tmp_path / "guest"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    sent, got = send_into(mignet_cmd, subprocess_env, recv, uri, "--image", str(image), "--block-name", name)
    assert got["ram_digest"] == sent["ram_digest"]
    assert all(len(p.name.encode()) <= NAME_MAX for p in out.iterdir())
    blocks = manifest(out)["blocks"]
    assert isinstance(blocks, list) and [b["name"] for b in blocks] == [name]
    snap = open_snapshot(out)  # read back through the manifest's mapping
    assert np.array_equal(snap.ram[name].data, data)
    again, uri2 = start_recv(mignet_cmd, subprocess_env)
    replayed, got2 = send_into(mignet_cmd, subprocess_env, again, uri2, "--snapshot", str(out))
    assert got2["ram_digest"] == replayed["ram_digest"] == sent["ram_digest"]


def test_a_manifest_naming_a_file_outside_is_refused(tmp_path: Path) -> None:
    """A copied-in snapshot cannot make ``send --snapshot`` read (and send) another file."""
    from mignet.errors import SetupError

    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": 1, "complete": True, "machine_type": "pc", "blocks": [
            {"name": "pc.ram", "file": "../secret", "size": 4096}]}))
    (tmp_path.parent / "secret").write_bytes(bytes(4096))
    with pytest.raises(SetupError, match="not a file of"):
        open_snapshot(tmp_path)


# --- space and permissions ----------------------------------------------------------------

def test_a_full_disk_is_refused_before_any_page(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                tmp_path: Path) -> None:
    """8 MiB of tmpfs, a 32 MiB guest from a real sender: one line, no SIGBUS, no EFAULT,
    and the reservation that failed is given back."""
    with tmpfs(tmp_path / "small", "size=8m,mode=0700") as small:
        out = small / "guest"
        recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
        send = subprocess.run([*mignet_cmd, "send", uri, "--size", "32M", "--quiet"], capture_output=True,
                              text=True, env=subprocess_env, timeout=120)
        _, stderr = recv.communicate(timeout=60)
        assert recv.returncode not in (0, -signal.SIGBUS), (recv.returncode, stderr)
        line = one_line(stderr, "not enough space")
        assert "32.0 MiB" in line and "free" in line, line
        assert "Bad address" not in line
        assert send.returncode != 0 and "Traceback" not in send.stderr, send.stderr
        assert manifest(out)["complete"] is False
        assert list(out.glob("*.ram")) == []
        free = os.statvfs(small)
        assert free.f_bavail * free.f_frsize > 7 << 20


def test_the_space_is_reserved_when_it_fits(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                            tmp_path: Path) -> None:
    """A zero guest on a tmpfs still occupies its whole size: the space was reserved."""
    with tmpfs(tmp_path / "fits", "size=16m,mode=0700") as fits:
        out = fits / "guest"
        recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
        send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "8M", "--fill", "zero")
        st = (out / block_filename("pc.ram")).stat()
        assert st.st_blocks * 512 >= 8 << 20


def test_a_read_only_folder_is_refused_before_listening(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m,mode=0755") as ro:
        refused_before_listening(mignet_cmd, subprocess_env, ro, "read-only")
        refused_before_listening(mignet_cmd, subprocess_env, ro / "guest", "read-only")


# --- failed and interrupted receives ------------------------------------------------------

def wait_for_pages(out: Path, timeout: float = 60) -> None:
    """Until the receiver has created its block file and pages are flowing."""
    deadline = time.monotonic() + timeout
    while not (out / block_filename("pc.ram")).exists():
        assert time.monotonic() < deadline, "the receiver never created its RAM file"
        time.sleep(0.05)
    time.sleep(0.5)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "peer killed"])
def test_an_interrupted_receive_is_marked_incomplete_and_reused_with_force(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path, how: str) -> None:
    out = tmp_path / "guest"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    sender = track(subprocess.Popen([*mignet_cmd, "send", uri, "--size", "64M", "--max-bandwidth", "8MiB/s",
                                     "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=subprocess_env))
    wait_for_pages(out)
    if how == "peer killed":
        sender.kill()
    else:
        recv.send_signal(getattr(signal, how))
    _, stderr = recv.communicate(timeout=60)
    sender.kill()
    sender.communicate(timeout=30)
    if how == "peer killed":
        assert recv.returncode not in (0, 130), (recv.returncode, stderr)
        one_line(stderr, "")
    else:  # SIGTERM is cancelled as Ctrl-C is: the cancelled status, one line
        assert recv.returncode == 130, (recv.returncode, stderr)
        one_line(stderr, f"cancelled by {'SIGTERM' if how == 'SIGTERM' else 'Ctrl-C'}")
    assert manifest(out)["complete"] is False
    # The folder says what it holds; --force reuses it.
    refused_before_listening(mignet_cmd, subprocess_env, out, "--force")
    again, uri2 = start_recv(mignet_cmd, subprocess_env, "--out", str(out), "--force")
    sent, got = send_into(mignet_cmd, subprocess_env, again, uri2, "--size", "4M")
    assert got["ram_digest"] == sent["ram_digest"]
    assert manifest(out)["complete"] is True
    assert (out / block_filename("pc.ram")).stat().st_size == 4 << 20


def test_a_folder_replaced_after_opening_still_receives_into_the_one_checked(tmp_path: Path) -> None:
    """DIR is opened once: renamed away and replaced by a link, writes still go to it."""
    from mignet.guest.devices import DeviceSet
    from mignet.guest.directory import GuestDir
    from mignet.guest.ram import GuestRam

    out, moved, elsewhere = tmp_path / "guest", tmp_path / "moved", tmp_path / "elsewhere"
    elsewhere.mkdir()
    guest = GuestDir(out)
    out.rename(moved)
    os.symlink(elsewhere, out)
    block = guest.block_factory("pc.ram", 1 << 20)
    block.data[:] = 7
    guest.write(GuestRam([block]), DeviceSet.empty(), None, {"machine_type": "pc"})
    guest.close()
    assert list(elsewhere.iterdir()) == []
    assert open_snapshot(moved).ram["pc.ram"].data.min() == 7


def test_reuse_rules(tmp_path: Path) -> None:
    """A lone incomplete manifest (a receive stopped before its first block) is reused; a
    finished receive needs --force, which removes mignet's files only."""
    from mignet.errors import SetupError
    from mignet.guest.devices import DeviceSet
    from mignet.guest.directory import GuestDir
    from mignet.guest.ram import GuestRam

    GuestDir(tmp_path / "g").close()
    guest = GuestDir(tmp_path / "g")  # only its "complete": false manifest there
    block = guest.block_factory("pc.ram", 1 << 16)
    guest.write(GuestRam([block]), DeviceSet.empty(), None, {"machine_type": "pc"})
    guest.close()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match="holds a received guest.*--force"):
        GuestDir(tmp_path / "g")
    GuestDir(tmp_path / "g", force=True).close()
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["manifest.json", "notes.txt"]
    assert manifest(tmp_path / "g")["complete"] is False
