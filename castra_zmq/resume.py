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

Cost and memory: a step reads at most ``STEP_BYTES`` of the log (more for one longer line), and
only while what waits for the guest is under half of its outbound budget (the
point where its transport pauses: then ``resume_writing`` goes on); steps of
sessions and guests' frames take turns in the loop. A guest that stops reading
is dropped as a slow consumer, as for live messages.

Runs in: the bridge.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from .framing import encode_frame
from .handover import Handover
from .handshake import HOST_SENDER, VM_TOPIC_PREFIX
from .replay import Cursor, Expired, origin_start, segments
from .subscriptions import pattern_prefix
from .wire import json_encode

if TYPE_CHECKING:
    from .session import GuestConnection

_HOST = HOST_SENDER.encode()
_VM_TOPIC = VM_TOPIC_PREFIX.encode()
_TOPIC_KEY = b',"topic":"'
_TOPIC_END = b'","payload":'
# A step holds the loop from the guests' frames and the commits, so it is short:
# measured, steps of 256 KiB (20 ms of work) took other guests' p99 from 3 to 39 ms;
# steps of 32 KiB alone to 7 ms but halved the replay's speed, as each waited for a
# loop turn with its commit. So a step reads 32 KiB at a time for 1 ms: other guests wait
# at most that per replaying session and loop turn.
STEP_BYTES = 32 * 1024
STEP_SECONDS = 0.001  # a step reads on while it has taken less than this
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
        # A VM that moved here (``handover``): its topic's lines from the handover's
        # start up to ``handover_upto`` go by the handover's marks, not by ``after``.
        self.handover: Handover | None = None
        self.handover_upto = 0

    def add(self, topic: str, since: int) -> None:
        """``topic`` wants what comes after ``since``; read from there if that is
        behind where reading is (the other subscriptions had that stretch)."""
        self.read_from(since)
        self.after[topic] = since
        self.schedule()

    def add_handover(self, handover: Handover, upto: int) -> None:
        """The session's VM moved here: the lines of its topic after the
        handover's start and up to ``upto`` (the seq committed when the session
        subscribed to it: it got those after live) that the handover wants. A
        start before the oldest line left (the log rotated away since) reads from
        that line: what is gone is no one's to send, and a replay that expired
        would close the session."""
        start = handover.request.after
        oldest = oldest_seq(self.log_path.parent, self.log_path.name, upto)
        if start < oldest - 1:
            self.connection.log.bind(reason="rotated away").warning("handover reads from the oldest line left",
                                                                    after=start, oldest=oldest)
            start = oldest - 1
        self.read_from(start)
        self.handover, self.handover_upto = handover, upto
        self.schedule()

    def read_from(self, since: int) -> None:
        """Read from ``since`` on, if that is behind where reading is (the
        subscriptions had that stretch)."""
        if self.cursor is None or since < self.cursor.after:
            if self.cursor is not None:
                for other, after in self.after.items():
                    self.after[other] = max(after, self.cursor.after)
            self.cursor = Cursor(self.log_path.parent, since, self.log_path.name)

    def add_live(self, topic: str, head: int) -> None:
        self.after[topic] = head

    def discard(self, topic: str) -> None:
        self.after.pop(topic, None)

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.step)

    def step(self) -> None:
        """Read and queue the next lines for at most ``STEP_SECONDS``, or end the
        catch-up once all committed lines are read; wait for the guest to read when
        its queue is half full."""
        self.scheduled = False
        connection = self.connection
        deadline = time.monotonic() + STEP_SECONDS
        while connection.catchup is self:  # else closed, or replaced
            room = connection.outbound_room()
            if room <= 0:
                # resume_writing, or the flush of what is queued, schedules the next
                # step; neither comes for a buffer that stopped just at the transport's limit.
                if not connection.outgoing and not connection.transport_paused():
                    self.retry_later()
                return
            head = connection.bridge.log.seq
            try:
                lines = self.cursor.read(head, min(room, STEP_BYTES))
            except Expired as exc:
                connection.log.bind(reason=REPLAY_EXPIRED).warning("replay lost its log", oldest=exc.oldest)
                connection.close(REPLAY_EXPIRED)
                return
            except OSError as exc:  # not readable now: the log's own health shows why
                connection.log.bind(reason=exc.strerror).warning("replay cannot read the log")
                self.retry_later()
                return
            if lines:
                self.deliver(lines)
            if self.cursor.after >= head:
                connection.catchup = None  # live from the next commit on
                connection.log.info("replay done", replayed=self.replayed, seq=head)
                if self.handover is not None:
                    connection.bridge.handover_sent(connection, self.handover)
            elif not lines:  # committed lines not found yet (a rotation under way)
                self.retry_later()
                return
            elif time.monotonic() >= deadline:
                self.schedule()  # after the loop's other work
                return

    def retry_later(self) -> None:
        asyncio.get_running_loop().call_later(RETRY_DELAY, self.schedule)

    def deliver(self, lines: list[bytes]) -> None:
        """Queue the frames of the lines a subscription wants. Lines are not decoded:
        a delivery is made of a log line's own bytes (both are msgspec's JSON of the
        same values: PROTOCOL.md 5.2 and 7.2), which costs a fraction of decoding
        and encoding (measured: replay went from 20,000 to over 50,000 messages/s)."""
        connection = self.connection
        own = raw_json(connection.vm)
        wanted = [(raw_json(pattern if prefix is None else prefix), prefix is not None, after)
                  for pattern, after in self.after.items() for prefix in (pattern_prefix(pattern),)]
        exact = {raw for raw, is_prefix, _ in wanted if not is_prefix}
        prefixes = tuple(raw for raw, is_prefix, _ in wanted if is_prefix)
        handover = self.handover
        moved = raw_json(VM_TOPIC_PREFIX + connection.vm) if handover is not None else None
        for line in lines:
            topic = raw_topic(line)
            if topic not in exact and not topic.startswith(prefixes):
                continue  # most lines of a log: told apart without more work
            fields = line_fields(line)
            seq = int(fields.seq)
            if fields.vm == own:
                continue  # a VM never hears its own publishes ("host" is no guest's name)
            if topic == moved and handover.request.after < seq and not handover.wants(line, seq):
                continue  # the host the VM left had it
            if not (topic == moved and handover.request.after < seq <= self.handover_upto) and not any(
                    after < seq and (topic.startswith(raw) if is_prefix else topic == raw)
                    for raw, is_prefix, after in wanted):
                continue
            if topic.startswith(_VM_TOPIC) and topic not in exact and not connection.bridge.policy.may_read(
                    connection.vm, decode_raw_string(topic)):
                continue  # only through a pattern, and not this VM's to read
            sender = _HOST if fields.vm == _HOST else _VM_TOPIC + fields.vm
            connection.queue(encode_frame(b'{"type":"message","topic":"%s","from":"%s","ts_ms":%s,"seq":%s,'
                                          b'"payload":%s}' % (topic, sender, fields.ts_ms, fields.seq,
                                                              fields.payload)))
            self.replayed += 1


class LineFields(NamedTuple):
    """The JSON bytes of a log line's values (strings without their quotes)."""

    ts_ms: bytes
    seq: bytes
    vm: bytes
    payload: bytes


def line_fields(line: bytes) -> LineFields:
    """Split a log line (PROTOCOL.md 7.2: its keys in that order, compact) into
    its values' bytes. Inside a JSON string every quote is escaped, so each key
    with its quotes is found where it is, not in a value before it."""
    ts_ms = line.index(b',"ts_ms":') + 9
    seq = line.index(b',"seq":', ts_ms) + 7
    vm = line.index(b',"vm":"', seq) + 7
    vm_end = line.index(b'","topic":"', vm)
    payload = line.index(b'","payload":', vm_end + 11) + 12
    origin = origin_start(line)  # a message from another host: its origin after the payload
    return LineFields(line[ts_ms:seq - 7], line[seq:vm - 7], line[vm:vm_end],
                      line[payload:-2] if origin is None else line[payload:origin])


def decode_raw_string(raw: bytes) -> str:
    return msgspec.json.decode(b'"%s"' % raw)


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
