"""The per-VM status table: its model, how events fold into it, what it shows.

Pure (no sockets): the status role folds bus events into a ``StatusTable`` and
snapshots it; ``castra status`` turns a table into a ``StatusView``. Ages are
computed from wall-clock timestamps (they must survive restarts) and clamped at
zero, so a clock stepped backwards never yields a negative age.

A VM may hold several bus sessions at once (processes of one guest share its
name): its record keeps each open one (``sessions``) and shows one row for all of
them: open while any is, ``session`` the oldest open one, ``topics`` the union.

The table stays small whatever guests do: only an accepted handshake or session
makes a record (a refused one only counts in ``refused_handshakes``), and at each
session sync ``prune`` forgets VMs without an open session that were not seen for
``IDLE_RECORD_TTL_MS``, and the least recently seen beyond ``MAX_IDLE_RECORDS``.

Runs in: the status role (the table) and ``castra status`` (its view).
"""

from __future__ import annotations

import msgspec

from .endpoints import Endpoints
from .events import (
    REMOTE_HOSTS_MAX,
    BackpressureEvent,
    Event,
    HandshakeEvent,
    HeartbeatEvent,
    JournalEvent,
    PublishEvent,
    RemoteHost,
    SessionCloseEvent,
    SessionOpenEvent,
    SessionsEvent,
    SubscribeEvent,
    UnsubscribeEvent,
    UplinkEvent,
    now_ms,
)
from .owner import RoleState
from .statefs import read_regular, replace_file
from .wire import json_encode

MAX_IDLE_RECORDS = 1024  # records of VMs without an open session
IDLE_RECORD_TTL_MS = 7 * 24 * 3600 * 1000  # a VM not seen for this long is forgotten


class SessionRecord(msgspec.Struct, kw_only=True):
    """One open bus session of a VM."""

    topics: list[str] = []
    opened_ms: int = 0  # when status learnt it is open (its session_open event, or a sync)
    sync_round: int = 0  # the last session sync that listed it open


class VmRecord(msgspec.Struct, kw_only=True):
    name: str
    capabilities: list[str] = []
    bus_protocol: str | None = None
    last_handshake_ms: int | None = None
    last_handshake_outcome: str | None = None
    # The VM's open sessions by token, oldest first; the three fields after it are
    # what they add up to (see ``refresh_sessions``).
    sessions: dict[str, SessionRecord] = {}
    session: str | None = None  # the oldest open session (the last one, once none is open)
    session_open: bool = False  # any session open
    topics: list[str] = []  # the union of the open sessions' topics, sorted
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
    # The bridge's last session sync or health event: its sessions are shown open
    # while it is fresh (a killed bridge cannot leave VMs looking connected). With
    # many guests a sync comes only every few health ticks; the health event, every one.
    bridge_seen_ms: int | None = None
    handshake_fresh_ms: int = 45_000
    stale_after_ms: int = 2_000  # how old a bridge sync or journal health may get
    refused_handshakes: int = 0  # since the state root was made; they leave no record
    sync_round: int = 0  # the bridge's session sync being received
    sync_parts_seen: int = 0  # of it
    written_ms: int | None = None
    # The uplink's last health event (``castra up --uplink`` only), its remote hosts
    # merged with those of the events before it: an uplink restarted forgets them.
    uplink: UplinkEvent | None = None


# -- state/fleet.json: where every VM lives, written by the uplink (``claims``) -------


class FleetVm(msgspec.Struct, array_like=True):
    vm: str
    host: str
    state: str  # owned | released
    since_ms: int


class FleetView(msgspec.Struct):
    """``state/fleet.json``: the owners bucket as this host's uplink last saw it
    (``ownership``), and the VMs connected here that another host owns (vm -> that
    host). Here, not in ``ownership``: ``castra status`` reads it without loading a
    NATS client."""

    host: str  # this host
    written_ms: int
    vms: list[FleetVm] = []
    waiting: dict[str, str] = {}


decode_fleet = msgspec.json.Decoder(FleetView).decode


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
    session: str | None  # the oldest open session, when there are several
    last_reason: str | None
    sessions: int = 0  # open bus sessions of this VM (processes of one guest share its name)


class JournalStatus(msgspec.Struct):
    state: str  # ok | error | down
    reason: str | None
    seq: int | None


class RouterStatus(msgspec.Struct):
    """The router part of ``castra status``: from its ``run/router.json``, by the CLI."""

    running: bool
    pid: int | None
    listen: str | None
    uptime_ms: int | None
    state_root: str
    source: str  # live (the status role answered), snapshot (its last file), none
    processes: dict[str, RoleState] = {}


class RemoteHostStatus(msgspec.Struct):
    host: str
    last_seq: int  # the origin seq of its last message downloaded here
    last_seen_age_ms: int


class UplinkStatus(msgspec.Struct):
    state: str  # connected | disconnected | down (the uplink has not reported for stale_after_ms)
    host: str
    server: str | None  # host:port of the NATS server, while connected
    reason: str | None  # the last failure on NATS, while not connected
    committed_seq: int | None
    uploaded_seq: int
    upload_lag_messages: int | None  # committed_seq - uploaded_seq (other hosts' lines counted)
    upload_lag_ms: int | None  # age of the oldest line not uploaded; 0 when none
    downloaded_stream_seq: int | None
    download_pending: int | None
    remote_hosts: list[RemoteHostStatus]


class FleetVmStatus(msgspec.Struct):
    vm: str
    host: str  # its owner, or the host that released it last
    state: str  # owned | released
    since_age_ms: int  # since it was claimed or released
    here: bool  # host is this host


class FleetStatus(msgspec.Struct):
    """``castra status --fleet``: where every VM lives, as this host's uplink last
    saw the owners bucket (``state/fleet.json``)."""

    host: str | None  # this host's name in the fleet; None: no uplink configured
    nats: str  # connected | unreachable (the uplink reports no connection) | down (the uplink does not report) | none
    known_age_ms: int | None  # how old what follows is; None: nothing known yet
    vms: list[FleetVmStatus] = []
    waiting: dict[str, str] = {}  # VM connected here -> the live host that owns it


class StatusView(msgspec.Struct):
    vms: list[VmStatus]
    router: RouterStatus | None = None  # None from the status role: the CLI fills it in
    journal: JournalStatus | None = None
    refused_handshakes: int = 0
    # Absent from the JSON without --uplink (UNSET is never encoded): the shape
    # scripts rely on stays as it was.
    uplink: UplinkStatus | msgspec.UnsetType = msgspec.UNSET
    fleet: FleetStatus | None | msgspec.UnsetType = msgspec.UNSET  # --fleet only; None: no uplink


def _age(now: int, then: int | None) -> int | None:
    return None if then is None else max(0, now - then)


def _fresh(now: int, then: int | None, limit_ms: int) -> bool:
    return then is not None and now - then <= limit_ms


def view(table: StatusTable, now: int) -> StatusView:
    """The status as of ``now`` (unix ms), from a live table or a snapshot."""
    bridge_live = _fresh(now, table.bridge_seen_ms, table.stale_after_ms)
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
                # A snapshot of an older router may say open with no sessions listed.
                sessions=max(1, len(record.sessions)) if open_session else 0,
            )
        )
    journal = table.journal
    state = journal.state if _fresh(now, journal.seen_ms, table.stale_after_ms) else "down"
    return StatusView(vms=vms, journal=JournalStatus(state=state, reason=journal.reason, seq=journal.seq),
                      refused_handshakes=table.refused_handshakes,
                      uplink=msgspec.UNSET if table.uplink is None else uplink_view(table, now))


def uplink_view(table: StatusTable, now: int) -> UplinkStatus:
    event = table.uplink
    if not _fresh(now, event.ts_ms, table.stale_after_ms):
        state = "down"
    else:
        state = "connected" if event.server is not None else "disconnected"
    lag = None if event.committed_seq is None else max(0, event.committed_seq - event.uploaded_seq)
    return UplinkStatus(
        state=state,
        host=event.host,
        server=event.server if state == "connected" else None,
        reason=event.reason,
        committed_seq=event.committed_seq,
        uploaded_seq=event.uploaded_seq,
        upload_lag_messages=lag,
        upload_lag_ms=0 if event.oldest_pending_ms is None else _age(now, event.oldest_pending_ms),
        downloaded_stream_seq=event.downloaded_stream_seq,
        download_pending=event.download_pending,
        remote_hosts=[RemoteHostStatus(seen.host, seen.seq, _age(now, seen.seen_ms))
                      for seen in sorted(event.remote_hosts, key=lambda seen: seen.host)],
    )


def vm_record(table: StatusTable, vm: str) -> VmRecord:
    """``vm``'s record, made if needed: only for a VM whose handshake was accepted."""
    record = table.vms.get(vm)
    if record is None:
        record = table.vms[vm] = VmRecord(name=vm)
    return record


def apply_event(table: StatusTable, event: Event) -> None:
    """Fold one event into the table (pure: no I/O)."""
    match event:
        case JournalEvent():
            table.journal = JournalHealth(state=event.outcome, reason=event.reason, seq=event.seq,
                                          seen_ms=event.ts_ms)
            table.bridge_seen_ms = event.ts_ms
        case SessionsEvent():
            apply_sessions(table, event)
        case UplinkEvent():
            event.remote_hosts = merge_remote_hosts(table.uplink.remote_hosts if table.uplink else [],
                                                    event.remote_hosts)
            table.uplink = event
        case PublishEvent():
            for vm in event.counts:
                record = table.vms.get(vm)  # none for host, nor for a VM already forgotten
                if record is not None:
                    record.last_publish_ms = event.ts_ms
        case HandshakeEvent(outcome="error"):
            # Any name can be refused, as often as a guest likes: only a VM already
            # known keeps the reason.
            table.refused_handshakes += 1
            record = table.vms.get(event.vm) if event.vm else None
            if record is not None:
                record.last_reason = event.reason
        case HandshakeEvent(vm=str(vm)) if vm:
            record = vm_record(table, vm)
            record.last_handshake_ms = event.ts_ms
            record.last_handshake_outcome = event.outcome
            record.capabilities = event.capabilities or []
            record.bus_protocol = event.bus_protocol
        case SessionOpenEvent(vm=str(vm)) if vm:
            record = vm_record(table, vm)
            record.sessions[event.session] = SessionRecord(opened_ms=event.ts_ms, sync_round=table.sync_round)
            record.bus_protocol = event.bus_protocol
            record.last_heartbeat_ms = event.ts_ms
            refresh_sessions(record)
        case SessionCloseEvent() | SubscribeEvent() | UnsubscribeEvent() | HeartbeatEvent() | BackpressureEvent():
            apply_session_event(table, event)


def apply_session_event(table: StatusTable, event: Event) -> None:
    """An event of one open session; a late one (its VM forgotten, its session
    closed) changes nothing."""
    record = table.vms.get(event.vm) if event.vm else None
    if record is None or event.session not in record.sessions:
        return
    match event:
        case SessionCloseEvent():
            del record.sessions[event.session]
            record.last_reason = event.reason
            refresh_sessions(record)
        case SubscribeEvent() | UnsubscribeEvent():
            record.sessions[event.session].topics = event.topics
            refresh_sessions(record)
        case HeartbeatEvent():
            record.last_heartbeat_ms = event.ts_ms
        case BackpressureEvent():
            record.last_reason = event.reason


def refresh_sessions(record: VmRecord) -> None:
    """Sum up the VM's open sessions in its row: open while any is, ``session`` the
    oldest, ``topics`` the union (at most ``max_sessions_per_vm`` x 16 of them)."""
    if record.sessions:
        record.session_open = True
        record.session = next(iter(record.sessions))
        record.topics = sorted({topic for state in record.sessions.values() for topic in state.topics})
    else:
        record.session_open = False
        record.topics = []


def apply_sessions(table: StatusTable, event: SessionsEvent) -> None:
    """One part of the bridge's session sync: its sessions are open. Once every
    part of a sync came, a session that none of them listed is closed; a sync
    with a part lost closes nothing (the next one will).
    One VM's sessions may be spread over several parts."""
    table.bridge_seen_ms = event.ts_ms
    sync_round = event.sync_round or event.ts_ms
    if sync_round != table.sync_round:
        table.sync_round = sync_round
        table.sync_parts_seen = 0
    table.sync_parts_seen += 1
    touched: dict[str, VmRecord] = {}
    for info in event.sessions or []:
        record = touched.get(info.vm) or vm_record(table, info.vm)
        touched[info.vm] = record
        state = record.sessions.get(info.session)
        if state is None:
            state = record.sessions[info.session] = SessionRecord(opened_ms=event.ts_ms)
        state.sync_round = sync_round
        state.topics = info.topics
        record.bus_protocol = info.bus_protocol
        if info.last_heartbeat_ms is not None:
            record.last_heartbeat_ms = max(record.last_heartbeat_ms or 0, info.last_heartbeat_ms)
    for record in touched.values():
        refresh_sessions(record)
    if table.sync_parts_seen < (event.sync_parts or 1):
        return
    for record in table.vms.values():
        if not record.session_open:
            continue
        lost = [token for token, state in record.sessions.items() if state.sync_round != sync_round]
        for token in lost:
            del record.sessions[token]
        if lost or not record.sessions:  # none listed: also a record of an older snapshot
            refresh_sessions(record)
            if not record.session_open:
                record.last_reason = record.last_reason or "session lost"
    prune(table, event.ts_ms)


def merge_remote_hosts(known: list[RemoteHost], reported: list[RemoteHost]) -> list[RemoteHost]:
    """Each host's latest sighting, of the ``REMOTE_HOSTS_MAX`` most recently seen."""
    latest = {seen.host: seen for seen in known}
    for seen in reported:
        if seen.host not in latest or seen.seen_ms >= latest[seen.host].seen_ms:
            latest[seen.host] = seen
    return sorted(latest.values(), key=lambda seen: seen.seen_ms, reverse=True)[:REMOTE_HOSTS_MAX]


def last_seen_ms(record: VmRecord) -> int:
    return max((t for t in (record.last_handshake_ms, record.last_heartbeat_ms, record.last_publish_ms)
                if t is not None), default=0)


def prune(table: StatusTable, now: int) -> None:
    """Forget VMs without an open session that were not seen for ``IDLE_RECORD_TTL_MS``,
    and the least recently seen of them beyond ``MAX_IDLE_RECORDS``."""
    idle = [(last_seen_ms(record), name) for name, record in table.vms.items() if not record.session_open]
    if len(idle) > MAX_IDLE_RECORDS:
        idle.sort(reverse=True)
        for _, name in idle[MAX_IDLE_RECORDS:]:
            del table.vms[name]
        del idle[MAX_IDLE_RECORDS:]
    for seen, name in idle:
        if now - seen > IDLE_RECORD_TTL_MS:
            del table.vms[name]


_decode_table = msgspec.json.Decoder(StatusTable).decode


def load_snapshot(endpoints: Endpoints) -> StatusTable | None:
    try:
        return _decode_table(read_regular(endpoints.snapshot))
    except (OSError, msgspec.DecodeError):  # none yet, or not a regular file of ours: start afresh
        return None


def write_snapshot(endpoints: Endpoints, table: StatusTable) -> None:
    """Replace the snapshot whole (``statefs.replace_file``): readers never see half."""
    table.written_ms = now_ms()
    replace_file(endpoints.snapshot, json_encode(table))
