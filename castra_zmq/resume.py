"""A bus-v2 session's catch-up: what it missed, from the log, then live (PROTOCOL.md 4.3.1).

A subscribe with ``since`` starts (or widens) a ``Catchup``. While one runs, the
bridge delivers nothing live to the session (``Bridge.deliver`` skips it): the
catch-up reads ``bus.log`` from the lowest position any subscription needs and
delivers every line one of the session's subscriptions wants, live ones
included, so the session gets one stream in seq order. When it has read
everything committed it ends, in that same loop callback, and live delivery goes
on from the next commit: no gap, no duplicate.

Each subscription has an ``after``: the seq up to which it needs nothing. A
``since`` subscription's is its ``since``; one that was live when the catch-up
began got everything up to then; one made during it wants what comes after it.
A line goes to the guest if one subscription that matches it (and that the guest
may read) has an ``after`` below its seq.

Cost and memory: a step reads at most ``replay.READ_CHUNK`` bytes of the log, and
only while what waits for the guest is under half of its outbound budget (the
point where its transport pauses: then ``resume_writing`` goes on); steps of
sessions and guests' frames take turns in the loop. A guest that stops reading
is dropped as a slow consumer, as for live messages.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .framing import encode_frame
from .handshake import VM_TOPIC_PREFIX, sender_of
from .replay import READ_CHUNK, Cursor, Expired, segments
from .subscriptions import pattern_prefix
from .wire import Delivery, decode_log_lines, json_encode

if TYPE_CHECKING:
    from .session import GuestConnection

_TOPIC_KEY = b',"topic":"'
_TOPIC_END = b'","payload":'
RETRY_DELAY = 0.1  # seconds: a log that cannot be read (being rotated, failing) is read again after it
REPLAY_EXPIRED = "replay_expired"  # a session's close reason: its log went while it was replayed


def oldest_seq(directory, name: str, head: int) -> int:
    """The seq of the oldest message the logs still hold; ``head + 1`` when none."""
    found = segments(directory, name)
    return found[0][0] if found else head + 1


class Catchup:
    def __init__(self, connection: GuestConnection, head: int):
        self.connection = connection
        bridge = connection.bridge
        self.log_path = bridge.log.path
        # What the session's subscriptions had: everything up to now, live.
        self.after: dict[str, int] = dict.fromkeys(connection.topics, head)
        self.cursor: Cursor | None = None
        self.scheduled = False
        self.replayed = 0

    def add(self, topic: str, since: int) -> None:
        """``topic`` wants what comes after ``since``; read from there if that is
        behind where reading is (the other subscriptions had that stretch)."""
        if self.cursor is None or since < self.cursor.after:
            if self.cursor is not None:
                for other, after in self.after.items():
                    self.after[other] = max(after, self.cursor.after)
            self.cursor = Cursor(self.log_path.parent, since, self.log_path.name)
        self.after[topic] = since
        self.schedule()

    def add_live(self, topic: str, head: int) -> None:
        self.after[topic] = head

    def discard(self, topic: str) -> None:
        self.after.pop(topic, None)

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.step)

    def step(self) -> None:
        """Read and queue the next lines, or end the catch-up once all committed
        lines are read; wait for the guest to read when its queue is half full."""
        self.scheduled = False
        connection = self.connection
        if connection.catchup is not self:
            return  # closed, or replaced
        room = connection.outbound_room()
        if room <= 0:
            # resume_writing, or the flush of what is queued, schedules the next step;
            # neither comes for a buffer that stopped just at the transport's limit.
            if not connection.outgoing and not connection.transport_paused():
                asyncio.get_running_loop().call_later(RETRY_DELAY, self.schedule)
            return
        head = connection.bridge.log.seq
        try:
            lines = self.cursor.read(head, min(room, READ_CHUNK))
        except Expired as exc:
            connection.log.bind(reason=REPLAY_EXPIRED).warning("replay lost its log", oldest=exc.oldest)
            connection.close(REPLAY_EXPIRED)
            return
        except OSError as exc:  # not readable now: the log's own health shows why
            connection.log.bind(reason=exc.strerror).warning("replay cannot read the log")
            asyncio.get_running_loop().call_later(RETRY_DELAY, self.schedule)
            return
        if lines:
            self.deliver(lines)
        if self.cursor.after >= head:
            connection.catchup = None  # live from the next commit on
            connection.log.info("replay done", replayed=self.replayed, seq=head)
        elif lines:
            self.schedule()
        else:  # committed lines not found yet (a rotation under way): look again soon
            asyncio.get_running_loop().call_later(RETRY_DELAY, self.schedule)

    def deliver(self, lines: list[bytes]) -> None:
        connection = self.connection
        may_read = connection.bridge.policy.may_read
        wanted = [(topic, pattern_prefix(topic), after) for topic, after in self.after.items()]
        # Most lines of a log are on other topics: those are told apart by their
        # bytes (about a tenth of the cost of decoding them, measured), the rest decoded.
        exact = {raw_json(pattern) for pattern, prefix, _ in wanted if prefix is None}
        prefixes = tuple(raw_json(prefix) for _, prefix, _ in wanted if prefix is not None)
        matching = [line for line in lines if (topic := raw_topic(line)) in exact or topic.startswith(prefixes)]
        if not matching:
            return
        for record in decode_log_lines(b"".join(matching)):
            if record.vm == connection.vm:
                continue  # a VM never hears its own publishes ("host" is no guest's name)
            topic, seq = record.topic, record.seq
            if not any(after < seq and (topic == pattern if prefix is None else topic.startswith(prefix))
                       for pattern, prefix, after in wanted):
                continue
            if (topic.startswith(VM_TOPIC_PREFIX) and topic not in self.after
                    and not may_read(connection.vm, topic)):
                continue  # only through a pattern, and not this VM's to read
            body = json_encode(Delivery(topic, sender_of(record.vm), record.ts_ms, seq, record.payload))
            connection.queue(encode_frame(body))
            self.replayed += 1


def raw_json(text: str) -> bytes:
    """``text`` as it is between the quotes of a JSON string in a log line (msgspec
    escapes each character alone, so a prefix's bytes are a prefix of the topic's)."""
    return json_encode(text)[1:-1]


def raw_topic(line: bytes) -> bytes:
    """A log line's topic as its JSON bytes, escapes kept, without decoding the
    line: inside a JSON string every quote is escaped, so the first ``,"topic":"``
    is the key (``vm`` comes before it, PROTOCOL.md 7.2) and the first ``","payload":``
    after it ends the topic."""
    start = line.find(_TOPIC_KEY) + len(_TOPIC_KEY)
    return line[start:line.find(_TOPIC_END, start)]
