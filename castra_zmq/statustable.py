"""The per-VM status table: its model, how events fold into it, what it shows.

Pure (no sockets): the status role folds bus events into a ``StatusTable`` and
snapshots it; ``castra status`` turns a table into a ``StatusView``. Ages are
computed from wall-clock timestamps (they must survive restarts) and clamped at
zero, so a clock stepped backwards never yields a negative age.
"""

from __future__ import annotations

import os

import msgspec

from .endpoints import Endpoints
from .events import Event, EventKind, now_ms
from .handshake import HOST_SENDER
from .wire import json_encode


class VmRecord(msgspec.Struct, kw_only=True):
    name: str
    capabilities: list[str] = []
    bus_protocol: str | None = None
    last_handshake_ms: int | None = None
    last_handshake_outcome: str | None = None
    session: str | None = None
    session_open: bool = False
    topics: list[str] = []
    last_publish_ms: int | None = None
    last_heartbeat_ms: int | None = None
    last_reason: str | None = None  # why the last session closed or handshake failed


class JournalHealth(msgspec.Struct, kw_only=True):
    state: str = "unknown"  # ok | error | unknown
    reason: str | None = None
    seq: int | None = None
    seen_ms: int | None = None


class StatusTable(msgspec.Struct, kw_only=True):
    """What the status role knows; this is also the snapshot file's content."""

    vms: dict[str, VmRecord] = {}
    journal: JournalHealth = msgspec.field(default_factory=JournalHealth)
    bridge_sync_ms: int | None = None
    handshake_fresh_ms: int = 45_000
    stale_after_ms: int = 2_000  # how old a bridge sync or journal health may get
    written_ms: int | None = None


# -- what `castra status --json` prints ---------------------------------------------


class VmStatus(msgspec.Struct):
    name: str
    reachable: bool
    last_handshake_age_ms: int | None
    capabilities: list[str]
    bus_protocol: str | None
    bus_subscribed: bool
    subscribed_topics: list[str]
    last_publish_age_ms: int | None
    last_heartbeat_age_ms: int | None
    session: str | None
    last_reason: str | None


class JournalStatus(msgspec.Struct):
    state: str  # ok | error | down
    reason: str | None
    seq: int | None


class StatusView(msgspec.Struct):
    vms: list[VmStatus]
    router: dict = {}
    journal: JournalStatus | None = None


def _age(now: int, then: int | None) -> int | None:
    return None if then is None else max(0, now - then)


def _fresh(now: int, then: int | None, limit_ms: int) -> bool:
    return then is not None and now - then <= limit_ms


def view(table: StatusTable, now: int) -> StatusView:
    """The status as of ``now`` (unix ms), from a live table or a snapshot."""
    bridge_live = _fresh(now, table.bridge_sync_ms, table.stale_after_ms)
    vms = []
    for record in sorted(table.vms.values(), key=lambda r: r.name):
        open_session = record.session_open and bridge_live
        handshake_age = _age(now, record.last_handshake_ms)
        reachable = open_session or (handshake_age is not None and handshake_age < table.handshake_fresh_ms)
        vms.append(
            VmStatus(
                name=record.name,
                reachable=reachable,
                last_handshake_age_ms=handshake_age,
                capabilities=record.capabilities,
                bus_protocol=record.bus_protocol,
                bus_subscribed=open_session,
                subscribed_topics=record.topics if open_session else [],
                last_publish_age_ms=_age(now, record.last_publish_ms),
                last_heartbeat_age_ms=_age(now, record.last_heartbeat_ms),
                session=record.session if open_session else None,
                last_reason=record.last_reason,
            )
        )
    journal = table.journal
    state = journal.state if _fresh(now, journal.seen_ms, table.stale_after_ms) else "down"
    return StatusView(vms=vms, journal=JournalStatus(state=state, reason=journal.reason, seq=journal.seq))


def vm_record(table: StatusTable, vm: str) -> VmRecord:
    record = table.vms.get(vm)
    if record is None:
        record = table.vms[vm] = VmRecord(name=vm)
    return record


def apply_event(table: StatusTable, event: Event) -> None:
    """Fold one event into the table (pure: no I/O)."""
    kind = event.kind
    if kind is EventKind.JOURNAL:
        table.journal = JournalHealth(state=event.outcome or "unknown", reason=event.reason, seq=event.seq, seen_ms=event.ts_ms)
        return
    if kind is EventKind.SESSIONS:
        apply_sessions(table, event)
        return
    if kind is EventKind.PUBLISH:
        for vm in event.counts or ():
            if vm != HOST_SENDER:  # host publishes are not a VM's
                vm_record(table, vm).last_publish_ms = event.ts_ms
        return
    if not event.vm:
        return
    record = vm_record(table, event.vm)
    if kind is EventKind.HANDSHAKE:
        if event.outcome == "error":
            record.last_reason = event.reason
        else:
            record.last_handshake_ms = event.ts_ms
            record.last_handshake_outcome = event.outcome
            record.capabilities = event.capabilities or []
            record.bus_protocol = event.bus_protocol
    elif kind is EventKind.SESSION_OPEN:
        record.session = event.session
        record.session_open = True
        record.bus_protocol = event.bus_protocol
        record.topics = []
        record.last_heartbeat_ms = event.ts_ms
    elif event.session != record.session:
        return  # a late event of a session already replaced
    elif kind is EventKind.SESSION_CLOSE:
        record.session_open = False
        record.topics = []
        record.last_reason = event.reason
    elif kind in (EventKind.SUBSCRIBE, EventKind.UNSUBSCRIBE):
        record.topics = event.topics or []
    elif kind is EventKind.HEARTBEAT:
        record.last_heartbeat_ms = event.ts_ms
    elif kind is EventKind.BACKPRESSURE:
        record.last_reason = event.reason


def apply_sessions(table: StatusTable, event: Event) -> None:
    table.bridge_sync_ms = event.ts_ms
    live = {info.vm: info for info in event.sessions or []}
    for name, info in live.items():
        record = vm_record(table, name)
        record.session = info.session
        record.session_open = True
        record.bus_protocol = info.bus_protocol
        record.topics = info.topics
        if info.last_heartbeat_ms is not None:
            record.last_heartbeat_ms = info.last_heartbeat_ms
    for name, record in table.vms.items():
        if record.session_open and name not in live:
            record.session_open = False
            record.topics = []
            record.last_reason = record.last_reason or "session lost"


_decode_table = msgspec.json.Decoder(StatusTable).decode


def load_snapshot(endpoints: Endpoints) -> StatusTable | None:
    try:
        return _decode_table(endpoints.snapshot.read_bytes())
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def write_snapshot(endpoints: Endpoints, table: StatusTable) -> None:
    """Write to a temp file and rename over the old one: readers never see half."""
    table.written_ms = now_ms()
    tmp = endpoints.snapshot.with_name(endpoints.snapshot.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json_encode(table))
    finally:
        os.close(fd)
    os.replace(tmp, endpoints.snapshot)
