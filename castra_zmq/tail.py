"""What ``castra bus tail`` does: the last lines of a bus log, then each new one.

Only complete lines are read. Bytes after the last newline are a line still being
written, or one torn by a crash; they are read again, whole, once their newline
lands, and never shown before.

Following tracks the path, not the open file, like ``tail -F``: a log truncated in
place is read again from its start, a replaced one (rotation, a new state root) is
read until the writer has moved to the new file, then to its end, and then the
new file is read (no line skipped), and a log that does not exist yet is waited
for. Wake-ups come from inotify on the log's directory, so a new line
shows within milliseconds; a short ``select`` timeout is the safety net for a missed
event, and without inotify (or while the directory does not exist) a 30 ms poll
takes over.

Reading from a seq (``--since``, ``client.follow``) is ``SeqFollower``: it finds
the first line after the seq by bisecting the file that holds it (``replay``),
reads the rotated copies before the log itself, and then follows by seq, not by
byte offset, so every line after the seq comes once, in seq order, whatever was
renamed meanwhile.

Runs in: ``castra bus tail`` and host tools (``client.follow``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import itertools
import os
import re
import select
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec

from .endpoints import Endpoints
from .errors import CastraError
from .logfiles import complete_end, file_identity, last_lines, lines_before, log_file_name
from .replay import (
    BUS_LOG,
    COMPRESSED_SUFFIXES,
    READ_CHUNK,
    Expired,
    ReplayError,
    offset_after,
    read_lines,
    segments,
    seq_of_line,
    ts_ms_of_line,
)
from .statefs import open_regular
from .subscriptions import topic_patterns
from .wire import LogRecord, decode_log_record

DEFAULT_COUNT = 10
POLL_INTERVAL = 0.03  # seconds between checks without inotify
SAFETY_INTERVAL = 0.25  # with inotify: check anyway this often, in case an event was missed
_READ_CHUNK = 1 << 20  # far above the longest record (a 64 KiB payload plus its fields)
_MAX_OPEN_FILES = 4  # a replaced log and the files that replaced it, read until one has data

Notify = Callable[[str], None]
OnGap = Callable[[Expired], None]


class Entry(NamedTuple):
    """One log line, as read (without its newline) and decoded."""

    line: bytes
    record: LogRecord


def log_path(state_root: os.PathLike | str, vm: str | None = None) -> Path:
    """The shared log, or ``vm``'s own log (what it sent and what was addressed to it)."""
    endpoints = Endpoints(state_root)
    return endpoints.bus_log if vm is None else endpoints.logs_dir / log_file_name(vm)


# -- turning lines into entries and entries into text ---------------------------------


def parse_entries(lines: Iterable[bytes], topics: Collection[str], notify: Notify) -> Iterator[Entry]:
    """Decode log lines, keeping those on ``topics`` (every topic when empty): exact
    topics, and patterns ``p*`` for every topic starting with ``p``.

    A line that is not a log record is skipped, with a note through ``notify``.
    """
    wanted = topic_patterns(topics)
    for line in lines:
        try:
            record = decode_log_record(line)
        except (msgspec.DecodeError, RecursionError) as exc:
            notify(f"skipped a line that is not a bus log record ({exc}): {line[:60]!r}")
            continue
        if not topics or wanted.match(record.topic):
            yield Entry(line, record)


def format_time(ts_ms: int, utc: bool = False) -> str:
    """ISO 8601 to the millisecond with the UTC offset: local time, or UTC with ``utc``."""
    seconds, millis = divmod(ts_ms, 1000)
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).replace(microsecond=millis * 1000)
    return when.isoformat(timespec="milliseconds") if utc else when.astimezone().isoformat(timespec="milliseconds")


# -- where --since starts ---------------------------------------------------------

_DURATION = re.compile(r"(?:[0-9]+[smhd])+")
_DURATION_PART = re.compile(r"([0-9]+)([smhd])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_SEQ = 2**63 - 1  # as a guest's since (PROTOCOL.md 4.3.1)


class Since(NamedTuple):
    """Where reading starts: after the line with seq ``seq``, or at the first line
    committed at ``ts_ms`` (Unix ms) or later."""

    seq: int | None = None
    ts_ms: int | None = None


def parse_duration(text: str) -> int:
    """The milliseconds in ``90s``, ``15m``, ``2h``, ``1d``, or several of them
    added up (``1h30m``)."""
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration (90s, 15m, 2h, 1d, 1h30m)")
    return sum(int(number) * _UNIT_MS[unit] for number, unit in _DURATION_PART.findall(text))


def parse_since(text: str, now_ms: int) -> Since:
    """``SEQ`` (digits: the lines after that seq), ``DURATION`` (the lines
    committed in that much time up to ``now_ms``) or an ISO 8601 time (the lines
    committed then or later; local time when it has no UTC offset)."""
    if re.fullmatch(r"[0-9]+", text):
        if int(text) > MAX_SEQ:
            raise ValueError(f"seq {text} is over 2^63-1")
        return Since(seq=int(text))
    if _DURATION.fullmatch(text):
        return Since(ts_ms=now_ms - parse_duration(text))
    try:
        # Python 3.10's fromisoformat takes no "Z" (3.11 does): the same instant as +00:00.
        when = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" and text else text)
    except ValueError:
        raise ValueError(f"{text!r} is not a seq (1200), a duration (90s, 15m, 2h, 1d) "
                         "or an ISO 8601 time (2026-12-01T09:30)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without an offset is local time, as printed
    return Since(ts_ms=round(when.timestamp() * 1000))


# -- reading a log file -----------------------------------------------------------


class _OpenLog:
    """One log file as opened, and how far its complete lines were handed out."""

    def __init__(self, fd: int):
        self.fd = fd
        stat = os.fstat(fd)
        self.identity = file_identity(stat)
        self.offset = 0

    def has_data(self) -> bool:
        return self.offset > 0 or os.fstat(self.fd).st_size > 0

    def drain(self, path: Path, notify: Notify) -> Iterator[bytes]:
        """The complete lines after ``offset``; a file shorter than that was truncated."""
        while True:
            size = os.fstat(self.fd).st_size
            if size < self.offset:
                notify(f"{path} was truncated; reading it from the start")
                self.offset = 0
            data = os.pread(self.fd, min(size - self.offset, _READ_CHUNK), self.offset)
            lines = data.split(b"\n")
            unfinished = lines.pop()  # after the last newline: not a line yet
            if not lines and len(data) == _READ_CHUNK:
                # No record is this long: hand it on to be reported rather than wait forever.
                lines, unfinished = [unfinished], b""
            self.offset += len(data) - len(unfinished)
            yield from lines
            if len(data) < _READ_CHUNK:
                return

    def close(self) -> None:
        os.close(self.fd)


class LogFollower:
    """The complete lines of the log at ``path``: those already there, then new ones.

    A file shorter than what was read of it was truncated in place: it is read
    again from its start. A path that names another file (or none) was replaced,
    as by rotation: the writer goes on appending to the old file for a while (the
    journal notices the rename at its next health tick), so the old file is kept
    open and read until the new one holds data. The writer appends to one file at
    a time and moves to a newer one only once done with the older, so from then on
    the old file is complete: it is read to its end, closed, and the new one read.
    No line is skipped and none is read twice. Truncation and replacement are told
    through ``notify``, so a reader knows why lines repeat.
    """

    def __init__(self, path: Path, notify: Notify):
        self.path = path
        self.notify = notify
        self.files: list[_OpenLog] = []  # oldest first; only the last may be at ``path``
        self.at_path = False  # whether ``files[-1]`` is the file ``path`` names
        self.missing = False  # whether ``path`` named no file at the last look
        opened = self._open()
        if opened is None:
            self.missing = True
        else:
            opened.offset = complete_end(opened.fd, os.fstat(opened.fd).st_size)

    @property
    def fd(self) -> int | None:
        """The file ``path`` names, while it is open."""
        return self.files[-1].fd if self.at_path else None

    def existing_lines(self) -> Iterator[bytes]:
        """The lines in the log when it was opened, newest first; call before ``new_lines``."""
        if not self.at_path:
            return iter(())
        current = self.files[-1]
        return lines_before(current.fd, current.offset)

    def new_lines(self) -> Iterator[bytes]:
        """The lines completed since the last call, oldest first."""
        self._look_at_path()
        # Every file older than the newest one holding data is complete (see above).
        newest = max((i for i, log in enumerate(self.files) if log.has_data()), default=0)
        for older in self.files[:newest]:
            yield from older.drain(self.path, self.notify)
            older.close()
        del self.files[:newest]
        if self.files:
            yield from self.files[0].drain(self.path, self.notify)
        # Files after the first are empty; only a path replaced again and again by
        # empty files makes many, and then the oldest of them are let go.
        while len(self.files) > _MAX_OPEN_FILES:
            self.files.pop(1).close()

    def close(self) -> None:
        for log in self.files:
            log.close()
        self.files.clear()
        self.at_path = False

    def _look_at_path(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        if self.at_path and (stat is None or file_identity(stat) != self.files[-1].identity):
            self.at_path = False
            self.notify(f"{self.path} was replaced or removed; reading the old file to its end, "
                        "then the one by that name")
        if stat is None:
            self.missing = True
        elif not self.at_path and self.files and file_identity(stat) == self.files[-1].identity:
            self.at_path = True  # moved back before anything replaced it
        elif not self.at_path and self._open() is not None and self.missing:
            self.notify(f"{self.path} appeared; reading it")
            self.missing = False

    def _open(self) -> _OpenLog | None:
        """Open the file at ``path`` as the newest one (None when there is none)."""
        try:
            fd = open_regular(self.path)  # no symbolic link followed, no FIFO waited on
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CastraError(f"cannot read {self.path}: {exc.strerror}") from None
        opened = _OpenLog(fd)
        self.files.append(opened)
        self.at_path = True
        return opened


# -- reading from a seq ----------------------------------------------------------

_MAX_HOPS = 16  # files one read may go through (copies with no line after the seq)
_HEAD_BYTES = 4096  # enough of a line to read its seq
_CHECK_BYTES = 512  # read back to see that the last line read is still there (longer lines: more)


def committed_seq(directory: Path) -> int | None:
    """The seq of the last line of ``bus.log`` in ``directory``; None when it has
    none (not there yet, or just rotated: its copies, maybe compressed already,
    cannot tell the last seq)."""
    try:
        last = last_lines(directory / BUS_LOG, 1)
    except OSError as exc:
        raise CastraError(f"cannot read {directory / BUS_LOG}: {exc.strerror}") from None
    return seq_of_line(last[0]) if last else None


def seq_at_time(directory: Path, name: str, ts_ms: int) -> int:
    """Where the lines of the log ``name`` (with its rotated copies) committed at
    ``ts_ms`` or later start, as the seq after which to read: one below the first
    such line, the seq of the last line when none is that recent, 0 when the
    oldest line left is (or there is no line).

    Bisects the file holding that time on ``ts_ms``, as ``replay.offset_after``
    does on seqs.
    """
    for _first, path in reversed(segments(directory, name)):
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            continue  # rotated again since the listing; the older files tell
        except OSError as exc:
            raise CastraError(f"cannot read {path}: {exc.strerror}") from None
        try:
            end = complete_end(fd, os.fstat(fd).st_size)
            if end == 0 or ts_ms_of_line(os.pread(fd, min(end, _HEAD_BYTES), 0)) >= ts_ms:
                continue  # all of it is that recent: the line before is in an older file
            offset = offset_after(fd, end, ts_ms - 1, ts_ms_of_line)
            if offset < end:
                return seq_of_line(os.pread(fd, min(end - offset, _HEAD_BYTES), offset)) - 1
            return seq_of_line(next(lines_before(fd, end)))
        finally:
            os.close(fd)
    return 0


def start_after(path: Path, since: Since) -> int:
    """The seq to read the log at ``path`` after: ``since.seq``, or for a time
    where its lines of that time start (``seq_at_time``)."""
    return since.seq if since.seq is not None else seq_at_time(path.parent, path.name, since.ts_ms)


class _Segment:
    """One log file, open, read up to ``offset`` (a line start)."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path
        stat = os.fstat(fd)
        self.identity = file_identity(stat)
        self.offset = 0
        self.start = 0  # where reading it began
        self.start_after = 0  # the seq reading it began after
        self.last_seq: int | None = None  # seq and time of the line ending at ``offset``, once one was read
        self.last_ts_ms: int | None = None

    def close(self) -> None:
        os.close(self.fd)


class SeqFollower:
    """The lines of the log at ``path`` whose seq is above ``after``, oldest first,
    each once: those of the log's rotated copies, then the log's, then each new
    one (call ``read`` again after a ``DirectoryWatch`` wake-up).

    It reads one file at a time, through its descriptor (a file renamed or deleted
    meanwhile is still read), and keeps the seq of the last line it gave. A file is
    done once a newer one holds lines (the writer appends to one file at a time
    and moves to a newer one only when done with the older, as ``LogFollower``
    relies on): it is then read to its end, and the next line found by seq, in the
    file that holds it, by bisection (``replay.offset_after``). So rotation loses
    no line and repeats none, a router restart only adds lines, and nothing before
    the seq is read.

    Lines after ``after`` that are gone (rotated away, then compressed or deleted)
    make ``Expired``: raised, or with ``on_gap`` told and skipped (reading goes on
    at the oldest line left). Every seq has a line in ``bus.log``; a VM's log has
    holes by design, so lines of it are said to be gone only when the shared log
    lost that stretch too, or a compressed copy of the VM's log is there.

    Told through ``notify``, and read on: a bus log whose last seq is below
    ``after`` (a new state root), from its last line at the start (as a guest's
    resume, PROTOCOL.md 4.3.1) and from its first later; a line whose seq cannot
    be read, skipped; a file cut back below what was read of it, and maybe
    written again past it (``_read_again``).
    """

    def __init__(self, path: Path, after: int, notify: Notify, on_gap: OnGap | None = None):
        self.path = path
        self.directory = path.parent
        self.name = path.name
        self.after = after  # the seq of the last line given, or where reading starts
        self.covered = after  # every seq up to it was given, or has no line in this log
        self.notify = notify
        self.on_gap = on_gap
        self.current: _Segment | None = None
        self.looked = False  # whether a file was looked for yet

    def read(self) -> list[bytes]:
        """The next lines (without their newlines), about ``replay.READ_CHUNK``
        bytes of them; [] when there is none yet."""
        for _hop in range(_MAX_HOPS):
            if self.current is None and not self._locate():
                return []
            lines = self._drain()
            if lines or not self._moved_on():
                return lines
            lines = self._drain()  # what the writer appended before it moved on
            if lines:
                return lines
            self.current.close()
            self.current = None
        return []

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def _drain(self) -> list[bytes]:
        log = self.current
        size = os.fstat(log.fd).st_size
        if size < log.offset or (size > log.offset and not self._unchanged(log)):
            self._read_again(log, size)
        raw = read_lines(log.fd, log.offset, size, READ_CHUNK)
        log.offset += sum(map(len, raw))
        lines = []
        for line in raw:
            try:
                seq = seq_of_line(line)
            except ReplayError:
                self.notify(f"skipped a line that is not a bus log record: {line[:60]!r}")
                continue
            if seq > self.after:
                lines.append(line[:-1])
                self.after = seq
        if raw:
            try:
                log.last_seq, log.last_ts_ms = seq_of_line(raw[-1]), ts_ms_of_line(raw[-1])
            except ReplayError:
                log.last_seq = log.last_ts_ms = None
        self.covered = max(self.covered, self.after)
        return lines

    def _unchanged(self, log: _Segment) -> bool:
        """Whether the line that ended at ``offset`` is still there (one small read)."""
        if log.last_seq is None:
            return True
        tail = os.pread(log.fd, min(log.offset, _CHECK_BYTES), log.offset - min(log.offset, _CHECK_BYTES))
        if not tail.endswith(b"\n"):
            return False
        start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
        line = tail[start:] if start > 0 or len(tail) == log.offset else next(lines_before(log.fd, log.offset))
        try:
            return seq_of_line(line) == log.last_seq
        except ReplayError:
            return False

    def _read_again(self, log: _Segment, size: int) -> None:
        """The file was cut back below what was read of it (a commit that failed
        after its lines were written, or truncated by hand), and maybe written
        again past that. The lines of a commit share their time, so what was cut
        began at the earliest with the first line of the time of the last line
        read: reading goes back over the lines of that time or later, and over
        those with a seq not given yet (never before where reading began), and on
        from there. The seqs cut off come again, with the messages committed under
        them; at worst messages committed in that same millisecond just before
        the cut come twice.
        """
        position = complete_end(log.fd, min(log.offset, size))
        for line in lines_before(log.fd, position):
            if position <= log.start:
                break
            try:
                recent = log.last_ts_ms is not None and ts_ms_of_line(line) >= log.last_ts_ms
                if not recent and seq_of_line(line) <= self.after:
                    break  # older than what was cut, and given already
            except ReplayError:
                break
            position -= len(line) + 1
        after = log.start_after
        if position > log.start:
            with contextlib.suppress(ReplayError):
                after = seq_of_line(next(lines_before(log.fd, position)))
        self.after = self.covered = min(self.after, after)
        log.offset = position
        log.last_seq = log.last_ts_ms = None
        self.notify(f"{log.path} was cut back below what was read of it (a failed commit?); "
                    f"reading on after seq {self.after}")

    def _moved_on(self) -> bool:
        """Whether a newer file than the current one holds lines (it is then complete)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        if stat is not None and file_identity(stat) == self.current.identity:
            return False  # reading the log itself
        newer = [first for first, _path in segments(self.directory, self.name) if first > self.after]
        if newer:
            self.covered = max(self.covered, min(newer) - 1)  # no line between: the current file is done
            return True
        return stat is not None and stat.st_size > 0  # a log with older seqs: started again?

    def _locate(self) -> bool:
        """Open the file holding the first line after ``after``, at that line (the
        newest file when there is none yet); False when there is no file."""
        self._check_restart()
        for _attempt in range(3):  # a file renamed between listing and opening: list again
            found = segments(self.directory, self.name)
            if not found:
                return False
            self._check_gap(found[0][0])
            # The newest file starting at or below the next seq may hold the next line; else the one after it.
            index = max((i for i, (first, _path) in enumerate(found) if first <= self.after + 1), default=0)
            for first, path in found[index:]:
                opened = self._open(path, first)
                if opened is None:
                    break
                segment, has_more = opened
                if has_more or path == found[-1][1]:
                    self.current = segment
                    return True
                segment.close()
        return False

    def _open(self, path: Path, first: int) -> tuple[_Segment, bool] | None:
        """``path`` open at the first line after ``after``, and whether it has one;
        None when it is no longer the file listed (renamed or cut since)."""
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CastraError(f"cannot read {path}: {exc.strerror}") from None
        segment = _Segment(fd, path)
        try:
            end = complete_end(fd, os.fstat(fd).st_size)
            if end == 0 or seq_of_line(os.pread(fd, min(end, _HEAD_BYTES), 0)) != first:
                segment.close()
                return None
            segment.offset = segment.start = 0 if first > self.after else offset_after(fd, end, self.after)
            segment.start_after = self.after
        except BaseException:
            segment.close()
            raise
        return segment, segment.offset < end

    def _check_restart(self) -> None:
        committed = committed_seq(self.directory)
        if committed is not None and committed < self.after:
            if self.looked:
                self.notify(f"the bus log starts again below seq {self.after} (a new state root?): "
                            f"reading {self.name} from its start")
                self.after = self.covered = 0
            else:
                self.notify(f"the bus log ends at seq {committed}, before seq {self.after} (a new state root?): "
                            f"reading on after seq {committed}")
                self.after = self.covered = committed
        self.looked = True

    def _check_gap(self, oldest: int) -> None:
        after = max(self.after, self.covered)
        if oldest <= after + 1 or not self._lines_gone(after):
            return
        gap = Expired(after, oldest)
        if self.on_gap is None:
            raise gap
        self.on_gap(gap)
        self.after = self.covered = oldest - 1

    def _lines_gone(self, after: int) -> bool:
        """Whether lines after ``after`` may be gone from a log whose oldest line
        left is above ``after + 1``."""
        if self.name == BUS_LOG:
            return True  # every seq has a line
        try:
            entries = os.listdir(self.directory)
        except OSError:
            entries = []
        if any(entry.startswith(self.name) and entry.endswith(COMPRESSED_SUFFIXES) for entry in entries):
            return True
        shared = segments(self.directory, BUS_LOG)
        return not shared or shared[0][0] > after + 1


# -- waiting for a change ---------------------------------------------------------

_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_IGNORED = 0x8000  # the watch is gone (its directory was removed)
_WATCH_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
               | _IN_DELETE_SELF | _IN_MOVE_SELF)
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


def _load_inotify():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not Linux, or no libc symbols to find
        return None
    return libc


class DirectoryWatch:
    """Waits until an entry of ``directory`` may have changed.

    The watch is on the directory, not on the file, so a log created, replaced or
    truncated wakes the follower as surely as an append does. A directory removed
    and made again (a new state root) is watched anew.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.libc = _load_inotify()
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC) if self.libc else -1
        self.watching = False
        self._watch()

    def wait(self) -> None:
        if not self.watching and not self._watch():
            time.sleep(POLL_INTERVAL)
            return
        readable, _, _ = select.select([self.fd], [], [], SAFETY_INTERVAL)
        if readable:
            self._read_events()

    async def wait_async(self) -> None:
        """``wait`` for asyncio: the event loop watches the inotify descriptor
        (``add_reader``), so waiting never blocks it."""
        import asyncio

        if not self.watching and not self._watch():
            await asyncio.sleep(POLL_INTERVAL)
            return
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fd, ready.set)
        try:
            await asyncio.wait_for(ready.wait(), SAFETY_INTERVAL)
        except asyncio.TimeoutError:
            return
        finally:
            loop.remove_reader(self.fd)
        self._read_events()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _watch(self) -> bool:
        if self.fd >= 0:
            self.watching = self.libc.inotify_add_watch(self.fd, os.fsencode(self.directory), _WATCH_MASK) >= 0
        return self.watching

    def _read_events(self) -> None:
        """Drain the queued events: one check of the file answers them all."""
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, name_len = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size + name_len
                if mask & _IN_MOVE_SELF:  # the path may name another directory now
                    self.libc.inotify_rm_watch(self.fd, wd)
                if mask & (_IN_IGNORED | _IN_MOVE_SELF):
                    self.watching = False


# -- the whole command ------------------------------------------------------------


def tail_entries(
    path: Path,
    *,
    count: int = DEFAULT_COUNT,
    follow: bool = False,
    topics: Collection[str] = (),
    notify: Notify,
    caught_up: Callable[[bool], None] | None = None,
) -> Iterator[Entry]:
    """The last ``count`` entries of the log at ``path``, oldest first; with ``follow``,
    then every new one as it is appended, until the caller stops iterating.

    ``caught_up`` is called once the last entries are out, with whether the log exists.
    """
    with contextlib.ExitStack() as cleanup:
        # Watching starts before the first read, so no append falls between the two.
        watch = cleanup.enter_context(contextlib.closing(DirectoryWatch(path.parent))) if follow else None
        follower = cleanup.enter_context(contextlib.closing(LogFollower(path, notify)))
        recent = list(itertools.islice(parse_entries(follower.existing_lines(), topics, notify), count))
        yield from reversed(recent)
        if caught_up is not None:
            caught_up(follower.at_path)
        while watch is not None:
            watch.wait()
            yield from parse_entries(follower.new_lines(), topics, notify)


def entries_after(
    path: Path,
    after: int,
    *,
    follow: bool = False,
    topics: Collection[str] = (),
    notify: Notify,
    on_gap: OnGap | None = None,
    caught_up: Callable[[bool], None] | None = None,
) -> Iterator[Entry]:
    """The entries of the log at ``path`` and its rotated copies after seq
    ``after``, in seq order (``SeqFollower``); with ``follow``, then every new one
    as it is appended, until the caller stops iterating.

    ``caught_up`` is called once those already there are out, with whether a log
    was found.
    """
    with contextlib.ExitStack() as cleanup:
        # Watching starts before the first read, so no append falls between the two.
        watch = cleanup.enter_context(contextlib.closing(DirectoryWatch(path.parent))) if follow else None
        reader = cleanup.enter_context(contextlib.closing(SeqFollower(path, after, notify, on_gap)))
        while lines := reader.read():
            yield from parse_entries(lines, topics, notify)
        if caught_up is not None:
            caught_up(reader.current is not None)
        while watch is not None:
            watch.wait()
            while lines := reader.read():
                yield from parse_entries(lines, topics, notify)
