"""Topic frames of the internal bus (the first frame of every ZeroMQ message).

ZeroMQ subscriptions match byte prefixes, so every variable part ends in ``\\0``:
``bus\\0vm:alpha\\0`` is not a prefix of ``bus\\0vm:alpha2\\0``. Bus topics may not
contain NUL (``wire.Topic`` refuses it), which keeps the terminator unambiguous.

| frame               | from -> to                  | further frames          |
|---------------------|-----------------------------|-------------------------|
| ``bus\\0<topic>\\0``  | bridge -> host tools        | sender, Delivery JSON   |
| ``log\\0``            | bridge -> journal           | whole log lines         |
| ``seq\\0``            | bridge -> uplink            | the log's seq, ASCII    |
| ``evt\\0<kind>\\0``   | every role -> status, ...   | Event JSON              |

The bridge sends ``bus`` messages only while a host tool subscribes to them (its
XPUB sees the subscriptions), and the lines of each commit as ``log`` messages
(at most ``bus_frame_bytes_max`` each) for the journal to file in the per-VM
logs, 5 ms late at most. Right after each commit, while someone
subscribes to it (the uplink), it also sends the log's seq as a ``seq`` message:
the uplink uploads a commit without that delay, and without taking every line
from the bus. Host tools' publishes and their results do not cross the proxy: they go
over the bridge's own socket (``run/journal.sock``), one message per batch.

Runs in: every role and host tool on the internal bus.
"""

from __future__ import annotations

from .subscriptions import pattern_prefix

BUS_ALL = b"bus\0"
LOG = b"log\0"
COMMITTED = b"seq\0"
EVENT_ALL = b"evt\0"


def _frame(prefix: bytes, name: str) -> bytes:
    return prefix + name.encode("utf-8") + b"\0"


def bus(topic: str) -> bytes:
    """Frame of committed messages on ``topic`` (and the subscription for it)."""
    return _frame(BUS_ALL, topic)


def bus_subscription(pattern: str) -> bytes:
    """The subscription for a topic, or for a pattern ``p*`` (``*``: every topic):
    ``bus\\0p`` without the terminating NUL, a prefix of every topic starting with ``p``."""
    prefix = pattern_prefix(pattern)
    return bus(pattern) if prefix is None else BUS_ALL + prefix.encode("utf-8")


def event(kind: str) -> bytes:
    return _frame(EVENT_ALL, kind)
