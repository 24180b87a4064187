"""The journal role: single writer of ``logs/bus/*.log``.

Publishes reach it on its ROUTER socket, ``run/journal.sock``, from bridges and
host tools alike. Per batch of whatever arrived (group commit) it assigns each
message its ``seq``, appends one JSON line to ``bus.log``, to the sender's log and,
for ``vm:<target>`` topics, to the target's log, fsyncs ``bus.log`` (per the
``fsync`` setting), and only then answers and delivers. A batch that cannot be
written is rolled back whole and every publish in it gets an error result: nothing
is half-written, nothing is acked that is not in the log.

The journal socket, from the peer's (a DEALER's) side:

| frames                       | direction | meaning                                        |
|------------------------------|-----------|------------------------------------------------|
| ``"", batch``                | in        | publishes: one PublishRequest or an array of   |
|                              |           | at most ``batch_max``                          |
| ``"", "attach"``             | in        | a bridge asks for every commit                 |
| ``"", "connected\\0" vm``    | in        | a bridge tells that ``vm`` connected (UTF-8):  |
|                              |           | it may get a per-VM log from now on            |
| ``"", CommitBatch``          | out       | the results of a host tool's publishes         |
| ``"", CommitBatch, frames``  | out       | to each attached bridge, once per commit: its  |
|                              |           | results, the index of every committed message, |
|                              |           | and their guest frames end to end              |

One frame per batch, not one per message: in pyzmq each frame costs a Python
call or two on each side, more than the bytes it carries.

Bounds, in bytes (``Settings``): a peer whose message is over ``batch_bytes_max``
is disconnected by ZeroMQ (ZMQ_MAXMSGSIZE) and gets no answer; a commit takes no
further message once ``commit_bytes_max`` is reached, so nothing it sends is over
``Settings.commit_message_bytes_max``; the queues to and from each peer hold
``queue_bytes`` at most (high-water marks sized from those). An attached bridge
whose queue stays full for ``commit_timeout`` is detached (``slow_consumer``: a
log line and a ``peer`` event) and attached again once it publishes. A publish
whose guest frame would be over ``MAX_FRAME`` bytes is refused: ``message too large``.

Per-VM logs: a VM gets one only once it connected (the bridge's ``connected``
notice, or a publish through a bridge), when the identities file lists it, or
when its log is already there; and only while there are fewer than
``vm_logs_max``. Other messages still go to ``bus.log`` and any log their
sender or target has.

Host tools subscribe on the bus instead (``bus`` topics through the proxy); those
messages are sent only while someone subscribes to them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import time
from pathlib import Path

import msgspec
import zmq
from loguru import logger

from . import runtime, topics
from .config import Settings, settings_from_env
from .endpoints import Endpoints
from .errors import CastraError, ConfigError
from .events import EventKind, event_message
from .framing import encode_frame
from .handshake import HOST_SENDER, validate_vm_name
from .identity import load_identities
from .logfiles import SUFFIX, AppendFile, last_lines, log_file_name, newest_lines, vm_from_file_name
from .statefs import read_regular, replace_file
from .wire import (
    ATTACH,
    BUS_MESSAGE_MAX,
    CONNECTED,
    MAX_FRAME,
    MAX_TOPIC,
    MESSAGE_TOO_LARGE,
    SUBSCRIBE_ALL,
    CommitBatch,
    CommitResult,
    Committed,
    Delivery,
    LogRecord,
    PublishRequest,
    compact_payload,
    decode_log_record,
    decode_publish_requests,
    delivery_bytes,
    json_encode,
)

_MAX_OPEN_FILES = 256
_MAX_CACHED_TOPICS = 4096
_SUBSCRIPTIONS_WAIT_MS = 1000  # for the bus's subscriptions to reach a new outbox
_PUBLISH_EVENT_INTERVAL = 0.1  # seconds: status needs freshness, not an event per commit
# An entry of a publish event's counts: a VM name (at most 6 bytes a character in
# JSON), and at most this for its count and punctuation.
_COUNT_ENTRY_BYTES = 24
_RESCAN_INTERVAL = 1.0  # seconds between listings of logs/bus/ while at vm_logs_max
_MAX_DETACHED = 64  # detached bridges remembered, to attach again when they publish
SLOW_CONSUMER = "slow_consumer"
_FRAME_PREFIX = 4  # the length before each guest frame


class Pending(msgspec.Struct):
    """One publish of the batch being committed."""

    peer: bytes  # the identity its result goes back to
    request: PublishRequest
    seq: int = 0


class KnownVms:
    """The VMs that may get a new per-VM log: ``host``, those the identities file
    lists, and the latest ``limit`` that connected since the journal started.

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


def listed_vms(identities_file: str | None) -> frozenset[str]:
    """The VM names of the identities file (none without one)."""
    try:
        identities = load_identities(identities_file)
    except ConfigError as exc:  # the bridge refuses to start on it; the logs need not
        logger.bind(reason=exc.reason).warning("identities file not read: its VMs get a log once they connect")
        return frozenset()
    return frozenset(identities.tokens) if identities is not None else frozenset()


def vm_log_names(directory: Path) -> set[str]:
    """The file names of the per-VM logs in ``directory`` (``%%<sha256>.log`` too)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    return {name for name in names
            if (name.startswith("%%") and name.endswith(SUFFIX)) or vm_from_file_name(name) is not None}


class LogSet:
    """``bus.log`` plus per-VM logs, with a bounded set of open files and at most
    ``vm_logs_max`` per-VM logs, which only known VMs get (see ``KnownVms``).

    Only ``bus.log`` is fsynced with each commit: it is the record of truth, and
    one fsync per batch instead of one per file touched is what keeps group commit
    cheap. The per-VM logs are derived from it; they are fsynced by ``sync_vm_logs``
    (about once a second) and, after an OS crash, rebuilt from ``bus.log`` past the
    checkpoint (see ``Journal.reconcile``).
    """

    def __init__(self, endpoints: Endpoints, sync: bool, known: KnownVms, vm_logs_max: int):
        self.dir = endpoints.logs_dir
        self.sync = sync
        self.known = known
        self.vm_logs_max = vm_logs_max
        self.bus = AppendFile(endpoints.bus_log)
        self._vm_files: collections.OrderedDict[str, AppendFile] = collections.OrderedDict()
        self._unsynced: set[AppendFile] = set()
        self.vm_log_names = vm_log_names(self.dir)  # the per-VM logs there are, by file name
        self.next_rescan = 0.0
        self.full = False  # at vm_logs_max: told once, until there is room again

    def vm_file(self, vm: str) -> AppendFile | None:
        """``vm``'s log, opened (or created) if needed; None when it has none and
        may not get one."""
        handle = self._vm_files.get(vm)
        if handle is not None:
            self._vm_files.move_to_end(vm)
            return handle
        name = log_file_name(vm)
        if name not in self.vm_log_names and (vm not in self.known or not self.room_for_a_new_log()):
            return None
        if len(self._vm_files) >= _MAX_OPEN_FILES:
            self._close(self._vm_files.popitem(last=False)[1])
        handle = self._vm_files[vm] = AppendFile(self.dir / name)
        self.vm_log_names.add(name)
        return handle

    def room_for_a_new_log(self) -> bool:
        """Whether there are fewer than ``vm_logs_max`` per-VM logs. At the cap the
        directory is listed again (at most once per ``_RESCAN_INTERVAL``): logs
        deleted or rotated away since free their place."""
        if len(self.vm_log_names) >= self.vm_logs_max and time.monotonic() >= self.next_rescan:
            self.next_rescan = time.monotonic() + _RESCAN_INTERVAL
            self.vm_log_names = vm_log_names(self.dir) | {handle.path.name for handle in self._vm_files.values()}
        room = len(self.vm_log_names) < self.vm_logs_max
        if not room and not self.full:
            logger.bind(reason="vm_logs_max").warning("per-VM logs at their cap: other VMs only in bus.log",
                                                      cap=self.vm_logs_max)
        self.full = not room
        return room

    def append(self, lines: dict[AppendFile, bytearray]) -> None:
        """Write every file's lines; on any error restore every file and re-raise."""
        sizes = {handle: handle.size for handle in lines}
        try:
            for handle, data in lines.items():
                handle.write(data)
            if self.sync and self.bus in lines:
                self.bus.sync()
            self._unsynced.update(handle for handle in lines if handle is not self.bus)
        except OSError:
            for handle, size in sizes.items():
                try:
                    handle.rollback(size)
                except OSError as exc:  # the line stays torn on disk; cut at next open
                    logger.error("rollback failed", path=str(handle.path), reason=exc.strerror)
            raise

    def sync_vm_logs(self) -> None:
        """fsync the per-VM logs written since the last call."""
        if self.sync:
            for handle in self._unsynced:
                handle.sync()
        self._unsynced.clear()

    def take_unsynced(self) -> list[int]:
        """Duplicates of the per-VM logs' fds written since the last call, for a
        background fsync: a dup stays valid if the LRU closes the file meanwhile."""
        fds = [os.dup(handle.fd) for handle in self._unsynced] if self.sync else []
        self._unsynced.clear()
        return fds

    def mark_all_unsynced(self) -> None:
        """After a failed background fsync: which file failed is unknown, so all are."""
        self._unsynced.update(self._vm_files.values())

    def close_replaced_vm_files(self) -> None:
        """Let go of per-VM logs moved away (rotation): the next line starts a new one."""
        for vm, handle in list(self._vm_files.items()):
            if handle.replaced():
                del self._vm_files[vm]
                self._close(handle)

    def _close(self, handle: AppendFile) -> None:
        if self.sync and handle in self._unsynced:
            handle.sync()
        self._unsynced.discard(handle)
        handle.close()

    def close(self) -> None:
        self.bus.close()
        for handle in self._vm_files.values():
            self._close(handle)
        self._vm_files.clear()


def last_seq(path: Path) -> int:
    """The ``seq`` of the last whole line of a bus log (0 when it has none)."""
    lines = last_lines(path, 1)
    if not lines:
        return 0
    try:
        return decode_log_record(lines[0]).seq
    except msgspec.DecodeError as exc:
        raise CastraError(f"cannot read seq from the last line of {path}: {exc}") from None


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


def sync_fds_then_checkpoint(fds: list[int], path: Path, seq: int, sync: bool) -> int:
    """fsync (and close) ``fds``, then record ``seq`` as synced; runs in a thread."""
    try:
        for fd in fds:
            os.fdatasync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    write_checkpoint(path, seq, sync)
    return seq


def files_of(vm: str, topic: str) -> tuple[str, ...]:
    """The per-VM logs a message belongs in: its sender's and its target's."""
    target = target_of(topic)
    return (vm,) if target is None or target == vm else (vm, target)


def sender_of(vm: str) -> str:
    """A message's sender as the bus shows it: ``vm:<name>``, or ``host``."""
    return HOST_SENDER if vm == HOST_SENDER else "vm:" + vm


@functools.lru_cache(maxsize=4096)  # called for every message with few distinct topics
def target_of(topic: str) -> str | None:
    """The VM a ``vm:<target>`` topic is addressed to, if it names a valid VM."""
    if not topic.startswith("vm:"):
        return None
    try:
        return validate_vm_name(topic[3:])
    except CastraError:
        return None


class Journal:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoints = settings.endpoints
        # The checkpoint too: after a rotation, bus.log may be new and empty.
        self.seq = max(last_seq(self.endpoints.bus_log), read_checkpoint(self.endpoints.journal_checkpoint) or 0)
        self.synced_seq = self.seq  # the per-VM logs are on disk up to here
        self.logs: LogSet | None = None
        self.syncer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.sync_job: concurrent.futures.Future[int] | None = None
        self.failure: str | None = None  # why the last commit failed, until one succeeds
        self.context = zmq.Context()
        # XPUB, not PUB: it shows the bus's subscriptions, so ``bus`` messages are
        # only built and sent while a host tool wants them.
        self.outbox = self.context.socket(zmq.XPUB)
        self.outbox.linger = 0
        self.outbox.sndhwm = settings.hwm_for(BUS_MESSAGE_MAX)  # a stopped proxy: drops past it
        self.outbox.connect(self.endpoints.publish)
        self.subscriptions: set[bytes] = set()  # the bus's, as the outbox sees them
        self.host_wanted: dict[str, bool] = {}  # topic -> does a host tool subscribe to it
        if self.outbox.poll(_SUBSCRIPTIONS_WAIT_MS):
            self.read_subscriptions()
        self.published: collections.Counter[str] = collections.Counter()  # since the last event
        self.next_publish_event = 0.0
        # Bridges and host tools publish straight here (DEALER -> ROUTER) and get
        # their results on the same socket: no proxy hop and no PUB/SUB slow joiner.
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.maxmsgsize = settings.batch_bytes_max
        self.router.sndhwm = settings.hwm_for(settings.commit_message_bytes_max)
        self.router.rcvhwm = settings.hwm_for(settings.batch_bytes_max)
        self.router.router_mandatory = True  # a peer gone or full is an error, not a silent drop
        self.bridges: dict[bytes, float] = {}  # attached bridges -> since when their queue is full (or 0)
        self.detached: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # the latest ones
        self.dropped_answers = 0  # to host tools with a full queue, since the last health tick
        self.known = KnownVms(listed_vms(settings.identities_file), settings.vm_logs_max)
        previous = os.umask(0o077)
        try:
            self.router.bind(self.endpoints.journal)
        finally:
            os.umask(previous)
        self.running = True

    def open_logs(self) -> LogSet:
        if self.logs is None:
            # Only the last level: the state root's checked directories stay as they are.
            self.endpoints.logs_dir.mkdir(mode=0o700, exist_ok=True)
            self.logs = LogSet(self.endpoints, sync=self.settings.fsync == "batch", known=self.known,
                               vm_logs_max=self.settings.vm_logs_max)
            self.reconcile(self.logs)
        return self.logs

    def checkpoint(self) -> None:
        """Sync the per-VM logs, then record how far they are on disk.

        In a thread: dozens of fsyncs in a row would stall the commits queued
        behind them for milliseconds. One sync runs at a time.
        """
        if not self.collect_sync_job(wait=False) or self.logs is None or self.synced_seq == self.seq:
            return
        try:
            fds = self.logs.take_unsynced()
        except OSError as exc:
            logger.warning("per-VM logs not synced", reason=exc.strerror)
            return
        self.sync_job = self.syncer.submit(
            sync_fds_then_checkpoint, fds, self.endpoints.journal_checkpoint, self.seq, self.logs.sync
        )

    def collect_sync_job(self, wait: bool) -> bool:
        """Take the outcome of the background sync; False while it still runs."""
        job = self.sync_job
        if job is None:
            return True
        if not job.done():
            if not wait:
                return False
            concurrent.futures.wait([job])
        self.sync_job = None
        try:
            self.synced_seq = job.result()
        except OSError as exc:
            logger.warning("per-VM logs not synced", reason=exc.strerror)
            if self.logs is not None:
                self.logs.mark_all_unsynced()
        return True

    def checkpoint_now(self) -> None:
        """A checkpoint in the foreground, written even if nothing changed."""
        self.collect_sync_job(wait=True)
        try:
            if self.logs is not None:
                self.logs.sync_vm_logs()
            write_checkpoint(self.endpoints.journal_checkpoint, self.seq, self.settings.fsync == "batch")
        except OSError as exc:
            logger.warning("per-VM logs not synced", reason=exc.strerror)
            return
        self.synced_seq = self.seq

    def follow_rotation(self) -> None:
        """Start new logs where the old ones were moved away (rotation by rename):
        lines go on into a renamed file only until the next health tick."""
        if self.logs is None:
            return
        try:
            self.logs.close_replaced_vm_files()
            if not self.logs.bus.replaced():
                return
        except OSError as exc:
            logger.warning("cannot check the logs for rotation", reason=exc.strerror)
            return
        self.checkpoint_now()  # the seq to go on from: the new bus.log has none yet
        self.logs.close()
        self.logs = None  # reopened by the next commit
        logger.info("bus.log moved away: the next commit starts a new one", seq=self.seq)

    def reconcile(self, logs: LogSet) -> None:
        """Copy to the per-VM logs what a crash left only in ``bus.log``.

        ``bus.log`` is written (and fsynced) first; the per-VM logs may lack lines
        after the last checkpoint: a process crash loses at most the batch being
        written, an OS crash what was not synced yet. Re-derive those lines.
        """
        appended = 0
        since = read_checkpoint(self.endpoints.journal_checkpoint)
        if since is None:  # no checkpoint yet: a process crash loses one commit at most
            since = max(0, self.seq - 2 * self.settings.batch_max)
        records = []
        for line in newest_lines(self.endpoints.bus_log):
            try:
                record = decode_log_record(line)
            except msgspec.DecodeError:
                continue  # not ours to judge here; last_seq reports a bad last line
            if record.seq <= since:
                break
            records.append((record.seq, files_of(record.vm, record.topic), line))
        records.reverse()
        for vm in {vm for _, vms, _ in records for vm in vms}:
            handle = logs.vm_file(vm)
            if handle is None:  # a VM with no log, as when the line was written
                continue
            have = last_seq(handle.path)
            missing = b"".join(line + b"\n" for seq, vms, line in records if seq > have and vm in vms)
            if missing:
                logs.append({handle: missing})
                appended += missing.count(b"\n")
        logs.sync_vm_logs()
        if appended:
            logger.warning("per-VM logs completed from bus.log after a crash", count=appended)

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        interval_ms = int(self.settings.health_interval * 1000)
        next_health = 0.0
        try:
            self.open_logs()  # trim torn tails and repair per-VM logs before anything else
        except OSError as exc:
            self.failure = f"log_write_failed: {exc.strerror or exc}"
            logger.error("logs not writable yet", reason=self.failure)
        logger.info("journal ready", seq=self.seq, log=str(self.endpoints.bus_log))
        runtime.notify_ready()
        while self.running:
            ready = dict(poller.poll(_PUBLISH_EVENT_INTERVAL * 1000 if self.published else interval_ms))
            if self.outbox in ready:
                self.read_subscriptions()
            if self.router in ready:
                self.commit()
            now = time.monotonic()
            if self.published and now >= self.next_publish_event:
                self.next_publish_event = now + _PUBLISH_EVENT_INTERVAL
                self.announce_publishes()
            if now >= next_health:
                next_health = now + self.settings.health_interval
                self.announce_health()
                self.report_dropped_answers()
                self.follow_rotation()
                self.checkpoint()

    def read_subscriptions(self) -> None:
        """Follow the bus's subscriptions (unread, their notices would pile up)."""
        while True:
            try:
                notice = self.outbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if notice[:1] == b"\x01":
                self.subscriptions.add(notice[1:])
            else:
                self.subscriptions.discard(notice[1:])
            self.host_wanted.clear()

    def host_wants(self, topic: str) -> bool:
        """Whether anyone subscribes to ``bus`` messages of ``topic`` (host tools do)."""
        wanted = self.host_wanted.get(topic)
        if wanted is None:
            if len(self.host_wanted) >= _MAX_CACHED_TOPICS:
                self.host_wanted.clear()
            frame = topics.bus(topic)
            wanted = self.host_wanted[topic] = any(frame.startswith(prefix) for prefix in self.subscriptions)
        return wanted

    def commit(self) -> None:
        """Group commit: take what arrived, up to about ``batch_max`` publishes or
        ``commit_bytes_max`` bytes to send, write it, then answer and deliver what
        was written.

        A message is never split, and holds at most ``batch_max`` publishes, so a
        commit holds fewer than ``2 * batch_max`` and sends no message larger than
        ``Settings.commit_message_bytes_max``.
        """
        results: dict[bytes, list[CommitResult]] = collections.defaultdict(list)
        accepted: list[Pending] = []
        now = time.monotonic()
        count = size = 0
        while count < self.settings.batch_max and size < self.settings.commit_bytes_max:
            try:
                parts = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            # What is not a publish counts too: a flood of it cannot hold a commit back.
            if len(parts) != 3 or parts[1]:
                logger.warning("dropped malformed journal message", reason=f"{len(parts)} frames")
                count += 1
            elif parts[2] == ATTACH:
                self.attach(parts[0])
                count += 1
            elif parts[2].startswith(CONNECTED):
                self.handle_connected(parts[2])
                count += 1
            else:
                published, frame_bytes = self.admit_all(parts[2], parts[0], now, results, accepted)
                count += max(1, published)
                # Its results are no longer than the message; its frames go out twice
                # (the index entry of a frame is shorter than it).
                size += len(parts[2]) + 2 * frame_bytes
        committed: list[Committed] = []
        frames = b""
        if accepted:
            committed, frames = self.write(accepted, results)
        for identity in self.bridges.copy():
            batch = results.pop(identity, [])
            if batch or committed:
                self.send(identity, [json_encode(CommitBatch(batch, committed)), frames])
        for identity, batch in results.items():
            self.send(identity, [json_encode(CommitBatch(batch))])

    def attach(self, identity: bytes) -> None:
        if identity not in self.bridges:
            self.bridges[identity] = 0.0
            self.detached.pop(identity, None)
            logger.info("bridge attached", bridges=len(self.bridges))

    def handle_connected(self, notice: bytes) -> None:
        """``connected\\0<vm>``: ``vm`` has a session or said hello; it may get a log."""
        try:
            vm = target_of("vm:" + notice[len(CONNECTED):].decode("utf-8"))
        except UnicodeDecodeError:
            vm = None
        if vm is None:
            logger.warning("dropped malformed journal message", reason="connected notice without a valid vm name")
        else:
            self.known.add(vm, refresh=True)

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        """Send to one peer; a peer gone or not reading loses the message, never stalls us."""
        try:
            self.router.send_multipart([identity, b"", *frames], zmq.NOBLOCK)
        except zmq.Again:  # its queue is full; what it lost times out at the peer
            self.handle_full_queue(identity)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            if self.bridges.pop(identity, None) is not None:
                logger.bind(reason="disconnected").warning("bridge detached", bridges=len(self.bridges))
        else:
            if self.bridges.get(identity):
                self.bridges[identity] = 0.0

    def handle_full_queue(self, identity: bytes) -> None:
        """A peer's queue is full: a bridge full for ``commit_timeout`` is detached
        (no more commits are built for it); a host tool only loses this answer."""
        full_since = self.bridges.get(identity)
        if full_since is None:
            self.dropped_answers += 1
            return
        now = time.monotonic()
        if not full_since:
            self.bridges[identity] = now
        elif now - full_since >= self.settings.commit_timeout:
            del self.bridges[identity]
            self.detached[identity] = None
            if len(self.detached) > _MAX_DETACHED:
                self.detached.popitem(last=False)
            logger.bind(reason=SLOW_CONSUMER).warning("bridge detached: its queue stayed full for the commit timeout",
                                                      peer=identity.hex(), bridges=len(self.bridges))
            self.outbox.send_multipart(event_message(EventKind.PEER, peer=identity.hex(), action="detach",
                                                     reason=SLOW_CONSUMER))

    def reattach(self, identity: bytes) -> None:
        """A detached bridge publishes again: it is alive, so it gets commits again
        (if it still reads nothing, it is detached again)."""
        del self.detached[identity]
        self.bridges[identity] = 0.0
        logger.bind(reason="publishing").info("bridge attached again", peer=identity.hex(), bridges=len(self.bridges))
        self.outbox.send_multipart(event_message(EventKind.PEER, peer=identity.hex(), action="attach",
                                                 reason="publishing"))

    def report_dropped_answers(self) -> None:
        """One line per health tick, not one per answer, for host tools not reading."""
        if self.dropped_answers:
            logger.bind(reason=SLOW_CONSUMER).warning("answers dropped: their peers' queues are full",
                                                      count=self.dropped_answers)
            self.dropped_answers = 0

    def admit_all(self, batch: bytes, peer: bytes, now: float, results, accepted) -> tuple[int, int]:
        """Check the publishes of one batch frame: each joins ``accepted`` or has its
        refusal put in ``results``. Returns how many there were, and the bytes of
        the guest frames of those accepted."""
        try:
            requests = decode_publish_requests(batch)
        except (msgspec.DecodeError, RecursionError) as exc:
            logger.warning("dropped malformed publish batch", reason=str(exc) or "nested too deeply")
            return 0, 0
        if isinstance(requests, PublishRequest):
            requests = [requests]
        elif len(requests) > self.settings.batch_max:
            logger.warning("dropped malformed publish batch", reason=f"more than {self.settings.batch_max} publishes")
            return 0, 0
        if peer in self.detached:
            self.reattach(peer)
        from_bridge = peer in self.bridges
        # msgspec keeps a Raw's strings unchecked and its whitespace as sent: a
        # payload must be UTF-8 and must not break its log line.
        check_utf8 = not batch.isascii()
        compact = b"\n" in batch or b"\r" in batch
        frame_bytes = 0
        for request in requests:
            frame_bytes += self.admit(request, peer, now, results, accepted, check_utf8, compact)
            if from_bridge:  # a bridge only publishes for VMs in session
                self.known.add(request.vm)
        return len(requests), frame_bytes

    def admit(self, request: PublishRequest, peer: bytes, now: float, results, accepted,
              check_utf8: bool, compact: bool) -> int:
        """Accept ``request`` or put its refusal in ``results``; returns the bytes of
        its guest frame (0 when refused)."""
        reason = None
        if now > request.deadline:
            reason = "commit_timeout"
        elif not request.topic or len(request.topic) > MAX_TOPIC or "\0" in request.topic:
            reason = "invalid topic"
        elif request.topic == SUBSCRIBE_ALL:
            reason = "topic * is only for subscribe"
        elif request.vm != HOST_SENDER and target_of("vm:" + request.vm) is None:
            reason = "invalid vm name"
        elif check_utf8 or compact:
            try:
                payload = bytes(request.payload)
                payload.decode("utf-8")
            except UnicodeDecodeError:
                reason = "payload is not valid JSON"
            else:
                request.payload = msgspec.Raw(compact_payload(payload))
        if reason is None:
            sender = sender_of(request.vm)
            # Its seq is the next one after those accepted before it in this commit.
            body = delivery_bytes(request.topic, sender, len(request.payload), self.seq + len(accepted) + 1)
            if body > MAX_FRAME:
                reason = MESSAGE_TOO_LARGE
        if reason is not None:
            results[peer].append(CommitResult(corr=request.corr, reason=reason))
            return 0
        accepted.append(Pending(peer=peer, request=request))
        return _FRAME_PREFIX + body

    def write(self, accepted: list[Pending], results) -> tuple[list[Committed], bytes]:
        """Commit ``accepted`` and put each one's result in ``results``. Returns what
        bridges get: the index of what was written, and its guest frames end to end."""
        ts_ns = time.time_ns()
        ts_ms = ts_ns // 1_000_000
        timestamp = ts_ms / 1000
        try:
            logs = self.open_logs()
            lines: dict[AppendFile, bytearray] = collections.defaultdict(bytearray)
            seq = self.seq
            for pending in accepted:
                seq += 1
                pending.seq = seq
                request = pending.request
                line = json_encode(
                    LogRecord(timestamp, ts_ms, seq, request.vm, request.topic, request.payload)
                )
                lines[logs.bus] += line + b"\n"
                for vm in files_of(request.vm, request.topic):
                    handle = logs.vm_file(vm)
                    if handle is not None:
                        lines[handle] += line + b"\n"
            logs.append(lines)
        except OSError as exc:
            reason = f"log_write_failed: {exc.strerror or exc}"
            if reason != self.failure:
                logger.error("commit failed", reason=reason, count=len(accepted))
            self.failure = reason
            if self.logs is not None:  # reopen next time: the directory may be back
                self.logs.close()
                self.logs = None
            for pending in accepted:
                results[pending.peer].append(CommitResult(corr=pending.request.corr, reason=reason))
            return [], b""
        if self.failure is not None:
            logger.info("commits recovered", seq=seq)
            self.failure = None
        self.seq = seq
        send = self.outbox.send_multipart
        committed = []
        frames = bytearray()
        for pending in accepted:
            request = pending.request
            results[pending.peer].append(CommitResult(corr=request.corr, seq=pending.seq))
            sender = sender_of(request.vm)
            body = json_encode(Delivery(request.topic, sender, ts_ms, pending.seq, request.payload))
            frames += encode_frame(body)
            committed.append(Committed(request.topic, sender, len(frames)))
            if self.host_wants(request.topic):
                send([topics.bus(request.topic), sender.encode(), body])
            self.published[request.vm] += 1
        return committed, bytes(frames)

    def announce_publishes(self) -> None:
        """``publish`` events for the counts since the last ones, split so that each
        is under ``BUS_MESSAGE_MAX`` (the outbox's queue is budgeted by it)."""
        counts: dict[str, int] = {}
        size = 0
        for vm, count in self.published.items():
            counts[vm] = count
            size += 6 * len(vm) + _COUNT_ENTRY_BYTES
            if size >= MAX_FRAME:
                self.outbox.send_multipart(event_message(EventKind.PUBLISH, counts=counts, seq=self.seq))
                counts, size = {}, 0
        if counts:
            self.outbox.send_multipart(event_message(EventKind.PUBLISH, counts=counts, seq=self.seq))
        self.published = collections.Counter()

    def announce_health(self) -> None:
        outcome = "error" if self.failure else "ok"
        self.outbox.send_multipart(event_message(EventKind.JOURNAL, outcome=outcome, reason=self.failure, seq=self.seq))

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.checkpoint_now()
        self.syncer.shutdown()
        if self.logs is not None:
            self.logs.close()
        for sock in (self.outbox, self.router):
            sock.close(linger=0)
        self.context.term()


def main() -> None:
    runtime.setup_logging("journal")
    runtime.die_with_parent()
    journal = Journal(settings_from_env())
    runtime.stop_on_signals(journal.stop)
    try:
        journal.serve()
    finally:
        journal.close()
        logger.info("journal stopped", seq=journal.seq)


if __name__ == "__main__":
    main()
