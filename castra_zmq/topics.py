"""Topic frames of the internal bus (the first frame of every ZeroMQ message).

ZeroMQ subscriptions match byte prefixes, so every variable part ends in ``\\0``:
``bus\\0vm:alpha\\0`` is not a prefix of ``bus\\0vm:alpha2\\0``. Bus topics may not
contain NUL (``wire.Topic`` refuses it), which keeps the terminator unambiguous.

| frame                 | from -> to                       | further frames                  |
|-----------------------|----------------------------------|---------------------------------|
| ``pub\\0``             | bridge, CLI, host tools -> journal | PublishRequest JSON, payload  |
| ``bus\\0<topic>\\0``    | journal -> bridge, host tools     | sender, Delivery JSON          |
| ``ack\\0<origin>\\0``   | journal -> one publisher          | CommitBatch JSON               |
| ``evt\\0<kind>\\0``     | every role -> status              | Event JSON                     |
"""

from __future__ import annotations

PUBLISH = b"pub\0"
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


def bus_topic(frame: bytes) -> str:
    """Inverse of ``bus``."""
    return frame[len(BUS_ALL) : -1].decode("utf-8")


def event_kind(frame: bytes) -> str:
    return frame[len(EVENT_ALL) : -1].decode("utf-8")
