"""A received guest on disk: one file per RAM block, every device section, and a manifest.

RAM block files are mapped as the destination's RAM, so pages land in the files directly (no
extra copy, no second write pass). Their space is reserved (fallocate) when the stream
announces them, before any page: a full disk is one line then, never a SIGBUS later.
Every file is created relative to the folder's fd, exclusively, without following links
(docs/reliability.md). A block name too long for a file name gets a short one; the
manifest maps each block to its file.

A directory is a *snapshot* that ``mignet send --snapshot DIR`` can replay into real QEMU: the
manifest keeps the machine type and the source's id for its 'ram' section, every block in
stream order, and ``devices.json`` lists every device section (idstr, instance, version,
section id) whose bytes lie back to back in ``device-state.bin``, in stream order. The VM
description is kept as QEMU sent it.

The manifest is written first with ``"complete": false`` and replaced (atomically) by the
final one only after every byte arrived, so a failed or interrupted receive leaves a
directory that says it is incomplete, and a replay refuses it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import secrets
import stat
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mignet.errors import SetupError
from mignet.guest.devices import DeviceSet, RawSection
from mignet.guest.ram import DEFAULT_DIGEST, GuestRam, RamBlock, RamDigests, block_filename
from mignet.units import human_bytes

MANIFEST = "manifest.json"
DEVICES = "devices.json"
DEVICE_STATE = "device-state.bin"
VMDESCRIPTION = "vmdescription.json"
FORMAT = 1  # of this directory layout
_PROBE = ".mignet-mmap-probe"
_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Snapshot:
    """A complete guest read back from a directory: what a replay sends."""

    path: Path
    machine_type: str
    ram: GuestRam
    devices: DeviceSet
    description: dict[str, Any] | None
    ram_section_id: int | None


def _folder_error(path: Path, what: str, exc: OSError) -> SetupError:
    if exc.errno == errno.EROFS:
        return SetupError(f"{path} is on a read-only file system: choose a writable folder for --out")
    return SetupError(f"{what} {path}: {exc.strerror}")


def _open_folder(path: Path) -> int:
    """Open DIR once (creating it, mode 700); every file after is made relative to this fd,
    so replacing DIR or a parent by a link later cannot redirect a write. DIR may itself be a
    link, if it is the user's own (or root's): never a stranger's."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _folder_error(path, "cannot create output directory", exc) from None
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise _folder_error(path, "cannot open output directory", exc) from None
    try:
        link = os.lstat(path)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
            raise SetupError(f"{path} is a link that belongs to user {link.st_uid}: receive into "
                             "a folder of your own")
        return os.open(path, flags)
    except OSError as exc:
        raise _folder_error(path, "cannot open output directory", exc) from None


def _is_ours(name: str) -> bool:
    """A file this module writes: what --force may remove."""
    return (name in (MANIFEST, DEVICES, DEVICE_STATE, VMDESCRIPTION, _PROBE) or name.endswith(".ram")
            or (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")))


class GuestDir:
    """Where ``recv --out`` (and ``serve --out``) writes a received guest.

    Everything happens before the first byte is accepted that can: the folder is opened
    once and checked (ours, writable by no one else, not read-only, able to map files shared,
    empty of an earlier receive unless ``force``), and the ``"complete": false`` manifest is
    written. Every file is then created relative to the folder's fd, exclusively and without
    following links, so a link planted in DIR at any time can never make mignet write
    outside it; the manifest alone is replaced, by a rename within the folder."""

    def __init__(self, path: Path, *, force: bool = False, digest: str = DEFAULT_DIGEST) -> None:
        self.path = path
        self.digest = digest  # the manifest's digests (``none``: none)
        self._fd = _open_folder(path)
        self._closer = weakref.finalize(self, os.close, self._fd)
        self._files: dict[str, str] = {}  # block name -> its file in DIR
        self._reserved = 0  # bytes of RAM files created so far
        try:
            self._check_folder()
            self._clear(force)
            self._check_shared_mapping()
            self._replace(MANIFEST, {"format": FORMAT, "complete": False,
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._closer()

    def _check_folder(self) -> None:
        st = os.fstat(self._fd)
        if st.st_uid != os.geteuid():
            raise SetupError(f"{self.path} belongs to user {st.st_uid}: receive into a folder of "
                             "your own (mkdir -m 700 DIR)")
        if st.st_mode & 0o022:
            raise SetupError(f"{self.path} is a folder that group or others can write (mode "
                             f"{st.st_mode & 0o7777:o}): receive into one only you can write "
                             "(chmod go-w, or a new folder)")
        if os.fstatvfs(self._fd).f_flag & os.ST_RDONLY:
            raise _folder_error(self.path, "", OSError(errno.EROFS, os.strerror(errno.EROFS)))

    def _manifest_says_complete(self) -> bool:
        try:
            fd = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)
            with os.fdopen(fd, "rb") as f:
                manifest = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return False
        return isinstance(manifest, dict) and manifest.get("complete") is True

    def _clear(self, force: bool) -> None:
        """Refuse a folder holding an earlier receive, or (``force``) remove its files."""
        ours = sorted(n for n in os.listdir(self._fd) if _is_ours(n))
        held = [n for n in ours if n.endswith(".ram") or n in (DEVICES, DEVICE_STATE, VMDESCRIPTION)]
        complete = self._manifest_says_complete()
        if not force and complete:
            raise SetupError(f"{self.path} holds a received guest: choose an empty directory, or "
                             "--force to replace it")
        if not force and held:
            raise SetupError(f"{self.path} holds an incomplete receive ({len(held)} files; it did "
                             "not finish): --force reuses the folder, replacing them")
        for name in ours if force else []:
            try:
                os.unlink(name, dir_fd=self._fd)  # a link is removed, never followed
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _folder_error(self.path, f"cannot remove {name} from", exc) from None

    def _create(self, name: str, access: int = os.O_RDWR) -> int:
        """A new file in DIR: never an existing one, never through a link."""
        try:
            return os.open(name, access | _CREATE, 0o600, dir_fd=self._fd)
        except FileExistsError:
            raise SetupError(f"{self.path / name} exists already (a file or link mignet did not "
                             "create): receive into a folder no other program writes") from None
        except OSError as exc:
            raise _folder_error(self.path, f"cannot create {name} in", exc) from None

    def _check_shared_mapping(self) -> None:
        """RAM blocks are files mapped shared; some file systems cannot (9p and virtiofs
        shares, such as a soft-RoCE guest's ``--rwdir``). Find out before a byte is read, not
        with a traceback from numpy after the source connected."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_PROBE, dir_fd=self._fd)  # left by a killed receive
        fd = self._create(_PROBE)
        try:
            try:
                os.posix_fallocate(fd, 0, mmap.PAGESIZE)  # a full disk: not a SIGBUS below
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self._no_space(mmap.PAGESIZE) from None
                os.ftruncate(fd, mmap.PAGESIZE)  # cannot reserve here: the mapping decides
            with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[0] = 1
        except OSError as exc:
            raise SetupError(
                f"{self.path} cannot hold guest RAM: its file system cannot map files shared "
                f"({exc.strerror}; 9p and virtiofs shares cannot); use a local folder such as "
                "/dev/shm/NAME") from None
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):  # must not hide the error above
                os.unlink(_PROBE, dir_fd=self._fd)

    def _free(self) -> int:
        st = os.fstatvfs(self._fd)
        return st.f_bavail * st.f_frsize

    def _allocate(self, fd: int, size: int, name: str) -> None:
        """Reserve ``size`` bytes for a new file: a page of a mapped file that the file system
        cannot back is a SIGBUS (or EFAULT from a read into it), so a full disk must show
        before the first page, as one line. Where the file system cannot reserve, the free
        space is checked and the file stays sparse."""
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                os.ftruncate(fd, 0)  # give back what was reserved before it failed
                raise self._no_space(size) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise _folder_error(self.path, f"cannot reserve space for {name} in", exc) from None
        if self._free() < size:
            raise self._no_space(size)
        os.ftruncate(fd, size)

    def _no_space(self, size: int) -> SetupError:
        need, free = self._reserved + size, self._free() + self._reserved
        return SetupError(f"not enough space in {self.path}: need {'at least ' if self._reserved else ''}"
                          f"{human_bytes(need)} for guest RAM, {human_bytes(free)} free; free "
                          "some or receive into another folder")

    def block_factory(self, name: str, size: int) -> RamBlock:
        """Used by the loader when the stream announces a block (at MEM_SIZE, before any
        page): a new file with its space reserved, mapped as the block's memory."""
        RamBlock.check_size(name, size)
        file = block_filename(name)
        fd = self._create(file)
        try:
            self._allocate(fd, size, file)
            block = RamBlock.mapped(name, fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(file, dir_fd=self._fd)
            raise
        os.close(fd)  # the mapping keeps the file
        self._files[name] = file
        self._reserved += size
        return block

    def _write_error(self, name: str, exc: OSError) -> SetupError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return SetupError(f"not enough space in {self.path} to write {name}: free some, then "
                              "receive again")
        return _folder_error(self.path, f"cannot write {name} in", exc)

    def _write_new(self, name: str, data: bytes) -> None:
        fd = self._create(name, os.O_WRONLY)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise self._write_error(name, exc) from None

    def _replace(self, name: str, obj: dict[str, Any]) -> None:
        """Write ``name`` whole or not at all: a new file under a random name, synced, then
        renamed over ``name`` within DIR (a link there is replaced, never followed)."""
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = self._create(tmp, os.O_WRONLY)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(obj, indent=1).encode())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            with contextlib.suppress(OSError):  # some file systems cannot sync a folder
                os.fsync(self._fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._fd)
            raise self._write_error(name, exc) from None

    def write(self, ram: GuestRam, devices: DeviceSet, description: dict[str, Any] | None,
              stats: dict[str, Any], ram_section_id: int | None = None,
              digests: RamDigests | None = None) -> Path:
        """Flush RAM and write the device state and the final manifest (last, atomically).

        The manifest names the digest algorithm and holds each block's digest (with sha256,
        what ``sha256sum DIR/<file>`` prints) and the RAM's; ``digests`` already computed
        by the caller are written as they are, so nothing is hashed twice."""
        for block in ram:
            block.flush()
        if digests is None and self.digest != "none":
            digests = ram.digests(self.digest)
        sections = devices.sections()
        self._write_new(DEVICE_STATE, b"".join(s.data for s in sections))
        info = json.loads(devices.to_json())
        info["sections"] = [{"idstr": s.idstr, "instance_id": s.instance_id, "version": s.version_id,
                             "section_id": s.section_id, "bytes": len(s.data)} for s in sections]
        self._write_new(DEVICES, json.dumps(info, indent=1).encode())
        if description is not None:
            self._write_new(VMDESCRIPTION, json.dumps(description, indent=1).encode())
        self._replace(MANIFEST, {
            "format": FORMAT,
            "complete": True,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine_type": stats.get("machine_type", ""),
            "ram_section_id": ram_section_id,
            "digest": digests.algorithm if digests else None,
            "blocks": [{"name": b.name, "file": self._files.get(b.name, block_filename(b.name)),
                        "size": b.size, "digest": digests.blocks[i] if digests else None}
                       for i, b in enumerate(ram)],
            "ram_digest": digests.ram if digests else None,
            "stats": stats,
        })
        return self.path / MANIFEST

def _member(path: Path, file: object, name: object) -> Path:
    """A block's file as the manifest names it: a plain name in ``path``, so a copied-in
    manifest cannot make a replay read (and send) a file from elsewhere."""
    if not isinstance(file, str) or file in ("", ".", "..") or "/" in file or "\0" in file:
        raise SetupError(f"{path}/{MANIFEST} names {file!r} as the file of block {name!r}, which is "
                         f"not a file of {path}: the snapshot is damaged")
    return path / file


def _read(path: Path, name: str) -> bytes:
    try:
        return (path / name).read_bytes()
    except OSError as exc:
        raise SetupError(f"{path / name} cannot be read ({exc.strerror}): the snapshot is damaged") from None


def open_snapshot(path: Path, private: bool = False) -> Snapshot:
    """Read a directory written by ``mignet recv --out``; RAM is mapped read-only, or
    copy-on-write with ``private`` (for RDMA, which must register it; the files never change).

    Refuses (one line each) a directory without a manifest, one whose receive did not
    finish, and one whose files disagree with its manifest. Each block's file is the one the
    manifest names (older manifests name the quoted block name: still read)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SetupError(f"{path} is not a snapshot: it has no {MANIFEST} (write one with "
                         f"mignet recv --out {path})") from None
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path}/{MANIFEST} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise SetupError(f"{path} is an incomplete snapshot (its receive did not finish): "
                         "receive the guest again")
    if not manifest.get("machine_type"):
        raise SetupError(f"{path}/{MANIFEST} names no machine type; QEMU would refuse the stream")
    ram = GuestRam()
    try:
        for entry in manifest.get("blocks", []):
            file = _member(path, entry["file"], entry["name"])
            block = RamBlock.from_file(str(entry["name"]), file, writable=False, private=private)
            if block.size != entry["size"]:
                raise SetupError(f"{file} is {block.size} bytes, the manifest says {entry['size']}")
            ram.add(block)
    except (KeyError, TypeError):
        raise SetupError(f"{path}/{MANIFEST} has a malformed block list: the snapshot is damaged") from None
    if not len(ram):
        raise SetupError(f"{path}/{MANIFEST} lists no RAM blocks")
    devices = DeviceSet.empty()
    try:
        info = json.loads(_read(path, DEVICES))
    except ValueError:
        raise SetupError(f"{path / DEVICES} is not JSON: the snapshot is damaged") from None
    blob = _read(path, DEVICE_STATE)
    pos = 0
    for s in info.get("sections", []):
        data = blob[pos:pos + s["bytes"]]
        if len(data) != s["bytes"]:
            raise SetupError(f"{path / DEVICE_STATE} is shorter than {DEVICES} says: the "
                             "snapshot is damaged")
        devices.raw.append(RawSection(s["idstr"], s["instance_id"], s["version"], data, s["section_id"]))
        pos += s["bytes"]
    if pos != len(blob):
        raise SetupError(f"{path / DEVICE_STATE} holds {len(blob) - pos} bytes more than {DEVICES} "
                         "lists: the snapshot is damaged")
    description = None
    if (path / VMDESCRIPTION).exists():
        description = json.loads((path / VMDESCRIPTION).read_text())
    return Snapshot(path, manifest["machine_type"], ram, devices, description,
                    manifest.get("ram_section_id"))
