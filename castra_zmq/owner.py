"""Who owns a state root: the supervisor's lock and its ``run/router.json``.

Read by ``castra status`` and host tools to tell whether a router runs, without
importing the supervisor. ``router_pid`` first checks that ``run/`` is ours.

Runs in: the supervisor (writes) and the CLI (reads).
"""

from __future__ import annotations

import fcntl
import os

import msgspec

from .endpoints import Endpoints
from .statefs import open_regular, read_regular


class RoleState(msgspec.Struct):
    state: str  # starting | running | restarting | stopped
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None


class UplinkInfo(msgspec.Struct):
    """How the router's uplink reaches NATS (``castra up``'s options, named as in
    ``Settings``), for the host tools that read the fleet's stream themselves
    (``castra bus tail --fleet``). No password: it stays in CASTRA_UPLINK_PASSWORD."""

    uplink_servers: list[str]
    host_name: str
    uplink_creds: str | None = None
    uplink_user: str | None = None
    uplink_tls_ca: str | None = None
    uplink_tls_cert: str | None = None
    uplink_tls_key: str | None = None
    uplink_tls_first: bool | None = None


class RouterInfo(msgspec.Struct):
    pid: int
    listen: str
    state_root: str
    started_ms: int
    processes: dict[str, RoleState]
    uplink: UplinkInfo | None = None  # with --uplink only


def read_router_info(endpoints: Endpoints) -> RouterInfo | None:
    try:
        return msgspec.json.decode(read_regular(endpoints.router_info), type=RouterInfo)
    except (OSError, msgspec.DecodeError):
        return None


def router_pid(endpoints: Endpoints) -> int | None:
    """The pid of the router owning ``endpoints``' state root, or None if none runs.

    The lock, not a pid file, is the truth: the kernel drops it when the owner dies,
    even by kill -9. Raises ``UnsafeStateRoot`` when another user could control
    ``run/`` (their lock, their sockets).
    """
    if not endpoints.check_run_dir():
        return None
    try:
        fd = open_regular(endpoints.lock_file)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None
