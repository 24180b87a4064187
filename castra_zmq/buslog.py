"""The bus log storage engine: ``bus.log`` and the per-VM logs derived from it.

No sockets and no settings: two pieces, each for a single writer, that a role
drives: the bridge ``BusLog``, the journal (the logger peer on the proxy)
``VmLogs``.

* ``BusLog``: ``bus.log``, the record of truth. ``commit`` gives a group of
  messages the next seqs, writes all their lines in one write, fdatasyncs (with
  ``sync``) and only then returns; a group that cannot be written is cut back off
  the file whole and raises ``LogWriteFailed``. Opening cuts a torn last line
  (a crash mid-write) and goes on from the seq of the last whole one.
* ``VmLogs``: the per-VM logs, the same lines filed by sender and target
  (PROTOCOL.md 7.1). Synced in the background about once a second, and how far
  they are on disk is recorded in the checkpoint (``state/journal.json``), so
  that after a crash ``rebuild`` copies from the end of ``bus.log`` only what
  they may lack. A gap in the seqs ``append`` is given is filled the same way.

Both notice a file moved away (rotation by rename: ``follow_rotation``) and
start a new one, open every file through ``statefs`` (no symbolic link
followed, no file of another user, no hard link) and change files only through
a ``Disk``, where tests inject ENOSPC, EIO and torn writes.

A line is msgspec's JSON of a ``wire.LogRecord`` and a newline (PROTOCOL.md 7.2).
A Struct per message, not a bytes template filled with ``%``: measured, msgspec
builds a line in about half the time.

Runs in: the bridge (``BusLog``) and the journal role (``VmLogs``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import os
import time
from collections.abc import Container, Sequence
from pathlib import Path

import msgspec
from loguru import logger

from .errors import CastraError, LogWriteFailed
from .handshake import HOST_SENDER, VM_TOPIC_PREFIX, is_vm_name
from .logfiles import (
    DISK,
    SUFFIX,
    AppendFile,
    Disk,
    complete_end,
    last_lines,
    line_chunks,
    lines_before,
    log_file_name,
    vm_from_file_name,
)
from .statefs import open_regular, read_regular, replace_file
from .wire import LOG_WRITE_FAILED, LogRecord, Origin, decode_log_record, json_encode

_MAX_OPEN_FILES = 256
_RESCAN_INTERVAL = 1.0  # seconds between listings of the directory while at vm_logs_max

Message = tuple[str, str, msgspec.Raw]
"""One message to commit: its sender's bare name (or ``host``), its topic, its
payload (compact JSON: no newline)."""

# -- lines ------------------------------------------------------------------------------


def encode_lines(ts_ms: int, first_seq: int, messages: Sequence[Message],
                 origins: Sequence[Origin | None] | None = None) -> list[bytes]:
    """The log lines of ``messages`` committed at ``ts_ms``, the first with
    ``first_seq``; each ends with its newline. ``origins[i]``: where
    ``messages[i]`` comes from when another host committed it first."""
    timestamp = ts_ms / 1000
    if origins is None:
        return [json_encode(LogRecord(timestamp, ts_ms, seq, vm, topic, payload)) + b"\n"
                for seq, (vm, topic, payload) in enumerate(messages, first_seq)]
    return [json_encode(LogRecord(timestamp, ts_ms, seq, vm, topic, payload, origin)) + b"\n"
            for seq, (vm, topic, payload), origin in zip(itertools.count(first_seq), messages, origins)]


def seq_of(line: bytes, path: Path) -> int:
    try:
        return decode_log_record(line).seq
    except msgspec.DecodeError as exc:
        raise CastraError(f"cannot read seq from the last line of {path}: {exc}") from None


def last_seq(path: Path) -> int:
    """The ``seq`` of the last whole line of a log (0 when it has none)."""
    lines = last_lines(path, 1)
    return seq_of(lines[0], path) if lines else 0


def last_seq_in(handle: AppendFile) -> int:
    """``last_seq`` of an open log (which may have been moved from its path)."""
    line = next(lines_before(handle.fd, handle.size), None)
    return 0 if line is None else seq_of(line, handle.path)


def write_failed(exc: OSError) -> LogWriteFailed:
    return LogWriteFailed(f"{LOG_WRITE_FAILED}: {exc.strerror or exc}")


# -- bus.log ----------------------------------------------------------------------------


class LogBatch(msgspec.Struct, gc=False):
    """What one commit wrote: the lines of its messages, in order, the first with
    ``first_seq``; each ends with its newline."""

    first_seq: int
    lines: list[bytes]


class BusLog:
    """``bus.log``: every committed message, one line each, under consecutive seqs.

    ``seq`` is the last one committed. It goes on from the last whole line of the
    file, or from ``seq_floor`` (the checkpoint) when that is higher: a rotated
    ``bus.log`` may have no line yet.
    """

    def __init__(self, path: Path, *, sync: bool, seq_floor: int = 0, disk: Disk = DISK):
        self.path = path
        self.sync = sync
        self.disk = disk
        self.file: AppendFile | None = None  # opened by the first commit (or ``open``)
        self.seq = max(last_seq(path), seq_floor)

    def open(self) -> None:
        """Open ``bus.log`` (made if missing) and cut a torn last line; done by
        ``commit`` when needed. Raises ``LogWriteFailed``."""
        if self.file is not None:
            return
        try:
            # Only the last level: the state root's checked directories stay as they are.
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            self.file = AppendFile(self.path, self.disk)
        except OSError as exc:
            raise write_failed(exc) from exc
        # Higher after a failed commit that could not be cut back: its whole lines
        # stay, and their seqs are never given again.
        self.seq = max(self.seq, last_seq_in(self.file))

    def commit(self, ts_ms: int, messages: Sequence[Message],
               origins: Sequence[Origin | None] | None = None) -> LogBatch:
        """Append ``messages`` (from ``origins``, see ``encode_lines``) under the
        next seqs, all in one write, then fdatasync (with ``sync``). All or
        nothing: on failure the file is cut back to its size before, and
        ``LogWriteFailed`` is raised."""
        self.open()  # first: reopening may move seq on
        batch = LogBatch(self.seq + 1, encode_lines(ts_ms, self.seq + 1, messages, origins))
        data = b"".join(batch.lines)
        if data.count(b"\n") != len(batch.lines):
            raise ValueError("a message's payload has a newline: it would break its log line")
        file = self.file
        size = file.size
        try:
            file.write(data)
            if self.sync:
                file.sync()
        except OSError as exc:
            self._cut_back(size)
            raise write_failed(exc) from exc
        self.seq += len(batch.lines)
        return batch

    def _cut_back(self, size: int) -> None:
        """Truncate to ``size``, synced: an OS crash must not bring back lines whose
        publishes got an error. If that fails too, the file is let go: reopening
        cuts a torn line, and ``open`` goes on past any whole line left."""
        try:
            self.file.rollback(size)
            if self.sync:
                self.file.sync()
        except OSError as exc:
            logger.error("rollback failed", path=str(self.path), reason=exc.strerror)
            self.close()

    def follow_rotation(self) -> bool:
        """Let go of ``bus.log`` if it was moved away (renamed or deleted); the next
        commit starts a new one. Until this is called, commits go on into the moved
        file, which a reader following the path reads to its end first.

        True when it did: the caller must make ``seq`` durable (the checkpoint)
        before the next commit, as the new file has no line to go on from.
        """
        if self.file is None:
            return False
        try:
            replaced = self.file.replaced()
        except OSError as exc:
            logger.warning("cannot check bus.log for rotation", reason=exc.strerror)
            return False
        if replaced:
            self.close()
            logger.info("bus.log moved away: the next commit starts a new one", seq=self.seq)
        return replaced

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# -- per-VM logs ------------------------------------------------------------------------


class KnownVms:
    """The VMs that may get a new per-VM log as a message's target: ``host``,
    those the identities file lists, and the latest ``limit`` that connected
    since the journal started (a sender always may: see ``VmLogs.file``).

    Any guest may name any ``vm:<target>``; only a VM that exists gets a file.
    """

    def __init__(self, listed: frozenset[str], limit: int):
        self.listed = listed
        self.limit = limit
        self.connected: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __contains__(self, vm: str) -> bool:
        return vm in self.connected or vm in self.listed or vm == HOST_SENDER

    def add(self, vm: str, refresh: bool = False) -> None:
        """``vm`` connected; ``refresh`` makes it the latest even if it was known."""
        if vm in self.connected:
            if refresh:
                self.connected.move_to_end(vm)
            return
        if len(self.connected) >= self.limit:
            self.connected.popitem(last=False)
        self.connected[vm] = None


@functools.lru_cache(maxsize=4096)  # called for every message with few distinct topics
def target_of(topic: str) -> str | None:
    """The VM a ``vm:<target>`` topic is addressed to, if it names a valid VM."""
    if not topic.startswith(VM_TOPIC_PREFIX):
        return None
    target = topic[len(VM_TOPIC_PREFIX):]
    return target if is_vm_name(target) else None


def files_of(vm: str, topic: str) -> tuple[str, ...]:
    """The per-VM logs a message belongs in: its sender's and its target's."""
    target = target_of(topic)
    return (vm,) if target is None or target == vm else (vm, target)


def vm_log_names(directory: Path) -> set[str]:
    """The file names of the per-VM logs in ``directory`` (``%%<sha256>.log`` too)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    return {name for name in names
            if (name.startswith("%%") and name.endswith(SUFFIX)) or vm_from_file_name(name) is not None}


class Checkpoint(msgspec.Struct):
    """``state/journal.json``: every per-VM log line up to ``vm_logs_synced_seq``
    is on disk, so recovery rebuilds only what comes after it. It is also where
    ``seq`` goes on from when a rotated ``bus.log`` has no line yet."""

    vm_logs_synced_seq: int


def read_checkpoint(path: Path) -> int | None:
    try:
        return msgspec.json.decode(read_regular(path), type=Checkpoint).vm_logs_synced_seq
    except (OSError, msgspec.DecodeError):
        return None


def write_checkpoint(path: Path, seq: int, sync: bool) -> None:
    replace_file(path, json_encode(Checkpoint(seq)), sync=sync)


class SeqFloor(msgspec.Struct):
    """``state/bus.json``: the seq of the last message before ``bus.log`` was
    rotated, for a new ``bus.log`` with no line yet to go on from. Written by the
    writer of ``bus.log``; the per-VM logs' checkpoint is another process's."""

    seq: int


def read_seq_floor(path: Path) -> int:
    try:
        return msgspec.json.decode(read_regular(path), type=SeqFloor).seq
    except (OSError, msgspec.DecodeError):
        return 0


def write_seq_floor(path: Path, seq: int, sync: bool) -> None:
    replace_file(path, json_encode(SeqFloor(seq)), sync=sync)


class LogIdentity(msgspec.Struct):
    """``state/log.json``: names the seq space of this state root's ``bus.log``
    (seqs go on across rotations and restarts, so one name holds for its life). A
    bus-v2 guest is told it, so that positions taken on another host's log, or on a
    state root made again, are not taken for seqs of this one (PROTOCOL.md 2.4)."""

    id: str


LOG_ID_BYTES = 8  # random bytes of a log's name, as hex


def log_identity(path: Path, sync: bool) -> str:
    """The log's name from ``path``, made (random) and written if there is none
    or it is unreadable; ``OSError`` when it cannot be written."""
    try:
        return msgspec.json.decode(read_regular(path), type=LogIdentity).id
    except (OSError, msgspec.DecodeError):
        pass
    identity = os.urandom(LOG_ID_BYTES).hex()
    replace_file(path, json_encode(LogIdentity(identity)), sync=sync)
    return identity


class VmLogs:
    """The per-VM logs beside ``bus_log``: a bounded set of open files, at most
    ``vm_logs_max`` logs, which only ``known`` VMs get (a log already there is
    written too).

    They are derived from ``bus.log``, so they are not synced with each commit:
    one fsync per batch instead of one per file touched is what keeps group
    commit cheap. ``checkpoint`` syncs them in the background and records
    ``synced_seq``; after a crash ``rebuild`` completes them from ``bus.log``.
    """

    def __init__(self, bus_log: Path, checkpoint: Path, *, sync: bool, known: Container[str], vm_logs_max: int,
                 lag_max: int, disk: Disk = DISK, rescan_interval: float = _RESCAN_INTERVAL):
        """``lag_max``: with no checkpoint, how many of ``bus.log``'s last lines
        they may lack (a process crash loses the commit being written at most)."""
        self.bus_log = bus_log
        self.dir = bus_log.parent
        self.checkpoint_path = checkpoint
        self.sync = sync
        self.known = known
        self.vm_logs_max = vm_logs_max
        self.lag_max = lag_max
        self.disk = disk
        self.rescan_interval = rescan_interval
        checkpointed = read_checkpoint(checkpoint)
        self.synced_seq = checkpointed or 0  # on disk, and in the checkpoint, up to here
        self.seq = checkpointed  # every line up to it is filed (None: not known before ``rebuild``)
        self._files: collections.OrderedDict[str, AppendFile] = collections.OrderedDict()
        self._unsynced: set[AppendFile] = set()
        self._names = vm_log_names(self.dir)  # the per-VM logs there are, by file name
        self._next_rescan = 0.0
        self.full = False  # at vm_logs_max: told once, until there is room again
        self._syncer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._sync_job: concurrent.futures.Future[int] | None = None

    # -- files

    def file(self, vm: str, keep: Container[AppendFile] = (), sender: bool = False) -> AppendFile | None:
        """``vm``'s log, opened (or created) if needed; None when it has none and
        may not get one: a ``sender`` of a message may (it published, so it
        exists), another VM only if ``known``. The least recently used file is
        closed to make room, unless it is in ``keep`` (written by the commit being
        filed)."""
        handle = self._files.get(vm)
        if handle is not None:
            self._files.move_to_end(vm)
            return handle
        name = log_file_name(vm)
        if name not in self._names and (not (sender or vm in self.known) or not self.room_for_a_new_log()):
            return None
        while len(self._files) >= _MAX_OPEN_FILES and next(iter(self._files.values())) not in keep:
            self._close(self._files.popitem(last=False)[1])
        handle = self._files[vm] = AppendFile(self.dir / name, self.disk)
        self._names.add(name)
        return handle

    def room_for_a_new_log(self) -> bool:
        """Whether there are fewer than ``vm_logs_max`` per-VM logs. At the cap the
        directory is listed again (at most once per ``rescan_interval``): logs
        deleted or rotated away since free their place."""
        if len(self._names) >= self.vm_logs_max and time.monotonic() >= self._next_rescan:
            self._next_rescan = time.monotonic() + self.rescan_interval
            self._names = vm_log_names(self.dir) | {handle.path.name for handle in self._files.values()}
        room = len(self._names) < self.vm_logs_max
        if not room and not self.full:
            logger.bind(reason="vm_logs_max").warning("per-VM logs at their cap: other VMs only in bus.log",
                                                      cap=self.vm_logs_max)
        self.full = not room
        return room

    # -- writing

    def append(self, first_seq: int, messages: Sequence[Message], lines: Sequence[bytes]) -> None:
        """File one commit: ``lines[i]`` (seq ``first_seq + i``) goes to the logs of
        ``messages[i]``'s sender and target. All or nothing: on failure every file
        is cut back and ``LogWriteFailed`` is raised.

        Lines it already has are skipped; a gap before ``first_seq`` (a crash, a
        lost commit) is filled from ``bus.log`` first.
        """
        if self.seq is None or first_seq > self.seq + 1:
            self.rebuild()
        skip = max(0, self.seq + 1 - first_seq)
        writes: dict[AppendFile, bytearray] = collections.defaultdict(bytearray)
        # A commit has few distinct senders and topics: their files are looked up once.
        # Not a route to a VM with no log: its first publish, later in the commit,
        # gives it one, and the lines to it after that go there (as ``rebuild`` files them).
        routes: dict[tuple[str, str], list[AppendFile]] = {}
        try:
            for (vm, topic, _), line in itertools.islice(zip(messages, lines), skip, None):
                handles = routes.get((vm, topic))
                if handles is None:
                    names = files_of(vm, topic)
                    handles = [handle for name in names
                               if (handle := self.file(name, keep=writes, sender=name == vm)) is not None]
                    if len(handles) == len(names):
                        routes[vm, topic] = handles
                for handle in handles:
                    writes[handle] += line
            self._write(writes)
        except OSError as exc:
            raise write_failed(exc) from exc
        self.seq = max(self.seq, first_seq + len(lines) - 1)

    def _write(self, writes: dict[AppendFile, bytearray]) -> None:
        """Write every file's lines; on any error cut every file back and re-raise."""
        sizes = {handle: handle.size for handle in writes}
        try:
            for handle, data in writes.items():
                handle.write(data)
        except OSError:
            for handle, size in sizes.items():
                try:
                    handle.rollback(size)
                except OSError as exc:  # let go of it: a torn line is cut when it is opened again
                    logger.error("rollback failed", path=str(handle.path), reason=exc.strerror)
                    self._files.pop(self._vm_of(handle), None)
                    self._unsynced.discard(handle)
                    handle.close()
            raise
        self._unsynced.update(writes)

    def _vm_of(self, handle: AppendFile) -> str | None:
        return next((vm for vm, opened in self._files.items() if opened is handle), None)

    def rebuild(self) -> int:
        """Copy to the per-VM logs what they lack of the end of ``bus.log`` (past
        ``seq``, or the last ``lag_max`` lines without a checkpoint): what a
        process crash left only in ``bus.log``, what an OS crash took from them
        since the checkpoint, what the journal missed while down or behind. Each
        log gets the lines after its own last seq, so nothing is filed twice; a VM
        with no log gets one only from its first publish, as ``append`` files it.
        Returns how many lines were appended.

        Memory is bounded however long the stretch: a backward pass finds where it
        starts and which VMs it names, a forward pass copies it in chunks. A log
        that cannot be opened, read or written is left as it is (one line each):
        the others, and ``bus.log``, go on.
        """
        try:
            fd = open_regular(self.bus_log)
        except FileNotFoundError:
            fd = None
        except OSError as exc:
            raise write_failed(exc) from exc
        since, appended = self.seq, 0
        if fd is not None:
            try:
                since, start, end, first_sent, names = self._stretch_to_copy(fd, since)
                have = self._last_seqs(names, first_sent)
                for lines in line_chunks(fd, start, end):
                    appended += self._copy(lines, have, first_sent)
            except OSError as exc:
                raise write_failed(exc) from exc
            finally:
                os.close(fd)
        self.seq = since or 0
        self.sync_files()
        if appended:
            logger.warning("per-VM logs completed from bus.log", count=appended)
        return appended

    def _stretch_to_copy(self, fd: int, since: int | None):
        """Scan ``bus.log`` back to the line after ``since``: returns the last seq,
        the byte range of the lines after ``since``, each sender's first seq in it
        and every VM whose log it names."""
        end = complete_end(fd, os.fstat(fd).st_size)
        start, last = end, None
        first_sent: dict[str, int] = {}
        names: dict[str, None] = {}
        for line in lines_before(fd, end):
            try:
                record = decode_log_record(line)
            except msgspec.DecodeError:
                start -= len(line) + 1
                continue  # not ours to judge here: BusLog reports a bad last line
            if last is None:
                last = record.seq
                if since is None:
                    since = max(0, last - self.lag_max)
            if record.seq <= since:
                break
            start -= len(line) + 1
            first_sent[record.vm] = record.seq  # backwards: the earliest stays
            for vm in reversed(files_of(record.vm, record.topic)):
                names.pop(vm, None)  # backwards: moved to where it came first
                names[vm] = None
        # Logs are made in the order of their VMs' first lines, as append makes them.
        return max(since or 0, last or 0), start, end, first_sent, dict.fromkeys(reversed(names))

    def _last_seqs(self, names: dict[str, None], first_sent: dict[str, int]) -> dict[str, int]:
        """For each VM that has or may get a log: the seq after which it lacks lines."""
        have: dict[str, int] = {}
        for vm in names:
            try:
                handle = self.file(vm, sender=vm in first_sent)
                if handle is None:  # a VM with no log, as when the line was written
                    continue
                have[vm] = last_seq_in(handle)
                # An empty log of a VM not known was made (or emptied by an OS crash)
                # no earlier than its first publish: append gave it nothing before.
                if not have[vm] and vm not in self.known and vm in first_sent:
                    have[vm] = first_sent[vm] - 1
            except (OSError, CastraError) as exc:
                logger.warning("per-VM log not completed from bus.log", vm=vm,
                               reason=getattr(exc, "strerror", None) or str(exc))
        return have

    def _copy(self, lines: list[bytes], have: dict[str, int], first_sent: dict[str, int]) -> int:
        """Append the lines each log lacks; a log that fails is left out from then on."""
        writes: dict[str, bytearray] = collections.defaultdict(bytearray)
        for line in lines:
            try:
                record = decode_log_record(line)
            except msgspec.DecodeError:
                continue
            for vm in files_of(record.vm, record.topic):
                if record.seq > have.get(vm, record.seq):
                    writes[vm] += line + b"\n"
        appended = 0
        for vm, data in writes.items():
            try:
                handle = self.file(vm, sender=vm in first_sent)
                if handle is None:
                    raise CastraError("no room for its log")
                self._write({handle: data})
                appended += data.count(b"\n")
            except (OSError, CastraError) as exc:
                logger.warning("per-VM log not completed from bus.log", vm=vm,
                               reason=getattr(exc, "strerror", None) or str(exc))
                del have[vm]
        return appended

    # -- syncing

    def sync_files(self) -> None:
        """fdatasync the per-VM logs written since the last sync."""
        if self.sync:
            for handle in self._unsynced:
                handle.sync()
        self._unsynced.clear()

    def checkpoint(self) -> None:
        """Sync the per-VM logs, then record ``seq`` as how far they are on disk.

        In a thread: dozens of fsyncs in a row would stall the commits queued
        behind them for milliseconds. One runs at a time; until it is done this
        does nothing.
        """
        if not self._collect_sync_job(wait=False) or self.seq is None or self.synced_seq == self.seq:
            return
        try:
            # Duplicates: a dup stays valid if the LRU closes its file meanwhile.
            fds = [os.dup(handle.fd) for handle in self._unsynced] if self.sync else []
        except OSError as exc:
            logger.warning("per-VM logs not synced", reason=exc.strerror)
            return
        self._unsynced.clear()
        self._sync_job = self._syncer.submit(self._sync_then_record, fds, self.seq)

    def _sync_then_record(self, fds: list[int], seq: int) -> int:
        """fdatasync (and close) ``fds``, then write ``seq`` to the checkpoint."""
        try:
            for fd in fds:
                self.disk.fdatasync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        write_checkpoint(self.checkpoint_path, seq, self.sync)
        return seq

    def _collect_sync_job(self, wait: bool) -> bool:
        """Take the outcome of the background sync; False while it still runs."""
        job = self._sync_job
        if job is None:
            return True
        if not job.done():
            if not wait:
                return False
            concurrent.futures.wait([job])
        self._sync_job = None
        try:
            self.synced_seq = job.result()
        except OSError as exc:
            logger.warning("per-VM logs not synced", reason=exc.strerror)
            self._unsynced.update(self._files.values())  # which one failed is unknown: all are
        return True

    def checkpoint_now(self) -> None:
        """``checkpoint`` in the foreground, written even if nothing changed (the
        seq a new ``bus.log`` goes on from)."""
        self._collect_sync_job(wait=True)
        if self.seq is None:
            return
        try:
            self.sync_files()
            write_checkpoint(self.checkpoint_path, self.seq, self.sync)
        except OSError as exc:
            logger.warning("per-VM logs not synced", reason=exc.strerror)
            return
        self.synced_seq = self.seq

    # -- rotation and closing

    def follow_rotation(self) -> None:
        """Let go of per-VM logs moved away (rotation by rename): the next line
        starts a new one."""
        try:
            for vm, handle in list(self._files.items()):
                if handle.replaced():
                    del self._files[vm]
                    self._close(handle)
        except OSError as exc:
            logger.warning("cannot check the per-VM logs for rotation", reason=exc.strerror)

    def _close(self, handle: AppendFile) -> None:
        try:
            if self.sync and handle in self._unsynced:
                handle.sync()
        finally:
            self._unsynced.discard(handle)
            handle.close()

    def close(self) -> None:
        """A last checkpoint, then every file closed."""
        self.checkpoint_now()
        self._syncer.shutdown()
        for handle in self._files.values():
            try:
                self._close(handle)
            except OSError as exc:
                logger.warning("per-VM log not synced", path=str(handle.path), reason=exc.strerror)
        self._files.clear()
