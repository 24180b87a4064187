"""The guests' listening socket: the supervisor binds it and hands it to each bridge
it starts, so a restarted bridge keeps the port and the connections queued on it.

Apart from ``bridge`` so that the supervisor need not import the bridge (uvloop,
the sessions: about 50 ms of every ``castra up`` before any role starts).

Runs in: the supervisor (binds) and the bridge (serves).
"""

from __future__ import annotations

import os
import socket

from .config import Settings

LISTEN_FD_ENV = "CASTRA_LISTEN_FD"


def listener_socket(settings: Settings) -> socket.socket:
    """The listening socket handed over by the supervisor, or a new one."""
    fd = os.environ.pop(LISTEN_FD_ENV, None)
    if fd is not None:
        return socket.socket(fileno=int(fd))
    return bind_listener(settings.host, settings.port)


def bind_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
