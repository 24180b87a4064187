"""Structured events: a Struct per kind (a tagged union), published on ``evt\\0<kind>\\0``.

Every handshake, session change, back-pressure action and process change leaves
one event (for the status role) beside its one log line.

Runs in: the bridge and the proxy (they emit events), the status and journal roles
(they read them).
"""

from __future__ import annotations

import enum
import time

import msgspec

from . import topics


class EventKind(str, enum.Enum):
    HANDSHAKE = "handshake"  # vm, capabilities, outcome (ok|session|error), reason
    SESSION_OPEN = "session_open"  # vm, session, bus_protocol; a VM may have several sessions open
    SESSION_CLOSE = "session_close"  # vm, session, reason, seq
    SUBSCRIBE = "subscribe"  # vm, session, topics (the session's topics after it)
    UNSUBSCRIBE = "unsubscribe"  # vm, session, topics
    HEARTBEAT = "heartbeat"  # vm, session
    PUBLISH = "publish"  # counts (vm -> committed publishes since the last one), seq; <= 10/s
    BACKPRESSURE = "backpressure"  # vm, session, action, reason
    SESSIONS = "sessions"  # sessions, sync_round, sync_parts: one part of the bridge's periodic session sync
    JOURNAL = "journal"  # outcome (ok|error), reason, seq: the bridge's periodic health of bus.log
    PEER = "peer"  # peer, action (disconnect), reason: a subscriber the proxy disconnected
    UPLINK = "uplink"  # reason, host, server, upload and download positions, remote_hosts: the uplink's health
    HANDOVER = "handover"  # vm, session, reason, outcome (kept|delivered|dropped), claim: a VM that moved here


class SessionInfo(msgspec.Struct, array_like=True):
    vm: str
    session: str
    bus_protocol: str
    topics: list[str]
    last_heartbeat_ms: int | None


class Event(msgspec.Struct, tag_field="kind", omit_defaults=True, kw_only=True):
    """Base of the events: ``kind`` (the tag) and ``ts_ms`` first, then each kind's
    keys in one order across kinds (PROTOCOL.md 8.3), absent when null."""

    ts_ms: int


class HandshakeEvent(Event, tag=EventKind.HANDSHAKE.value, kw_only=True):
    vm: str | None = None  # None when no name was parsed (limits, timeout, bad hello)
    reason: str | None = None
    outcome: str  # ok (handshake-only), session, error
    capabilities: list[str] | None = None
    bus_protocol: str | None = None


class SessionOpenEvent(Event, tag=EventKind.SESSION_OPEN.value, kw_only=True):
    vm: str
    session: str
    bus_protocol: str | None = None


class SessionCloseEvent(Event, tag=EventKind.SESSION_CLOSE.value, kw_only=True):
    vm: str
    session: str
    reason: str | None = None
    seq: int | None = None  # bus.log's last committed seq then: what the session could have been sent


class SubscribeEvent(Event, tag=EventKind.SUBSCRIBE.value, kw_only=True):
    vm: str
    session: str
    topics: list[str] = []  # the session's topics afterwards


class UnsubscribeEvent(Event, tag=EventKind.UNSUBSCRIBE.value, kw_only=True):
    vm: str
    session: str
    topics: list[str] = []


class HeartbeatEvent(Event, tag=EventKind.HEARTBEAT.value, kw_only=True):
    vm: str
    session: str


class PublishEvent(Event, tag=EventKind.PUBLISH.value, kw_only=True):
    counts: dict[str, int]  # sender -> messages committed since the last event
    seq: int | None = None


class BackpressureEvent(Event, tag=EventKind.BACKPRESSURE.value, kw_only=True):
    vm: str | None = None
    session: str | None = None
    reason: str | None = None
    action: str  # pause_reading, disconnect


class SessionsEvent(Event, tag=EventKind.SESSIONS.value, kw_only=True):
    sessions: list[SessionInfo]
    sync_round: int | None = None  # a session sync: when it started (unix ms), the same in each part
    sync_parts: int | None = None  # how many parts that sync has


class JournalEvent(Event, tag=EventKind.JOURNAL.value, kw_only=True):
    reason: str | None = None
    outcome: str  # ok, error
    seq: int | None = None
    started_ms: int | None = None  # when this bridge process started (unix ms): another value, a restarted bridge


class PeerEvent(Event, tag=EventKind.PEER.value, kw_only=True):
    reason: str | None = None
    action: str  # disconnect
    peer: str  # a subscriber the proxy disconnected: pid:<n>


class RemoteHost(msgspec.Struct, array_like=True):
    """Another host whose messages the uplink downloaded: the origin of the last one."""

    host: str
    epoch: int
    seq: int
    seen_ms: int  # when the uplink handed it to the bridge (unix ms)


class UplinkEvent(Event, tag=EventKind.UPLINK.value, kw_only=True):
    """The uplink's health, every ``health_interval`` (``castra up --uplink`` only)."""

    reason: str | None = None  # the last failure on NATS (kept while not connected)
    host: str  # this host's name in the fleet
    server: str | None = None  # host:port of the NATS server it is connected to; None: not connected
    committed_seq: int | None = None  # bus.log's last committed seq, as the uplink knows it
    uploaded_seq: int = 0  # bus.log's seq the upload has gone through (other hosts' lines are passed over)
    oldest_pending_ms: int | None = None  # ts_ms of the oldest line not uploaded yet; None: none
    downloaded_stream_seq: int | None = None  # the stream seq of the last message downloaded and acked
    download_pending: int | None = None  # messages in the stream after it (as of that fetch)
    remote_hosts: list[RemoteHost] = []  # the most recently seen, at most REMOTE_HOSTS_MAX


class HandoverOutcome(str, enum.Enum):
    KEPT = "kept"  # no session of the VM subscribed to vm:<vm> yet: kept for the first that does
    DELIVERED = "delivered"  # a session was sent all of it (queued to its socket)
    DROPPED = "dropped"  # no session took it in time, or more than HANDOVERS_MAX were pending


class HandoverEvent(Event, tag=EventKind.HANDOVER.value, kw_only=True):
    """What the bridge did with a handover (``handover``, PROTOCOL.md 8.2.1): the
    uplink keeps its request until it is ``delivered`` or ``dropped``."""

    vm: str
    session: str | None = None  # the session it was delivered to
    reason: str | None = None
    outcome: HandoverOutcome
    claim: int  # the request's claim (its revision in CASTRA_VMS): which request this is about


AnyEvent = (HandshakeEvent | SessionOpenEvent | SessionCloseEvent | SubscribeEvent | UnsubscribeEvent
            | HeartbeatEvent | PublishEvent | BackpressureEvent | SessionsEvent | JournalEvent | PeerEvent
            | UplinkEvent | HandoverEvent)
EVENT_TYPES: dict[EventKind, type[Event]] = {
    EventKind(cls.__struct_config__.tag): cls for cls in AnyEvent.__args__  # type: ignore[attr-defined]
}


# No event is larger: a subscribe event lists at most 16 topics of 256 characters
# (6 bytes each at worst in JSON, about 25 KB), the session sync is split to fit,
# and an uplink event lists at most REMOTE_HOSTS_MAX hosts (names of at most 253
# characters that JSON never escapes, about 19 KB).
# Event sockets' high-water marks are sized from it (``Settings.hwm_for``).
EVENT_BYTES_MAX = 32 * 1024
REMOTE_HOSTS_MAX = 64


def split_sessions(sessions: list[SessionInfo], part_bytes: int) -> list[list[SessionInfo]]:
    """``sessions`` in parts whose events stay under ``part_bytes`` (one part at least,
    maybe empty). A size is bounded from above: each character of a name or topic
    takes at most 6 bytes in JSON (``\\uXXXX``), the rest of a session under 64."""
    parts: list[list[SessionInfo]] = [[]]
    size = 0
    for info in sessions:
        info_bytes = 64 + 6 * (len(info.vm) + sum(len(topic) + 3 for topic in info.topics))
        if size + info_bytes > part_bytes and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(info)
        size += info_bytes
    return parts


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_encode = msgspec.json.Encoder().encode
decode_event = msgspec.json.Decoder(AnyEvent).decode


def event_message(kind: EventKind, **fields) -> list[bytes]:
    """The multipart message announcing one event."""
    return [topics.event(kind.value), _encode(EVENT_TYPES[kind](ts_ms=now_ms(), **fields))]
