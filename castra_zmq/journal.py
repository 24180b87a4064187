"""The journal role: the logger peer that files the per-VM logs.

The bridge writes ``bus.log`` (the record of truth, see ``bridge``) and sends
the lines of each commit into the proxy as ``log`` messages; this role, a SUB
on the proxy beside status and host tools, files each line in its sender's log
and, for ``vm:<target>`` topics, the target's (``buslog.VmLogs``). The per-VM
logs are derived: the bridge acks without waiting for them. Whatever this role
did not get (it was down, or the proxy dropped lines at its high-water mark) it
copies from the end of ``bus.log``: at start, on a gap in the seqs of the lines
it gets, and on a health event of the bridge whose seq is past the last line it
filed. On its health tick it follows rotation and checkpoints the per-VM logs
(``state/journal.json``).

Per-VM logs: a VM gets one once it published (its own messages), once it
connected (a ``handshake`` event, or a session in the bridge's first ``sessions``
sync: ``KnownVms``), when the identities file lists it, or when its log is
already there; and only while there are fewer
than ``vm_logs_max``. Other messages still go to ``bus.log`` and any log their
sender or target has.

The role kept its name (``journal``: the ``castra-journal`` process of ``castra
up``); it no longer has a socket of its own.
"""

from __future__ import annotations

import time

import msgspec
import zmq
from loguru import logger

from . import runtime, topics
from .buslog import KnownVms, Message, VmLogs
from .config import Settings
from .errors import ConfigError, LogWriteFailed
from .events import EventKind, HandshakeEvent, JournalEvent, SessionsEvent, decode_event
from .handshake import is_vm_name
from .identity import load_identities
from .wire import decode_log_lines

_MESSAGES_PER_TURN = 10_000  # then the stop signal and the checkpoint tick get their turn


def listed_vms(identities_file: str | None) -> frozenset[str]:
    """The VM names of the identities file (none without one)."""
    try:
        identities = load_identities(identities_file)
    except ConfigError as exc:  # the bridge refuses to start on it; the logs need not
        logger.bind(reason=exc.reason).warning("identities file not read: its VMs get a log once they connect")
        return frozenset()
    return frozenset(identities.tokens) if identities is not None else frozenset()


class Journal:
    def __init__(self, settings: Settings):
        self.settings = settings
        endpoints = settings.endpoints
        self.known = KnownVms(listed_vms(settings.identities_file), settings.vm_logs_max)
        # A commit the bridge had written but not sent when it was killed is what a
        # crash leaves out at most, with no checkpoint: fewer than 2 * batch_max lines
        # from host tools, plus a turn of guest publishes.
        self.vm_logs = VmLogs(endpoints.bus_log, endpoints.journal_checkpoint, sync=settings.fsync == "batch",
                              known=self.known, vm_logs_max=settings.vm_logs_max, lag_max=4 * settings.batch_max)
        self.failure: str | None = None  # why the last filing failed, until one succeeds
        self.context = zmq.Context()
        self.bus = self.context.socket(zmq.SUB)
        self.bus.linger = 0
        self.bus.rcvhwm = settings.hwm_for(settings.bus_frame_bytes_max)
        for subscription in (topics.LOG, topics.event(EventKind.HANDSHAKE.value),
                             topics.event(EventKind.SESSIONS.value), topics.event(EventKind.JOURNAL.value)):
            self.bus.subscribe(subscription)
        self.bus.connect(endpoints.subscribe)
        self.first_sync: int | None = None  # the round of the first session sync, until it is read
        self.running = True

    def serve(self, stop_signals: int) -> None:
        """File until ``stop``. ``stop_signals`` turns readable when a stop signal
        arrives (see ``runtime.stop_on_signals``): polled too, it wakes the loop."""
        poller = zmq.Poller()
        poller.register(self.bus, zmq.POLLIN)
        poller.register(stop_signals, zmq.POLLIN)
        interval_ms = int(self.settings.health_interval * 1000)
        next_health = 0.0
        # Ready before catching up: a journal far behind (a restored state root, a long
        # outage) takes seconds a million lines, and the bridge acks without it.
        logger.info("journal ready", seq=self.vm_logs.seq, log=str(self.vm_logs.bus_log))
        runtime.notify_ready()
        self.rebuild()
        while self.running:
            if self.bus in dict(poller.poll(interval_ms)):
                self.read_bus()
            now = time.monotonic()
            if now >= next_health:
                next_health = now + self.settings.health_interval
                self.vm_logs.follow_rotation()
                self.vm_logs.checkpoint()

    def read_bus(self) -> None:
        for parts in runtime.ready_messages(self.bus, _MESSAGES_PER_TURN):
            if len(parts) != 2:
                logger.warning("dropped malformed bus message", reason=f"{len(parts)} frames")
            elif parts[0] == topics.LOG:
                self.file(parts[1])
            else:
                self.handle_event(parts[1])

    def file(self, data: bytes) -> None:
        """File one ``log`` message: whole lines of commits, in seq order."""
        try:
            records = decode_log_lines(data)
        except msgspec.DecodeError as exc:
            logger.warning("dropped malformed log message", reason=str(exc))
            return
        # A line ends only at its newline: compact JSON has no raw \r or \n.
        lines = data.splitlines(keepends=True)
        if not records or len(lines) != len(records):
            logger.warning("dropped malformed log message", reason="not whole lines of records")
            return
        messages: list[Message] = [(record.vm, record.topic, record.payload) for record in records]
        self.guard(lambda: self.vm_logs.append(records[0].seq, messages, lines))

    def handle_event(self, data: bytes) -> None:
        """Connected VMs may get a log; a bridge's seq past ours is lines we missed."""
        try:
            event = decode_event(data)
        except msgspec.DecodeError as exc:
            logger.warning("dropped malformed event", reason=str(exc))
            return
        match event:
            case HandshakeEvent(outcome="ok" | "session", vm=str(vm)):
                self.add_known(vm)
            case SessionsEvent():
                # Only the first sync matters (the sessions opened before this role
                # started); later sessions come with their handshake events.
                if self.first_sync is None:
                    self.first_sync = event.sync_round
                if event.sync_round == self.first_sync:
                    for session in event.sessions:
                        self.add_known(session.vm)
                else:
                    self.bus.unsubscribe(topics.event(EventKind.SESSIONS.value))
            case JournalEvent(seq=int(seq)) if seq > (self.vm_logs.seq or 0):
                self.rebuild()

    def add_known(self, vm: str) -> None:
        if is_vm_name(vm):
            self.known.add(vm, refresh=True)

    def rebuild(self) -> None:
        """Copy to the per-VM logs what they lack of the end of ``bus.log``."""
        self.guard(self.vm_logs.rebuild)

    def guard(self, write) -> None:
        """Run ``write``; a failure is logged once per reason, and what it left out
        is copied from ``bus.log`` with the next lines (a gap in seqs)."""
        try:
            write()
        except LogWriteFailed as exc:
            if exc.reason != self.failure:
                logger.error("per-VM logs not written", reason=exc.reason)
            self.failure = exc.reason
            return
        if self.failure is not None:
            logger.info("per-VM logs written again", seq=self.vm_logs.seq)
            self.failure = None

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.vm_logs.close()
        self.bus.close(linger=0)
        self.context.term()
        logger.info("journal stopped", seq=self.vm_logs.seq)


def main() -> None:
    runtime.run_polling_role("journal", Journal)


if __name__ == "__main__":
    main()
