"""The uplink's health on the bus, for ``castra status``: an ``uplink`` event
(``events.UplinkEvent``) every ``health_interval``, which the status role keeps
(``statustable``).

It says whether the uplink is connected and to which server, how far the upload
is behind ``bus.log`` (in messages, and the commit time of the oldest line not
uploaded, read from the log so that it survives an uplink restart), where the
download is in the stream, and which other hosts it downloaded from.

Runs in: the uplink role.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import zmq

from .config import Settings
from .events import REMOTE_HOSTS_MAX, EventKind, RemoteHost, event_message, now_ms
from .replay import Cursor, Expired
from .wire import Origin, decode_log_record

_LINE_BYTES = 1  # one line is read whatever the size asked for


class RemoteHosts:
    """The other hosts whose messages were downloaded: each one's last origin and
    when it came, the ``REMOTE_HOSTS_MAX`` most recently seen (oldest first)."""

    def __init__(self) -> None:
        self.seen: dict[str, RemoteHost] = {}

    def note(self, origins: list[Origin]) -> None:
        now = now_ms()
        for origin in origins:
            self.seen.pop(origin.host, None)  # to the end: the most recent
            self.seen[origin.host] = RemoteHost(origin.host, origin.epoch, origin.seq, now)
        while len(self.seen) > REMOTE_HOSTS_MAX:
            del self.seen[next(iter(self.seen))]

    def listed(self) -> list[RemoteHost]:
        return list(self.seen.values())


def committed_ms(logs_dir: Path, after: int, committed: int) -> int | None:
    """When the first line of ``bus.log`` after seq ``after`` (and at most
    ``committed``) was committed (its ``ts_ms``); None when there is none (left)."""
    try:
        lines = Cursor(logs_dir, after).read(committed, _LINE_BYTES)
    except Expired:
        return None  # rotated away: the upload skips it
    return decode_log_record(lines[0]).ts_ms if lines else None


class HealthReport:
    """Publishes the uplink's health event on the bus (``run/bus-in.sock``), every
    ``health_interval``; one lost (the proxy restarting) is made up by the next."""

    def __init__(self, settings: Settings):
        self.interval = settings.health_interval
        self.context = zmq.Context()
        self.bus = self.context.socket(zmq.PUB)
        self.bus.linger = 0
        self.bus.sndhwm = 16
        self.bus.connect(settings.endpoints.publish)

    async def run(self, fields: Callable[[], dict]) -> None:
        while True:
            try:
                self.bus.send_multipart(event_message(EventKind.UPLINK, **fields()), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the proxy is not there yet: the next tick says the same, newer
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        self.bus.close(linger=0)
        self.context.term()
