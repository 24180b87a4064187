"""Reading ``bus.log`` by seq: where a seq is, and the lines after it.

Resume (bus-v2, PROTOCOL.md 4.3.1) replays what a guest or host tool missed from
the log itself, so its cost must follow what is replayed, not the size of the log.
A log's lines are in seq order, so the first line after a seq is found by
bisecting the file's bytes: about 2 log2(size) small reads (a 1 GB log: some 60
reads of a page), no index to build, keep or rebuild after a crash. Rotated
copies (``bus.log.1``, ``bus.log-20261201``: any name starting ``bus.log``, not
compressed) are ordered by the seq of their first line.

Pure file reading, no sockets: the bridge replays to guests with it, host tools
(``client.follow``, ``castra bus tail --since``) read with it.

Runs in: the bridge (guests' resume) and host tools (``client.follow``, ``castra bus
tail --since``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import CastraError
from .logfiles import SUFFIX as LOG_SUFFIX
from .logfiles import file_identity

BUS_LOG = "bus.log"
# What logrotate may leave beside the log: those cannot be read line by line.
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z", ".zip")
# PROTOCOL.md 7.2 fixes the keys' order: "timestamp", "ts_ms", "seq", ...
_SEQ_KEY = b',"seq":'
_TS_MS_KEY = b',"ts_ms":'
# The key a line of a message from another host ends with (7.2): a host name and two counts.
ORIGIN_KEY = b',"origin":{"host":"'
_ORIGIN_REST = re.compile(rb'[A-Za-z0-9._-]+","epoch":[0-9]+,"seq":[0-9]+\}\}\n?')
_HEAD_BYTES = 96  # a line's bytes up to its seq, and more: {"timestamp":<float>,"ts_ms":<int>,"seq":<int>,
_SCAN_CHUNK = 4096
READ_CHUNK = 256 * 1024  # bytes of lines a cursor reads at once (more for one longer line)


class ReplayError(CastraError):
    """A log line whose seq cannot be read (not a bus log line)."""


def _int_field(head: bytes, key: bytes) -> int:
    start = head.find(key)
    end = head.find(b",", start + len(key)) if start >= 0 else -1
    try:
        return int(head[start + len(key):end])
    except ValueError:
        raise ReplayError(f"not a bus log line: {head[:60]!r}") from None


def seq_of_line(head: bytes) -> int:
    """The seq of a log line, from its first bytes (at least up to the comma after the seq)."""
    return _int_field(head, _SEQ_KEY)


def ts_ms_of_line(head: bytes) -> int:
    """The commit time (Unix ms) of a log line, from its first bytes."""
    return _int_field(head, _TS_MS_KEY)


def origin_start(line: bytes) -> int | None:
    """Where a log line's ``origin`` key starts (a message from another host), or
    None (a local line). The key comes last and holds a host name and two numbers,
    so it is the last ``,"origin":{"host":"`` of the line and the rest is exactly
    its value and the line's ``}``: a payload cannot end like that (its own
    ``origin`` object would be followed by the ``}`` that closes it)."""
    start = line.rfind(ORIGIN_KEY)
    if start < 0 or _ORIGIN_REST.fullmatch(line, start + len(ORIGIN_KEY)) is None:
        return None
    return start


def line_start_from(fd: int, offset: int, size: int) -> int:
    """The offset of the first line starting at ``offset`` or after (``size``: none)."""
    if offset == 0:
        return 0
    position = offset - 1  # the line starts after a newline at offset - 1 or later
    while position < size:
        chunk = os.pread(fd, min(_SCAN_CHUNK, size - position), position)
        newline = chunk.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(chunk)
    return size


def offset_after(fd: int, size: int, since: int, key: Callable[[bytes], int] = seq_of_line) -> int:
    """The offset of the first line of a log whose ``key`` (its seq, or with
    ``ts_ms_of_line`` its time) is above ``since`` (``size`` if none), looking at
    the first ``size`` bytes only (whole lines up to there).

    Bisects on byte offsets: the first line starting at or after an offset has a
    seq that only grows with the offset (a time too, but for a clock set back).
    """
    low, high = 0, size
    while low < high:
        middle = (low + high) // 2
        start = line_start_from(fd, middle, size)
        if start >= size or key(os.pread(fd, min(_HEAD_BYTES, size - start), start)) > since:
            high = middle
        else:
            low = middle + 1
    return line_start_from(fd, low, size)


def first_seq(path: Path) -> int | None:
    """The seq of a log's first line; None for an empty or unreadable file."""
    try:
        with open(path, "rb") as file:
            head = file.read(_HEAD_BYTES)
    except OSError:
        return None
    return seq_of_line(head) if b"\n" in head or len(head) == _HEAD_BYTES else None


def segments(directory: Path, name: str = BUS_LOG) -> list[tuple[int, Path]]:
    """``name`` and its rotated copies in ``directory`` that have lines, as
    (seq of the first line, path), oldest first.

    Another log is never taken for a copy: every per-VM log ends in ``.log``
    (``bus.log.log`` is the log of a VM named ``bus.log``), a rotated copy does not.
    """
    found = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    for entry in entries:
        if entry != name and entry.endswith(LOG_SUFFIX):
            continue  # a per-VM log whose name starts with ``name``
        if entry.startswith(name) and not entry.endswith(COMPRESSED_SUFFIXES) and not entry.endswith(".tmp"):
            try:
                seq = first_seq(directory / entry)
            except ReplayError:
                continue  # not one of ours (a stray file with the same prefix)
            if seq is not None:
                found.append((seq, directory / entry))
    found.sort()
    return found


class Expired(CastraError):
    """The messages after ``since`` are no longer all in the logs (rotated away)."""

    def __init__(self, since: int, oldest: int):
        super().__init__(f"messages after seq {since} are gone: the oldest left is {oldest}")
        self.since = since
        self.oldest = oldest


class Cursor:
    """Reads the lines after a seq from ``bus.log`` and its rotated copies, in seq
    order, a chunk at a time, up to a seq its caller knows is committed.

    Between reads it keeps only a seq and where that was (device, inode, offset):
    no file stays open, and a file renamed or replaced meanwhile is found again by
    its seq. ``Expired`` when a read would have to start before the oldest line left.
    """

    def __init__(self, directory: Path, since: int, name: str = BUS_LOG):
        self.directory = directory
        self.name = name
        self.after = since  # the seq of the last line read (or where reading starts)
        self.place: tuple[int, int, int] | None = None  # (st_dev, st_ino, offset) of the line after ``after``

    def read(self, end_seq: int, max_bytes: int = READ_CHUNK) -> list[bytes]:
        """The next whole lines (each with its newline) with seqs up to ``end_seq``,
        about ``max_bytes`` of them; [] when there is none (yet)."""
        if self.after >= end_seq:
            return []
        found = segments(self.directory, self.name)
        if not found:
            return []
        if found[0][0] > self.after + 1:
            raise Expired(self.after, found[0][0])
        # The last segment starting at or before the next seq holds it, if any does.
        path = next(path for seq, path in reversed(found) if seq <= self.after + 1)
        lines = self._read_from(path, end_seq, max_bytes)
        if lines:
            self.after = seq_of_line(lines[-1])
        return lines

    def _read_from(self, path: Path, end_seq: int, max_bytes: int) -> list[bytes]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return []  # renamed meanwhile: the next read looks again
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            if self.place is not None and self.place[:2] == file_identity(stat) and self.place[2] <= size:
                offset = self.place[2]
            else:
                offset = offset_after(fd, size, self.after)
            lines = read_lines(fd, offset, size, max_bytes)
            if lines and seq_of_line(lines[-1]) > end_seq:  # past what the caller knows is committed
                while lines and seq_of_line(lines[-1]) > end_seq:
                    lines.pop()
            self.place = (*file_identity(stat), offset + sum(map(len, lines)))
            return lines
        finally:
            os.close(fd)

    def oldest(self) -> int | None:
        """The seq of the oldest line left in the logs."""
        found = segments(self.directory, self.name)
        return found[0][0] if found else None


def read_lines(fd: int, offset: int, size: int, max_bytes: int) -> list[bytes]:
    """Whole lines (each with its newline) from ``offset`` (a line start) to at
    most ``size``: about ``max_bytes`` of them, at least one if there is one."""
    data = b""
    while offset + len(data) < size:
        data += os.pread(fd, min(max(max_bytes, _SCAN_CHUNK), size - offset - len(data)), offset + len(data))
        if b"\n" in data:
            break  # at least one whole line (a longer one takes more reads)
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or a line not whole yet
    return [line + b"\n" for line in lines]
