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
from collections.abc import Callable
from pathlib import Path

import msgspec

from .errors import CastraError
from .logfiles import SUFFIX as LOG_SUFFIX
from .logfiles import file_identity
from .subscriptions import TopicPatterns
from .wire import LogRecord, decode_log_lines, decode_log_record, json_encode

BUS_LOG = "bus.log"
# What logrotate may leave beside the log: those cannot be read line by line.
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z", ".zip")
# PROTOCOL.md 7.2 fixes the keys' order: "timestamp", "ts_ms", "seq", ...
_SEQ_KEY = b',"seq":'
_TOPIC_KEY = b'","topic":"'  # after the VM name's closing quote
_TOPIC_END = b'","payload":'
_TS_MS_KEY = b',"ts_ms":'
# The key a line of a message from another host ends with (7.2): a host name and two counts.
ORIGIN_KEY = b',"origin":{"host":"'
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

    Between reads it keeps only a seq and where that was (path, device, inode,
    offset): no file stays open, and a file renamed or replaced meanwhile is found
    again by its seq. ``Expired`` when a read would have to start before the
    oldest line left.
    """

    def __init__(self, directory: Path, since: int, name: str = BUS_LOG):
        self.directory = directory
        self.name = name
        self.after = since  # the seq of the last line read (or where reading starts)
        self.place: tuple[int, int, int] | None = None  # (st_dev, st_ino, offset) of the line after ``after``
        self.path: Path | None = None  # the file of ``place``, when it was found

    def read(self, end_seq: int, max_bytes: int = READ_CHUNK) -> list[bytes]:
        """The next whole lines (each with its newline) with seqs up to ``end_seq``,
        about ``max_bytes`` of them; [] when there is none (yet)."""
        return split_lines(self.read_block(end_seq, max_bytes))

    def read_block(self, end_seq: int, max_bytes: int = READ_CHUNK) -> bytes:
        """``read``'s lines as the one bytes they are in the file (b"" for none):
        for a reader that finds what it wants in them without a list of lines."""
        if self.after >= end_seq:
            return b""
        # Mostly the file read last has more: read on there without listing the
        # directory and reading each log's first line (measured in-process: 105 -> 26 µs a read).
        block = self._read_from(self.path, end_seq, max_bytes, on_only=True) if self.path is not None else None
        if block is None:
            found = segments(self.directory, self.name)
            if not found:
                return b""
            if found[0][0] > self.after + 1:
                raise Expired(self.after, found[0][0])
            # The last segment starting at or before the next seq holds it, if any does.
            path = next(path for seq, path in reversed(found) if seq <= self.after + 1)
            block = self._read_from(path, end_seq, max_bytes) or b""
        if block:
            self.after = seq_of_line(block[last_line_start(block):])
        return block

    def _read_from(self, path: Path, end_seq: int, max_bytes: int, on_only: bool = False) -> bytes | None:
        """The block read from ``path``; with ``on_only``, None unless ``path`` is
        still the file of ``place`` and has lines after it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None if on_only else b""  # renamed meanwhile: the next read looks again
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            known = self.place is not None and self.place[:2] == file_identity(stat) and self.place[2] <= size
            if on_only and not (known and self.place[2] < size):
                return None
            offset = self.place[2] if known else offset_after(fd, size, self.after)
            block = read_block(fd, offset, size, max_bytes)
            while block and seq_of_line(block[(last := last_line_start(block)):]) > end_seq:
                block = block[:last]  # past what the caller knows is committed
            self.place = (*file_identity(stat), offset + len(block))
            self.path = path
            return block
        finally:
            os.close(fd)

    def oldest(self) -> int | None:
        """The seq of the oldest line left in the logs."""
        found = segments(self.directory, self.name)
        return found[0][0] if found else None


def read_block(fd: int, offset: int, size: int, max_bytes: int) -> bytes:
    """Whole lines (each with its newline) from ``offset`` (a line start) to at
    most ``size``, as one bytes: about ``max_bytes`` of them, at least one if
    there is one."""
    data = b""
    while offset + len(data) < size:
        data += os.pread(fd, min(max(max_bytes, _SCAN_CHUNK), size - offset - len(data)), offset + len(data))
        if b"\n" in data:
            break  # at least one whole line (a longer one takes more reads)
    return data[:data.rfind(b"\n") + 1]  # after the last newline: a line not whole yet


def records_with(block: bytes, needles: tuple[bytes, ...] | None) -> tuple[list[LogRecord], list[bytes]]:
    """The records of the lines of ``block`` (whole log lines) that hold one of
    ``needles`` (``topic_needles``; None: every line), in order, and the lines
    that are not bus log records (left out). The lines are found with
    ``bytes.find`` and decoded in one msgspec call, so a line of a topic not
    wanted costs no Python. Measured in-process against finding and cutting
    each line's fields in Python: a resume of ``vm:<name>`` in a log where one
    line in ten is its own 3.0 -> 0.9 µs a line scanned (its delivery included),
    a resume of ``*`` 10.5 -> 3.9 µs a line. A needle may also be found in a
    payload: the caller matches the records' topics."""
    if needles is None:
        chosen = block
    else:
        ends: dict[int, int] = {}  # line start -> line end (after its newline)
        for needle in needles:
            position = 0
            while (found := block.find(needle, position)) >= 0:
                start = block.rfind(b"\n", 0, found) + 1
                position = ends[start] = block.index(b"\n", found) + 1
        chosen = b"".join(block[start:ends[start]] for start in sorted(ends))
    try:
        return decode_log_lines(chosen), []
    except msgspec.DecodeError:  # one of them is not a record: decode each alone
        records, bad = [], []
        for line in split_lines(chosen):
            try:
                records.append(decode_log_record(line))
            except msgspec.DecodeError:
                bad.append(line)
        return records, bad


def topic_needles(patterns: TopicPatterns) -> tuple[bytes, ...] | None:
    """What a log line of a topic ``patterns`` match holds, for ``records_with``:
    its topic key and the topic (or the prefix) as JSON; None when every line may
    (the prefix "", a pattern ``*``). A JSON string's quotes are escaped, so no
    topic holds another's key (msgspec escapes each character alone: a prefix's
    JSON is a prefix of its topics')."""
    if "" in patterns.prefixes:
        return None
    return (tuple(_TOPIC_KEY + json_encode(topic)[1:-1] + _TOPIC_END for topic in sorted(patterns.exact))
            + tuple(_TOPIC_KEY + json_encode(prefix)[1:-1] for prefix in patterns.prefixes))


def read_lines(fd: int, offset: int, size: int, max_bytes: int) -> list[bytes]:
    """``read_block``'s lines, each with its newline."""
    return split_lines(read_block(fd, offset, size, max_bytes))


def split_lines(block: bytes) -> list[bytes]:
    """The lines of whole lines, each with its newline (only ``\\n`` ends a line:
    ``bytes.splitlines`` would also cut at a ``\\r``)."""
    lines = block.split(b"\n")
    lines.pop()  # empty: the block ends with a newline
    return [line + b"\n" for line in lines]


def last_line_start(block: bytes) -> int:
    """Where the last line of whole lines starts."""
    return block.rfind(b"\n", 0, len(block) - 1) + 1
