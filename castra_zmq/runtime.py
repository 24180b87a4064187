"""What every role process does the same way: logging, readiness, parent watch.

Roles are forked from the supervisor (``roleprocess``) and run their module's
``main()``; the supervisor passes the settings in ``CASTRA_SETTINGS`` (the log
settings among them, so every process logs alike) and a pipe in
``CASTRA_READY_FD`` on which the role writes one line once its sockets are up.

Runs in: each role process (bridge, journal, status, proxy).
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import traceback
from collections.abc import Iterator

import msgspec
import zmq
from loguru import logger

from .config import Settings, settings_from_env
from .terminal import json_for_terminal, printable

READY_FD_ENV = "CASTRA_READY_FD"
_PR_SET_PDEATHSIG = 1

# <level> colours the level name when colour is on; loguru drops the tag otherwise.
LOG_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} <level>{level: <7}</level> {extra[role]: <10} {message}"
    "{extra[fields]}"
)
_JSON_LOG = msgspec.json.Encoder(enc_hook=str)  # a field of another type (a Path) as its text


def _format_fields(record) -> None:
    """Bound fields and the message may carry guest-chosen text (a topic, a name):
    through ``printable``, so no guest can drive the terminal or forge a line."""
    extra = record["extra"]
    record["message"] = printable(record["message"])
    extra["fields"] = "".join(
        f" {key}={printable(str(value))}" for key, value in extra.items()
        if key not in ("role", "fields") and value is not None
    )


def _write_json(message) -> None:
    """One JSON object a line: time (ISO 8601 with its offset), level, role, message,
    then the bound fields as top-level keys, never replacing those four.

    The JSON encoder escapes the ASCII controls but writes the others (U+009B, a
    one-character CSI; bidi overrides) raw: ``json_for_terminal`` escapes them too,
    so guest text stays inert when the log is read on a terminal.
    """
    record = message.record
    line = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "role": record["extra"]["role"],
        "message": record["message"],
    }
    for key, value in record["extra"].items():
        if value is not None:
            line.setdefault(key, value)
    if record["exception"] is not None:
        line.setdefault("exception", "".join(traceback.format_exception(*record["exception"])))
    sys.stderr.write(json_for_terminal(_JSON_LOG.encode(line)).decode() + "\n")


def setup_logging(role: str, settings: Settings | None = None) -> None:
    """Log to stderr at ``settings.log_level`` (by default the settings this role was
    started with): one text line per event with the bound fields (vm, session,
    reason) at the end, levels coloured with ``log_color``; or with ``log_json``, one
    JSON object per event."""
    settings = settings or settings_from_env()
    logger.remove()
    if settings.log_json:
        logger.configure(extra={"role": role})
        logger.add(_write_json, level=settings.log_level)
    else:
        logger.configure(extra={"role": role}, patcher=_format_fields)
        logger.add(sys.stderr, format=LOG_FORMAT, level=settings.log_level, colorize=settings.log_color)


def logs_at(settings: Settings, level: str) -> bool:
    """Whether messages at ``level`` are written. A hot path asks once and skips the
    call otherwise: even a dropped loguru call costs about a microsecond."""
    return logger.level(level).no >= logger.level(settings.log_level).no


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, even by kill -9.

    Without it, an orphaned bridge would keep the port and the next ``castra up``
    would find it taken.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent check below still runs
        pass
    if os.getppid() != parent or parent == 1:
        sys.exit(0)


def skip_final_collection() -> None:
    """For a role that has stopped: the garbage collections of the interpreter's
    exit go over every object, about 40 ms, and the supervisor stops the roles one
    after another. What they would free goes with the process anyway."""
    gc.freeze()


def notify_ready() -> None:
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except OSError:
        pass


def run_polling_role(name: str, create) -> None:
    """The life of a role that polls its sockets (journal, status): ``create(settings)``
    gives an object with ``serve(stop_signals)``, ``stop()`` (from a signal handler)
    and ``close()`` (which logs that it stopped)."""
    setup_logging(name)
    die_with_parent()
    role = create(settings_from_env())
    stop_signals = stop_on_signals(role.stop)
    try:
        role.serve(stop_signals)
    finally:
        role.close()
    skip_final_collection()


def ready_messages(sock: zmq.Socket, limit: int) -> Iterator[list[bytes]]:
    """The messages ``sock`` has ready now, at most ``limit`` of them: a polling role
    takes a bounded share of one socket per turn, then serves the others."""
    for _ in range(limit):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def bind_owner_only(*bindings) -> None:
    """Bind each ``(socket, endpoint)`` under umask 077: an ipc socket file that only
    its owner may connect to (see README "Local users")."""
    previous = os.umask(0o077)
    try:
        for sock, endpoint in bindings:
            sock.bind(endpoint)
    finally:
        os.umask(previous)


def stop_on_signals(handler) -> int:
    """Route SIGTERM and SIGINT to ``handler`` (a clean stop, not a traceback).

    Returns a descriptor that turns readable when one arrives, for a role to poll
    with its sockets: ``handler`` runs when the poll is interrupted, but pyzmq then
    polls again, so without it the role would stop only at the poll's timeout.
    """
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda *_: handler())
    signal.signal(signal.SIGINT, lambda *_: handler())
    return read_end
