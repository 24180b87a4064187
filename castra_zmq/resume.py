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

Cost and memory: a catch-up reads at most ``READ_BYTES_MAX`` of the log at a
time (more for one longer line), and only while what waits for the guest is
under half of its outbound budget (the point where its transport pauses: then
``resume_writing`` goes on). All sessions' catch-ups together read for at most
``STEP_SECONDS`` a loop turn, in turn (``ReplayTurns``): the guests' frames and
the commits come between. A guest that stops reading is dropped as a slow
consumer, as for live messages.

Runs in: the bridge.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING

from .framing import encode_frame
from .handover import Handover
from .handshake import VM_TOPIC_PREFIX, sender_of
from .replay import Cursor, Expired, records_with, segments, topic_needles
from .subscriptions import pattern_prefix, topic_patterns
from .wire import Delivery, json_encode

if TYPE_CHECKING:
    from .session import GuestConnection

# A step holds the loop from the guests' frames and the commits, so it is short:
# measured, steps of 256 KiB (20 ms of work, lines then cut apart in Python) took other
# guests' p99 from 3 to 39 ms; steps of 32 KiB alone to 7 ms but halved the replay's
# speed, as each waited for a loop turn with its commit. So the replays read for 1 ms a
# loop turn, all sessions' together (``ReplayTurns``). A read is 32 KiB, or up to 256 KiB
# while a read takes under a quarter of that: a log of which the session wants few
# lines is read in fewer, larger reads (measured in-process, a vm:<name> resume where
# 1 line in 10 is its own: 8.7 -> 6.4 µs a replayed message).
READ_BYTES = 32 * 1024
READ_BYTES_MAX = 256 * 1024
STEP_SECONDS = 0.001  # a loop turn's replays read on while they have taken less than this
RETRY_DELAY = 0.1  # seconds: a log that cannot be read (being rotated, failing) is read again after it
REPLAY_EXPIRED = "replay_expired"  # a session's close reason: its log went while it was replayed


def oldest_seq(directory, name: str, head: int) -> int:
    """The seq of the oldest message the logs still hold; ``head + 1`` when none."""
    found = segments(directory, name)
    return found[0][0] if found else head + 1


class ReplayTurns:
    """The bridge's replays, all sessions' together, take at most ``STEP_SECONDS``
    of a loop turn (and one read past it): each catch-up that has lines to read
    does one read in turn, round the ring, until that time is used; the next turn
    goes on where this one stopped. However many sessions resume at once, the
    other guests wait for one step a turn, not one step per replaying session."""

    def __init__(self) -> None:
        self.waiting: collections.deque[Catchup] = collections.deque()
        self.scheduled = False

    def add(self, catchup: Catchup) -> None:
        """``catchup`` has lines to read: its turn comes (once, however often asked)."""
        if not catchup.scheduled:
            catchup.scheduled = True
            self.waiting.append(catchup)
            if not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        deadline = time.monotonic() + STEP_SECONDS
        while self.waiting and time.monotonic() < deadline:
            catchup = self.waiting.popleft()
            catchup.scheduled = False
            if catchup.step():
                self.add(catchup)
        if self.waiting and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.run)  # after the loop's other work


class Catchup:
    def __init__(self, connection: GuestConnection, head: int):
        self.connection = connection
        bridge = connection.bridge
        self.log_path = bridge.log.path
        # What the session's subscriptions had: everything up to now, live.
        self.after: dict[str, int] = dict.fromkeys(connection.topics, head)
        self.cursor: Cursor | None = None
        self.read_bytes = READ_BYTES  # the next read's size (see READ_BYTES_MAX)
        self.scheduled = False  # waiting for its turn (``ReplayTurns``)
        self.replayed = 0
        self.wanted_topics: WantedTopics | None = None
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
        self.connection.bridge.replays.add(self)

    def step(self) -> bool:
        """Read and queue the next lines once, or end the catch-up once all
        committed lines are read; wait for the guest to read when its queue is
        half full. True when there is more to read now (``ReplayTurns``)."""
        connection = self.connection
        if connection.catchup is not self:  # closed, or replaced
            return False
        room = connection.outbound_room()
        if room <= 0:
            # resume_writing, or the flush of what is queued, schedules the next
            # step; neither comes for a buffer that stopped just at the transport's limit.
            if not connection.outgoing and not connection.transport_paused():
                self.retry_later()
            return False
        head = connection.bridge.log.seq
        started = time.monotonic()
        try:
            block = self.cursor.read_block(head, min(room, self.read_bytes))
        except Expired as exc:
            connection.log.bind(reason=REPLAY_EXPIRED).warning("replay lost its log", oldest=exc.oldest)
            connection.close(REPLAY_EXPIRED)
            return False
        except OSError as exc:  # not readable now: the log's own health shows why
            connection.log.bind(reason=exc.strerror).warning("replay cannot read the log")
            self.retry_later()
            return False
        if block:
            self.deliver(block)
            self.size_reads(time.monotonic() - started)
        if self.cursor.after >= head:
            connection.catchup = None  # live from the next commit on
            connection.log.info("replay done", replayed=self.replayed, seq=head)
            if self.handover is not None:
                connection.bridge.handover_sent(connection, self.handover)
            return False
        if not block:  # committed lines not found yet (a rotation under way)
            self.retry_later()
            return False
        return True

    def size_reads(self, took: float) -> None:
        """Double the next read while a read takes under a quarter of a step, halve it
        over half of one (between ``READ_BYTES`` and ``READ_BYTES_MAX``)."""
        if took < STEP_SECONDS / 4:
            self.read_bytes = min(self.read_bytes * 2, READ_BYTES_MAX)
        elif took > STEP_SECONDS / 2:
            self.read_bytes = max(self.read_bytes // 2, READ_BYTES)

    def retry_later(self) -> None:
        asyncio.get_running_loop().call_later(RETRY_DELAY, self.schedule)

    def deliver(self, block: bytes) -> None:
        """Queue the frames of the lines of ``block`` (whole log lines) a
        subscription wants, each the bytes the live delivery of its message had."""
        connection = self.connection
        wanted = self.wanted()
        vm = connection.vm
        handover = self.handover
        moved = VM_TOPIC_PREFIX + vm if handover is not None else None
        records, bad = records_with(block, wanted.needles)
        frames = []
        for line in bad:
            connection.log.bind(reason="not a bus log record").warning("replay skipped a line", line=line[:60])
        for record in records:
            topic, seq = record.topic, record.seq
            if record.vm == vm or not wanted.patterns.match(topic):
                continue  # a VM never hears its own publishes; a needle found in a payload
            moving = topic == moved and handover.request.after < seq
            if moving and not handover.wants(record):
                continue  # the host the VM left had it
            if not (moving and seq <= self.handover_upto) and not wanted.wants(topic, seq):
                continue
            if topic.startswith(VM_TOPIC_PREFIX) and topic not in wanted.patterns.exact and not \
                    connection.bridge.policy.may_read(vm, topic):
                continue  # only through a pattern, and not this VM's to read
            frames.append(encode_frame(json_encode(
                Delivery(topic, sender_of(record.vm), record.ts_ms, seq, record.payload))))
        if frames:
            connection.queue(b"".join(frames))  # about the bytes read: under half what ``queue`` allows
            self.replayed += len(frames)

    def wanted(self) -> WantedTopics:
        """The subscriptions as ``WantedTopics``, made again when they change."""
        if self.wanted_topics is None or self.wanted_topics.since != self.after:
            self.wanted_topics = WantedTopics(dict(self.after))
        return self.wanted_topics


class WantedTopics:
    """A catch-up's subscriptions (topic or pattern -> the seq up to which it
    needs nothing), as its reading uses them."""

    def __init__(self, since: dict[str, int]):
        self.since = since
        self.after = [(pattern, pattern_prefix(pattern), after) for pattern, after in since.items()]
        self.patterns = topic_patterns(since)
        self.newest = max(since.values(), default=0)
        self.needles = topic_needles(self.patterns)

    def wants(self, topic: str, seq: int) -> bool:
        """Whether a subscription that matches ``topic`` (one does) needs ``seq``."""
        return seq > self.newest or any(
            after < seq and (topic.startswith(prefix) if prefix is not None else topic == pattern)
            for pattern, prefix, after in self.after)
