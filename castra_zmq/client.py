"""Host-tool API: publish with a durable ack, subscribe to committed messages,
follow the bus log from a seq.

```python
from castra_zmq import client

seq = client.publish("vm:alpha", {"cmd": "reload"})      # returns once it is in bus.log
for message in client.subscribe(["vm:alpha", "broadcast"]):   # or ["vm:*"]: every VM's topic
    print(message.seq, message.sender, message.topic, bytes(message.payload))
for message in client.follow(["vm:*"], since=last_seq_handled):  # what was missed, then live
    handle(message)
    last_seq_handled = message.seq
```

Publishing and subscribing go over the router's ipc endpoints under
``<state_root>/run/``, and only once ``run/`` is known to be ours
(``Endpoints.check_run_dir``): a socket another user put there is never
connected to. ``follow`` reads ``logs/bus/bus.log`` itself. The README documents
the framing for tools written in other languages.

Runs in: host tools and the CLI, never a role.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import msgspec
import zmq

from . import topics
from .config import DEFAULTS
from .endpoints import Endpoints, default_state_root
from .errors import PublishFailed, RouterUnavailable
from .handshake import HOST_SENDER, sender_of
from .owner import router_pid
from .replay import Expired  # noqa: F401 - raised by follow: client.Expired
from .subscriptions import topic_patterns
from .wire import (
    MAX_FRAME,
    MESSAGE_TOO_LARGE,
    CommitResult,
    Delivery,
    PublishRequest,
    decode_commit_batch,
    decode_delivery,
    decode_log_record,
    json_encode,
)

DEFAULT_TIMEOUT = 5.0
BATCH_MAX = DEFAULTS.batch_max  # requests in one frame to the bridge
BATCH_BYTES_MAX = DEFAULTS.batch_bytes_max  # bytes in one frame: past it, ZeroMQ drops the tool
_validate = msgspec.json.Decoder(msgspec.Raw).decode


def _endpoints(state_root: os.PathLike | str | None) -> Endpoints:
    return Endpoints(state_root if state_root is not None else default_state_root())


def require_router(endpoints: Endpoints) -> None:
    """Raise ``RouterUnavailable`` unless a router holds the lock (``UnsafeStateRoot``
    when ``run/`` is not ours: see ``owner.router_pid``)."""
    if router_pid(endpoints) is None:
        default = endpoints.state_root == Path(default_state_root()).absolute()
        start = "castra up" if default else f"castra up --state-root {endpoints.state_root}"
        raise RouterUnavailable(f"no router is running on {endpoints.state_root}; start one with `{start}`")


def encode_payload(payload) -> bytes:
    """JSON bytes for ``payload``: any Python value is encoded; ``bytes`` and
    ``msgspec.Raw`` are taken as JSON text, checked and sent as they are."""
    if isinstance(payload, (bytes, bytearray, memoryview, msgspec.Raw)):
        raw = bytes(payload)
        try:
            _validate(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise PublishFailed(f"payload is not valid JSON: {exc}") from None
        return raw
    return json_encode(payload)


def publish(
    topic: str,
    payload=None,
    *,
    state_root: os.PathLike | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Publish as ``host`` and return the message's ``seq`` once it is in the bus log.

    Raises ``RouterUnavailable`` when no router runs on the state root and
    ``PublishFailed`` (with the bridge's reason) when the message was not
    committed within ``timeout`` seconds. It is never half-written. A message
    whose guest frame would be over 65,536 bytes is refused: ``message too large``.
    """
    body = encode_payload(payload)
    # The bridge has the last word; what cannot fit in any case is not sent (past
    # the host socket's message limit, it would not even be answered).
    if len(body) + len(topic) > MAX_FRAME:
        raise PublishFailed(MESSAGE_TOO_LARGE)
    with Publisher(state_root=state_root) as publisher:
        [result] = publisher.publish_batch([(topic, msgspec.Raw(body))], timeout=timeout)
    if result.reason is not None:
        raise PublishFailed(result.reason)
    return result.seq


class Publisher:
    """One connection to the bridge for many publishes as ``host``.

    ``publish_batch`` sends its messages as JSON arrays of requests, each one frame
    the bridge commits whole (at most ``BATCH_MAX`` requests and ``BATCH_BYTES_MAX``
    bytes a frame), and returns once every message is in the log or refused::

        with client.Publisher() as publisher:
            for result in publisher.publish_batch([("builds", {"n": 1}), ("builds", {"n": 2})]):
                print(result.seq, result.reason)
    """

    def __init__(self, *, state_root: os.PathLike | str | None = None):
        self.endpoints = _endpoints(state_root)
        require_router(self.endpoints)
        self.corr = 0
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(self.endpoints.journal)

    def __enter__(self) -> Publisher:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()

    def publish_batch(self, messages: Iterable[tuple[str, object]], *,
                      timeout: float = DEFAULT_TIMEOUT) -> list[CommitResult]:
        """Publish ``(topic, payload)`` pairs (payloads as for ``publish``); return a
        result per message, in their order, ``corr`` being its index: ``seq`` once it
        is in the bus log, else ``reason`` (one that is not JSON, or too large, is
        not sent). Raises ``RouterUnavailable`` when the router is gone."""
        deadline = time.monotonic() + timeout
        results: list[CommitResult | None] = []
        waiting: dict[int, int] = {}  # corr -> index in results
        frames: list[list[bytes]] = [[]]
        frame_bytes = 2
        for index, (topic, payload) in enumerate(messages):
            results.append(None)
            try:
                body = encode_payload(payload)
            except PublishFailed as exc:
                results[index] = CommitResult(corr=index, reason=exc.reason)
                continue
            if len(body) + len(topic) > MAX_FRAME:
                results[index] = CommitResult(corr=index, reason=MESSAGE_TOO_LARGE)
                continue
            self.corr += 1
            request = json_encode(PublishRequest(corr=self.corr, vm=HOST_SENDER, topic=topic, deadline=deadline,
                                                 payload=msgspec.Raw(body)))
            if len(frames[-1]) >= BATCH_MAX or frame_bytes + len(request) + 1 > BATCH_BYTES_MAX:
                frames.append([])
                frame_bytes = 2
            frames[-1].append(request)
            frame_bytes += len(request) + 1
            waiting[self.corr] = index
        for requests in frames:
            if requests:
                self.sock.send_multipart([b"", b"[" + b",".join(requests) + b"]"])
        # A little past the deadline: the bridge answers commit_timeout itself.
        end = deadline + 0.5
        while waiting:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                if router_pid(self.endpoints) is None:
                    raise RouterUnavailable(f"the router on {self.endpoints.state_root} stopped")
                reason = f"no commit within {timeout:g}s (is the router running? see `castra status`)"
                for index in waiting.values():
                    results[index] = CommitResult(corr=index, reason=reason)
                break
            for result in decode_commit_batch(self.sock.recv_multipart()[-1]).results:
                index = waiting.pop(result.corr, None)
                if index is not None:  # else the answer to an earlier batch given up on
                    results[index] = CommitResult(corr=index, seq=result.seq, reason=result.reason)
        return results


def _bus_subscriptions(sock: zmq.Socket, topic_names: Iterable[str]) -> None:
    for name in list(topic_names) or ["*"]:
        sock.subscribe(topics.bus_subscription(name))


def require_run_dir(endpoints: Endpoints) -> None:
    """Raise ``RouterUnavailable`` unless ``run/`` exists and is ours (a subscriber
    may come before the router, but not before its directory)."""
    if not endpoints.check_run_dir():
        raise RouterUnavailable(f"no router has run on {endpoints.state_root} (it has no run/ directory)")


def subscribe(topic_names: Iterable[str] = ("*",), *, state_root=None) -> Iterator[Delivery]:
    """Yield every committed message on ``topic_names`` as it arrives: exact topics,
    and patterns ``p*`` for every topic starting with ``p`` (``vm:*``: every VM's
    topic, ``*``: all).

    Like any ZeroMQ subscriber it sees messages committed after its subscription
    reached the bus (a few milliseconds); older ones are in the log.
    """
    endpoints = _endpoints(state_root)
    require_run_dir(endpoints)
    with zmq.Context() as context, context.socket(zmq.SUB) as sock:
        sock.linger = 0
        _bus_subscriptions(sock, topic_names)
        sock.connect(endpoints.subscribe)
        while True:
            yield decode_delivery(sock.recv_multipart()[2])


async def subscribe_async(topic_names: Iterable[str] = ("*",), *, state_root=None) -> AsyncIterator[Delivery]:
    """``subscribe`` for asyncio programs."""
    import zmq.asyncio  # ~30 ms of asyncio imports that only asyncio tools should pay

    endpoints = _endpoints(state_root)
    require_run_dir(endpoints)
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.SUB)
    try:
        sock.linger = 0
        _bus_subscriptions(sock, topic_names)
        sock.connect(endpoints.subscribe)
        while True:
            yield decode_delivery((await sock.recv_multipart())[2])
    finally:
        sock.close(linger=0)
        context.term()


# -- following bus.log from a seq ---------------------------------------------------


class _LogReader:
    """``follow``'s state: the bus log read by seq (``tail.SeqFollower``), an
    inotify watch on its directory, and the topics wanted."""

    def __init__(self, topic_names: Iterable[str], since: int, state_root):
        from . import tail  # file reading and inotify: only tools that follow pay for them

        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise ValueError(f"since is a seq, an int from 0 (every message) on, not {since!r}")
        self.wanted = topic_patterns(list(topic_names) or ["*"])
        path = _endpoints(state_root).bus_log
        # Watching starts before the first read, so no append falls between the two.
        self.watch = tail.DirectoryWatch(path.parent)
        self.reader = tail.SeqFollower(path, since, self._notify)

    def deliveries(self) -> list[Delivery] | None:
        """The next messages on the topics wanted (maybe none of them is), None when
        no message is committed yet."""
        lines = self.reader.read()
        if not lines:
            return None
        found = []
        for line in lines:
            try:
                record = decode_log_record(line)
            except msgspec.DecodeError as exc:
                self._notify(f"skipped a line that is not a bus log record ({exc}): {line[:60]!r}")
                continue
            if self.wanted.match(record.topic):
                found.append(Delivery(topic=record.topic, sender=sender_of(record.vm), ts_ms=record.ts_ms,
                                      seq=record.seq, payload=record.payload))
        return found

    def close(self) -> None:
        self.reader.close()
        self.watch.close()

    @staticmethod
    def _notify(note: str) -> None:
        from loguru import logger

        logger.warning("client.follow: {}", note)


def follow(topic_names: Iterable[str] = ("*",), *, since: int, state_root=None) -> Iterator[Delivery]:
    """Yield every committed message on ``topic_names`` (as for ``subscribe``) with
    a seq above ``since``, in seq order, each once: those already in the log, then
    each one as it is committed, until the caller stops iterating.

    Pass the seq of the last message handled (0: from the first one): a tool that
    was away gets what it missed and goes on, with no gap at the switch to live
    messages and none across router restarts. The messages are read from
    ``logs/bus/bus.log`` and its rotated copies (bisecting to ``since``, never
    reading the log through) and are ``Delivery`` values as ``subscribe`` gives,
    from the log's lines (``sender`` ``host`` or ``vm:<name>``). No router is
    needed: a log that does not exist yet is waited for. Each message shows within
    milliseconds of its line being written (inotify on the log's directory), which
    can be just before its fsync and ack: if that commit then fails
    (``log_write_failed``, the log is cut back; a full or failing disk), a warning
    is logged and the seqs cut off come again with the messages committed under them.

    Raises ``Expired`` (``.since``, ``.oldest``) when messages after ``since`` are
    no longer in the logs (rotated away, then compressed or deleted): follow again
    from ``oldest - 1`` to accept the gap. A log started again below ``since`` (a
    new state root) is read from its last seq on, as a guest's resume does
    (PROTOCOL.md 4.3.1); both, and lines that are not records, are logged.
    """
    source = _LogReader(topic_names, since, state_root)
    try:
        while True:
            found = source.deliveries()
            if found is None:
                source.watch.wait()
            else:
                yield from found
    finally:
        source.close()


async def follow_async(topic_names: Iterable[str] = ("*",), *, since: int, state_root=None) -> AsyncIterator[Delivery]:
    """``follow`` for asyncio programs. Waiting never blocks the event loop (it
    watches the inotify descriptor); reading is from the page cache, a chunk of at
    most about 256 KiB between two returns to the loop."""
    import asyncio

    source = _LogReader(topic_names, since, state_root)
    try:
        while True:
            found = source.deliveries()
            if found is None:
                await source.watch.wait_async()
                continue
            for delivery in found:
                yield delivery
            await asyncio.sleep(0)  # a long backlog shares the loop
    finally:
        source.close()


def query_status(*, state_root=None, timeout: float = 0.25) -> bytes | None:
    """The status role's answer (``StatusView`` JSON), or None if it does not answer."""
    endpoints = _endpoints(state_root)
    if not endpoints.check_run_dir() or not endpoints.status_socket.exists():
        return None
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(endpoints.status)
        sock.send_multipart([b"", b"status"])
        if not sock.poll(int(timeout * 1000)):
            return None
        return sock.recv_multipart()[-1]
