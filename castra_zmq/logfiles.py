"""Bus log files: VM names to safe file names, and crash-safe appends.

A VM name is an identity, never a path. A plain name (letters, digits, ``.``, ``_``,
``-``, not starting with ``.``) is its own file name. Any other name, and ``bus``
(``bus.log`` is the shared log), is percent-encoded byte by byte with its first byte
always encoded: ``a/b`` -> ``%61%2Fb.log``, ``..`` -> ``%2E%2E.log``. Encoded names
start with ``%`` and plain ones never contain it, so two names never share a file and
``vm_from_file_name`` reverses the encoding. A stem longer than ``_MAX_STEM`` bytes
(only names with many unsafe bytes, or names longer than a VM name may be) becomes
``%%<sha256>``, so a file name stays under the 255-byte limit; the name is then in
the ``vm`` field of every line of that file.

Runs in: the bridge and the journal role (appends), ``castra bus tail`` and host
tools (reads).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .statefs import open_private, open_regular

_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_RESERVED_STEMS = frozenset({"bus"})
_MAX_STEM = 200
SUFFIX = ".log"
_TAIL_CHUNK = 64 * 1024
_REBUILD_CHUNK = 1024 * 1024


def log_file_name(vm: str) -> str:
    if _PLAIN.fullmatch(vm) and vm not in _RESERVED_STEMS and len(vm) <= _MAX_STEM:
        return vm + SUFFIX
    raw = vm.encode("utf-8")
    stem = "".join(chr(b) if i and b in _SAFE_BYTES else f"%{b:02X}" for i, b in enumerate(raw))
    if len(stem) > _MAX_STEM:
        stem = "%%" + hashlib.sha256(raw).hexdigest()
    return stem + SUFFIX


def vm_from_file_name(name: str) -> str | None:
    """Inverse of ``log_file_name``; None for hashed names and other files."""
    if not name.endswith(SUFFIX) or name.startswith("%%"):
        return None
    stem = name[: -len(SUFFIX)]
    if not stem.startswith("%"):
        vm = stem
    else:
        out = bytearray()
        i = 0
        try:
            while i < len(stem):
                if stem[i] == "%":
                    out.append(int(stem[i + 1 : i + 3], 16))
                    i += 3
                else:
                    out.append(ord(stem[i]))
                    i += 1
            vm = out.decode("utf-8")
        except ValueError:  # not %XX, not a byte, not UTF-8: not a name we wrote
            return None
    # ``bus.log``, ``a%41.log``, ``%4.log``: files log_file_name never makes.
    return vm if log_file_name(vm) == name else None


def complete_end(fd: int, size: int) -> int:
    """``size`` less the bytes after the last newline (a line being written, or torn)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def lines_before(fd: int, end: int) -> Iterator[bytes]:
    """The lines of ``fd`` before ``end`` (a line boundary), newest first, without newlines.

    The file is read backwards in chunks, each byte once, so a filtered scan of a
    large log stays linear.
    """
    head = b""  # what was read of the oldest line so far (with its newline); it began further back
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        pieces = (os.pread(fd, end - start, start) + head).split(b"\n")
        pieces.pop()  # the empty piece after the newline at ``end``
        head = pieces.pop(0) + b"\n" if start else b""
        yield from reversed(pieces)
        end = start


def line_chunks(fd: int, start: int, end: int, size: int = _REBUILD_CHUNK) -> Iterator[list[bytes]]:
    """The lines of ``fd`` from ``start`` to ``end`` (line boundaries), oldest
    first, without newlines, in lists of about ``size`` bytes: a long stretch of a
    log is read with bounded memory."""
    head = b""  # the start of a line the last read cut
    while start < end:
        data = head + os.pread(fd, min(size, end - start), start)
        start += len(data) - len(head)
        lines = data.split(b"\n")
        head = lines.pop()  # after the last newline: empty at a line boundary
        if lines:
            yield lines


def newest_lines(path: Path) -> Iterator[bytes]:
    """The complete lines of ``path`` (without newlines), newest first."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return
    try:
        yield from lines_before(fd, complete_end(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def last_lines(path: Path, count: int) -> list[bytes]:
    """Up to ``count`` last complete lines of ``path`` (without newlines), oldest first.

    A torn tail (no final newline) is not a line.
    """
    lines = list(itertools.islice(newest_lines(path), count))
    lines.reverse()
    return lines


def file_identity(stat: os.stat_result) -> tuple[int, int]:
    """Which file a stat is of (device, inode): a path whose identity changed was
    replaced (rotation by rename, a new file)."""
    return stat.st_dev, stat.st_ino


class Disk:
    """The calls that change a log file's bytes. The OS's; tests pass a subclass
    that fails on cue (ENOSPC, EIO, a torn write) against the real file system."""

    def write(self, fd: int, data) -> int:
        return os.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)


DISK = Disk()


class AppendFile:
    """One log file opened for appending, owner-only (0600), through no symbolic
    link and only if it is ours alone (``statefs.open_private``).

    A torn tail (a process killed mid-write) is cut off at open, so every line in
    the file stays whole; ``rollback`` restores the size before a failed batch.
    """

    __slots__ = ("disk", "fd", "path", "size")

    def __init__(self, path: Path, disk: Disk = DISK):
        self.path = path
        self.disk = disk
        self.fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            size = os.fstat(self.fd).st_size
            self.size = complete_end(self.fd, size)
            if self.size != size:
                disk.ftruncate(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.disk.write(self.fd, view)
            view = view[written:]
        self.size += len(data)

    def rollback(self, size: int) -> None:
        self.disk.ftruncate(self.fd, size)
        self.size = size

    def sync(self) -> None:
        self.disk.fdatasync(self.fd)

    def replaced(self) -> bool:
        """Whether ``path`` no longer names this file (renamed or deleted: rotation)."""
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return True
        opened = os.fstat(self.fd)
        return file_identity(named) != file_identity(opened)

    def close(self) -> None:
        os.close(self.fd)
