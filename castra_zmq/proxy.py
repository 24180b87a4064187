"""The proxy role: one ZeroMQ XSUB/XPUB proxy, the bus every other role attaches to.

Publishers (bridge, journal, status, CLI, host tools) connect PUB sockets to the
XSUB side (``run/bus-in.sock``); subscribers connect SUB sockets to the XPUB side
(``run/bus-out.sock``).

Its queues are budgeted in bytes: a frame in is at most ``bus_frame_bytes_max``
(ZMQ_MAXMSGSIZE: a publisher that sends a larger one is disconnected), and each
high-water mark is ``queue_bytes`` over that. A subscriber that stops reading loses
what its queue cannot hold (ZeroMQ PUB semantics), so the proxy's memory for it
stays under ``queue_bytes`` (see README "Security"); one whose connection stays
full for ``slow_consumer_timeout`` is disconnected (``StalledSubscribers``).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import zmq
from loguru import logger

from . import runtime
from .config import Settings, settings_from_env
from .events import EventKind, event_message
from .wire import MAX_TOPIC

# A subscription: its flag byte, "bus\0" or "evt\0", a topic in UTF-8 and "\0".
_SUBSCRIPTION_MAX = 16 + 4 * MAX_TOPIC
_CHECK_INTERVAL = 0.5  # seconds between looks at the subscribers' connections
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def duplicate(fd: int) -> socket.socket:
    """A socket on a duplicate of ``fd``: closing it leaves ``fd`` to its owner."""
    copy = os.dup(fd)
    try:
        return socket.socket(fileno=copy)
    except OSError:  # ``fd`` was closed and reused for something else meanwhile
        os.close(copy)
        raise


class StalledSubscribers:
    """Disconnects subscribers that stopped reading.

    ZeroMQ neither tells which XPUB peer is full nor lets one be dropped. The
    kernel shows it: the proxy's end of each connection to ``bus-out.sock`` is a
    socket of this process, which stops being writable once the kernel holds all
    it takes for a subscriber that does not read. One not writable at every look
    for ``timeout`` seconds is shut down through a duplicate of its descriptor;
    libzmq then closes the connection and frees its queue, and the subscriber's
    ZeroMQ reconnects by itself.
    """

    def __init__(self, path: Path, timeout: float, events: zmq.Socket):
        self.path = str(path)
        self.timeout = timeout
        self.events = events
        self.full_since: dict[str, float] = {}  # /proc/self/fd link ("socket:[inode]") -> first seen full

    def check(self) -> None:
        now = time.monotonic()
        full_since = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
                if not link.startswith("socket:"):
                    continue
                with duplicate(int(fd)) as sock:
                    if not self.is_subscriber(sock) or not self.is_full(sock):
                        continue
                    since = full_since[link] = self.full_since.get(link, now)
                    if now - since >= self.timeout:
                        self.disconnect(sock)
                        del full_since[link]
            except OSError:  # closed by libzmq meanwhile
                continue
        self.full_since = full_since

    def is_subscriber(self, sock: socket.socket) -> bool:
        return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and sock.getsockname() == self.path)

    @staticmethod
    def is_full(sock: socket.socket) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return not poller.poll(0)

    def disconnect(self, sock: socket.socket) -> None:
        pid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
        sock.shutdown(socket.SHUT_RDWR)
        logger.bind(reason="slow_consumer").warning("subscriber disconnected: its connection stayed full",
                                                    peer=f"pid:{pid}")
        self.events.send_multipart(event_message(EventKind.PEER, peer=f"pid:{pid}", action="disconnect",
                                                 reason="slow_consumer"))


def run(settings: Settings) -> None:
    endpoints = settings.endpoints
    context = zmq.Context()
    frontend = context.socket(zmq.XSUB)
    backend = context.socket(zmq.XPUB)
    hwm = settings.hwm_for(settings.bus_frame_bytes_max)
    for sock in (frontend, backend):
        sock.linger = 0
        sock.sndhwm = hwm
        sock.rcvhwm = hwm
    frontend.maxmsgsize = settings.bus_frame_bytes_max
    backend.maxmsgsize = _SUBSCRIPTION_MAX  # what subscribers send: (un)subscriptions
    runtime.bind_owner_only((frontend, endpoints.publish), (backend, endpoints.subscribe))
    stopping = threading.Event()

    def stop() -> None:
        stopping.set()
        context.term()  # makes zmq.proxy return with ContextTerminated

    # The proxy blocks in C; run it in a thread so the main thread can take signals.
    def serve() -> None:
        try:
            zmq.proxy(frontend, backend)
        except zmq.ContextTerminated:
            pass
        finally:
            frontend.close(linger=0)
            backend.close(linger=0)

    thread = threading.Thread(target=serve, name="proxy", daemon=True)
    thread.start()
    runtime.stop_on_signals(lambda: threading.Thread(target=stop, daemon=True).start())
    # Its own context: terminating the proxy's must not wait for this socket.
    events_context = zmq.Context()
    events = events_context.socket(zmq.PUB)
    events.linger = 0
    events.connect(endpoints.publish)
    stalled = StalledSubscribers(endpoints.subscribe_socket, settings.slow_consumer_timeout, events)
    logger.info("proxy ready", publish=endpoints.publish, subscribe=endpoints.subscribe)
    runtime.notify_ready()
    while thread.is_alive():
        thread.join(_CHECK_INTERVAL)
        stalled.check()
    events.close(linger=0)
    events_context.term()
    logger.info("proxy stopped")


def main() -> None:
    runtime.setup_logging("proxy")
    runtime.die_with_parent()
    run(settings_from_env())
    runtime.skip_final_collection()


if __name__ == "__main__":
    main()
