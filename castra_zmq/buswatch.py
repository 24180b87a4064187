"""The uplink's one reader of the local bus: the committed seq the bridge sends
after each commit (``topics.COMMITTED``) and the bridge's events the uplink needs,
each decoded once and handed to every ``BusObserver``: the upload's commit watch
and the ownership half's local sessions (``claims``) both follow it.

Runs in: the uplink role.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio
from loguru import logger

from . import runtime, topics
from .config import Settings
from .errors import CastraError
from .events import AnyEvent, EventKind, decode_event

_DRAIN_MAX = 1024  # bus messages read per wake-up before the loop gets a turn


class BusObserver(Protocol):
    def observe(self, committed: int | None, event: AnyEvent | None) -> None:
        """One bus message: ``committed`` for a committed seq, else ``event``."""


class BusWatch:
    """A SUB socket on the bus for ``COMMITTED`` and the events of ``kinds``."""

    def __init__(self, settings: Settings, kinds: Iterable[EventKind], observers: list[BusObserver]):
        self.observers = observers
        self.context = zmq.asyncio.Context()
        self.bus = self.context.socket(zmq.SUB)
        self.bus.linger = 0
        self.bus.rcvhwm = settings.hwm_for(settings.bus_frame_bytes_max)
        self.bus.subscribe(topics.COMMITTED)
        for kind in kinds:
            self.bus.subscribe(topics.event(kind.value))
        self.bus.connect(settings.endpoints.subscribe)
        self.queued = zmq.Socket.shadow(self.bus.underlying)  # the same socket, read without a future

    async def watch(self) -> None:
        """A ``COMMITTED`` message comes with every commit: once awake, what else is
        queued is read at once, not a future and a loop turn each."""
        while True:
            self.handle(await self.bus.recv_multipart())
            for parts in runtime.ready_messages(self.queued, _DRAIN_MAX):
                self.handle(parts)

    def handle(self, parts: list[bytes]) -> None:
        if len(parts) != 2:
            return
        topic, body = parts
        committed, event = None, None
        try:
            if topic == topics.COMMITTED:
                committed = int(body)
            else:
                event = decode_event(body)
        except (CastraError, msgspec.DecodeError, ValueError) as exc:
            logger.warning("dropped malformed bus message", reason=str(exc))
            return
        for observer in self.observers:
            observer.observe(committed, event)

    def close(self) -> None:
        self.bus.close(linger=0)
        self.context.term()
