"""The status role: the per-VM table behind ``castra status``.

It follows session events on the bus (``evt``), answers queries on a ROUTER socket
(``run/status.sock``) and writes an atomic snapshot (``state/status.json``) at most
every ``snapshot_interval``, so ``castra status`` never blocks and a restart loses
nothing. The bridge's periodic ``sessions`` event is authoritative for which
sessions are open, and a session is only shown open while the bridge is heard
from (that sync, or its health event every tick), so a killed bridge cannot
leave VMs looking connected. The table itself is ``statustable``.
"""

from __future__ import annotations

import time

import msgspec
import zmq
from loguru import logger

from . import runtime, topics
from .config import Settings
from .events import decode_event, now_ms
from .statustable import StatusTable, apply_event, load_snapshot, view, write_snapshot
from .wire import json_encode

QUERY = b"status"


class StatusService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoints = settings.endpoints
        self.table = load_snapshot(self.endpoints) or StatusTable()
        self.table.handshake_fresh_ms = int(settings.handshake_fresh * 1000)
        self.table.stale_after_ms = max(2000, int(settings.health_interval * 4000))
        if settings.uplink_servers is None:
            self.table.uplink = None  # a snapshot's, from a router that ran with --uplink
        self.dirty = True
        self.running = True
        self.context = zmq.Context()
        self.events = self.context.socket(zmq.SUB)
        self.events.linger = 0
        # Bounded in bytes; a lost event is mended by the next session sync.
        self.events.rcvhwm = settings.hwm_for(settings.bus_frame_bytes_max)
        self.events.subscribe(topics.EVENT_ALL)
        self.events.connect(self.endpoints.subscribe)
        self.queries = self.context.socket(zmq.ROUTER)
        self.queries.linger = 0
        runtime.bind_owner_only((self.queries, self.endpoints.status))

    def serve(self, stop_signals: int) -> None:
        """Serve until ``stop``. ``stop_signals`` turns readable when a stop signal
        arrives (see ``runtime.stop_on_signals``): polled too, it wakes the loop."""
        poller = zmq.Poller()
        poller.register(self.events, zmq.POLLIN)
        poller.register(self.queries, zmq.POLLIN)
        poller.register(stop_signals, zmq.POLLIN)
        interval = self.settings.snapshot_interval
        next_write = 0.0
        logger.info("status ready", vms=len(self.table.vms))
        runtime.notify_ready()
        while self.running:
            for sock, _ in poller.poll(int(interval * 1000)):
                if sock is self.events:
                    self.handle_events()
                elif sock is self.queries:
                    self.handle_queries()
            now = time.monotonic()
            if self.dirty and now >= next_write:
                next_write = now + interval
                self.dirty = False
                try:
                    write_snapshot(self.endpoints, self.table)
                except OSError as exc:
                    logger.warning("snapshot not written", reason=exc.strerror)

    def handle_events(self) -> None:
        for parts in runtime.ready_messages(self.events, 10_000):
            try:
                event = decode_event(parts[1])
            except (msgspec.DecodeError, IndexError) as exc:
                logger.warning("dropped malformed event", reason=str(exc))
                continue
            apply_event(self.table, event)
            self.dirty = True

    def handle_queries(self) -> None:
        """Request: ``[identity, b"", b"status"]``; reply: the ``StatusView`` JSON."""
        for parts in runtime.ready_messages(self.queries, 1000):
            identity, body = parts[0], parts[-1]
            if body != QUERY:
                self.queries.send_multipart([identity, b"", json_encode({"error": "unknown query"})])
                continue
            self.queries.send_multipart([identity, b"", json_encode(view(self.table, now_ms()))])

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        try:
            write_snapshot(self.endpoints, self.table)
        except OSError:
            pass
        self.events.close(linger=0)
        self.queries.close(linger=0)
        self.context.term()
        logger.info("status stopped")


def main() -> None:
    runtime.run_polling_role("status", StatusService)


if __name__ == "__main__":
    main()
