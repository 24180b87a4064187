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
| ``"", batch``                | in        | publishes: one PublishRequest or an array      |
| ``"", "attach"``             | in        | a bridge asks for every commit                 |
| ``"", CommitBatch``          | out       | the results of a host tool's publishes         |
| ``"", CommitBatch, frames``  | out       | to each attached bridge, once per commit: its  |
|                              |           | results, the index of every committed message, |
|                              |           | and their guest frames end to end              |

One frame per batch, not one per message: in pyzmq each frame costs a Python
call or two on each side, more than the bytes it carries.

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
from .errors import CastraError
from .events import EventKind, event_message
from .framing import encode_frame
from .handshake import HOST_SENDER, validate_vm_name
from .logfiles import AppendFile, last_lines, log_file_name, newest_lines
from .wire import (
    ATTACH,
    MAX_TOPIC,
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
    json_encode,
)

_MAX_OPEN_FILES = 256
_MAX_CACHED_TOPICS = 4096
_SUBSCRIPTIONS_WAIT_MS = 1000  # for the bus's subscriptions to reach a new outbox
_PUBLISH_EVENT_INTERVAL = 0.1  # seconds: status needs freshness, not an event per commit


class Pending(msgspec.Struct):
    """One publish of the batch being committed."""

    peer: bytes  # the identity its result goes back to
    request: PublishRequest
    seq: int = 0


class LogSet:
    """``bus.log`` plus per-VM logs, with a bounded set of open files.

    Only ``bus.log`` is fsynced with each commit: it is the record of truth, and
    one fsync per batch instead of one per file touched is what keeps group commit
    cheap. The per-VM logs are derived from it; they are fsynced by ``sync_vm_logs``
    (about once a second) and, after an OS crash, rebuilt from ``bus.log`` past the
    checkpoint (see ``Journal.reconcile``).
    """

    def __init__(self, endpoints: Endpoints, sync: bool):
        self.dir = endpoints.logs_dir
        self.sync = sync
        self.bus = AppendFile(endpoints.bus_log)
        self._vm_files: collections.OrderedDict[str, AppendFile] = collections.OrderedDict()
        self._unsynced: set[AppendFile] = set()

    def vm_file(self, vm: str) -> AppendFile:
        handle = self._vm_files.get(vm)
        if handle is None:
            if len(self._vm_files) >= _MAX_OPEN_FILES:
                self._close(self._vm_files.popitem(last=False)[1])
            handle = self._vm_files[vm] = AppendFile(self.dir / log_file_name(vm))
        else:
            self._vm_files.move_to_end(vm)
        return handle

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
        return msgspec.json.decode(path.read_bytes(), type=Checkpoint).vm_logs_synced_seq
    except (OSError, msgspec.DecodeError):
        return None


def write_checkpoint(path: Path, seq: int, sync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json_encode(Checkpoint(seq)))
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
        self.outbox.sndhwm = settings.hwm
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
        self.router.sndhwm = settings.hwm
        self.router.rcvhwm = settings.hwm
        self.router.router_mandatory = True  # a peer gone is an error, not a silent drop
        self.bridges: set[bytes] = set()  # identities of attached bridges
        previous = os.umask(0o077)
        try:
            self.router.bind(self.endpoints.journal)
        finally:
            os.umask(previous)
        self.running = True

    def open_logs(self) -> LogSet:
        if self.logs is None:
            self.endpoints.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.logs = LogSet(self.endpoints, sync=self.settings.fsync == "batch")
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
                self.outbox.send_multipart(event_message(EventKind.PUBLISH, counts=self.published, seq=self.seq))
                self.published = collections.Counter()
            if now >= next_health:
                next_health = now + self.settings.health_interval
                self.announce_health()
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
        """Group commit: take what arrived, up to about ``batch_max`` publishes,
        write it, then answer and deliver what was written.

        A message is never split, and a bridge puts at most ``batch_max`` publishes
        in one, so a commit of bridges' publishes holds fewer than ``2 * batch_max``.
        """
        results: dict[bytes, list[CommitResult]] = collections.defaultdict(list)
        accepted: list[Pending] = []
        now = time.monotonic()
        count = 0
        while count < self.settings.batch_max:
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
            else:
                count += max(1, self.admit_all(parts[2], parts[0], now, results, accepted))
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
            self.bridges.add(identity)
            logger.info("bridge attached", bridges=len(self.bridges))

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        """Send to one peer; a peer gone or stuck loses the message, never stalls us."""
        try:
            self.router.send_multipart([identity, b"", *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # Results lost this way time out at the peer with an error ack.
            if exc.errno != zmq.EHOSTUNREACH:
                logger.warning("answer dropped: its peer's queue is full", reason=exc.strerror)
            elif identity in self.bridges:
                self.bridges.discard(identity)
                logger.warning("bridge detached", reason=exc.strerror)

    def admit_all(self, batch: bytes, peer: bytes, now: float, results, accepted) -> int:
        """Check the publishes of one batch frame: each joins ``accepted`` or has its
        refusal put in ``results``. Returns how many there were."""
        try:
            requests = decode_publish_requests(batch)
        except (msgspec.DecodeError, RecursionError) as exc:
            logger.warning("dropped malformed publish batch", reason=str(exc) or "nested too deeply")
            return 0
        if isinstance(requests, PublishRequest):
            requests = [requests]
        # msgspec keeps a Raw's strings unchecked and its whitespace as sent: a
        # payload must be UTF-8 and must not break its log line.
        check_utf8 = not batch.isascii()
        compact = b"\n" in batch or b"\r" in batch
        for request in requests:
            self.admit(request, peer, now, results, accepted, check_utf8, compact)
        return len(requests)

    def admit(self, request: PublishRequest, peer: bytes, now: float, results, accepted,
              check_utf8: bool, compact: bool) -> None:
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
        if reason is not None:
            results[peer].append(CommitResult(corr=request.corr, reason=reason))
        else:
            accepted.append(Pending(peer=peer, request=request))

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
                    lines[logs.vm_file(vm)] += line + b"\n"
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
            sender = HOST_SENDER if request.vm == HOST_SENDER else "vm:" + request.vm
            body = json_encode(Delivery(request.topic, sender, ts_ms, pending.seq, request.payload))
            frames += encode_frame(body)
            committed.append(Committed(request.topic, sender, len(frames)))
            if self.host_wants(request.topic):
                send([topics.bus(request.topic), sender.encode(), body])
            self.published[request.vm] += 1
        return committed, bytes(frames)

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
