"""A test guest that speaks the wire contract (PROTOCOL.md) over a plain socket.

Deliberately independent of ``castra_zmq``'s own codec, so the tests check the
bytes on the wire, not the router's idea of them.
"""

from __future__ import annotations

import json
import socket
import struct
import time


class Guest:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0, greeting: bool = True):
        """Connect; with ``greeting`` false the first line is left for the test to read."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.greeting = self.read_line() if greeting else None
        self.session: str | None = None

    # -- line mode --------------------------------------------------------------------

    def read_line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed before a full line (have {self.buffer!r})")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def hello(self, vm: str, capabilities: str | None = "bus-v1") -> str:
        line = f"hello vm:{vm}" + (f" capabilities={capabilities}" if capabilities else "")
        self.sock.sendall(line.encode() + b"\n")
        reply = self.read_line()
        if reply.startswith("ok session="):
            self.session = reply.split()[1].split("=", 1)[1]
        return reply

    # -- frame mode -------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def recv_raw(self, timeout: float = 5.0) -> bytes:
        """One frame body as bytes (the exact bytes the broker sent)."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if len(self.buffer) >= 4 + length:
                    body = self.buffer[4 : 4 + length]
                    self.buffer = self.buffer[4 + length :]
                    return body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by broker")
            self.buffer += chunk

    def recv(self, timeout: float = 5.0) -> dict:
        return json.loads(self.recv_raw(timeout))

    def recv_until(self, predicate, timeout: float = 5.0) -> dict:
        """The first frame matching ``predicate``; others are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(frame):
                return frame

    def request(self, obj, timeout: float = 5.0) -> dict:
        """Send a frame and return the next ack/error reply, skipping deliveries."""
        self.send(obj)
        return self.recv_until(lambda f: f.get("type") != "message", timeout)

    def publish(self, payload, topic: str = "broadcast", **extra) -> dict:
        return self.request({"type": "publish", "topic": topic, "payload": payload, **extra})

    def subscribe(self, topic: str) -> dict:
        return self.request({"type": "subscribe", "topic": topic})

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True once the broker has closed the connection (EOF)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect_bus(port: int, vm: str) -> Guest:
    guest = Guest(port)
    reply = guest.hello(vm)
    assert reply.startswith("ok session="), reply
    return guest
