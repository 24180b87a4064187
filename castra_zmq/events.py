"""Structured events: one name list and one Struct, published on ``evt\\0<kind>\\0``.

Every handshake, session change, back-pressure action and process change leaves
one event (for the status role) beside its one log line.
"""

from __future__ import annotations

import enum
import time

import msgspec

from . import topics


class EventKind(str, enum.Enum):
    HANDSHAKE = "handshake"  # vm, capabilities, outcome (ok|session|error), reason
    SESSION_OPEN = "session_open"  # vm, session, bus_protocol
    SESSION_CLOSE = "session_close"  # vm, session, reason
    SUBSCRIBE = "subscribe"  # vm, session, topics (the session's topics after it)
    UNSUBSCRIBE = "unsubscribe"  # vm, session, topics
    HEARTBEAT = "heartbeat"  # vm, session
    PUBLISH = "publish"  # counts (vm -> committed publishes since the last one), seq; <= 10/s
    BACKPRESSURE = "backpressure"  # vm, session, action, reason
    SESSIONS = "sessions"  # sessions: the bridge's open sessions, sent periodically
    JOURNAL = "journal"  # outcome (ok|error), reason, seq: the journal's periodic health


class SessionInfo(msgspec.Struct, array_like=True):
    vm: str
    session: str
    bus_protocol: str
    topics: list[str]
    last_heartbeat_ms: int | None


class Event(msgspec.Struct, omit_defaults=True):
    kind: EventKind
    ts_ms: int
    vm: str | None = None
    session: str | None = None
    reason: str | None = None
    outcome: str | None = None
    action: str | None = None
    capabilities: list[str] | None = None
    bus_protocol: str | None = None
    topics: list[str] | None = None
    counts: dict[str, int] | None = None
    seq: int | None = None
    sessions: list[SessionInfo] | None = None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_encode = msgspec.json.Encoder().encode
decode_event = msgspec.json.Decoder(Event).decode


def event_message(kind: EventKind, **fields) -> list[bytes]:
    """The multipart message announcing one event."""
    return [topics.event(kind.value), _encode(Event(kind=kind, ts_ms=now_ms(), **fields))]
