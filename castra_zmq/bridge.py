"""The bridge role: guests' TCP side of the bus.

An asyncio server of ``GuestConnection``s (see ``session``) plus the bridge's
ZeroMQ sockets: a DEALER to the journal socket, which takes the publishes of each
loop turn as one message and answers once per commit with this bridge's results
and every committed message, and a PUB into the proxy for events. Each publish is
answered only when its result comes back; one the journal does not answer within
``commit_timeout`` gets an error ack.

The bridge's own memory is bounded: per guest by its session (see ``session``), and
toward the journal by a budget of bytes taken from guests and not answered yet
(``backlog_budget``): past it no guest is read until the journal catches up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import resource
import signal
import socket
import time

import msgspec
import uvloop
import zmq
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

from . import runtime
from .config import Settings, settings_from_env
from .events import EVENT_BYTES_MAX, EventKind, SessionInfo, event_message, now_ms, split_sessions
from .handshake import Hello
from .identity import DEFAULT_POLICY, FORBIDDEN_TOPIC, VM_TOPIC_PREFIX, load_identities
from .listener import listener_socket
from .session import CLOSE_LINGER, THROTTLE_NOTICE_S, GuestConnection, ReadPause
from .subscriptions import SubscriberIndex
from .wire import (
    ATTACH,
    PUBLISH_REQUEST_MAX,
    Committed,
    MessageId,
    Publish,
    PublishRequest,
    decode_commit_batch,
    encode_connected,
    json_encode,
    publish_request_bytes,
)

_SHUTDOWN_GRACE = 2.0  # seconds for the journal to answer what guests sent, when stopping
_BATCHES_IN_FLIGHT = 4  # a batch that is not full waits while this many are unanswered
_DRAIN_MAX = 4096  # bus messages handled per wake-up before yielding to guests
_COMMIT_GRACE = 0.5  # seconds past its deadline before the bridge times a publish out
TOO_MANY_SESSIONS = "too many sessions for this vm"  # hello past max_sessions_per_vm
# Descriptors kept out of the connection cap: the bridge's own (about 25) and those
# of closing connections, which give their slot back before their socket goes.
FD_RESERVE = 64


class PendingPublish(msgspec.Struct):
    connection: GuestConnection
    topic: str
    message_id: MessageId
    deadline: float


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
        self.pending: dict[int, PendingPublish] = {}  # in commit order, so deadlines too
        self.corr = itertools.count(1)
        self.requests: list[PublishRequest] = []  # not sent yet, to go as one batch
        self.request_bytes = 0  # at least their encoded size: a batch stays under batch_bytes_max
        self.send_scheduled = False
        # Batches the journal has not answered yet, oldest first: the last corr of
        # each and its bytes. Publishes timed out meanwhile still count: they are
        # still queued toward the journal.
        self.unanswered: collections.deque[tuple[int, int]] = collections.deque()
        self.unanswered_bytes = 0
        # Past this many bytes of publishes taken and not answered (sent or not), no
        # guest is read until half of it is answered: a stalled journal cannot make
        # the bridge grow, nor fill the journal's queue for it (queue_bytes).
        self.backlog_budget = settings.queue_bytes // 4
        self.journal_backlog_full = False
        self.backlog_noticed = float("-inf")  # when a full backlog was last logged
        self.held: set[GuestConnection] = set()  # sessions not read while it is full
        self.closing: set[GuestConnection] = set()  # slots given back, sockets not gone yet
        self.journal_attached = False  # connected to the journal socket (see watch_journal)
        # Each connection is a descriptor: past the fd limit accept() fails, and the
        # guest is dropped without a word instead of getting "too many connections".
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_connections = min(settings.max_connections, max(1, self.fd_limit - FD_RESERVE))
        # Plain sockets read from loop callbacks (see watch_socket), not zmq.asyncio:
        # its Futures per send and receive were a fifth of the bridge's CPU.
        self.context = zmq.Context()
        self.journal = self.context.socket(zmq.DEALER)
        # In batches of at most batch_bytes_max: ZeroMQ holds at most queue_bytes
        # toward the journal, whatever the backlog budget lets through.
        self.journal.sndhwm = settings.hwm_for(settings.batch_bytes_max)
        self.journal.rcvhwm = settings.hwm
        self.journal_monitor = self.journal.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.journal.connect(endpoints.journal)
        self.events = self.context.socket(zmq.PUB)  # drops at its HWM: never waits
        # A guest's subscribe storm while the proxy stalls grows this queue: in bytes.
        self.events.sndhwm = settings.hwm_for(EVENT_BYTES_MAX)
        self.events.connect(endpoints.publish)
        for sock in (self.journal, self.events):
            sock.linger = 0
        self.server: asyncio.AbstractServer | None = None
        self.stopping = asyncio.Event()
        self.failure: BaseException | None = None  # what stopped a socket reader

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
        self.held.discard(connection)
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
        self.announce_connected(hello.vm)
        connection.log.info("session open", vm_sessions=len(open_sessions))

    def announce_connected(self, vm: str) -> None:
        """Tell the journal ``vm`` connected: messages to it may get a per-VM log."""
        with contextlib.suppress(zmq.Again):  # journal down or stuck: its next hello tells it
            self.send_to_journal(encode_connected(vm))

    def close_session(self, connection: GuestConnection, reason: str) -> None:
        for topic in connection.topics:
            self.subscribers.discard(connection, topic)
        connection.topics.clear()
        open_sessions = self.sessions.get(connection.vm)
        if open_sessions is not None:
            open_sessions.pop(connection, None)
            if not open_sessions:
                del self.sessions[connection.vm]
        self.emit(EventKind.SESSION_CLOSE, vm=connection.vm, session=connection.token, reason=reason)
        connection.log.bind(reason=reason, unlogged=connection.unlogged or None).info("session closed")

    def publish(self, connection: GuestConnection, frame: Publish) -> str | None:
        """Forward one publish to the journal; returns a reason when it cannot be."""
        if not self.policy.may_publish(connection.vm, frame.topic):
            connection.log_frame_event("INFO", "publish refused", reason=FORBIDDEN_TOPIC, topic=frame.topic)
            return FORBIDDEN_TOPIC
        if not self.journal_attached:
            return "journal_unavailable"
        corr = next(self.corr)
        deadline = time.monotonic() + self.settings.commit_timeout
        self.pending[corr] = PendingPublish(connection, frame.topic, frame.id, deadline)
        self.requests.append(PublishRequest(corr, connection.vm, frame.topic, deadline, frame.payload))
        self.request_bytes += publish_request_bytes(connection.vm, frame.topic, frame.payload)
        if self.batch_full():
            self.send_publishes()
        elif not self.send_scheduled:
            self.send_scheduled = True
            asyncio.get_running_loop().call_soon(self.send_publishes)
        self.update_backlog()
        return None

    def send_publishes(self) -> None:
        """Send what accumulated as one batch, unless ``_BATCHES_IN_FLIGHT`` are
        unanswered and it is not full: then it waits for an answer (and grows), as
        publishes would wait in the journal's queue anyway, and the bus carries
        fewer messages. A full batch goes at once: the backlog budget bounds those."""
        self.send_scheduled = False
        if not self.requests:
            return
        if len(self.unanswered) >= _BATCHES_IN_FLIGHT and not self.batch_full():
            return
        requests, self.requests = self.requests, []
        size, self.request_bytes = self.request_bytes, 0
        try:
            self.send_to_journal(json_encode(requests))
        except zmq.Again:  # its queue is full: the journal is stuck
            for request in requests:
                self.answer(request.corr, None, "journal_unavailable")
            self.update_backlog()
            return
        self.unanswered.append((requests[-1].corr, size))
        self.unanswered_bytes += size

    def batch_full(self) -> bool:
        """Whether the next publish might not fit in the batch: ``batch_max`` of them,
        or too close to ``batch_bytes_max`` (the journal's limit) for the largest one."""
        return (len(self.requests) >= self.settings.batch_max
                or self.request_bytes > self.settings.batch_bytes_max - PUBLISH_REQUEST_MAX)

    def send_to_journal(self, frame: bytes) -> None:
        self.journal.send_multipart([b"", frame], zmq.NOBLOCK)
        # A send can take the edge of the socket's FD for a message that arrived
        # meanwhile: look, or that message would wait for the next one.
        if self.journal.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            asyncio.get_running_loop().call_soon(self.run_reader, self.read_journal)

    def subscribe(self, connection: GuestConnection, topic: str) -> None:
        self.subscribers.add(connection, topic)
        self.emit(EventKind.SUBSCRIBE, vm=connection.vm, session=connection.token, topics=sorted(connection.topics))

    def unsubscribe(self, connection: GuestConnection, topic: str) -> None:
        self.subscribers.discard(connection, topic)
        self.emit(EventKind.UNSUBSCRIBE, vm=connection.vm, session=connection.token, topics=sorted(connection.topics))

    def emit(self, kind: EventKind, **fields) -> None:
        self.events.send_multipart(event_message(kind, **fields))

    # -- bus side ---------------------------------------------------------------------

    def watch_socket(self, sock: zmq.Socket, read) -> None:
        """Call ``read`` when ``sock`` may have messages. Its FD is edge-triggered:
        ``read`` drains the socket (or reschedules itself) every time."""
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.getsockopt(zmq.FD), self.run_reader, read)
        loop.call_soon(self.run_reader, read)  # what came before we watched

    def run_reader(self, read) -> None:
        try:
            read()
        except Exception as exc:  # noqa: BLE001 - a dead reader would leave guests without acks
            self.failure = exc
            self.stopping.set()

    def read_journal(self) -> None:
        if not self.drain_journal(_DRAIN_MAX):
            asyncio.get_running_loop().call_soon(self.run_reader, self.read_journal)  # more, after the guests' turn

    def drain_journal(self, limit: float) -> bool:
        """Handle up to ``limit`` messages from the journal; True once none is left."""
        handled = 0
        while handled < limit:
            try:
                parts = self.journal.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            self.handle_journal_message(parts)
            handled += 1
        return False

    def handle_journal_message(self, parts: list[bytes]) -> None:
        """``["", CommitBatch, frames]``: this bridge's results of one commit, and
        every message of it for the guests subscribed to it."""
        batch = decode_commit_batch(parts[1])
        for result in batch.results:
            self.answer(result.corr, result.seq, result.reason)
        if batch.results:
            self.settle(max(result.corr for result in batch.results))
            if self.requests:
                self.send_publishes()
        if batch.committed and self.subscribers:
            frames = parts[2]
            start = 0
            for committed in batch.committed:
                self.deliver(committed, frames[start : committed.end])
                start = committed.end

    def answer(self, corr: int, seq: int | None, reason: str | None) -> None:
        pending = self.pending.pop(corr, None)
        if pending is not None and pending.connection.phase == "bus":  # else: timed out, or gone
            pending.connection.handle_commit(pending.topic, pending.message_id, seq, reason)

    def settle(self, corr: int) -> None:
        """The journal answered up to ``corr``: it takes batches in order, and
        answers all of one batch at once, so every batch up to it is done."""
        while self.unanswered and self.unanswered[0][0] <= corr:
            self.unanswered_bytes -= self.unanswered.popleft()[1]
        self.update_backlog()

    # -- journal backlog: stop reading guests while the journal lags --------------------

    def hold(self, connection: GuestConnection) -> None:
        """Pause a session that has a frame to handle while the backlog is full."""
        connection.pause(ReadPause.JOURNAL)
        self.held.add(connection)

    def update_backlog(self) -> None:
        """Full at ``backlog_budget`` bytes, then until half of it is answered.

        Under a load the journal cannot keep up with, this happens many times a
        second: it is told (log line and event) at most once per
        ``THROTTLE_NOTICE_S``."""
        backlog = self.request_bytes + self.unanswered_bytes
        if not self.journal_backlog_full:
            if backlog >= self.backlog_budget:
                self.journal_backlog_full = True
                now = time.monotonic()
                if now - self.backlog_noticed >= THROTTLE_NOTICE_S:
                    self.backlog_noticed = now
                    self.emit(EventKind.BACKPRESSURE, action="pause_reading", reason=ReadPause.JOURNAL.value)
                    logger.bind(reason=ReadPause.JOURNAL.value).info(
                        "journal backlog full: guests are not read", backlog_bytes=backlog)
        elif backlog < self.backlog_budget // 2:
            self.journal_backlog_full = False
            held, self.held = self.held, set()
            now = time.monotonic()
            for connection in held:
                connection.last_frame = max(connection.last_frame, now)  # its silence was ours
                connection.resume(ReadPause.JOURNAL)

    def watch_journal(self) -> None:
        """Attach to each journal the DEALER connects to; when it goes, fail what it
        had not answered (it may have committed some: never a false ok)."""
        while True:
            try:
                message = self.journal_monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(message)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.send_to_journal(ATTACH)
                self.journal_attached = True
                logger.info("journal attached")
            elif event == zmq.EVENT_DISCONNECTED and self.journal_attached:
                self.journal_attached = False
                logger.warning("journal detached: publishes get error acks")
                self.unanswered.clear()  # never answered now
                self.unanswered_bytes = 0
                self.fail_pending("journal_unavailable")
                self.update_backlog()

    def deliver(self, committed: Committed, frame: bytes) -> None:
        """Push one committed message's guest frame to every session subscribed to its
        topic or to a pattern it matches (``*`` included), once per session however
        many of its subscriptions match, and never to the sender's sessions (none of
        them: a VM never hears its own publishes, whichever of its sessions sent it).

        An exact subscription was checked when it was made; a pattern gets a ``vm:``
        topic only if the session may read it. The sessions come as lists: a
        delivery can close a slow session, which then leaves the index's sets."""
        topic, sender = committed.topic, committed.sender
        self.deliveries += 1
        for connection in list(self.subscribers.exact_subscribers(topic)):
            if connection.sender != sender:
                connection.deliver(frame, self.deliveries)
        private = topic.startswith(VM_TOPIC_PREFIX)
        for sessions in self.subscribers.prefix_subscribers(topic):
            for connection in list(sessions):
                if connection.sender != sender and (not private or self.policy.may_read(connection.vm, topic)):
                    connection.deliver(frame, self.deliveries)

    # -- periodic work ----------------------------------------------------------------

    async def sweep(self) -> None:
        """Commit timeouts, heartbeat timeouts and the session sync for status."""
        tick = min(0.25, self.settings.health_interval)
        next_sync = 0.0
        previous = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            # The journal's answers first: after the loop stood still (SIGSTOP, a
            # starved host) they may be waiting, and must win over the timeouts.
            self.drain_journal(float("inf"))
            # A grace past the deadline, counted while the bridge ran: after a
            # standstill, answers still on their way (ZeroMQ's I/O thread stood
            # still too) get one more tick. The journal refuses stale work itself,
            # so this only fires when the journal is stuck.
            ran_until = min(now, previous + tick)
            previous = now
            self.fail_pending("commit_timeout", deadline_before=ran_until - _COMMIT_GRACE)
            limit = now - self.settings.heartbeat_timeout
            silent = [c for open_sessions in self.sessions.values() for c in open_sessions
                      if c.last_frame < limit and c not in self.held]
            for connection in silent:
                connection.log.bind(reason="heartbeat_timeout").info("session timed out")
                connection.close("heartbeat_timeout")
            if now >= next_sync:
                next_sync = now + self.settings.health_interval
                self.sync_sessions()

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

    def fail_pending(self, reason: str, deadline_before: float = float("inf")) -> None:
        """Answer ``reason`` to pending publishes whose deadline is before the given
        one (all by default). Deadlines grow with ``corr``, so this stops early."""
        corrs = []
        for corr, pending in self.pending.items():
            if pending.deadline > deadline_before:
                break
            corrs.append(corr)
        for corr in corrs:
            self.answer(corr, None, reason)
        if corrs and self.requests:  # never send what was answered already
            self.requests = [request for request in self.requests if request.corr in self.pending]
            self.request_bytes = sum(publish_request_bytes(r.vm, r.topic, r.payload) for r in self.requests)
            self.send_publishes()
            self.update_backlog()

    # -- life cycle -------------------------------------------------------------------

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: GuestConnection(self), sock=listener, backlog=1024)
        self.watch_socket(self.journal, self.read_journal)
        self.watch_socket(self.journal_monitor, self.watch_journal)
        sweep = asyncio.create_task(self.sweep())
        host, port = listener.getsockname()[:2]
        deadline = time.monotonic() + 2.0  # a restarted bridge finds the journal at once
        while not self.journal_attached and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.max_connections < self.settings.max_connections:
            logger.bind(reason="fd limit").warning("connection cap lowered to fit the fd limit",
                                                   max_connections=self.max_connections, fd_limit=self.fd_limit)
        logger.info("bridge ready", listen=f"{host}:{port}", journal=self.journal_attached,
                    max_connections=self.max_connections, fd_limit=self.fd_limit)
        runtime.notify_ready()
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([stop, sweep], return_when=asyncio.FIRST_COMPLETED)
        if sweep.done():
            self.failure = sweep.exception()
        if self.failure is not None:
            # Guests would be left without acks or timeouts: exit and be restarted.
            stop.cancel()
            raise RuntimeError("bridge loop ended") from self.failure
        await self.shut_down()
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)
        for sock in (self.journal, self.journal_monitor):
            loop.remove_reader(sock.getsockopt(zmq.FD))
        self.journal.disable_monitor()
        for sock in (self.journal_monitor, self.journal, self.events):
            sock.close(linger=0)
        self.context.term()

    async def shut_down(self) -> None:
        """Stop reading guests, answer what they had sent, then close them all.

        The journal is still up (the supervisor stops the bridge first); what it
        does not answer within ``_SHUTDOWN_GRACE`` gets ``journal_unavailable``.
        Each connection then gets its last frames and a FIN (see
        ``GuestConnection.finish``) before the process exits.
        """
        self.server.close()
        for connection in list(self.connections):
            connection.pause(ReadPause.SHUTDOWN)
        logger.bind(reason="shutdown").info("stopping: guests are not read", pending=len(self.pending))
        deadline = time.monotonic() + _SHUTDOWN_GRACE
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.fail_pending("journal_unavailable")
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
    runtime.wait_for_turn()
    raise_fd_limit()
    # uvloop: transports in C take about 40 % off the bridge's CPU per message.
    uvloop.run(run(settings_from_env()))
    logger.info("bridge stopped")
    runtime.skip_final_collection()


if __name__ == "__main__":
    main()
