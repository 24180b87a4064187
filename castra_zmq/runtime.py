"""What every role process does the same way: logging, readiness, parent watch.

Roles run as ``python -m castra_zmq.<role>``; the supervisor passes the settings in
``CASTRA_SETTINGS`` and a pipe in ``CASTRA_READY_FD`` on which the role writes one
line once its sockets are up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from loguru import logger

from .terminal import printable

READY_FD_ENV = "CASTRA_READY_FD"
_PR_SET_PDEATHSIG = 1

LOG_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[role]: <10} {message}"
    "{extra[fields]}"
)


def _format_fields(record) -> None:
    """Bound fields and the message may carry guest-chosen text (a topic, a name):
    through ``printable``, so no guest can drive the terminal or forge a line."""
    extra = record["extra"]
    record["message"] = printable(record["message"])
    extra["fields"] = "".join(
        f" {key}={printable(str(value))}" for key, value in extra.items()
        if key not in ("role", "fields") and value is not None
    )


def setup_logging(role: str, level: str | None = None) -> None:
    """One line per event on stderr; bound fields (vm, session, reason) go at the end."""
    logger.remove()
    logger.configure(extra={"role": role}, patcher=_format_fields)
    logger.add(sys.stderr, format=LOG_FORMAT, level=level or os.environ.get("CASTRA_LOG_LEVEL", "INFO"))


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


def notify_ready() -> None:
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except OSError:
        pass


def stop_on_signals(handler) -> None:
    """Route SIGTERM and SIGINT to ``handler`` (a clean stop, not a traceback)."""
    signal.signal(signal.SIGTERM, lambda *_: handler())
    signal.signal(signal.SIGINT, lambda *_: handler())
