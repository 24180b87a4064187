"""The journal role: single writer of ``logs/bus/*.log``.

Publishes reach it on its ROUTER socket, ``run/journal.sock``, from bridges and
host tools alike. It admits them, commits whatever arrived as one group, and
only then answers and delivers; the files are the storage engine's
(``buslog``): ``BusLog.commit`` gives each message its ``seq``, appends its line
to ``bus.log`` and fdatasyncs it (per the ``fsync`` setting), then
``VmLogs.append`` files the same lines in the sender's log and, for
``vm:<target>`` topics, the target's. A commit that cannot be written is cut
back off every file and each publish in it gets an error result: nothing is
half-written, nothing is acked that is not in the log. On its health tick the
journal follows rotation and checkpoints the per-VM logs; at start it has them
completed from ``bus.log`` after a crash.

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
notice, or a publish through a bridge: ``KnownVms``), when the identities file
lists it, or when its log is already there; and only while there are fewer than
``vm_logs_max``. Other messages still go to ``bus.log`` and any log their
sender or target has.

Host tools subscribe on the bus instead (``bus`` topics through the proxy); those
messages are sent only while someone subscribes to them.
"""

from __future__ import annotations

import collections
import os
import time

import msgspec
import zmq
from loguru import logger

from . import runtime, topics
from .buslog import BusLog, KnownVms, LogBatch, Message, VmLogs, target_of
from .config import Settings, settings_from_env
from .errors import ConfigError, LogWriteFailed
from .events import EventKind, event_message
from .framing import encode_frame
from .handshake import HOST_SENDER
from .identity import load_identities
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
    PublishRequest,
    compact_payload,
    decode_publish_requests,
    delivery_bytes,
    json_encode,
)

_MAX_CACHED_TOPICS = 4096
_SUBSCRIPTIONS_WAIT = 1.0  # seconds, at most, for the bus's subscriptions to reach a new outbox
_PUBLISH_EVENT_INTERVAL = 0.1  # seconds: status needs freshness, not an event per commit
# An entry of a publish event's counts: a VM name (at most 6 bytes a character in
# JSON), and at most this for its count and punctuation.
_COUNT_ENTRY_BYTES = 24
_MAX_DETACHED = 64  # detached bridges remembered, to attach again when they publish
SLOW_CONSUMER = "slow_consumer"
_FRAME_PREFIX = 4  # the length before each guest frame


class Pending(msgspec.Struct):
    """One publish of the batch being committed."""

    peer: bytes  # the identity its result goes back to
    request: PublishRequest


def listed_vms(identities_file: str | None) -> frozenset[str]:
    """The VM names of the identities file (none without one)."""
    try:
        identities = load_identities(identities_file)
    except ConfigError as exc:  # the bridge refuses to start on it; the logs need not
        logger.bind(reason=exc.reason).warning("identities file not read: its VMs get a log once they connect")
        return frozenset()
    return frozenset(identities.tokens) if identities is not None else frozenset()


def sender_of(vm: str) -> str:
    """A message's sender as the bus shows it: ``vm:<name>``, or ``host``."""
    return HOST_SENDER if vm == HOST_SENDER else "vm:" + vm


class Journal:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoints = settings.endpoints
        sync = settings.fsync == "batch"
        self.known = KnownVms(listed_vms(settings.identities_file), settings.vm_logs_max)
        # A commit holds fewer than 2 * batch_max messages: with no checkpoint, a
        # process crash left at most that many lines of bus.log out of the per-VM logs.
        self.vm_logs = VmLogs(self.endpoints.bus_log, self.endpoints.journal_checkpoint, sync=sync,
                              known=self.known, vm_logs_max=settings.vm_logs_max, lag_max=2 * settings.batch_max)
        # The checkpoint too: after a rotation, bus.log may be new and empty.
        self.bus = BusLog(self.endpoints.bus_log, sync=sync, seq_floor=self.vm_logs.synced_seq)
        self.failure: str | None = None  # why the last commit failed, until one succeeds
        self.log_publishes = runtime.logs_at(settings, "DEBUG")  # a line per publish: checked once
        self.context = zmq.Context()
        # XPUB, not PUB: it shows the bus's subscriptions, so ``bus`` messages are
        # only built and sent while a host tool wants them.
        self.outbox = self.context.socket(zmq.XPUB)
        self.outbox.linger = 0
        self.outbox.sndhwm = settings.hwm_for(BUS_MESSAGE_MAX)  # a stopped proxy: drops past it
        self.outbox.connect(self.endpoints.publish)
        self.subscriptions: set[bytes] = set()  # the bus's, as the outbox sees them
        self.host_wanted: dict[str, bool] = {}  # topic -> does a host tool subscribe to it
        self.take_bus_subscriptions()
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
        previous = os.umask(0o077)
        try:
            self.router.bind(self.endpoints.journal)
        finally:
            os.umask(previous)
        self.running = True

    @property
    def seq(self) -> int:
        """The seq of the last message committed."""
        return self.bus.seq

    def open_logs(self) -> None:
        """Cut torn last lines and complete the per-VM logs from ``bus.log``, before
        anything else. Raises ``LogWriteFailed`` (then the first commit that can
        write does it)."""
        self.bus.open()
        self.vm_logs.rebuild()

    def follow_rotation(self) -> None:
        """Start new logs where the old ones were moved away (rotation by rename):
        lines go on into a renamed file only until the next health tick."""
        self.vm_logs.follow_rotation()
        if self.bus.follow_rotation():
            self.vm_logs.checkpoint_now()  # the seq to go on from: the new bus.log has none yet

    def serve(self, stop_signals: int) -> None:
        """Commit until ``stop``. ``stop_signals`` turns readable when a stop signal
        arrives (see ``runtime.stop_on_signals``): polled too, it wakes the loop."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        poller.register(stop_signals, zmq.POLLIN)
        interval_ms = int(self.settings.health_interval * 1000)
        next_health = 0.0
        try:
            self.open_logs()
        except LogWriteFailed as exc:
            self.failure = exc.reason
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
                self.vm_logs.checkpoint()

    def take_bus_subscriptions(self) -> None:
        """Read the bus's subscriptions before the first commit: a host tool
        subscribed before the journal (re)started misses none of its messages.

        The proxy sends them all to the outbox once it is connected, but nothing
        marks the last one. Two subscriptions of our own through the proxy do: the
        first shows that the outbox is connected (it may come among the proxy's
        batch, if it got there first), the second, made after it, comes behind
        that batch. Without a proxy nothing is subscribed: this waits for
        ``_SUBSCRIPTIONS_WAIT`` and goes on. Closing the probe unsubscribes both.
        """
        probe = self.context.socket(zmq.SUB)
        probe.linger = 0
        probe.connect(self.endpoints.subscribe)
        deadline = time.monotonic() + _SUBSCRIPTIONS_WAIT
        try:
            for number in (1, 2):
                # Starts with NUL: a prefix of no bus frame, and unique to this process.
                marker = b"\0journal start\0%d\0%d" % (os.getpid(), number)
                probe.subscribe(marker)
                while marker not in self.subscriptions:
                    remaining_ms = (deadline - time.monotonic()) * 1000
                    if remaining_ms <= 0 or not self.outbox.poll(max(1, int(remaining_ms))):
                        return
                    self.read_subscriptions()
        finally:
            probe.close()

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
            if self.log_publishes:
                logger.bind(reason=reason).debug("publish refused", sender=sender_of(request.vm),
                                                 topic=request.topic)
            return 0
        accepted.append(Pending(peer=peer, request=request))
        return _FRAME_PREFIX + body

    def write(self, accepted: list[Pending], results) -> tuple[list[Committed], bytes]:
        """Commit ``accepted`` and put each one's result in ``results``. Returns what
        bridges get: the index of what was written, and its guest frames end to end."""
        ts_ms = time.time_ns() // 1_000_000
        messages = [(pending.request.vm, pending.request.topic, pending.request.payload) for pending in accepted]
        try:
            batch = self.write_logs(ts_ms, messages)
        except LogWriteFailed as exc:
            if exc.reason != self.failure:
                logger.error("commit failed", reason=exc.reason, count=len(accepted))
            self.failure = exc.reason
            for pending in accepted:
                results[pending.peer].append(CommitResult(corr=pending.request.corr, reason=exc.reason))
            return [], b""
        if self.failure is not None:
            logger.info("commits recovered", seq=self.seq)
            self.failure = None
        send = self.outbox.send_multipart
        committed = []
        frames = bytearray()
        for seq, pending in enumerate(accepted, batch.first_seq):
            request = pending.request
            results[pending.peer].append(CommitResult(corr=request.corr, seq=seq))
            sender = sender_of(request.vm)
            if self.log_publishes:
                logger.debug("published", sender=sender, topic=request.topic, seq=seq)
            body = json_encode(Delivery(request.topic, sender, ts_ms, seq, request.payload))
            frames += encode_frame(body)
            committed.append(Committed(request.topic, sender, len(frames)))
            if self.host_wants(request.topic):
                send([topics.bus(request.topic), sender.encode(), body])
            self.published[request.vm] += 1
        return committed, bytes(frames)

    def write_logs(self, ts_ms: int, messages: list[Message]) -> LogBatch:
        """``bus.log`` (fdatasynced), then the same lines in the per-VM logs; if
        those fail, ``bus.log`` is cut back too: nothing is half-written.
        Raises ``LogWriteFailed``."""
        batch = self.bus.commit(ts_ms, messages)
        try:
            self.vm_logs.append(batch.first_seq, messages, batch.lines)
        except LogWriteFailed:
            self.bus.retract(batch)
            raise
        return batch

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
        self.vm_logs.close()
        self.bus.close()
        for sock in (self.outbox, self.router):
            sock.close(linger=0)
        self.context.term()


def main() -> None:
    runtime.setup_logging("journal")
    runtime.die_with_parent()
    runtime.wait_for_turn()
    journal = Journal(settings_from_env())
    stop_signals = runtime.stop_on_signals(journal.stop)
    try:
        journal.serve(stop_signals)
    finally:
        journal.close()
        logger.info("journal stopped", seq=journal.seq)
    runtime.skip_final_collection()


if __name__ == "__main__":
    main()
