"""One guest TCP connection: handshake in line mode, then a bus session in frames.

``GuestConnection`` is an ``asyncio.Protocol``: bytes in, replies out, no awaiting,
so thousands of connections cost one small object each. Routing (publishing into
the bus, subscriber index, acks) belongs to the ``Bridge``; this class owns only
what is per-connection: the handshake deadline, the frame decoder, the publish
window, the outbound byte budget, and closing (see ``finish``).

A guest is untrusted: what one connection costs is bounded. Its socket is read
only while no ``ReadPause`` holds it, so frames wait in the kernel (TCP pushes
back on the guest), never in the bridge; at most ``FRAMES_PER_TURN`` of its frames
are handled per loop turn; everything queued to it counts against
``subscriber_queue_bytes``.

Runs in: the bridge.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import socket
import struct
import time
from typing import TYPE_CHECKING

from loguru import logger

from .errors import FrameError, HandshakeError
from .events import EventKind, now_ms
from .framing import FrameDecoder, encode_frame
from .handshake import (
    BUS_V2,
    GREETING,
    OK_HANDSHAKE_ONLY,
    Hello,
    error_line,
    ok_session_line,
    parse_hello,
    take_line,
)
from .identity import FORBIDDEN_TOPIC
from .resume import Catchup, oldest_seq
from .wire import (
    MAX_SUBSCRIPTIONS,
    Acknowledge,
    AckReply,
    ErrorReply,
    FrameRejected,
    Heartbeat,
    MessageId,
    Publish,
    Reply,
    Subscribe,
    Unsubscribe,
    decode_guest_frame,
    json_encode,
)

if TYPE_CHECKING:
    from .bridge import Bridge
    from .handover import Handover



class Phase(enum.Enum):
    """Where a connection is: its hello line, bus frames, or closing (read and dropped)."""

    HELLO = "hello"
    BUS = "bus"
    CLOSED = "closed"


HELLO, BUS, CLOSED = Phase.HELLO, Phase.BUS, Phase.CLOSED
# bus-v2 subscribe refusals (PROTOCOL.md 4.3.1)
INVALID_SINCE = "invalid since"
SINCE_EXPIRED = "since expired"
SEQ_MAX = 2**63 - 1
THROTTLE_NOTICE_S = 10.0
_LINGER_OFF = struct.pack("ii", 1, 0)
# Frames of one connection handled per loop turn: a whole publish window at once,
# yet a guest streaming frames cannot keep the loop (and every other guest) waiting.
FRAMES_PER_TURN = 64
# Seconds a closing connection has to take its last frames and our FIN; then it is
# reset, whatever it left unread.
CLOSE_LINGER = 1.0
# Heartbeat replies per session: a burst of this many, refilled at this rate a
# second. Past it a heartbeat still counts as liveness but gets no reply or event.
HEARTBEAT_REPLY_BURST = 100
HEARTBEAT_REPLIES_PER_S = 100.0
# Log lines a guest's frames cause (refusals, subscriptions), per session: a burst of
# this many, refilled at this rate a second; the lines left out are counted
# (``unlogged=N`` on the next line written and on ``session closed``).
FRAME_LOG_BURST = 20
FRAME_LOGS_PER_S = 1.0


class TokenBucket:
    """At most ``burst`` takes in a row, refilled at ``per_s`` a second."""

    __slots__ = ("burst", "per_s", "refilled", "tokens")

    def __init__(self, burst: int, per_s: float):
        self.burst, self.per_s = float(burst), per_s
        self.tokens = self.burst
        self.refilled = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.per_s)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class ReadPause(str, enum.Enum):
    """Why a connection's socket is not read; it is read again once none is left."""

    PUBLISH_WINDOW = "publish_window_full"  # its un-acked publishes fill the window
    OUTBOUND = "outbound_queue_full"  # over half its outbound budget waits for it to read
    TURN = "frame_budget"  # it had its frames of this loop turn; the rest next turn
    SHUTDOWN = "shutdown"  # the bridge answers what it took, then closes


class GuestConnection(asyncio.Protocol):
    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.phase = HELLO
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.line = b""
        self.deadline: asyncio.TimerHandle | None = None
        self.decoder = FrameDecoder()
        self.vm: str | None = None
        self.sender = ""  # "vm:<name>" as on the bus, to never echo a guest's own publish
        self.token: str | None = None
        self.bus_protocol: str | None = None
        self.topics: set[str] = set()  # exact topics and patterns (``*``, ``vm:*``)
        self.last_delivery = 0  # the bridge's number of the last message queued to it
        self.in_flight = 0
        self.paused_for: set[ReadPause] = set()
        self.reading_paused = False  # what the transport was last told
        self.pause_noticed: dict[ReadPause, float] = {}
        self.last_frame = time.monotonic()
        self.last_heartbeat_ms: int | None = None
        self.heartbeat_replies = TokenBucket(HEARTBEAT_REPLY_BURST, HEARTBEAT_REPLIES_PER_S)
        self.frame_log_lines = TokenBucket(FRAME_LOG_BURST, FRAME_LOGS_PER_S)
        self.unlogged = 0  # frame log lines left out since the last one written
        self.outgoing: list[bytes] = []  # frames to write at the end of this loop turn
        self.outgoing_bytes = 0
        self.stall: asyncio.TimerHandle | None = None  # slow_consumer deadline while OUTBOUND
        self.linger: asyncio.TimerHandle | None = None  # the reset of a closing connection
        self.lost = False  # connection_lost came: the transport is gone
        self.catchup: Catchup | None = None  # bus-v2: a replay runs, live deliveries wait (see resume)
        self.own_topic_seq: int | None = None  # bus.log's seq when it subscribed to vm:<its name> (see handover)
        self.moved_from: Handover | None = None  # its VM moved here: what the host it left had sent it
        self.log = logger

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.log = logger.bind(peer=self.peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Past half the outbound budget the transport calls pause_writing (see there).
        budget = self.bridge.settings.subscriber_queue_bytes
        self.transport.set_write_buffer_limits(high=budget // 2, low=budget // 4)
        refusal = self.bridge.admit(self, peer[0] if peer else "?")
        if refusal:
            self.refuse(refusal, vm=None)
            return
        self.transport.write(GREETING)
        self.deadline = asyncio.get_running_loop().call_later(
            self.bridge.settings.handshake_timeout, self.handle_handshake_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self.phase is BUS:
            self.decoder.feed(data)
            self.process_frames()
        elif self.phase is HELLO:
            self.line += data
            self.process_hello()
        # CLOSED: read only to be dropped (see finish)

    def eof_received(self) -> None:
        """The guest sends nothing more. Close as any close (see ``finish``): left to
        asyncio alone, the transport would wait for a guest that does not read."""
        if self.phase is not CLOSED:
            self.finish("disconnect")
        # None: the transport closes once what is queued is sent (or at the linger)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for timer in (self.deadline, self.stall, self.linger):
            if timer is not None:
                timer.cancel()
        if self.phase is not CLOSED:
            self.finish("disconnect" if exc is None else f"disconnect: {exc}")
        self.bridge.forget(self)

    def pause_writing(self) -> None:
        """The transport holds over half the outbound budget: stop reading (a guest's
        frames are what makes most replies) until it drains to a quarter, and reset
        the guest if it does not within ``slow_consumer_timeout``."""
        self.pause(ReadPause.OUTBOUND)
        self.notice_pause(ReadPause.OUTBOUND)
        if self.phase is BUS and self.stall is None:
            self.stall = asyncio.get_running_loop().call_later(
                self.bridge.settings.slow_consumer_timeout, self.drop_slow_consumer)

    def resume_writing(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        self.resume(ReadPause.OUTBOUND)
        if self.catchup is not None:
            self.catchup.schedule()

    # -- handshake (line mode) --------------------------------------------------------

    def process_hello(self) -> None:
        try:
            split = take_line(self.line)
            if split is None:
                return
            line, rest = split
            hello = parse_hello(line)
        except HandshakeError as exc:
            self.refuse(exc.reason, vm=None)
            return
        try:
            self.bridge.check_identity(hello)
        except HandshakeError as exc:
            self.refuse(exc.reason, vm=hello.vm)
            return
        if hello.bus_protocol is not None:
            refusal = self.bridge.session_refusal(hello.vm)
            if refusal is not None:  # its other sessions go on
                self.refuse(refusal, vm=hello.vm)
                return
        self.deadline.cancel()
        self.line = b""
        if hello.bus_protocol is None:
            self.transport.write(OK_HANDSHAKE_ONLY)
            self.bridge.emit(EventKind.HANDSHAKE, vm=hello.vm, outcome="ok", capabilities=list(hello.capabilities))
            self.log.bind(vm=hello.vm).info("handshake ok (handshake-only)")
            self.finish(None)
        else:
            self.open_session(hello, rest)

    def handle_handshake_timeout(self) -> None:
        if self.phase is HELLO:
            self.refuse("handshake timeout", vm=None)

    def refuse(self, reason: str, vm: str | None) -> None:
        self.transport.write(error_line(reason))
        self.bridge.emit(EventKind.HANDSHAKE, vm=vm, outcome="error", reason=reason)
        self.log.bind(vm=vm, reason=reason).info("handshake refused")
        self.finish(None)

    def open_session(self, hello: Hello, rest: bytes) -> None:
        self.vm = hello.vm
        self.sender = f"vm:{hello.vm}"
        self.token = secrets.token_hex(8)
        self.bus_protocol = hello.bus_protocol
        self.log = logger.bind(peer=self.peer, vm=self.vm, session=self.token)
        self.phase = BUS
        self.last_frame = time.monotonic()
        self.transport.write(ok_session_line(self.token, self.bus_protocol, self.bridge.log_id))
        self.bridge.open_session(self, hello)
        if rest:
            self.decoder.feed(rest)
            self.process_frames()

    # -- bus mode (frames) ------------------------------------------------------------

    def process_frames(self) -> None:
        """Handle buffered frames while nothing pauses reading, at most
        ``FRAMES_PER_TURN``: the rest waits for the next loop turn (reading paused
        meanwhile, so the buffer holds at most one read's worth)."""
        settings = self.bridge.settings
        handled = 0
        while self.phase is BUS and not self.paused_for:
            if handled == FRAMES_PER_TURN:
                self.pause(ReadPause.TURN)
                asyncio.get_running_loop().call_soon(self.resume, ReadPause.TURN)
                return
            if self.in_flight >= settings.publish_window:
                self.pause(ReadPause.PUBLISH_WINDOW)
                self.notice_pause(ReadPause.PUBLISH_WINDOW)
                return
            if self.outgoing_bytes >= settings.subscriber_queue_bytes // 2:
                self.flush()  # now: the transport tells (pause_writing) if the guest lags
                continue
            try:
                body = self.decoder.next_frame()
            except FrameError as exc:
                self.send(ErrorReply(reason=exc.reason))
                self.close(exc.reason)
                return
            if body is None:
                return
            handled += 1
            self.last_frame = time.monotonic()
            self.handle_frame(body)

    def handle_frame(self, body: bytes) -> None:
        """Decode one frame and dispatch it; every refusal is answered, never raised."""
        try:
            frame = decode_guest_frame(body)
        except FrameError as exc:
            self.send(ErrorReply(reason=exc.reason))
            self.log_frame_event("DEBUG", "frame refused", reason=exc.reason)
            return
        except FrameRejected as exc:
            self.send(AckReply(ack=exc.frame_type, status="error", reason=exc.reason))
            self.log_frame_event("DEBUG", "frame refused", reason=exc.reason, frame=exc.frame_type)
            return
        match frame:
            case Publish():
                # A raw line break can only be whitespace, maybe in its payload: that breaks a log line.
                self.handle_publish(frame, b"\n" in body or b"\r" in body)
            case Subscribe():
                self.handle_subscribe(frame)
            case Unsubscribe():
                self.handle_unsubscribe(frame)
            case Heartbeat():
                self.handle_heartbeat()
            case Acknowledge():
                pass  # receipts of deliveries need no reply

    def handle_publish(self, frame: Publish, multiline: bool) -> None:
        """``publish`` -> ``{"type":"ack","ack":"publish","status":"ok","topic":T,"seq":N}``
        once its turn's commit is in ``bus.log``, or an error ack with a reason."""
        self.in_flight += 1  # first: the bridge may commit it, and call handle_commit, at once
        reason = self.bridge.publish(self, frame, multiline)
        if reason is not None:
            self.in_flight -= 1
            self.send(AckReply(ack="publish", status="error", topic=frame.topic, id=frame.id, reason=reason))

    def handle_commit(self, topic: str, message_id: MessageId, seq: int | None, reason: str | None) -> None:
        """The commit's result for one of this session's publishes."""
        if reason is None:
            self.send(AckReply(ack="publish", status="ok", topic=topic, seq=seq, id=message_id))
        else:
            self.send(AckReply(ack="publish", status="error", topic=topic, id=message_id, reason=reason))
        self.in_flight -= 1
        if self.in_flight < self.bridge.settings.publish_window:
            self.resume(ReadPause.PUBLISH_WINDOW)

    def handle_subscribe(self, frame: Subscribe) -> None:
        """``subscribe`` -> ``{"type":"ack","ack":"subscribe","status":"ok","topic":T}``;
        error ack ``forbidden topic`` for a topic the policy keeps from this VM (another
        VM's ``vm:`` topic unless granted), and past ``MAX_SUBSCRIPTIONS`` topics. A
        topic ending in ``*`` is a pattern (``vm:*``: every topic starting with ``vm:``),
        one of the ``MAX_SUBSCRIPTIONS``, always allowed: it delivers only what this VM
        may read (see ``Bridge.deliver``)."""
        if not self.bridge.policy.may_subscribe(self.vm, frame.topic):
            self.send(AckReply(ack="subscribe", status="error", topic=frame.topic, reason=FORBIDDEN_TOPIC))
            self.log_frame_event("INFO", "subscribe refused", reason=FORBIDDEN_TOPIC, topic=frame.topic)
            return
        if frame.topic not in self.topics and len(self.topics) >= MAX_SUBSCRIPTIONS:
            reason = f"too many subscriptions (max {MAX_SUBSCRIPTIONS})"
            self.send(AckReply(ack="subscribe", status="error", topic=frame.topic, reason=reason))
            self.log_frame_event("INFO", "subscribe refused", reason=reason, topic=frame.topic)
            return
        if frame.since is not None and self.bus_protocol == BUS_V2:
            self.subscribe_since(frame.topic, frame.since)
            return
        self.topics.add(frame.topic)
        self.bridge.subscribe(self, frame.topic)
        if self.catchup is not None:
            self.catchup.add_live(frame.topic, self.bridge.log.seq)
        self.send(AckReply(ack="subscribe", status="ok", topic=frame.topic))
        self.log_frame_event("INFO", "subscribed", topic=frame.topic)

    def subscribe_since(self, topic: str, since) -> None:
        """bus-v2 ``subscribe`` with ``since``: the ack says what is replayed (after
        ``since`` up to ``seq``, the last committed), then the replay (see ``resume``)."""
        if type(since) is not int or not 0 <= since <= SEQ_MAX:
            self.send(AckReply(ack="subscribe", status="error", topic=topic, reason=INVALID_SINCE))
            self.log_frame_event("INFO", "subscribe refused", reason=INVALID_SINCE, topic=topic)
            return
        head = self.bridge.log.seq
        since = min(since, head)
        oldest = oldest_seq(self.bridge.log.path.parent, self.bridge.log.path.name, head)
        if since + 1 < oldest:
            self.send(AckReply(ack="subscribe", status="error", topic=topic, reason=SINCE_EXPIRED, oldest=oldest))
            self.log_frame_event("INFO", "subscribe refused", reason=SINCE_EXPIRED, topic=topic, since=since,
                                 oldest=oldest)
            return
        self.topics.add(topic)
        self.bridge.subscribe(self, topic)
        self.send(AckReply(ack="subscribe", status="ok", topic=topic, seq=head, since=since))
        self.log_frame_event("INFO", "subscribed", topic=topic, since=since, seq=head)
        if since < head:
            if self.catchup is None:
                self.catchup = Catchup(self, head)
            self.catchup.add(topic, since)
        elif self.catchup is not None:
            self.catchup.add_live(topic, head)

    def handle_unsubscribe(self, frame: Unsubscribe) -> None:
        """``unsubscribe`` -> ``{"type":"ack","ack":"unsubscribe","status":"ok","topic":T}``."""
        self.topics.discard(frame.topic)
        self.bridge.unsubscribe(self, frame.topic)
        if self.catchup is not None:
            self.catchup.discard(frame.topic)
        self.send(AckReply(ack="unsubscribe", status="ok", topic=frame.topic))
        self.log_frame_event("INFO", "unsubscribed", topic=frame.topic)

    def log_frame_event(self, level: str, message: str, **fields) -> None:
        """One log line caused by a frame, unless this session used up its
        ``FRAME_LOG_BURST``: a guest looping on refused frames cannot flood the log."""
        if not self.frame_log_lines.take():
            self.unlogged += 1
            return
        if self.unlogged:
            fields["unlogged"], self.unlogged = self.unlogged, 0
        self.log.bind(**fields).log(level, message)

    def handle_heartbeat(self) -> None:
        """``heartbeat`` -> ``{"type":"ack","ack":"heartbeat","status":"ok"}``, at once,
        up to ``HEARTBEAT_REPLY_BURST`` in a row and ``HEARTBEAT_REPLIES_PER_S`` a
        second; past that no reply (the frame still counts as liveness)."""
        self.last_heartbeat_ms = now_ms()
        if not self.heartbeat_replies.take():
            return
        self.send(HEARTBEAT_OK)
        self.bridge.emit(EventKind.HEARTBEAT, vm=self.vm, session=self.token)

    # -- output -----------------------------------------------------------------------

    def send(self, reply: Reply) -> None:
        if self.phase is BUS:
            self.queue(encode_frame(json_encode(reply)))

    def queue(self, frame: bytes) -> None:
        """Write ``frame`` with the others of this loop turn: one send() for a burst
        of acks and deliveries instead of one each. A frame that would take what
        waits for the guest past ``subscriber_queue_bytes`` resets it instead."""
        queued = self.transport.get_write_buffer_size() + self.outgoing_bytes + len(frame)
        if queued > self.bridge.settings.subscriber_queue_bytes:
            self.drop_slow_consumer()
            return
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outgoing.append(frame)
        self.outgoing_bytes += len(frame)

    def flush(self) -> None:
        if self.outgoing and not self.transport.is_closing():
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()
        self.outgoing_bytes = 0
        if self.catchup is not None:
            self.catchup.schedule()  # it may have waited for these bytes to leave

    def transport_paused(self) -> bool:
        """Whether the transport said ``pause_writing`` (and not yet ``resume_writing``)."""
        return ReadPause.OUTBOUND in self.paused_for

    def outbound_room(self) -> int:
        """Bytes that may still be queued before the transport pauses (``pause_writing``)."""
        waiting = self.transport.get_write_buffer_size() + self.outgoing_bytes
        return self.bridge.settings.subscriber_queue_bytes // 2 - waiting

    def deliver(self, frame: bytes, delivery: int) -> None:
        """Queue one encoded message for a subscribed guest, numbered ``delivery`` by
        the bridge: several of its subscriptions may match it, it is queued once."""
        if delivery != self.last_delivery:
            self.last_delivery = delivery
            self.queue(frame)

    def drop_slow_consumer(self) -> None:
        """Reset a guest that leaves what it is sent unread (see ``queue`` and
        ``pause_writing``): publishers are never held back by it."""
        if self.phase is not BUS:
            return
        self.bridge.emit(EventKind.BACKPRESSURE, vm=self.vm, session=self.token,
                         action="disconnect", reason="slow_consumer")
        self.log.bind(reason="slow_consumer").warning("guest not reading: disconnected")
        self.close("slow_consumer", abort=True)

    # -- reading ----------------------------------------------------------------------

    def pause(self, reason: ReadPause) -> None:
        self.paused_for.add(reason)
        self.sync_reading()

    def resume(self, reason: ReadPause) -> None:
        """Drop one reason; with none left, handle what is buffered, then read."""
        if reason not in self.paused_for:
            return
        self.paused_for.discard(reason)
        if not self.paused_for:
            self.process_frames()
        self.sync_reading()

    def sync_reading(self) -> None:
        """Tell the transport to read exactly while no reason pauses this session."""
        if self.phase is CLOSED:
            return  # finish reads on, to drop what comes
        paused = bool(self.paused_for)
        if paused != self.reading_paused:
            self.reading_paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def notice_pause(self, reason: ReadPause) -> None:
        """Tell (log line and event) that reading paused. Under load a window fills
        many times a second: at most once per ``THROTTLE_NOTICE_S`` per session and
        reason."""
        now = time.monotonic()
        if now - self.pause_noticed.get(reason, float("-inf")) >= THROTTLE_NOTICE_S:
            self.pause_noticed[reason] = now
            self.bridge.emit(EventKind.BACKPRESSURE, vm=self.vm, session=self.token,
                             action="pause_reading", reason=reason.value)
            self.log.bind(reason=reason.value).info("reading paused")

    # -- closing ----------------------------------------------------------------------

    def close(self, reason: str, abort: bool = False) -> None:
        """Close the session; ``abort`` also discards what is queued for the guest."""
        if self.phase is CLOSED:
            return
        self.finish(reason)
        if abort:
            self.abort()

    def finish(self, reason: str | None) -> None:
        """Leave the bus (if in it), give the connection slot back at once, and close.

        Queued frames go first (the one that explains the close among them), then a
        FIN. What the guest still sends is read and dropped, as closing a socket with
        unread bytes resets it and loses those last frames; the transport closes when
        the guest closes too, or is reset after ``CLOSE_LINGER``. A connection that
        was never admitted has no slot and closes at once, so refusals cannot use up
        the descriptors kept in reserve (see ``Bridge.admit``).
        """
        was_bus = self.phase is BUS
        self.phase = CLOSED
        for timer in (self.deadline, self.stall):
            if timer is not None:
                timer.cancel()
        admitted = self.bridge.release(self)
        if was_bus:
            self.bridge.close_session(self, reason or "closed")
        if self.lost or self.transport.is_closing():
            return
        self.flush()
        if not admitted:
            self.transport.close()
            return
        self.transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.linger = asyncio.get_running_loop().call_later(CLOSE_LINGER, self.abort)

    def abort(self) -> None:
        """Reset the connection now (SO_LINGER 0): nothing queued for the guest is
        sent, and the kernel keeps nothing for it either."""
        if self.lost:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
        self.transport.abort()


HEARTBEAT_OK = AckReply(ack="heartbeat", status="ok")
