"""The bridge role: guests' TCP side of the bus, and the single writer of ``bus.log``.

An asyncio server of ``GuestConnection``s (see ``session``) that commits what it
decodes: the publishes of one loop turn, from guests and from host tools (read
from ``run/journal.sock``, a ROUTER, PROTOCOL.md 8.2), are one group commit to
``bus.log`` (``buslog.BusLog``: seqs, one write, fdatasync with ``--fsync
batch``), and only then acked and delivered. No hop between decoding and the
log: the fdatasync is in the loop, and a turn's commit holds whatever that turn
decoded.

Each committed batch goes on into the proxy as ``log`` messages (its lines), for
the journal role to file in the per-VM logs; ``bus`` messages go only while a
host tool subscribes (the bus socket is an XPUB: it sees the subscriptions), and
events always. That socket drops at its high-water mark and never waits: a peer
that misses lines completes them from ``bus.log``.

The bridge's memory is bounded per guest by its session (see ``session``); a
commit holds at most what one loop turn read, and host tools' messages are
capped by ZMQ_MAXMSGSIZE and the ROUTER's queues, in bytes (``queue_bytes``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import resource
import signal
import socket
import time

import msgspec
import uvloop
import zmq
from loguru import logger

from . import runtime, topics
from .buslog import BusLog, Message, log_identity, read_checkpoint, read_seq_floor, write_seq_floor
from .config import Settings, settings_from_env
from .errors import LogWriteFailed
from .events import (
    EVENT_BYTES_MAX,
    EventKind,
    HandoverOutcome,
    SessionInfo,
    event_message,
    now_ms,
    split_sessions,
)
from .framing import encode_frame
from .handover import Handover, Handovers
from .handshake import HOST_SENDER, Hello, is_vm_name, sender_of
from .identity import DEFAULT_POLICY, FORBIDDEN_TOPIC, VM_TOPIC_PREFIX, load_identities
from .listener import listener_socket
from .origins import OriginMarks, rebuild
from .resume import Catchup, ReplayTurns
from .session import CLOSE_LINGER, GuestConnection, Phase, ReadPause
from .subscriptions import SubscriberIndex, topic_patterns
from .wire import (
    COMMIT_TIMEOUT,
    DUPLICATE,
    HANDOVER_VERB,
    MAX_FRAME,
    MAX_TOPIC,
    MESSAGE_TOO_LARGE,
    PAYLOAD_ALWAYS_FITS,
    SUBSCRIBE_ALL,
    CommitBatch,
    CommitResult,
    Delivery,
    HandoverRequest,
    MessageId,
    Origin,
    Publish,
    PublishRequest,
    compact_payload,
    decode_handover_request,
    decode_publish_requests,
    delivery_bytes,
    json_encode,
)

_MAX_CACHED_TOPICS = 4096
_SUBSCRIPTIONS_WAIT = 1.0  # seconds, at most, for the bus's subscriptions to reach a new bus socket
# A session sync lists every open session, to mend events the proxy dropped: past
# this many connections it comes every few health ticks (one more a thousand), so
# that what it costs the bridge and status a second stays flat (10,000 sessions:
# every 5.5 s instead of a sync of 10,000 every 0.5 s).
_SYNCED_SESSIONS_PER_TICK = 1000
_PUBLISH_EVENT_INTERVAL = 0.1  # seconds: status needs freshness, not an event per commit
_LINES_DELAY = 0.005  # seconds committed lines wait to go to the journal with later ones
# An entry of a publish event's counts: a VM name (at most 6 bytes a character in
# JSON), and at most this for its count and punctuation.
_COUNT_ENTRY_BYTES = 24
SLOW_CONSUMER = "slow_consumer"
STAR_IS_FOR_SUBSCRIBE = "topic * is only for subscribe"
TOO_MANY_SESSIONS = "too many sessions for this vm"  # hello past max_sessions_per_vm
NO_UPLINK = "no uplink: messages of other hosts are refused"  # an origin without --uplink
# Descriptors kept out of the connection cap: the bridge's own (about 25) and those
# of closing connections, which give their slot back before their socket goes.
FD_RESERVE = 64


class GuestPublish(msgspec.Struct, gc=False):
    """Whom a guest's publish of this turn's commit is acked to."""

    connection: GuestConnection
    topic: str
    message_id: MessageId


class HostPublish(msgspec.Struct, gc=False):
    """Whom a host tool's publish of this turn's commit is answered to; ``origin``:
    the message was committed on another host first (the uplink hands it in)."""

    peer: bytes  # its ROUTER identity
    corr: int
    origin: Origin | None = None


def had_before_moving(connection: GuestConnection, topic: str, origin: Origin) -> bool:
    """Whether a message of another host (``origin``) to ``connection``'s VM was
    committed on the host the VM moved here from before it left: that session got
    it there (``handover``), through ``vm:<vm>`` or a pattern. (Callers check
    ``origin`` first: it is None for every local message.)"""
    return (connection.moved_from is not None and topic == VM_TOPIC_PREFIX + connection.vm
            and connection.moved_from.had(origin))


class Bridge:
    def __init__(self, settings: Settings):
        self.settings = settings
        endpoints = settings.endpoints
        self.connections: dict[GuestConnection, str] = {}  # -> source address
        self.per_address: collections.Counter[str] = collections.Counter()
        self.identities = load_identities(settings.identities_file)
        self.policy = self.identities.policy if self.identities is not None else DEFAULT_POLICY
        # vm -> its open sessions, oldest first (a dict as an ordered set): processes
        # of one guest share its name, each with its own subscriptions.
        self.sessions: dict[str, dict[GuestConnection, None]] = {}
        self.subscribers: SubscriberIndex[GuestConnection] = SubscriberIndex()  # topics and patterns
        self.deliveries = 0  # messages delivered so far: numbers each one (see deliver)
        self.closing: set[GuestConnection] = set()  # slots given back, sockets not gone yet
        # Each connection is a descriptor: past the fd limit accept() fails, and the
        # guest is dropped without a word instead of getting "too many connections".
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_connections = min(settings.max_connections, max(1, self.fd_limit - FD_RESERVE))
        # The write-ahead log. After a rotation bus.log may be new and empty: seq
        # goes on from the higher of the floor written then and the journal's checkpoint.
        self.seq_floor_path = endpoints.bus_seq_floor
        self.log = BusLog(endpoints.bus_log, sync=settings.fsync == "batch",
                          seq_floor=max(read_seq_floor(self.seq_floor_path),
                                        read_checkpoint(endpoints.journal_checkpoint) or 0))
        self.failure: str | None = None  # why the last commit failed, until one succeeds
        try:
            self.log_id: str | None = log_identity(endpoints.log_identity, settings.fsync == "batch")
        except OSError as exc:  # bus-v2 guests are then not told: they keep their positions, as before
            self.log_id = None
            logger.bind(reason=exc.strerror).warning("log identity not written: bus-v2 guests are not told it")
        # With an uplink: the other hosts' last messages in bus.log (rebuilt in serve).
        self.origins: OriginMarks | None = None
        self.handovers = Handovers()  # VMs that moved here, for their next session (see handover)
        self.replays = ReplayTurns()  # the sessions' catch-ups, 1 ms a loop turn in all (see resume)
        self.started_ms = now_ms()  # in each health event: the uplink sees a restart by it
        self.log_publishes = runtime.logs_at(settings, "DEBUG")  # a line per publish: checked once
        # This loop turn's publishes, committed together at its end (see commit).
        self.messages: list[Message] = []
        self.waiting: list[GuestPublish | HostPublish] = []
        self.host_results: dict[bytes, list[CommitResult]] = collections.defaultdict(list)
        self.commit_scheduled = False
        # Committed lines not yet sent to the journal (see send_lines).
        self.unsent_lines: list[bytes] = []
        self.unsent_bytes = 0
        self.lines_flush: asyncio.TimerHandle | None = None
        self.host_bytes = 0  # of host tools' messages taken into it
        self.taken_bytes = 0  # of payloads taken into it
        self.published: collections.Counter[str] = collections.Counter()  # since the last event
        self.next_publish_event = 0.0
        self.dropped_answers = 0  # to host tools with a full queue, since the last health tick
        # Plain sockets read from loop callbacks (see watch_socket), not zmq.asyncio:
        # its Futures per send and receive were a fifth of the bridge's CPU.
        self.context = zmq.Context()
        # XPUB, not PUB: it shows the bus's subscriptions, so ``bus`` messages are
        # only built and sent while a host tool wants them. Drops at its high-water
        # mark (a stalled proxy): never waits.
        self.bus = self.context.socket(zmq.XPUB)
        self.bus.linger = 0
        self.bus.sndhwm = settings.hwm_for(settings.bus_frame_bytes_max)
        self.bus.connect(endpoints.publish)
        self.subscriptions: set[bytes] = set()  # the bus's, as the bus socket sees them
        self.subscriptions_unread = False  # a read of them is scheduled (see read_subscriptions_soon)
        self.host_wanted: dict[str, bool] = {}  # topic -> does a host tool subscribe to it
        # Host tools publish here (DEALER -> ROUTER) and get their results back on it.
        self.host = self.context.socket(zmq.ROUTER)
        self.host.linger = 0
        self.host.maxmsgsize = settings.batch_bytes_max
        self.host.sndhwm = settings.hwm_for(settings.host_reply_bytes_max)
        self.host.rcvhwm = settings.hwm_for(settings.batch_bytes_max)
        self.host.router_mandatory = True  # a tool gone or full is an error, not a silent drop
        runtime.bind_owner_only((self.host, endpoints.journal))
        self.server: asyncio.AbstractServer | None = None
        self.stopping = asyncio.Event()
        self.crash: BaseException | None = None  # what stopped a socket reader

    # -- guests: called by GuestConnection --------------------------------------------

    def admit(self, connection: GuestConnection, address: str) -> str | None:
        """A reason to refuse a new connection, or None (then it is counted)."""
        if len(self.connections) >= self.max_connections:
            return "too many connections"
        cap = self.settings.max_connections_per_address
        if cap and self.per_address[address] >= cap:
            return "too many connections from this address"
        self.connections[connection] = address
        self.per_address[address] += 1
        return None

    def release(self, connection: GuestConnection) -> bool:
        """Give a closed connection's slot back; False if it never had one. Its
        socket may linger a moment (see ``GuestConnection.finish``)."""
        address = self.connections.pop(connection, None)
        if address is None:
            return False
        self.per_address[address] -= 1
        if not self.per_address[address]:
            del self.per_address[address]
        self.closing.add(connection)
        return True

    def forget(self, connection: GuestConnection) -> None:
        """The connection's socket is gone."""
        self.closing.discard(connection)

    def check_identity(self, hello: Hello) -> None:
        """Raise ``HandshakeError`` when an identities file refuses ``hello``."""
        if self.identities is not None:
            self.identities.check(hello)

    def session_refusal(self, vm: str) -> str | None:
        """A reason to refuse ``vm`` one more bus session, or None. A new hello never
        closes the VM's other sessions: a stale one (a guest reset without a FIN)
        goes at its heartbeat timeout, so the cap must leave room for those."""
        open_sessions = self.sessions.get(vm)
        if open_sessions is not None and len(open_sessions) >= self.settings.max_sessions_per_vm:
            return TOO_MANY_SESSIONS
        return None

    def open_session(self, connection: GuestConnection, hello: Hello) -> None:
        open_sessions = self.sessions.setdefault(hello.vm, {})
        open_sessions[connection] = None
        self.emit(EventKind.HANDSHAKE, vm=hello.vm, outcome="session", capabilities=list(hello.capabilities),
                  bus_protocol=hello.bus_protocol)
        self.emit(EventKind.SESSION_OPEN, vm=hello.vm, session=connection.token, bus_protocol=hello.bus_protocol)
        connection.log.info("session open", vm_sessions=len(open_sessions))

    def close_session(self, connection: GuestConnection, reason: str) -> None:
        if connection.catchup is not None and connection.catchup.handover is not None:
            self.keep_unfinished(connection.catchup.handover)
        connection.catchup = None
        for topic in connection.topics:
            self.subscribers.discard(connection, topic)
        connection.topics.clear()
        open_sessions = self.sessions.get(connection.vm)
        if open_sessions is not None:
            open_sessions.pop(connection, None)
            if not open_sessions:
                del self.sessions[connection.vm]
        self.emit(EventKind.SESSION_CLOSE, vm=connection.vm, session=connection.token, reason=reason,
                  seq=self.log.seq)
        connection.log.bind(reason=reason, unlogged=connection.unlogged or None).info("session closed")

    def publish(self, connection: GuestConnection, frame: Publish, multiline: bool) -> str | None:
        """Take one publish into this turn's commit; returns a reason when it cannot be.
        ``multiline``: its frame has a raw line break (its UTF-8 was checked)."""
        if not self.policy.may_publish(connection.vm, frame.topic):
            connection.log_frame_event("INFO", "publish refused", reason=FORBIDDEN_TOPIC, topic=frame.topic)
            return FORBIDDEN_TOPIC
        if frame.topic == SUBSCRIBE_ALL:
            return STAR_IS_FOR_SUBSCRIBE
        payload = frame.payload
        if multiline:
            payload = msgspec.Raw(compact_payload(bytes(payload)))
        if self.too_large(connection.vm, frame.topic, payload):
            return MESSAGE_TOO_LARGE
        self.take(connection.vm, frame.topic, payload, GuestPublish(connection, frame.topic, frame.id))
        return None

    def too_large(self, vm: str, topic: str, payload: msgspec.Raw) -> bool:
        """Whether its delivery would be over ``MAX_FRAME``, under the seq it would get."""
        if len(payload) <= PAYLOAD_ALWAYS_FITS:
            return False
        seq = self.log.seq + len(self.messages) + 1
        return delivery_bytes(topic, sender_of(vm), len(payload), seq) > MAX_FRAME

    def take(self, vm: str, topic: str, payload: msgspec.Raw, waiting: GuestPublish | HostPublish) -> None:
        self.messages.append((vm, topic, payload))
        self.waiting.append(waiting)
        self.taken_bytes += len(payload)
        if self.taken_bytes >= self.settings.commit_bytes_max:
            self.commit()  # now: a turn of guests with full windows of large publishes would be tens of MB
        else:
            self.schedule_commit()

    def schedule_commit(self) -> None:
        """Commit at the end of this loop turn: what every ready guest and tool sent is one group."""
        if not self.commit_scheduled:
            self.commit_scheduled = True
            asyncio.get_running_loop().call_soon(self.commit)

    def subscribe(self, connection: GuestConnection, topic: str) -> None:
        self.subscribers.add(connection, topic)
        self.emit(EventKind.SUBSCRIBE, vm=connection.vm, session=connection.token, topics=sorted(connection.topics))
        if connection.own_topic_seq is None and topic_patterns([topic]).match(VM_TOPIC_PREFIX + connection.vm):
            connection.own_topic_seq = self.log.seq
            handover = self.handovers.take(connection.vm)
            if handover is not None:
                self.hand_over(connection, handover)

    def take_handover(self, body: bytes) -> None:
        """A ``HandoverRequest`` from the uplink (PROTOCOL.md 8.2.1): to the VM's
        sessions subscribed to its topic now, else kept for the first that
        subscribes (``handover``). No reply."""
        try:
            request = decode_handover_request(body)
        except msgspec.DecodeError as exc:
            logger.warning("dropped malformed handover", reason=str(exc))
            return
        if not is_vm_name(request.vm):
            logger.warning("dropped malformed handover", reason="invalid vm name")
            return
        handed = self.handovers.handed_state(request)
        if handed is not None:  # sent again by the uplink: it did not see the report yet
            logger.bind(vm=request.vm, reason="handed to a session already").info("handover not handed again",
                                                                                  claim=request.claim)
            if handed:
                self.emit_handover(request, HandoverOutcome.DELIVERED, reason="handed to a session already")
            return
        handover = Handover(request, time.monotonic())
        subscribed = [c for c in self.sessions.get(request.vm, ()) if c.own_topic_seq is not None]
        # A session gets one handover: another request while it is open is of the same
        # move (the uplink claimed the VM again from a release that carried the first
        # one on, say), and would send the same lines twice.
        fresh = [c for c in subscribed if c.moved_from is None]
        for connection in fresh:
            self.hand_over(connection, handover)
        if not subscribed:
            self.keep(request)
        elif not fresh:
            reason = "its session had a handover already"
            logger.bind(vm=request.vm, reason=reason).info("handover not handed again", claim=request.claim)
            self.emit_handover(request, HandoverOutcome.DELIVERED, reason=reason)

    def keep(self, request: HandoverRequest, reason: str | None = None) -> None:
        """Keep ``request`` for its VM's next session subscribed to its topic."""
        for dropped in self.handovers.add(request):
            self.drop_handover(dropped, "more than HANDOVERS_MAX pending")
        logger.bind(vm=request.vm, reason=reason).info("handover kept for the VM's next session",
                                                       after=request.after, claim=request.claim)
        self.emit_handover(request, HandoverOutcome.KEPT, reason=reason)

    def keep_unfinished(self, handover: Handover) -> None:
        """A session closed before all of ``handover`` was sent: the next takes it, from its start."""
        self.handovers.unhand(handover.request)
        self.keep(handover.request, reason="its session closed before all of it was sent")

    def hand_over(self, connection: GuestConnection, handover: Handover) -> None:
        """Deliver to ``connection`` what its VM was sent while it moved here, and
        from now on none of what it was sent before."""
        upto = connection.own_topic_seq
        connection.moved_from = handover
        self.handovers.handing(handover.request, done=False)
        connection.log.info("handover: messages sent while the VM moved", after=handover.request.after, upto=upto,
                            hosts=len(handover.request.marks), claim=handover.request.claim)
        if upto > handover.request.after:
            if connection.catchup is None:
                connection.catchup = Catchup(connection, self.log.seq)
            connection.catchup.add_handover(handover, upto)
        else:
            self.handover_sent(connection, handover)

    def handover_sent(self, connection: GuestConnection, handover: Handover) -> None:
        """All of ``handover`` is queued for ``connection`` (``Catchup``): the uplink may forget it."""
        self.handovers.handing(handover.request, done=True)
        connection.log.info("handover delivered", claim=handover.request.claim)
        self.emit_handover(handover.request, HandoverOutcome.DELIVERED, session=connection.token)

    def drop_handover(self, handover: Handover, reason: str) -> None:
        logger.bind(vm=handover.request.vm, reason=reason).info("handover dropped", claim=handover.request.claim)
        self.emit_handover(handover.request, HandoverOutcome.DROPPED, reason=reason)

    def emit_handover(self, request: HandoverRequest, outcome: HandoverOutcome, session: str | None = None,
                      reason: str | None = None) -> None:
        self.emit(EventKind.HANDOVER, vm=request.vm, session=session, reason=reason, outcome=outcome,
                  claim=request.claim)

    def unsubscribe(self, connection: GuestConnection, topic: str) -> None:
        self.subscribers.discard(connection, topic)
        self.emit(EventKind.UNSUBSCRIBE, vm=connection.vm, session=connection.token, topics=sorted(connection.topics))

    def emit(self, kind: EventKind, **fields) -> None:
        self.bus.send_multipart(event_message(kind, **fields))
        self.read_subscriptions_soon()

    # -- the commit -------------------------------------------------------------------

    def commit(self) -> None:
        """Group commit of this turn's publishes: ``bus.log`` (fdatasynced), then
        the acks and results, the deliveries to guests and host tools, and the
        lines to the journal. A commit that cannot be written gets each of its
        publishes the error as its result: nothing is acked that is not in the log."""
        self.commit_scheduled = False
        self.host_bytes = self.taken_bytes = 0
        messages, self.messages = self.messages, []
        waiting, self.waiting = self.waiting, []
        origins, moved = None, None
        if self.origins is not None and messages:
            messages, waiting, origins, moved = self.drop_duplicates(messages, waiting)
        if messages:
            ts_ms = time.time_ns() // 1_000_000
            try:
                batch = self.log.commit(ts_ms, messages, origins)
            except LogWriteFailed as exc:
                if exc.reason != self.failure:
                    logger.error("commit failed", reason=exc.reason, count=len(messages))
                self.failure = exc.reason
                for waiter in waiting:
                    self.answer(waiter, None, exc.reason)
            else:
                if self.failure is not None:
                    logger.info("commits recovered", seq=self.log.seq)
                    self.failure = None
                if moved:
                    self.origins.advance(moved)
                bus_sent = self.distribute(ts_ms, batch.first_seq, messages, waiting)
                bus_sent |= self.send_lines(batch.lines)
                if topics.COMMITTED in self.subscriptions:  # the uplink's: it uploads what is committed
                    self.bus.send_multipart([topics.COMMITTED, b"%d" % self.log.seq])
                    bus_sent = True
                if bus_sent:
                    self.read_subscriptions_soon()
        self.send_host_results()
        now = time.monotonic()
        if self.published and now >= self.next_publish_event:
            self.next_publish_event = now + _PUBLISH_EVENT_INTERVAL
            self.announce_publishes()

    def drop_duplicates(self, messages: list[Message], waiting: list[GuestPublish | HostPublish]):
        """This commit less the messages of other hosts that ``bus.log`` holds
        already (each answered ``DUPLICATE``): the messages, whom to answer, their
        origins (None: all local) and the marks they move once written."""
        origins = [waiter.origin if isinstance(waiter, HostPublish) else None for waiter in waiting]
        if not any(origins):
            return messages, waiting, None, None
        keep, moved = self.origins.select(origins)
        if all(keep):
            return messages, waiting, origins, moved
        dropped = [origin.message_id for origin, kept in zip(origins, keep) if not kept]
        logger.bind(reason=DUPLICATE).info("messages of other hosts already in bus.log: not committed again",
                                           count=len(dropped), first=dropped[0])
        for waiter, kept in zip(waiting, keep):
            if not kept:
                self.answer(waiter, None, DUPLICATE)
        return ([item for item, kept in zip(messages, keep) if kept], [item for item, kept in zip(waiting, keep) if kept],
                [item for item, kept in zip(origins, keep) if kept], moved)

    def distribute(self, ts_ms: int, first_seq: int, messages: list[Message],
                   waiting: list[GuestPublish | HostPublish]) -> bool:
        """Answer and deliver a committed batch; True if it sent on the bus."""
        send = self.bus.send_multipart
        sent = False
        for seq, (vm, topic, payload), waiter in zip(itertools.count(first_seq), messages, waiting):
            self.answer(waiter, seq, None)
            sender = sender_of(vm)
            if self.log_publishes:
                logger.debug("published", sender=sender, topic=topic, seq=seq)
            host_wants = self.host_wants(topic)
            if self.subscribers or host_wants:
                body = json_encode(Delivery(topic, sender, ts_ms, seq, payload))
                if self.subscribers:
                    self.deliver(topic, sender, encode_frame(body),
                                 waiter.origin if isinstance(waiter, HostPublish) else None)
                if host_wants:
                    send([topics.bus(topic), sender.encode(), body])
                    sent = True
            if not (isinstance(waiter, HostPublish) and waiter.origin is not None):
                self.published[vm] += 1  # status counts this host's VMs' publishes, not the fleet's
        return sent

    def answer(self, waiter: GuestPublish | HostPublish, seq: int | None, reason: str | None) -> None:
        if isinstance(waiter, GuestPublish):
            if waiter.connection.phase is Phase.BUS:  # else: gone meanwhile
                waiter.connection.handle_commit(waiter.topic, waiter.message_id, seq, reason)
        else:
            self.host_results[waiter.peer].append(CommitResult(corr=waiter.corr, seq=seq, reason=reason))

    def send_lines(self, lines: list[bytes]) -> bool:
        """Pass the committed lines on to the journal, for the per-VM logs: in
        messages of at most ``bus_frame_bytes_max`` (the proxy's limit), sent once
        one is full or ``_LINES_DELAY`` after its first line. A message per commit
        would wake the proxy and the journal once per commit, which cost them more
        CPU per ack than the commit itself. Dropped when the proxy's queue is full:
        the journal fills a gap in seqs from ``bus.log``. True if it sent."""
        limit = self.settings.bus_frame_bytes_max
        sent = False
        for line in lines:
            if self.unsent_bytes + len(line) > limit:
                sent |= self.flush_lines()
            self.unsent_lines.append(line)
            self.unsent_bytes += len(line)
        if self.unsent_lines and self.lines_flush is None:
            self.lines_flush = asyncio.get_running_loop().call_later(_LINES_DELAY, self.flush_lines_later)
        return sent

    def flush_lines(self) -> bool:
        """Send the unsent lines now; True if there were any."""
        if self.lines_flush is not None:
            self.lines_flush.cancel()
            self.lines_flush = None
        if not self.unsent_lines:
            return False
        self.bus.send_multipart([topics.LOG, b"".join(self.unsent_lines)])
        self.unsent_lines, self.unsent_bytes = [], 0
        return True

    def flush_lines_later(self) -> None:
        """``_LINES_DELAY`` after the first unsent line, outside any commit."""
        if self.flush_lines():
            self.read_subscriptions_soon()

    # -- host tools -------------------------------------------------------------------

    def read_host(self) -> None:
        """Take host tools' publishes into this turn's commit: at most ``batch_max``
        of them or ``commit_bytes_max`` bytes of messages a commit, the rest later."""
        count = 0
        while count < self.settings.batch_max and self.host_bytes < self.settings.commit_bytes_max:
            if not self.host.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            parts = self.host.recv_multipart(zmq.NOBLOCK)
            self.host_bytes += sum(map(len, parts))
            self.schedule_commit()  # which sends the results, and resets host_bytes
            if len(parts) == 4 and not parts[1] and parts[2] == HANDOVER_VERB:
                self.take_handover(parts[3])
                count += 1
                continue
            if len(parts) != 3 or parts[1]:
                logger.warning("dropped malformed host message", reason=f"{len(parts)} frames")
                count += 1
                continue
            # What is not a publish counts too: a flood of it cannot hold a commit back.
            count += max(1, self.take_host_batch(parts[0], parts[2]))
        asyncio.get_running_loop().call_soon(self.run_reader, self.read_host)  # more, after this commit

    def take_host_batch(self, peer: bytes, batch: bytes) -> int:
        """Admit the publishes of one batch frame: each joins the commit or has its
        refusal put in the results. Returns how many there were."""
        try:
            requests = decode_publish_requests(batch)
        except (msgspec.DecodeError, RecursionError) as exc:
            logger.warning("dropped malformed publish batch", reason=str(exc) or "nested too deeply")
            return 0
        if isinstance(requests, PublishRequest):
            requests = [requests]
        elif len(requests) > self.settings.batch_max:
            logger.warning("dropped malformed publish batch", reason=f"more than {self.settings.batch_max} publishes")
            return 0
        # msgspec keeps a Raw's strings unchecked and its whitespace as sent: a
        # payload must be UTF-8 and must not break its log line.
        check_utf8 = not batch.isascii()
        compact = b"\n" in batch or b"\r" in batch
        now = time.monotonic()
        for request in requests:
            reason = self.host_refusal(request, now, check_utf8, compact)
            if reason is None:
                self.take(request.vm, request.topic, request.payload, HostPublish(peer, request.corr, request.origin))
            else:
                self.host_results[peer].append(CommitResult(corr=request.corr, reason=reason))
                if self.log_publishes:
                    logger.bind(reason=reason).debug("publish refused", sender=sender_of(request.vm),
                                                     topic=request.topic)
        return len(requests)

    def host_refusal(self, request: PublishRequest, now: float, check_utf8: bool, compact: bool) -> str | None:
        """Why ``request`` may not be committed, or None (its payload made compact)."""
        if now > request.deadline:
            return COMMIT_TIMEOUT
        if not request.topic or len(request.topic) > MAX_TOPIC or "\0" in request.topic:
            return "invalid topic"
        if request.topic == SUBSCRIBE_ALL:
            return STAR_IS_FOR_SUBSCRIBE
        if request.vm != HOST_SENDER and not is_vm_name(request.vm):
            return "invalid vm name"
        if request.origin is not None and self.origins is None:
            return NO_UPLINK
        if check_utf8 or compact:
            try:
                payload = bytes(request.payload)
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return "payload is not valid JSON"
            request.payload = msgspec.Raw(compact_payload(payload))
        if self.too_large(request.vm, request.topic, request.payload):
            return MESSAGE_TOO_LARGE
        return None

    def send_host_results(self) -> None:
        """One reply per tool per commit; a tool gone or not reading loses it, never stalls us."""
        results, self.host_results = self.host_results, collections.defaultdict(list)
        for peer, batch in results.items():
            try:
                self.host.send_multipart([peer, b"", json_encode(CommitBatch(batch))], zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: what it lost times out at the tool
                self.dropped_answers += 1
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:  # gone: nobody to answer
                    raise
        if results and self.host.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # as for the bus socket
            asyncio.get_running_loop().call_soon(self.run_reader, self.read_host)

    # -- the bus socket ---------------------------------------------------------------

    def take_bus_subscriptions(self) -> None:
        """Read the bus's subscriptions before the first commit: a host tool
        subscribed before the bridge (re)started misses none of its messages.

        The proxy sends them all to the bus socket once it is connected, but nothing
        marks the last one. Two subscriptions of our own through the proxy do: the
        first shows that the socket is connected (it may come among the proxy's
        batch, if it got there first), the second, made after it, comes behind
        that batch. Without a proxy nothing is subscribed: this waits for
        ``_SUBSCRIPTIONS_WAIT`` and goes on. Closing the probe unsubscribes both.
        """
        probe = self.context.socket(zmq.SUB)
        probe.linger = 0
        probe.connect(self.settings.endpoints.subscribe)
        deadline = time.monotonic() + _SUBSCRIPTIONS_WAIT
        try:
            for number in (1, 2):
                # Starts with NUL: a prefix of no bus frame, and unique to this process.
                marker = b"\0bridge start\0%d\0%d" % (os.getpid(), number)
                probe.subscribe(marker)
                while marker not in self.subscriptions:
                    remaining_ms = (deadline - time.monotonic()) * 1000
                    if remaining_ms <= 0 or not self.bus.poll(max(1, int(remaining_ms))):
                        return
                    self.read_subscriptions()
        finally:
            probe.close()

    def read_subscriptions_soon(self) -> None:
        """After sends on the bus socket: a send can take the edge of its FD for a
        subscription notice that came meanwhile, so the notices are read at the end
        of this loop turn, once however many sends it made (ZMQ_EVENTS costs 5 us)."""
        if not self.subscriptions_unread:
            self.subscriptions_unread = True
            asyncio.get_running_loop().call_soon(self.run_reader, self.read_subscriptions)

    def read_subscriptions(self) -> None:
        """Follow the bus's subscriptions (unread, their notices would pile up)."""
        self.subscriptions_unread = False
        while self.bus.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            notice = self.bus.recv(zmq.NOBLOCK)
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

    def watch_socket(self, sock: zmq.Socket, read) -> None:
        """Call ``read`` when ``sock`` may have messages. Its FD is edge-triggered:
        ``read`` drains the socket (or reschedules itself) every time."""
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.getsockopt(zmq.FD), self.run_reader, read)
        loop.call_soon(self.run_reader, read)  # what came before we watched

    def run_reader(self, read) -> None:
        try:
            read()
        except Exception as exc:  # noqa: BLE001 - a dead reader would leave tools without answers
            self.crash = exc
            self.stopping.set()

    def deliver(self, topic: str, sender: str, frame: bytes, origin: Origin | None = None) -> None:
        """Push one committed message's guest frame to every session subscribed to its
        topic or to a pattern it matches (``*`` included), once per session however
        many of its subscriptions match, and never to the sender's sessions (none of
        them: a VM never hears its own publishes, whichever of its sessions sent it).

        An exact subscription was checked when it was made; a pattern gets a ``vm:``
        topic only if the session may read it. The sessions come as lists: a
        delivery can close a slow session, which then leaves the index's sets.
        A message of another host (``origin``) that a VM's session got before it
        moved here is not sent to it again (``handover``)."""
        self.deliveries += 1
        for connection in list(self.subscribers.exact_subscribers(topic)):
            if connection.sender != sender and connection.catchup is None and (
                    origin is None or not had_before_moving(connection, topic, origin)):
                connection.deliver(frame, self.deliveries)
        private = topic.startswith(VM_TOPIC_PREFIX)
        for sessions in self.subscribers.prefix_subscribers(topic):
            for connection in list(sessions):
                if (connection.sender != sender and connection.catchup is None
                        and (not private or (self.policy.may_read(connection.vm, topic) and (
                            origin is None or not had_before_moving(connection, topic, origin))))):
                    connection.deliver(frame, self.deliveries)

    # -- periodic work ----------------------------------------------------------------

    async def sweep(self) -> None:
        """Heartbeat timeouts, and on each health tick the log's health for
        status and rotation of ``bus.log``; the session sync on every tick, or
        every few with many guests (``_SYNCED_SESSIONS_PER_TICK``)."""
        tick = min(0.25, self.settings.health_interval)
        next_health = next_sync = 0.0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            limit = now - self.settings.heartbeat_timeout
            silent = [c for open_sessions in self.sessions.values() for c in open_sessions if c.last_frame < limit]
            for connection in silent:
                connection.log.bind(reason="heartbeat_timeout").info("session timed out")
                connection.close("heartbeat_timeout")
            if self.published and now >= self.next_publish_event:
                self.next_publish_event = now + _PUBLISH_EVENT_INTERVAL
                self.announce_publishes()
            if now >= next_health:
                next_health = now + self.settings.health_interval
                if now >= next_sync:
                    ticks = 1 + len(self.connections) // _SYNCED_SESSIONS_PER_TICK
                    next_sync = now + ticks * self.settings.health_interval
                    self.sync_sessions()
                self.follow_rotation()
                self.save_origins()
                self.expire_handovers()
                self.announce_health()
                self.report_dropped_answers()

    def follow_rotation(self) -> None:
        """Start a new ``bus.log`` where the old one was moved away (rotation by
        rename); lines go on into the renamed file only until this tick. The new
        file has no line to go on from: its seq floor is written first."""
        if self.log.follow_rotation():
            self.write_seq_floor()

    def expire_handovers(self) -> None:
        for handover in self.handovers.expire():
            self.drop_handover(handover, "no session subscribed in time")

    def save_origins(self) -> None:
        """The other hosts' marks, so that a restart reads only the log after them."""
        if self.origins is not None:
            try:
                self.origins.save(self.settings.endpoints.origins_checkpoint, self.log.seq, self.log.sync)
            except OSError as exc:
                logger.warning("origins checkpoint not written", reason=exc.strerror)

    def load_origins(self) -> None:
        """With an uplink: the other hosts' last messages in bus.log, from the
        checkpoint and the lines after it (``origins.rebuild``)."""
        started = time.monotonic()
        endpoints = self.settings.endpoints
        self.origins, read = rebuild(endpoints.origins_checkpoint, endpoints.logs_dir, self.log.seq)
        logger.info("origins of remote messages rebuilt", hosts=len(self.origins.marks), lines_read=read,
                    seconds=round(time.monotonic() - started, 3))

    def write_seq_floor(self) -> None:
        try:
            write_seq_floor(self.seq_floor_path, self.log.seq, self.log.sync)
        except OSError as exc:
            logger.warning("seq floor not written", reason=exc.strerror)

    def sync_sessions(self) -> None:
        """Tell status every open session, in parts of at most ``EVENT_BYTES_MAX``:
        20,000 sessions with 16 long topics each would be hundreds of MB in one, and
        the proxy drops a publisher that sends a frame over its limit."""
        parts = split_sessions([
            SessionInfo(c.vm, c.token, c.bus_protocol, sorted(c.topics), c.last_heartbeat_ms)
            for open_sessions in self.sessions.values() for c in open_sessions
        ], EVENT_BYTES_MAX)
        sync_round = now_ms()
        for part in parts:
            self.emit(EventKind.SESSIONS, sessions=part, sync_round=sync_round, sync_parts=len(parts))

    def announce_publishes(self) -> None:
        """``publish`` events for the counts since the last ones, split so that each
        is under ``BUS_MESSAGE_MAX`` (the bus socket's queue is budgeted by it)."""
        counts: dict[str, int] = {}
        size = 0
        for vm, count in self.published.items():
            counts[vm] = count
            size += 6 * len(vm) + _COUNT_ENTRY_BYTES
            if size >= MAX_FRAME:
                self.emit(EventKind.PUBLISH, counts=counts, seq=self.log.seq)
                counts, size = {}, 0
        if counts:
            self.emit(EventKind.PUBLISH, counts=counts, seq=self.log.seq)
        self.published = collections.Counter()

    def announce_health(self) -> None:
        """The log's health; its seq also shows the journal lines it may have missed
        (so the lines up to it go first)."""
        self.flush_lines()
        self.emit(EventKind.JOURNAL, outcome="error" if self.failure else "ok", reason=self.failure, seq=self.log.seq,
                  started_ms=self.started_ms)

    def report_dropped_answers(self) -> None:
        """One line per health tick, not one per answer, for host tools not reading."""
        if self.dropped_answers:
            logger.bind(reason=SLOW_CONSUMER).warning("answers dropped: their tools' queues are full",
                                                      count=self.dropped_answers)
            self.dropped_answers = 0

    # -- life cycle -------------------------------------------------------------------

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.log.open()
        except LogWriteFailed as exc:  # the first commit that can write opens it
            self.failure = exc.reason
            logger.error("log not writable yet", reason=self.failure)
        if self.settings.uplink_servers is not None:
            self.load_origins()
        self.take_bus_subscriptions()
        self.server = await loop.create_server(lambda: GuestConnection(self), sock=listener, backlog=1024)
        self.watch_socket(self.bus, self.read_subscriptions)
        self.watch_socket(self.host, self.read_host)
        sweep = asyncio.create_task(self.sweep())
        host, port = listener.getsockname()[:2]
        if self.max_connections < self.settings.max_connections:
            logger.bind(reason="fd limit").warning("connection cap lowered to fit the fd limit",
                                                   max_connections=self.max_connections, fd_limit=self.fd_limit)
        logger.info("bridge ready", listen=f"{host}:{port}", seq=self.log.seq, log=str(self.log.path),
                    max_connections=self.max_connections, fd_limit=self.fd_limit)
        runtime.notify_ready()
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([stop, sweep], return_when=asyncio.FIRST_COMPLETED)
        if sweep.done():
            self.crash = sweep.exception()
        if self.crash is not None:
            # Guests would be left without acks: exit and be restarted.
            stop.cancel()
            raise RuntimeError("bridge loop ended") from self.crash
        await self.shut_down()
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)
        for sock in (self.bus, self.host):
            loop.remove_reader(sock.getsockopt(zmq.FD))
            sock.close(linger=0)
        self.context.term()
        self.log.close()
        # Where seq goes on from, should bus.log be moved away while the router is down.
        self.write_seq_floor()
        self.save_origins()

    async def shut_down(self) -> None:
        """Stop reading guests and tools, commit and answer what they had sent, then
        close them all: each connection gets its last frames and a FIN (see
        ``GuestConnection.finish``) before the process exits."""
        self.server.close()
        asyncio.get_running_loop().remove_reader(self.host.getsockopt(zmq.FD))
        for connection in list(self.connections):
            connection.pause(ReadPause.SHUTDOWN)
        logger.bind(reason="shutdown").info("stopping: guests are not read", pending=len(self.messages))
        self.commit()
        self.flush_lines()
        for connection in list(self.connections):
            connection.close("shutdown")
        deadline = time.monotonic() + CLOSE_LINGER + 0.5
        while self.closing and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


async def run(settings: Settings) -> None:
    bridge = Bridge(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, bridge.stopping.set)
    await bridge.serve(listener_socket(settings))


def raise_fd_limit() -> None:
    """Each guest session is a file descriptor: take the hard limit, not 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    runtime.setup_logging("bridge")
    runtime.die_with_parent()
    raise_fd_limit()
    # uvloop: transports in C take about 40 % off the bridge's CPU per message.
    uvloop.run(run(settings_from_env()))
    logger.info("bridge stopped")
    runtime.skip_final_collection()


if __name__ == "__main__":
    main()
