"""The uplink's download half: other hosts' messages from JetStream into this
host's ``bus.log`` (issue 14, delivery into each host).

Through one durable pull consumer per host (``federation.consumer_config``: named
after the host, every subject, stream order, AckPolicy.ALL), a batch at a time:

1. **Pull** what the consumer has, up to ``_FETCH_BATCH`` messages, as soon as
   there is one (``ConsumerPull``). This host's own are skipped by their
   subject (``castra.v1.<host>.``): only lines without an origin are ever uploaded,
   so nothing loops. A message castra did not make is skipped with a warning.
2. **Commit**: the others go to the bridge as one batch of host publishes on
   ``run/journal.sock`` (``PublishRequest`` with ``origin``): the sender is the
   original one (``vm`` of the origin's line), the bridge commits them with their
   origin in the line, acks nothing to a guest (nobody here sent them) and delivers
   them as any message. It answers ``DUPLICATE`` for a message ``bus.log`` already
   holds (``origins``): that is a redelivery, done before.
3. **Ack** the last message of the batch, which acks the batch (AckPolicy.ALL), once
   each of its messages is committed, a duplicate, or refused for good (too large
   here, say: logged as an error and passed over, or it would hold up the rest).
   A batch of this host's own messages only is acked with a later one (at most
   ``_IDLE_ACK_MESSAGES`` or ``_IDLE_ACK_S`` later).
   A commit that failed (``log_write_failed``, ``commit_timeout``, no answer) ends
   the session before the ack: the batch comes again.

Each session (re)makes the consumer to start right after its ack floor: a batch
committed but not acked (the uplink killed between the two) then comes again at
once and in stream order. Left pending it would come back only after the ack wait,
behind later messages of its origins, which the bridge would then have dropped as
duplicates.

Runs in: the uplink role.
"""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import nats
import nats.aio.msg
import nats.js.errors
import zmq
import zmq.asyncio
from loguru import logger

from .config import Settings
from .errors import CastraError
from .federation import (
    STREAM_NAME,
    FederationError,
    RemoteMessage,
    consumer_config,
    consumer_name,
    origin_filter,
    remote_message,
)
from .uplinkhealth import RemoteHosts
from .wire import (
    COMMIT_TIMEOUT,
    DUPLICATE,
    LOG_WRITE_FAILED,
    CommitResult,
    PublishRequest,
    decode_commit_batch,
    json_encode,
)

_FETCH_BATCH = 256  # messages a pull request asks for; a commit and an ack take at most this many
_FETCH_WAIT = 1.0  # seconds a pull request waits for messages (it expires then, and another is sent)
_FETCH_SLACK = 0.5  # beyond _FETCH_WAIT: no word from the server by then, the request is taken as lost
# The server's answers to a pull request that are not messages (a "Status" header).
_REQUEST_ENDED = frozenset({"404", "408"})  # no messages (now), or the request expired
_HEARTBEAT = "100"
_PENDING_MESSAGES = "Nats-Pending-Messages"  # with a 408: how many the expired request had not brought
# A batch of this host's own messages only (nothing committed) is acked with a later
# batch, at most this many messages or seconds later: each ack is a replicated write
# of the consumer's state in the cluster, and not acking them yet risks nothing
# (should they come again, they are skipped again). Well within the ack wait.
_IDLE_ACK_MESSAGES = _FETCH_BATCH
_IDLE_ACK_S = 1.0
_COMMIT_WAIT = 5.0  # seconds the bridge has to commit a batch (its deadline); answers wait 0.5 s more


class DeliveryFailed(CastraError):
    """The bridge did not commit a batch (a write failed, or no answer in time)."""


class BridgeLink:
    """Publishes batches of remote messages to the bridge (``run/journal.sock``,
    PROTOCOL.md 8.2) and waits for their results."""

    def __init__(self, settings: Settings):
        self.context = zmq.asyncio.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(settings.endpoints.journal)
        self.corr = 0

    async def commit(self, messages: list[RemoteMessage]) -> list[CommitResult]:
        """Each message's result, in order; ``DeliveryFailed`` when the bridge does
        not answer them all in time (it may have committed some)."""
        deadline = time.monotonic() + _COMMIT_WAIT
        requests = []
        for message in messages:
            self.corr += 1
            requests.append(PublishRequest(self.corr, message.vm, message.topic, deadline, message.payload,
                                           message.origin))
        await self.sock.send_multipart([b"", json_encode(requests)])
        results: dict[int, CommitResult] = {}
        wanted = {request.corr for request in requests}
        # One answer per commit: a batch the bridge split over commits has several.
        while not wanted <= results.keys():
            remaining = deadline + 0.5 - time.monotonic()
            if remaining <= 0 or not await self.sock.poll(remaining * 1000):
                raise DeliveryFailed(f"no answer from the bridge for {len(wanted - results.keys())} messages")
            parts = await self.sock.recv_multipart()
            try:
                batch = decode_commit_batch(parts[-1])
            except msgspec.DecodeError as exc:
                raise DeliveryFailed(f"malformed answer from the bridge: {exc}") from None
            results.update((result.corr, result) for result in batch.results if result.corr in wanted)
        return [results[request.corr] for request in requests]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


class ConsumerPull:
    """This host's consumer's messages, in stream order: pull requests for
    ``_FETCH_BATCH`` messages or ``_FETCH_WAIT``, the next one out before the one
    before is used up, their messages gathered by a subscription callback and
    handed over as soon as there is one. Not nats-py's
    ``fetch``: it waits on each message with a task of its own (0.4 ms a message on
    a busy 2-core machine: 110 ms for a batch of 256) and, once it has waited for a
    first message, waits on for the whole batch or its timeout."""

    def __init__(self, connection: nats.NATS, durable: str):
        self.connection = connection
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM_NAME}.{durable}"
        self.request = json.dumps({"batch": _FETCH_BATCH, "expires": int(_FETCH_WAIT * 1e9)}).encode()
        self.inbox = connection.new_inbox()
        self.subscription = None
        self.arrived: list[nats.aio.msg.Msg] = []
        self.woken = asyncio.Event()
        self.asked = 0  # messages the requests out may still bring
        self.failure: str | None = None

    async def open(self) -> None:
        self.subscription = await self.connection.subscribe(self.inbox, cb=self.take)

    async def close(self) -> None:
        await self.subscription.unsubscribe()

    async def take(self, message: nats.aio.msg.Msg) -> None:
        status = message.headers.get("Status") if message.headers else None
        if status is None:
            self.arrived.append(message)
            self.asked -= 1
        elif status in _REQUEST_ENDED:
            # What that request still had coming; all the rest when the server does not say.
            left = message.headers.get(_PENDING_MESSAGES, "")
            self.asked = max(0, self.asked - int(left)) if left.isdigit() else 0
        elif status != _HEARTBEAT:  # the consumer deleted, a leader change: the session starts again
            self.failure = f"pull request refused: {status} {message.headers.get('Description', '')}".rstrip()
        self.woken.set()

    async def next_batch(self) -> list[nats.aio.msg.Msg]:
        """The messages that arrived, once there is one (at most ``_FETCH_BATCH``);
        none when the requests ended without any (the caller asks again). Another
        request goes out once those out may bring half a batch or less: under a
        steady flow the server always has one to deliver on, and a message never
        waits for a request's round trip."""
        if self.asked <= _FETCH_BATCH // 2:
            await self.connection.publish(self.next_subject, self.request, reply=self.inbox)
            self.asked += _FETCH_BATCH
        deadline = time.monotonic() + _FETCH_WAIT + _FETCH_SLACK
        while not self.arrived and self.asked > 0 and self.failure is None:
            self.woken.clear()
            try:
                await asyncio.wait_for(self.woken.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                self.asked = 0  # lost with a connection, say: the next call sends another
        if self.failure is not None:
            raise DeliveryFailed(self.failure)
        batch, self.arrived = self.arrived[:_FETCH_BATCH], self.arrived[_FETCH_BATCH:]
        return batch


class Downlink:
    def __init__(self, settings: Settings):
        self.host = settings.host_name
        self.durable = consumer_name(self.host)
        self.own_subjects = origin_filter(self.host)[:-1]  # "castra.v1.<host>."
        self.bridge = BridgeLink(settings)
        self.committed = 0  # other hosts' messages this role committed, since it started
        self.batches = 0  # fetched batches done and acked
        self.acked_stream_seq: int | None = None  # of the last batch acked, since the role started
        self.pending: int | None = None  # messages in the stream after it, as of its fetch
        self.remote_hosts = RemoteHosts()
        self.unacked = 0  # messages of batches with nothing to commit, not acked yet
        self.acked_at = 0.0  # monotonic time of the last ack

    async def session(self, connection: nats.NATS, js, start_ms: int) -> None:
        """Make the consumer start after its ack floor, then deliver until
        something fails (raised) or the role stops (cancelled)."""
        after = await self.reset_consumer(js, start_ms)
        self.acked_stream_seq = after
        pull = ConsumerPull(connection, self.durable)
        await pull.open()
        logger.info("downloading", consumer=self.durable, after_stream_seq=after)
        try:
            while True:
                batch = await pull.next_batch()
                if batch:
                    await self.deliver(batch)
        finally:
            await pull.close()

    async def reset_consumer(self, js, start_ms: int) -> int | None:
        """Make this host's consumer again, after its ack floor (None: it was new,
        made to start at ``start_ms``). Its ack floor is all it keeps between
        sessions: what it had delivered past it comes again, now."""
        try:
            info = await js.consumer_info(STREAM_NAME, self.durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(STREAM_NAME, consumer_config(self.host, start_ms=start_ms))
            return None
        after = info.ack_floor.stream_seq
        await js.delete_consumer(STREAM_NAME, self.durable)
        await js.add_consumer(STREAM_NAME, consumer_config(self.host, after_stream_seq=after))
        return after

    async def deliver(self, batch: list) -> None:
        """Commit a fetched batch's other hosts' messages, then ack the batch."""
        remote: list[RemoteMessage] = []
        for message in batch:
            if message.subject.startswith(self.own_subjects):
                continue
            try:
                remote.append(remote_message(message.subject, message.headers, message.data))
            except FederationError as exc:
                logger.bind(reason=exc.reason).warning("skipped a message castra did not make",
                                                       stream_seq=message.metadata.sequence.stream)
        duplicates = []
        for message, result in zip(remote, await self.bridge.commit(remote) if remote else []):
            if result.seq is not None:
                self.committed += 1
            elif result.reason == DUPLICATE:
                duplicates.append(message.origin.message_id)
            elif result.reason == COMMIT_TIMEOUT or result.reason.startswith(LOG_WRITE_FAILED):
                raise DeliveryFailed(f"{message.origin.message_id}: {result.reason}")
            else:  # it can never be committed here (too large under this log's seq, say)
                logger.bind(reason=result.reason, vm=message.vm).error(
                    "message of another host refused: passed over", origin=message.origin.message_id,
                    topic=message.topic)
        if duplicates:
            logger.bind(reason=DUPLICATE).info("already in bus.log (redelivered)", count=len(duplicates),
                                               first=duplicates[0])
        self.unacked += len(batch)
        now = time.monotonic()
        if remote or self.unacked >= _IDLE_ACK_MESSAGES or now - self.acked_at >= _IDLE_ACK_S:
            await batch[-1].ack()
            self.unacked, self.acked_at = 0, now
        self.batches += 1
        self.acked_stream_seq, self.pending = batch[-1].metadata.sequence.stream, batch[-1].metadata.num_pending
        self.remote_hosts.note([message.origin for message in remote])

    def close(self) -> None:
        self.bridge.close()
