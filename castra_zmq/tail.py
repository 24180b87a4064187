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
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import itertools
import os
import select
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec

from .endpoints import Endpoints
from .errors import CastraError
from .logfiles import complete_end, lines_before, log_file_name
from .statefs import open_regular
from .subscriptions import topic_patterns
from .wire import LogRecord, decode_log_record

DEFAULT_COUNT = 10
POLL_INTERVAL = 0.03  # seconds between checks without inotify
SAFETY_INTERVAL = 0.25  # with inotify: check anyway this often, in case an event was missed
_READ_CHUNK = 1 << 20  # far above the longest record (a 64 KiB payload plus its fields)
_MAX_OPEN_FILES = 4  # a replaced log and the files that replaced it, read until one has data

Notify = Callable[[str], None]


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


# -- reading a log file -----------------------------------------------------------


class _OpenLog:
    """One log file as opened, and how far its complete lines were handed out."""

    def __init__(self, fd: int):
        self.fd = fd
        stat = os.fstat(fd)
        self.identity = (stat.st_dev, stat.st_ino)
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
        if self.at_path and (stat is None or (stat.st_dev, stat.st_ino) != self.files[-1].identity):
            self.at_path = False
            self.notify(f"{self.path} was replaced or removed; reading the old file to its end, "
                        "then the one by that name")
        if stat is None:
            self.missing = True
        elif not self.at_path and self.files and (stat.st_dev, stat.st_ino) == self.files[-1].identity:
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
