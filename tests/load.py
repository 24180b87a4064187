"""Load for tests that stress the bridge: guests that keep a window of publishes
unanswered, and the bridge's resident memory.

One thread drives every guest on non-blocking sockets, so a bridge that stops
reading (or a stopped process) blocks no test thread, and the test can stop the
load, let it drain and inspect what each guest was told.
"""

from __future__ import annotations

import json
import select
import struct
import threading
import time

from .conftest import Router
from .guest import connect_bus

_LENGTH = struct.Struct(">I")


def role_rss_kib(router: Router, role: str = "bridge") -> int:
    """Resident memory of one role process, from /proc/<pid>/status (VmRSS)."""
    with open(f"/proc/{router.role_pid(role)}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


class PipelinedGuest:
    """One bus session that publishes ``{"n": <id>, "pad": ...}`` with ``id`` = n,
    never more than ``window`` unanswered."""

    def __init__(self, port: int, vm: str, pad: str, window: int):
        guest = connect_bus(port, vm)
        self.vm = vm
        self.sock = guest.sock
        self.sock.setblocking(False)
        self.inbound = bytearray(guest.buffer)
        self.window = window
        self.pad = json.dumps(pad).encode()
        self.outbound = bytearray()
        self.sent = 0  # publishes queued to the socket; their ids are 0..sent-1
        self.acks: dict[int, dict] = {}  # id -> the ack that answered it
        self.end: str | None = None  # "eof" or "reset" once the broker closed the connection

    def frame(self, n: int) -> bytes:
        body = b'{"type":"publish","topic":"load","id":%d,"payload":{"n":%d,"pad":%s}}' % (n, n, self.pad)
        return _LENGTH.pack(len(body)) + body

    @property
    def unanswered(self) -> int:
        return self.sent - len(self.acks)

    def fill(self) -> None:
        while self.end is None and self.unanswered < self.window:
            self.outbound += self.frame(self.sent)
            self.sent += 1

    def write(self) -> None:
        try:
            written = self.sock.send(self.outbound)
        except BlockingIOError:
            return
        except OSError:
            self.end = self.end or "reset"
            return
        del self.outbound[:written]

    def read(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.end = "reset"
            return
        if not chunk:
            self.end = "eof"
            return
        self.inbound += chunk
        while len(self.inbound) >= 4:
            (length,) = _LENGTH.unpack_from(self.inbound)
            if len(self.inbound) < 4 + length:
                break
            reply = json.loads(self.inbound[4 : 4 + length])
            del self.inbound[: 4 + length]
            if reply.get("ack") == "publish":
                self.acks[reply["id"]] = reply


class PipelinedLoad:
    """``count`` guests publishing ``pad``-sized payloads as fast as their windows
    allow, until ``stop_sending``; the thread ends at ``close`` or ``limit`` seconds."""

    def __init__(self, port: int, vms: list[str], pad: str = "", window: int = 64, limit: float = 60.0):
        self.guests = [PipelinedGuest(port, vm, pad, window) for vm in vms]
        self.sending = True
        self.closing = threading.Event()
        self.deadline = time.monotonic() + limit
        self.thread = threading.Thread(target=self.run, name="pipelined-load", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> None:
        while not self.closing.is_set() and time.monotonic() < self.deadline:
            live = [guest for guest in self.guests if guest.end is None]
            if not live:
                return
            for guest in live:
                if self.sending:
                    guest.fill()
            writers = [guest.sock for guest in live if guest.outbound]
            readable, writable, _ = select.select([guest.sock for guest in live], writers, [], 0.02)
            for guest in live:
                if guest.sock in writable:
                    guest.write()
                if guest.sock in readable:
                    guest.read()

    def total_acks(self) -> int:
        return sum(len(guest.acks) for guest in self.guests)

    def stop_sending(self) -> None:
        self.sending = False

    def wait_answered(self, timeout: float) -> bool:
        """After ``stop_sending``: wait until every written publish has its ack or
        its connection ended; False at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(guest.end is not None or (not guest.outbound and not guest.unanswered) for guest in self.guests):
                return True
            time.sleep(0.02)
        return False

    def wait_ended(self, timeout: float) -> bool:
        """Wait until the broker has closed every guest's connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(guest.end is not None for guest in self.guests):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.closing.set()
        self.thread.join(timeout=5)
        for guest in self.guests:
            guest.sock.close()
