"""One guest TCP connection: handshake in line mode, then a bus session in frames.

``GuestConnection`` is an ``asyncio.Protocol``: bytes in, replies out, no awaiting,
so thousands of connections cost one small object each. Routing (publishing into
the bus, subscriber index, acks) belongs to the ``Bridge``; this class owns only
what is per-connection: the handshake deadline, the frame decoder, the publish
window and the outbound queue limit.
"""

from __future__ import annotations

import asyncio
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
    GREETING,
    OK_HANDSHAKE_ONLY,
    Hello,
    error_line,
    ok_session_line,
    parse_hello,
    take_line,
)
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

HELLO, BUS, CLOSED = "hello", "bus", "closed"
_THROTTLE_NOTICE_S = 10.0
_LINGER_OFF = struct.pack("ii", 1, 0)


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
        self.topics: set[str] = set()
        self.in_flight = 0
        self.paused = False
        self.throttle_noticed = float("-inf")
        self.last_frame = time.monotonic()
        self.last_heartbeat_ms: int | None = None
        self.outgoing: list[bytes] = []  # frames to write at the end of this loop turn
        self.outgoing_bytes = 0
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

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self.phase is not CLOSED:
            self.finish("disconnect" if exc is None else f"disconnect: {exc}")
        self.bridge.release(self)

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
        self.transport.write(ok_session_line(self.token))
        self.bridge.open_session(self, hello)
        if rest:
            self.decoder.feed(rest)
            self.process_frames()

    # -- bus mode (frames) ------------------------------------------------------------

    def process_frames(self) -> None:
        window = self.bridge.settings.publish_window
        while self.phase is BUS:
            if self.in_flight >= window:
                self.throttle()
                return
            try:
                body = self.decoder.next_frame()
            except FrameError as exc:
                self.send(ErrorReply(reason=exc.reason))
                self.close(exc.reason)
                return
            if body is None:
                return
            self.last_frame = time.monotonic()
            self.handle_frame(body)

    def handle_frame(self, body: bytes) -> None:
        """Decode one frame and dispatch it; every refusal is answered, never raised."""
        try:
            frame = decode_guest_frame(body)
        except FrameError as exc:
            self.send(ErrorReply(reason=exc.reason))
            return
        except FrameRejected as exc:
            self.send(AckReply(ack=exc.frame_type, status="error", reason=exc.reason))
            return
        match frame:
            case Publish():
                self.handle_publish(frame)
            case Subscribe():
                self.handle_subscribe(frame)
            case Unsubscribe():
                self.handle_unsubscribe(frame)
            case Heartbeat():
                self.handle_heartbeat()
            case Acknowledge():
                pass  # receipts of deliveries need no reply

    def handle_publish(self, frame: Publish) -> None:
        """``publish`` -> ``{"type":"ack","ack":"publish","status":"ok","topic":T,"seq":N}``
        once the journal has committed it, or an error ack with a reason."""
        reason = self.bridge.publish(self, frame)
        if reason is not None:
            self.send(AckReply(ack="publish", status="error", topic=frame.topic, id=frame.id, reason=reason))
        else:
            self.in_flight += 1

    def handle_commit(self, topic: str, message_id: MessageId, seq: int | None, reason: str | None) -> None:
        """The journal's result for one of this session's publishes."""
        if reason is None:
            self.send(AckReply(ack="publish", status="ok", topic=topic, seq=seq, id=message_id))
        else:
            self.send(AckReply(ack="publish", status="error", topic=topic, id=message_id, reason=reason))
        self.in_flight -= 1
        if self.paused and self.in_flight < self.bridge.settings.publish_window:
            self.paused = False
            self.transport.resume_reading()
            self.process_frames()

    def handle_subscribe(self, frame: Subscribe) -> None:
        """``subscribe`` -> ``{"type":"ack","ack":"subscribe","status":"ok","topic":T}``;
        error ack past ``MAX_SUBSCRIPTIONS`` topics."""
        if frame.topic not in self.topics and len(self.topics) >= MAX_SUBSCRIPTIONS:
            self.send(AckReply(ack="subscribe", status="error", topic=frame.topic,
                               reason=f"too many subscriptions (max {MAX_SUBSCRIPTIONS})"))
            return
        self.topics.add(frame.topic)
        self.bridge.subscribe(self, frame.topic)
        self.send(AckReply(ack="subscribe", status="ok", topic=frame.topic))

    def handle_unsubscribe(self, frame: Unsubscribe) -> None:
        """``unsubscribe`` -> ``{"type":"ack","ack":"unsubscribe","status":"ok","topic":T}``."""
        self.topics.discard(frame.topic)
        self.bridge.unsubscribe(self, frame.topic)
        self.send(AckReply(ack="unsubscribe", status="ok", topic=frame.topic))

    def handle_heartbeat(self) -> None:
        """``heartbeat`` -> ``{"type":"ack","ack":"heartbeat","status":"ok"}``."""
        self.send(HEARTBEAT_OK)
        self.last_heartbeat_ms = now_ms()
        self.bridge.emit(EventKind.HEARTBEAT, vm=self.vm, session=self.token)

    # -- output -----------------------------------------------------------------------

    def send(self, reply: Reply) -> None:
        if self.phase is BUS:
            self.queue(encode_frame(json_encode(reply)))

    def queue(self, frame: bytes) -> None:
        """Write ``frame`` with the others of this loop turn: one send() for a burst
        of acks and deliveries instead of one each."""
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outgoing.append(frame)
        self.outgoing_bytes += len(frame)

    def flush(self) -> None:
        if self.outgoing and not self.transport.is_closing():
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()
        self.outgoing_bytes = 0

    def deliver(self, frame: bytes) -> None:
        """Queue one encoded message; past the queue limit the guest is dropped."""
        queued = self.transport.get_write_buffer_size() + self.outgoing_bytes + len(frame)
        if queued > self.bridge.settings.subscriber_queue_bytes:
            self.bridge.emit(EventKind.BACKPRESSURE, vm=self.vm, session=self.token,
                             action="disconnect", reason="slow_consumer")
            self.log.bind(reason="slow_consumer").warning("subscriber disconnected")
            self.close("slow_consumer", abort=True)
            return
        self.queue(frame)

    def throttle(self) -> None:
        """Stop reading while the publish window is full: TCP pushes back on the guest.

        Under load a window fills many times a second, so it is told (log line and
        event) at most once per ``_THROTTLE_NOTICE_S`` per session.
        """
        self.pause()
        now = time.monotonic()
        if now - self.throttle_noticed >= _THROTTLE_NOTICE_S:
            self.throttle_noticed = now
            self.bridge.emit(EventKind.BACKPRESSURE, vm=self.vm, session=self.token,
                             action="pause_reading", reason="publish_window_full")
            self.log.bind(reason="publish_window_full").info("publish window full: reading paused")

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def close(self, reason: str, abort: bool = False) -> None:
        """Close the session; ``abort`` also discards what is queued for the guest."""
        if self.phase is CLOSED:
            return
        if abort:
            # SO_LINGER 0: reset now instead of the kernel trickling megabytes to a
            # guest that stopped reading.
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
        self.finish(reason)
        if abort:
            self.transport.abort()

    def finish(self, reason: str | None) -> None:
        """Leave the bus (if in it) and close the transport after pending writes."""
        was_bus = self.phase is BUS
        self.phase = CLOSED
        if was_bus:
            self.bridge.close_session(self, reason or "closed")
        self.flush()  # the error frame that explains the close goes out first
        self.transport.close()


HEARTBEAT_OK = AckReply(ack="heartbeat", status="ok")
