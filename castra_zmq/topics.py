"""Topic frames of the internal bus (the first frame of every ZeroMQ message).

ZeroMQ subscriptions match byte prefixes, so every variable part ends in ``\\0``:
``bus\\0vm:alpha\\0`` is not a prefix of ``bus\\0vm:alpha2\\0``. Bus topics may not
contain NUL (``wire.Topic`` refuses it), which keeps the terminator unambiguous.

| frame                | from -> to                          | further frames                       |
|----------------------|-------------------------------------|--------------------------------------|
| ``pub\\0``            | bridge -> journal                   | PublishRequest JSON array, payloads  |
| ``ack\\0<origin>\\0``  | journal -> one publisher            | CommitBatch JSON                     |
| ``cmt\\0``            | journal -> bridges, once per commit | CommittedIndex JSON, Delivery JSONs  |
| ``bus\\0<topic>\\0``   | journal -> host tools               | sender, Delivery JSON                |
| ``evt\\0<kind>\\0``    | every role -> status                | Event JSON                           |

A ``pub`` or ``cmt`` message carries a whole batch: one message per loop turn or
commit instead of one per publish is most of what the bus costs per message. The
journal sends ``bus`` messages only while a host tool subscribes to them (its
XPUB sees the subscriptions), since bridges take everything from ``cmt``. Host
publishes do not cross the bus: they go to the journal's ROUTER (``run/journal.sock``).
"""

from __future__ import annotations

PUBLISH = b"pub\0"
COMMITTED = b"cmt\0"
BUS_ALL = b"bus\0"
ACK_PREFIX = b"ack\0"
EVENT_ALL = b"evt\0"


def _frame(prefix: bytes, name: str) -> bytes:
    return prefix + name.encode("utf-8") + b"\0"


def bus(topic: str) -> bytes:
    """Frame of committed messages on ``topic`` (and the subscription for it)."""
    return _frame(BUS_ALL, topic)


def ack(origin: str) -> bytes:
    """Frame of commit results meant for one publisher."""
    return _frame(ACK_PREFIX, origin)


def event(kind: str) -> bytes:
    return _frame(EVENT_ALL, kind)


def event_kind(frame: bytes) -> str:
    return frame[len(EVENT_ALL) : -1].decode("utf-8")
