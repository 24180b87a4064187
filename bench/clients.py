"""The clients of every system under test, on one asyncio machinery.

Each server's wire protocol is spoken directly by an ``asyncio.Protocol`` here
(castra bus-v1, MQTT 3.1.1, the NATS text protocol with JetStream acks, Redis's RESP
for stream appends), so every
system is driven by the same event loop, the same buffering and the same clock:
rates compare servers, not client libraries. ZeroMQ peers (the bare proxy floor and
castra's ipc host subscriber) are pyzmq sockets on the same loop.

Every client offers the same surface to the workloads:

* ``publish(payload, acked)``: write one message on ``TOPIC``; ``acked`` asks for the
  protocol's publish acknowledgement (castra acks every publish anyway);
* ``await subscribe()``: subscribe to ``TOPIC`` and return once the server confirmed;
* ``heartbeat()``: one liveness round trip;
* callbacks ``on_delivery(message_bytes)``, ``on_ack(ok)``, ``on_heartbeat()``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import struct

import zmq
import zmq.asyncio

TOPIC = b"bench"
HANDSHAKE_TIMEOUT = 10.0
_LINGER_OFF = struct.pack("ii", 1, 0)
_DRAIN_MAX = 4096  # ZeroMQ messages handled per wake-up before yielding to the loop


def _ignore(*_args) -> None:
    pass


class ProtocolError(Exception):
    """The server answered something this client does not expect."""


class TcpClient(asyncio.Protocol):
    """One TCP connection: TCP_NODELAY, buffered parsing, handshake future.

    Subclasses implement ``greet`` (called on connect), ``parse(data) -> consumed``
    and the publish/subscribe/heartbeat surface.
    """

    def __init__(self, name: str):
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ready = asyncio.get_running_loop().create_future()
        self.on_delivery = _ignore
        self.on_ack = _ignore
        self.on_heartbeat = _ignore
        self.errors: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport  # type: ignore[assignment]
        self.greet()

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            self.buffer += data
            del self.buffer[: self.parse(self.buffer)]
        else:  # the common case: whole messages, parsed without a copy into the buffer
            consumed = self.parse(data)
            if consumed < len(data):
                self.buffer += data[consumed:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: connection lost during handshake"))

    def fail(self, reply: bytes) -> None:
        """Keep an unexpected reply (the first few) for the run's notes."""
        if len(self.errors) < 5:
            self.errors.append(bytes(reply[:200]))

    def handshake_failed(self, reply: bytes) -> None:
        if not self.ready.done():
            self.ready.set_exception(ProtocolError(f"{self.name}: handshake refused: {bytes(reply[:200])!r}"))

    def close(self) -> None:
        """Reset the connection: no TIME_WAIT left behind across thousands of sessions."""
        if self.transport is not None and not self.lost:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
            self.transport.abort()

    # Subclasses: greet, parse, publish, subscribe, heartbeat.

    def greet(self) -> None:
        raise NotImplementedError

    def parse(self, data: bytes | bytearray) -> int:
        raise NotImplementedError


class CastraClient(TcpClient):
    """A guest of castra-zmq (PROTOCOL.md bus-v1)."""

    _PUBLISH_OK = b'{"type":"ack","ack":"publish","status":"ok"'
    _PUBLISH_ACK = b'{"type":"ack","ack":"publish"'
    _SUBSCRIBE_OK = b'{"type":"ack","ack":"subscribe","status":"ok"'
    _HEARTBEAT_OK = b'{"type":"ack","ack":"heartbeat","status":"ok"'
    _MESSAGE = b'{"type":"message"'
    _HEARTBEAT = b'{"type":"heartbeat"}'
    #: what the hello line offers (``CastraV2Client``: bus-v2 too)
    capabilities = b"bus-v1"

    def __init__(self, name: str):
        super().__init__(name)
        self.lines_left = 2  # greeting, then the answer to hello
        self.subscribed: asyncio.Future | None = None
        self.answer = b""  # the router's answer line to hello, without its newline
        self.topic = TOPIC  # what it publishes and subscribes to

    def greet(self) -> None:
        pass  # the broker speaks first

    def parse(self, data: bytes | bytearray) -> int:
        offset, end = 0, len(data)
        while self.lines_left:
            eol = data.find(b"\n", offset)
            if eol < 0:
                return offset
            line, offset = data[offset:eol], eol + 1
            self.lines_left -= 1
            if self.lines_left == 1:
                self.transport.write(b"hello vm:%s capabilities=%s\n" % (self.name.encode(), self.capabilities))
            elif line.startswith(b"ok session="):
                self.answer = bytes(line)
                self.ready.set_result(None)
            else:
                self.handshake_failed(line)
                return end
        while end - offset >= 4:
            stop = offset + 4 + int.from_bytes(data[offset : offset + 4], "big")
            if stop > end:
                break
            self.frame(data[offset + 4 : stop])
            offset = stop
        return offset

    def frame(self, body: bytes | bytearray) -> None:
        if body.startswith(self._MESSAGE):
            self.on_delivery(body)
        elif body.startswith(self._PUBLISH_ACK):
            ok = body.startswith(self._PUBLISH_OK)
            if not ok:
                self.fail(body)
            self.on_ack(ok)
        elif body.startswith(self._HEARTBEAT_OK):
            self.on_heartbeat()
        elif body.startswith(self._SUBSCRIBE_OK) and self.subscribed is not None:
            self.subscribed.set_result(None)
        else:
            self.fail(body)

    def publish(self, payload: bytes, acked: bool) -> None:
        self.write_frame(b'{"type":"publish","topic":"%s","payload":%s}' % (self.topic, payload))

    async def subscribe(self) -> None:
        self.subscribed = asyncio.get_running_loop().create_future()
        self.write_frame(b'{"type":"subscribe","topic":"%s"}' % self.topic)
        await asyncio.wait_for(self.subscribed, HANDSHAKE_TIMEOUT)

    def heartbeat(self) -> None:
        self.write_frame(self._HEARTBEAT)

    def write_frame(self, body: bytes) -> None:
        self.transport.write(len(body).to_bytes(4, "big") + body)


class CastraV2Client(CastraClient):
    """A bus-v2 guest of castra-zmq: bus-v1 plus resume, a subscribe with ``since``
    (PROTOCOL.md 4.3.1). Offering bus-v2 does not make the session bus-v2: the
    router says so in its answer, ``bus_v2`` tells."""

    capabilities = b"bus-v1,bus-v2"
    _SUBSCRIBE_ACK = b'{"type":"ack","ack":"subscribe"'

    def __init__(self, name: str):
        super().__init__(name)
        self.on_subscribe_ack = _ignore  # called with the ack's bytes as it is parsed
        self.resumed: asyncio.Future | None = None

    @property
    def bus_v2(self) -> bool:
        """The answer's words (PROTOCOL.md 2.4: further ``key=value`` ones, such as
        ``log=``, may follow) include ``protocol=bus-v2``."""
        return b"protocol=bus-v2" in self.answer.split()

    def frame(self, body: bytes | bytearray) -> None:
        if self.resumed is not None and body.startswith(self._SUBSCRIBE_ACK):
            # At once, not through the future: the replayed messages after it may
            # be parsed from the same read, before any callback runs.
            self.on_subscribe_ack(bytes(body))
            if not self.resumed.done():
                self.resumed.set_result(bytes(body))
        else:
            super().frame(body)

    def subscribe_since(self, topic: bytes, since: int) -> asyncio.Future:
        """Send ``{"type":"subscribe","topic":T,"since":S}``; the future gets the
        ack's bytes (ok with ``seq`` and ``since``, or an error ack)."""
        self.resumed = asyncio.get_running_loop().create_future()
        self.write_frame(b'{"type":"subscribe","topic":"%s","since":%d}' % (topic, since))
        return self.resumed


def _mqtt_length(n: int) -> bytes:
    """MQTT's variable-length "remaining length" field."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_string(text: bytes) -> bytes:
    return len(text).to_bytes(2, "big") + text


class MqttClient(TcpClient):
    """An MQTT 3.1.1 client: QoS 0 publishes, QoS 1 with PUBACK when acked,
    QoS 0 subscriptions, PINGREQ as heartbeat."""

    _KEEPALIVE_S = 120
    _PINGREQ = b"\xc0\x00"
    _TOPIC = _mqtt_string(TOPIC)

    def __init__(self, name: str):
        super().__init__(name)
        self.packet_id = 0
        self.subscribed: asyncio.Future | None = None

    def greet(self) -> None:
        # Protocol "MQTT" level 4, clean session, keep-alive, then the client id.
        body = _mqtt_string(b"MQTT") + b"\x04\x02" + self._KEEPALIVE_S.to_bytes(2, "big")
        body += _mqtt_string(self.name.encode())
        self.transport.write(b"\x10" + _mqtt_length(len(body)) + body)

    def next_packet_id(self) -> bytes:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id.to_bytes(2, "big")

    def parse(self, data: bytes | bytearray) -> int:
        offset, end = 0, len(data)
        while end - offset >= 2:
            first = data[offset]
            length, shift, index = 0, 0, offset + 1
            while True:
                if index >= end:
                    return offset
                digit = data[index]
                index += 1
                length |= (digit & 0x7F) << shift
                if digit < 0x80:
                    break
                shift += 7
            stop = index + length
            if stop > end:
                break
            kind = first >> 4
            if kind == 3:  # PUBLISH (QoS 0: no packet id)
                start = index + 2 + int.from_bytes(data[index : index + 2], "big")
                self.on_delivery(data[start:stop])
            elif kind == 4:  # PUBACK
                self.on_ack(True)
            elif kind == 13:  # PINGRESP
                self.on_heartbeat()
            elif kind == 9 and self.subscribed is not None:  # SUBACK: 0x80 is a refusal
                if data[stop - 1] == 0x80:
                    self.subscribed.set_exception(ProtocolError(f"{self.name}: subscribe refused"))
                else:
                    self.subscribed.set_result(None)
            elif kind == 2:  # CONNACK: return code 0 accepts
                if data[index + 1] == 0:
                    self.ready.set_result(None)
                else:
                    self.handshake_failed(data[offset:stop])
            else:
                self.fail(data[offset:stop])
            offset = stop
        return offset

    def publish(self, payload: bytes, acked: bool) -> None:
        if acked:
            body = self._TOPIC + self.next_packet_id() + payload
            self.transport.write(b"\x32" + _mqtt_length(len(body)) + body)
        else:
            body = self._TOPIC + payload
            self.transport.write(b"\x30" + _mqtt_length(len(body)) + body)

    async def subscribe(self) -> None:
        self.subscribed = asyncio.get_running_loop().create_future()
        body = self.next_packet_id() + self._TOPIC + b"\x00"
        self.transport.write(b"\x82" + _mqtt_length(len(body)) + body)
        await asyncio.wait_for(self.subscribed, HANDSHAKE_TIMEOUT)

    def heartbeat(self) -> None:
        self.transport.write(self._PINGREQ)


class NatsClient(TcpClient):
    """A NATS client: core publishes; acked publishes go to the JetStream stream that
    captures ``TOPIC`` with a reply inbox, and the stream's answer is the ack.
    PING/PONG is the heartbeat, and also confirms a subscription (as NATS clients'
    ``flush`` does)."""

    _SUBSCRIPTION_SID = b"1"
    _ACK_SID = b"2"
    _REQUEST_SID = b"3"
    _CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"name":"%s"}\r\nPING\r\n'

    def __init__(self, name: str):
        super().__init__(name)
        self.inbox = b"_INBOX.%s" % os.urandom(6).hex().encode()
        self.pongs: collections.deque = collections.deque()
        self.pongs.append(lambda: self.ready.set_result(None))
        self.reply: asyncio.Future | None = None
        self.acks_subscribed = False

    def greet(self) -> None:
        pass  # the server speaks first (INFO)

    def parse(self, data: bytes | bytearray) -> int:
        offset, end = 0, len(data)
        while True:
            eol = data.find(b"\r\n", offset)
            if eol < 0:
                return offset
            if data.startswith(b"MSG ", offset):
                fields = data[offset + 4 : eol].split(b" ")
                start = eol + 2
                stop = start + int(fields[-1])
                if stop + 2 > end:
                    return offset
                self.message(fields[1], data[start:stop])
                offset = stop + 2
                continue
            if data.startswith(b"PING", offset):
                self.transport.write(b"PONG\r\n")
            elif data.startswith(b"PONG", offset):
                self.pongs.popleft()()
            elif data.startswith(b"INFO ", offset):
                if not self.ready.done():
                    self.transport.write(self._CONNECT % self.name.encode())
            elif data.startswith(b"-ERR", offset):
                self.handshake_failed(data[offset:eol])
                self.fail(data[offset:eol])
            offset = eol + 2

    def message(self, sid: bytes, payload: bytes | bytearray) -> None:
        if sid == self._SUBSCRIPTION_SID:
            self.on_delivery(payload)
        elif sid == self._ACK_SID:
            ok = b'"error"' not in payload
            if not ok:
                self.fail(payload)
            self.on_ack(ok)
        elif sid == self._REQUEST_SID and self.reply is not None:
            self.reply.set_result(bytes(payload))

    def publish(self, payload: bytes, acked: bool) -> None:
        if acked:
            if not self.acks_subscribed:  # the server handles a connection in order: SUB precedes PUB
                self.transport.write(b"SUB %s %s\r\n" % (self.inbox, self._ACK_SID))
                self.acks_subscribed = True
            self.transport.write(b"PUB %s %s %d\r\n%s\r\n" % (TOPIC, self.inbox, len(payload), payload))
        else:
            self.transport.write(b"PUB %s %d\r\n%s\r\n" % (TOPIC, len(payload), payload))

    async def flush(self) -> None:
        """One PING/PONG: everything written before it has been processed."""
        done = asyncio.get_running_loop().create_future()
        self.pongs.append(lambda: done.set_result(None))
        self.transport.write(b"PING\r\n")
        await asyncio.wait_for(done, HANDSHAKE_TIMEOUT)

    async def subscribe(self) -> None:
        self.transport.write(b"SUB %s %s\r\n" % (TOPIC, self._SUBSCRIPTION_SID))
        await self.flush()

    async def request(self, subject: bytes, payload: bytes) -> bytes:
        """A request/reply round trip (JetStream's API)."""
        reply_to = self.inbox + b".api"
        self.reply = asyncio.get_running_loop().create_future()
        self.transport.write(b"SUB %s %s\r\nPUB %s %s %d\r\n%s\r\n"
                             % (reply_to, self._REQUEST_SID, subject, reply_to, len(payload), payload))
        return await asyncio.wait_for(self.reply, HANDSHAKE_TIMEOUT)

    def heartbeat(self) -> None:
        self.pongs.append(self.on_heartbeat)
        self.transport.write(b"PING\r\n")


def _resp_bulk(item: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(item), item)


class RedisClient(TcpClient):
    """A Redis client speaking RESP2: an acked publish is ``XADD <TOPIC> * m <payload>``
    (the entry id in reply is the ack, an error reply a failed ack), PING the heartbeat.
    Redis answers a connection's commands in order, and only publishes and PINGs are
    sent, so a bulk or error reply is a publish's and ``+PONG`` a PING's. No ``subscribe``:
    the system runs the acked workloads only."""

    _XADD = b"*5\r\n" + b"".join(map(_resp_bulk, (b"XADD", TOPIC, b"*", b"m")))
    _PING = b"*1\r\n" + _resp_bulk(b"PING")

    def __init__(self, name: str):
        super().__init__(name)
        self.pongs: collections.deque = collections.deque()
        self.pongs.append(lambda: self.ready.set_result(None))

    def greet(self) -> None:
        self.transport.write(self._PING)  # Redis needs no handshake: the first PONG is "ready"

    def parse(self, data: bytes | bytearray) -> int:
        offset, end = 0, len(data)
        while True:
            eol = data.find(b"\r\n", offset)
            if eol < 0:
                return offset
            kind = data[offset]
            if kind == 0x24:  # "$": a bulk string, the id of the appended entry
                stop = eol + 2 + int(data[offset + 1 : eol]) + 2
                if stop > end:
                    return offset
                self.on_ack(True)
                offset = stop
                continue
            if kind == 0x2B and data.startswith(b"+PONG", offset):
                self.pongs.popleft()()
            elif kind == 0x2D:  # "-": an error reply
                self.handshake_failed(data[offset:eol])
                self.fail(data[offset:eol])
                self.on_ack(False)
            else:
                self.fail(data[offset:eol])
            offset = eol + 2

    def publish(self, payload: bytes, acked: bool) -> None:
        self.transport.write(self._XADD + _resp_bulk(payload))

    def heartbeat(self) -> None:
        self.pongs.append(self.on_heartbeat)
        self.transport.write(self._PING)


async def open_tcp(client_class: type[TcpClient], port: int, name: str) -> TcpClient:
    """Connect to 127.0.0.1:port and finish the protocol's handshake."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: client_class(name), "127.0.0.1", port), HANDSHAKE_TIMEOUT
    )
    try:
        await asyncio.wait_for(client.ready, HANDSHAKE_TIMEOUT)
    except BaseException:
        client.close()
        raise
    return client


class ZmqSubscriber:
    """A SUB socket feeding ``on_delivery`` with one frame of each message."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, prefix: bytes, part: int):
        self.on_delivery = _ignore
        self.part = part
        self.socket = context.socket(zmq.SUB)
        self.socket.linger = 0
        self.socket.rcvhwm = 0  # a benchmark subscriber never drops: losses are the server's
        self.socket.subscribe(prefix)
        self.socket.connect(endpoint)
        self._now = zmq.Socket.shadow(self.socket.underlying)  # non-blocking drains
        self.task = asyncio.get_running_loop().create_task(self.receive())

    async def receive(self) -> None:
        while True:
            parts = await self.socket.recv_multipart()
            self.on_delivery(parts[self.part])
            for _ in range(_DRAIN_MAX):
                try:
                    parts = self._now.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.on_delivery(parts[self.part])

    def close(self) -> None:
        self.task.cancel()
        self.socket.close(linger=0)


class ZmqClient:
    """A guest of the bare proxy: a PUB socket into it, and a SUB out once subscribed."""

    def __init__(self, context: zmq.asyncio.Context, publish_endpoint: str, subscribe_endpoint: str):
        self.context = context
        self.subscribe_endpoint = subscribe_endpoint
        # A plain socket: a PUB never blocks, so sends need no future each.
        self.publisher = zmq.Context.shadow(context.underlying).socket(zmq.PUB)
        self.publisher.linger = 0
        self.publisher.sndhwm = 0
        self.publisher.connect(publish_endpoint)
        self.subscriber: ZmqSubscriber | None = None
        self.on_delivery = _ignore
        self.on_ack = _ignore
        self.on_heartbeat = _ignore
        self.errors: list[bytes] = []

    def publish(self, payload: bytes, acked: bool) -> None:
        self.publisher.send_multipart((TOPIC, payload))

    async def subscribe(self) -> None:
        self.subscriber = ZmqSubscriber(self.context, self.subscribe_endpoint, TOPIC, 1)
        self.subscriber.on_delivery = lambda message: self.on_delivery(message)

    def close(self) -> None:
        self.publisher.close(linger=0)
        if self.subscriber is not None:
            self.subscriber.close()
