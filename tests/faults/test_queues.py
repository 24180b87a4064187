"""Internal queues are budgeted in bytes (issue 10): a host-side peer that stops
reading, or a stopped proxy, leaves the proxy and the bridge within
``--queue-bytes`` under a flood of ~64 KB messages, and publishers are never
held back.

The memory tests run their own router with a 4 MiB budget and flood at least
38 MB of host publishes: without a byte budget the queue in question takes all
of it.
"""

from __future__ import annotations

import json
import os
import signal
import time

import zmq

from castra_zmq import client

from ..conftest import wait_for
from ..guest import connect_bus
from ..load import role_rss_kib

QUEUE_BYTES = 4 * 1024 * 1024
# What the allocators keep beyond the queue: freed 64 KB buffers, arenas of threads.
SLACK_KIB = 12 * 1024
PAYLOAD = json.dumps("x" * 64_000).encode()
FLOOD_COUNT = 600  # 38 MB


def start_router(router_factory, *args: str):
    return router_factory("--queue-bytes", str(QUEUE_BYTES), *args)


def ipc(router, name: str) -> str:
    return f"ipc://{router.state_root}/run/{name}"


class Flood:
    """Host publishes of ~64 KB on the bridge's host socket, at most ``window`` unanswered,
    sampling a role's RSS (KiB) as it goes; bounded in count and time."""

    def __init__(self, router, role: str, window: int = 8):
        self.router = router
        self.role = role
        self.window = window
        self.peak_kib = role_rss_kib(router, role)
        self.refused = 0
        self.answered = 0

    def run(self, count: int, until=lambda: False, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        sent = 0
        with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
            sock.linger = 0
            sock.connect(ipc(self.router, "journal.sock"))
            while self.answered < count and not until():
                assert time.monotonic() < deadline, f"flood stalled at {self.answered} of {count}"
                while sent < count and sent - self.answered < self.window:
                    sent += 1
                    sock.send_multipart([b"", b'{"corr":%d,"vm":"host","topic":"flood","deadline":%r,"payload":%s}'
                                         % (sent, time.monotonic() + 10, PAYLOAD)])
                assert sock.poll(10_000), "the bridge stopped answering"
                for _corr, _seq, reason in json.loads(sock.recv_multipart()[-1])["results"]:
                    self.answered += 1
                    self.refused += reason is not None
                if self.answered % 50 == 0:
                    self.peak_kib = max(self.peak_kib, role_rss_kib(self.router, self.role))
        self.peak_kib = max(self.peak_kib, role_rss_kib(self.router, self.role))


def subscribed(router, topic: str) -> zmq.Socket:
    """A SUB on ``bus\\0<topic>\\0`` once host publishes on ``topic`` reach it."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.SUB)
    sock.linger = 0
    sock.subscribe(f"bus\0{topic}\0".encode())
    sock.connect(ipc(router, "bus-out.sock"))

    def arrives() -> bool:
        client.publish(topic, "probe", state_root=router.state_root)
        return sock.poll(100) != 0

    wait_for(arrives, timeout=10, what="the subscription to reach the bridge")
    while sock.poll(0):
        sock.recv_multipart()
    return sock


def peer_events(router) -> zmq.Socket:
    """A SUB on ``peer`` events, once events reach it (the bridge's health of
    bus.log comes every health tick)."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.linger = 0
    for topic in (b"evt\0peer\0", b"evt\0journal\0"):
        sock.subscribe(topic)
    sock.connect(ipc(router, "bus-out.sock"))
    next_event(sock, b"evt\0journal\0")
    return sock


def next_event(sock: zmq.Socket, topic: bytes, timeout: float = 5.0) -> dict:
    """The next message on ``topic`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        frames = sock.recv_multipart()
        if frames[0] == topic:
            return json.loads(frames[-1])
    raise AssertionError(f"no {topic!r} in time")


def idle_socket(socket_type: int, endpoint: str) -> zmq.Socket:
    """A socket that will never read: its own queue holds one message at most."""
    sock = zmq.Context.instance().socket(socket_type)
    sock.linger = 0
    sock.rcvhwm = 1
    sock.connect(endpoint)
    return sock


def test_host_subscriber_that_never_reads_is_disconnected_and_the_proxy_stays_within_budget(router_factory):
    router = start_router(router_factory, "--slow-consumer-timeout", "1")
    idle = idle_socket(zmq.SUB, ipc(router, "bus-out.sock"))
    idle.subscribe(b"bus\0flood\0")
    subscribed(router, "flood").close()  # proves idle's subscription arrived before it
    events = peer_events(router)
    flood = Flood(router, "proxy")
    before = flood.peak_kib
    flood.run(5 * FLOOD_COUNT, until=lambda: "subscriber disconnected" in router.log_text())
    idle.close()
    assert flood.refused == 0  # the publisher was never held back
    growth = flood.peak_kib - before
    assert growth < QUEUE_BYTES // 1024 + SLACK_KIB, f"the proxy grew by {growth} KiB"
    assert f"reason=slow_consumer peer=pid:{os.getpid()}" in router.log_text()
    peer_event = next_event(events, b"evt\0peer\0")
    assert (peer_event["action"], peer_event["reason"], peer_event["peer"]) == (
        "disconnect", "slow_consumer", f"pid:{os.getpid()}")
    events.close()


# A corr as wide as a host tool may send (int64): each result of a reply,
# ``[corr,seq,null]``, is then about 34 bytes, not 21, so fewer publishes make the
# same bytes of replies.
WIDE_CORR = 10**18


def host_batch(first_corr: int, count: int) -> bytes:
    """One host message of ``count`` small publishes."""
    deadline = time.monotonic() + 30
    return json.dumps([{"corr": first_corr + n, "vm": "host", "topic": "t", "deadline": deadline, "payload": n}
                       for n in range(count)]).encode()


def test_host_tool_that_never_reads_its_replies_leaves_the_bridge_within_budget(router_factory):
    """180 messages of 1,024 publishes with wide corrs (6 MB of replies, 1.5 times
    the 4 MiB queue) from a tool that reads none: the bridge drops the replies past
    its queue for the tool, says so, and guests are still acked."""
    router = start_router(router_factory)
    before = role_rss_kib(router, "bridge")
    peak = before
    idle = idle_socket(zmq.DEALER, ipc(router, "journal.sock"))
    for message in range(180):
        idle.send_multipart([b"", host_batch(WIDE_CORR + message * 1024, 1024)])
        if message % 20 == 0:
            peak = max(peak, role_rss_kib(router, "bridge"))
    wait_for(lambda: "answers dropped" in router.log_text(), timeout=30, what="the dropped answers logged")
    peak = max(peak, role_rss_kib(router, "bridge"))
    assert "reason=slow_consumer" in router.log_text()
    growth = peak - before
    assert growth < QUEUE_BYTES // 1024 + SLACK_KIB, f"the bridge grew by {growth} KiB"
    with connect_bus(router.port, "alpha") as alpha:
        assert alpha.publish("after", topic="after")["status"] == "ok"
    idle.close()


def test_a_reply_to_a_host_tool_is_never_over_its_byte_cap(router_factory):
    """40 messages of 1,024 publishes waiting at once: a commit takes no further
    host message past 1 MiB (commit_bytes_max), so no reply is over 1 MiB +
    256 KiB (batch_bytes_max), and every publish gets its result."""
    router = router_factory()
    largest = 1024 * 1024 + 256 * 1024
    with zmq.Context() as context, context.socket(zmq.DEALER) as tool:
        tool.linger = 0
        tool.connect(ipc(router, "journal.sock"))
        for message in range(40):
            tool.send_multipart([b"", host_batch(message * 1024, 1024)])
        sizes, results = [], 0
        while results < 40 * 1024 and tool.poll(5000):
            reply = tool.recv_multipart()[-1]
            sizes.append(len(reply))
            results += len(json.loads(reply)["results"])
    assert results == 40 * 1024
    assert max(sizes) <= largest, f"a reply of {max(sizes)} bytes"


def test_stopped_proxy_leaves_the_bridge_within_budget(router_factory):
    router = start_router(router_factory)
    reader = subscribed(router, "flood")
    proxy = router.role_pid("proxy")
    flood = Flood(router, "bridge")
    before = flood.peak_kib
    os.kill(proxy, signal.SIGSTOP)
    try:
        flood.run(FLOOD_COUNT)
    finally:
        os.kill(proxy, signal.SIGCONT)
    assert flood.refused == 0  # publishing does not wait for the bus
    growth = flood.peak_kib - before
    assert growth < QUEUE_BYTES // 1024 + SLACK_KIB, f"the bridge grew by {growth} KiB"

    def delivered_again() -> bool:
        client.publish("flood", "after", state_root=router.state_root)
        while reader.poll(200):  # what the proxy held for it comes first
            if reader.recv_multipart()[-1].endswith(b'"payload":"after"}'):
                return True
        return False

    wait_for(delivered_again, timeout=10, what="the bus delivering again")
    reader.close()


def test_a_host_subscriber_that_reads_gets_every_message_of_commit_sized_bursts(router):
    """Byte budgets must not cost a reading subscriber anything: bursts of 1,000
    small host publishes in one batch (one commit) all reach a SUB that reads all
    along. With queues of 32 messages (a 64 MiB budget over 2 MiB frames), or even
    of 1,000, a burst overflowed them."""
    bursts, size = 5, 1000
    with zmq.Context() as context, context.socket(zmq.SUB) as sub, context.socket(zmq.DEALER) as dealer:
        for sock in (sub, dealer):
            sock.linger = 0
        sub.rcvhwm = 100_000
        sub.subscribe(b"bus\0burst\0")
        sub.connect(ipc(router, "bus-out.sock"))
        # The subscription reaches the bridge (slow joiner): a probe comes back.
        wait_for(lambda: client.publish("burst", "probe", state_root=router.state_root) and sub.poll(100),
                 timeout=10, what="the subscription in place")
        while sub.poll(200):
            sub.recv_multipart()
        dealer.connect(ipc(router, "journal.sock"))
        received = 0
        deadline = time.monotonic() + 30
        for burst in range(bursts):
            requests = [{"corr": burst * size + n, "vm": "host", "topic": "burst",
                         "deadline": time.monotonic() + 10, "payload": n} for n in range(size)]
            dealer.send_multipart([b"", json.dumps(requests).encode()])
            while not dealer.poll(0):  # read while the bridge commits and answers
                assert time.monotonic() < deadline, "no answer from the bridge"
                if sub.poll(10):
                    sub.recv_multipart()
                    received += 1
            results = json.loads(dealer.recv_multipart()[-1])["results"]
            assert all(reason is None for _, _, reason in results), results[:3]
        while received < bursts * size and sub.poll(1000):
            sub.recv_multipart()
            received += 1
    assert received == bursts * size
