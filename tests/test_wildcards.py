"""Subscription patterns (issue 12): a topic ending in ``*`` is every topic starting
with what comes before it, for guests (within what they may read), host tools and
``castra bus tail --topic``.

The pure parts (the pattern syntax, the bridge's index) come first; then one real
router for the module, with an identities file that grants ``monitor`` every VM's
topic. Each test uses its own topics, so that none hears another's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading

import pytest

from castra_zmq import client, tail, topics
from castra_zmq.identity import DEFAULT_POLICY, parse_identities
from castra_zmq.subscriptions import SubscriberIndex, pattern_prefix, topic_patterns
from castra_zmq.wire import MAX_SUBSCRIPTIONS, MAX_TOPIC

from .conftest import Router, shared_router
from .guest import Guest
from .test_cli import Follow, castra, record_line

IDENTITIES = """
alpha
beta
gamma
delta
monitor subscribe=vm:*
"""

# -- pure ------------------------------------------------------------------------------


def test_a_topic_ending_in_star_is_a_prefix():
    assert [pattern_prefix(p) for p in ("vm:*", "*", "metrics.*", "a*b*", "vm:alpha", "*x")] == \
        ["vm:", "", "metrics.", "a*b", None, None]
    patterns = topic_patterns(["metrics.*", "broadcast"])
    assert patterns.match("metrics.cpu") and patterns.match("metrics.") and patterns.match("broadcast")
    assert not patterns.match("metricsX") and not patterns.match("metrics") and not patterns.match("broadcast2")
    assert topic_patterns(["*"]).match("anything")
    # The identities file's grants are the same patterns.
    assert parse_identities("m subscribe=metrics.*,broadcast").policy.reads["m"] == patterns


def test_a_guest_may_subscribe_to_any_pattern_but_not_to_another_vms_topic():
    assert all(DEFAULT_POLICY.may_subscribe("gamma", p) for p in ("*", "vm:*", "vm:beta*", "metrics.*"))
    assert not DEFAULT_POLICY.may_subscribe("gamma", "vm:beta")


def test_a_host_pattern_subscribes_a_zeromq_prefix_without_its_nul():
    assert topics.bus_subscription("vm:*") == b"bus\x00vm:"
    assert topics.bus_subscription("*") == topics.BUS_ALL
    assert topics.bus_subscription("vm:alpha") == b"bus\x00vm:alpha\x00"
    assert topics.bus("vm:alpha").startswith(topics.bus_subscription("vm:*"))
    assert not topics.bus("vmX").startswith(topics.bus_subscription("vm:*"))


def test_tail_keeps_the_lines_a_pattern_matches():
    lines = [record_line(1, "vm:alpha"), record_line(2, "broadcast"), record_line(3, "vm:beta"),
             record_line(4, "vmX"), record_line(5, "metrics.cpu")]
    picked = tail.parse_entries(lines, ("vm:*", "metrics.cpu"), notify=pytest.fail)
    assert [entry.record.seq for entry in picked] == [1, 3, 5]


def test_the_index_finds_exact_and_prefix_subscribers():
    index: SubscriberIndex[str] = SubscriberIndex()
    assert not index
    for session, pattern in (("s1", "vm:alpha"), ("s2", "vm:*"), ("s3", "*"), ("s2", "metrics.*"),
                             ("s4", "metrics.*"), ("s4", "vm:alpha*")):
        index.add(session, pattern)
    assert index.exact_subscribers("vm:alpha") == {"s1"} and index.exact_subscribers("vm:beta") == frozenset()
    assert sorted(map(sorted, index.prefix_subscribers("vm:alpha"))) == [["s2"], ["s3"], ["s4"]]
    assert sorted(map(sorted, index.prefix_subscribers("metrics.cpu"))) == [["s2", "s4"], ["s3"]]
    assert index.prefix_subscribers("vm") == [{"s3"}]  # shorter than vm:, vm:alpha, metrics.
    assert index.sorted_lengths == [0, 3, 8]

    index.discard("s2", "metrics.*")
    index.discard("s9", "metrics.*")  # never held: nothing happens
    assert sorted(map(sorted, index.prefix_subscribers("metrics.x"))) == [["s3"], ["s4"]]
    for session, pattern in (("s1", "vm:alpha"), ("s2", "vm:*"), ("s3", "*"), ("s4", "metrics.*"),
                             ("s4", "vm:alpha*")):
        index.discard(session, pattern)
    assert not index and not index.prefix_lengths and not index.sorted_lengths
    assert not index.prefixes and not index.exact


def test_the_index_looks_up_once_per_prefix_length_however_many_patterns():
    """10,000 sessions with 16 patterns each: a message costs one lookup per distinct
    prefix length, never a pass over the 160,000 patterns."""
    index: SubscriberIndex[int] = SubscriberIndex()
    for session in range(10_000):
        for n in range(MAX_SUBSCRIPTIONS):
            index.add(session, f"s{session % 50}.{n}*")
    assert len(index.prefixes) == 50 * MAX_SUBSCRIPTIONS
    assert len(index.prefix_lengths) <= MAX_TOPIC + 1
    assert index.prefix_subscribers("s7.3.x") == [set(range(7, 10_000, 50))]
    assert index.prefix_subscribers("nothing") == []


# -- real router -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router():
    yield from shared_router(identities=IDENTITIES)


def connect_as(router: Router, vm: str) -> Guest:
    guest = Guest(router.port)
    reply = guest.hello(vm)
    assert reply.startswith("ok session="), reply
    return guest


def subscribe_ok(guest: Guest, topic: str) -> None:
    """The ack of a pattern is the same frame as any topic's."""
    guest.send({"type": "subscribe", "topic": topic})
    assert guest.recv_raw() == b'{"type":"ack","ack":"subscribe","status":"ok","topic":"%s"}' % topic.encode()


def host_publish(router: Router, topic: str, payload=None) -> int:
    return client.publish(topic, payload, state_root=router.state_root)


def assert_nothing_more(guest: Guest) -> None:
    """The next frame is the heartbeat's ack: no delivery is queued before it."""
    guest.send({"type": "heartbeat"})
    assert guest.recv_raw() == b'{"type":"ack","ack":"heartbeat","status":"ok"}'


def test_vm_star_gives_a_guest_its_own_topic_and_a_granted_one_every_vms(router):
    with connect_as(router, "gamma") as gamma, connect_as(router, "monitor") as monitor:
        subscribe_ok(gamma, "vm:*")
        subscribe_ok(gamma, "vm:be*")  # any pattern is taken; this one delivers nothing to gamma
        gamma.send({"type": "subscribe", "topic": "vm:beta"})  # an exact topic is checked as before
        assert gamma.recv_raw() == (b'{"type":"ack","ack":"subscribe","status":"error","topic":"vm:beta",'
                                    b'"reason":"forbidden topic"}')
        subscribe_ok(monitor, "vm:*")
        sent = {topic: host_publish(router, topic) for topic in ("vm:alpha", "vm:gamma", "broadcast", "vm:beta")}
        assert gamma.recv()["seq"] == sent["vm:gamma"]
        assert [monitor.recv()["seq"] for _ in range(3)] == [sent["vm:alpha"], sent["vm:gamma"], sent["vm:beta"]]
        assert_nothing_more(gamma)
        assert_nothing_more(monitor)


def test_a_prefix_pattern_gets_every_topic_starting_with_it_and_no_other(router):
    with connect_as(router, "alpha") as alpha:
        subscribe_ok(alpha, "metrics.*")
        # A published topic ending in * is just a topic, and starts with metrics. too.
        sent = {topic: host_publish(router, topic, topic)
                for topic in ("metrics.cpu", "metricsX", "metrics", "other", "metrics.*", "metrics.mem")}
        assert [alpha.recv()["seq"] for _ in range(3)] == [sent["metrics.cpu"], sent["metrics.*"], sent["metrics.mem"]]
        assert_nothing_more(alpha)


def test_a_message_matching_several_subscriptions_arrives_once(router):
    with connect_as(router, "beta") as beta:
        for topic in ("reports.disk", "reports.*", "rep*", "*"):
            subscribe_ok(beta, topic)
        report = host_publish(router, "reports.disk", {"free": 1})
        news = host_publish(router, "news")  # through "*" alone
        assert [beta.recv()["seq"], beta.recv()["seq"]] == [report, news]
        assert_nothing_more(beta)


def test_unsubscribing_a_pattern_stops_its_deliveries(router):
    with connect_as(router, "alpha") as alpha:
        subscribe_ok(alpha, "jobs.*")
        subscribe_ok(alpha, "marker")
        first = host_publish(router, "jobs.1")
        assert alpha.recv()["seq"] == first
        alpha.send({"type": "unsubscribe", "topic": "jobs.*"})
        assert alpha.recv_raw() == b'{"type":"ack","ack":"unsubscribe","status":"ok","topic":"jobs.*"}'
        host_publish(router, "jobs.2")
        marker = host_publish(router, "marker")
        assert alpha.recv()["seq"] == marker


def test_no_session_of_the_sender_hears_its_publish_through_a_pattern(router):
    with connect_as(router, "delta") as listener, connect_as(router, "delta") as sender, \
            connect_as(router, "gamma") as other:
        subscribe_ok(listener, "news.*")
        subscribe_ok(sender, "news.*")
        subscribe_ok(sender, "*")
        assert sender.publish({"own": True}, topic="news.own")["status"] == "ok"
        ack = other.publish({"n": 1}, topic="news.other")
        assert listener.recv()["seq"] == ack["seq"]
        assert sender.recv()["seq"] == ack["seq"]
        assert_nothing_more(listener)
        assert_nothing_more(sender)


def test_a_pattern_is_one_of_the_sixteen_subscriptions(router):
    with connect_as(router, "gamma") as gamma:
        for n in range(MAX_SUBSCRIPTIONS - 1):
            subscribe_ok(gamma, f"t{n}")
        subscribe_ok(gamma, "p*")
        gamma.send({"type": "subscribe", "topic": "q*"})
        assert gamma.recv_raw() == (b'{"type":"ack","ack":"subscribe","status":"error","topic":"q*",'
                                    b'"reason":"too many subscriptions (max 16)"}')
        subscribe_ok(gamma, "p*")  # held already: not a new one
        assert gamma.request({"type": "unsubscribe", "topic": "p*"})["status"] == "ok"
        subscribe_ok(gamma, "q*")


def probe_until_heard(router: Router, heard) -> None:
    """Publish on ``vm:probe`` until ``heard`` (waiting at most the seconds it is given)
    says a delivery came: the subscription has reached the bus."""
    for _ in range(100):
        host_publish(router, "vm:probe")
        if heard(0.1):
            return
    raise AssertionError("the host subscription never got a probe")


def vm_topics_after_probes(deliveries: list, last_seq: int) -> list[str]:
    return [d.topic for d in deliveries if d.topic != "vm:probe" and d.seq <= last_seq]


def test_a_host_subscriber_of_vm_star_gets_every_vms_topic_and_no_other(router):
    received: queue.Queue = queue.Queue()
    done = threading.Event()

    def collect() -> None:
        with contextlib.closing(client.subscribe(["vm:*"], state_root=router.state_root)) as deliveries:
            for delivery in deliveries:
                received.put(delivery)
                if done.is_set():
                    return

    def heard(timeout: float) -> bool:
        try:
            received.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    probe_until_heard(router, heard)
    for topic in ("vm:alpha", "broadcast", "metrics.vm:alpha"):
        host_publish(router, topic)
    last = host_publish(router, "vm:beta")
    deliveries = []
    while not deliveries or deliveries[-1].seq < last:
        deliveries.append(received.get(timeout=5))
    assert vm_topics_after_probes(deliveries, last) == ["vm:alpha", "vm:beta"]
    done.set()
    host_publish(router, "vm:probe")  # wakes the reader, which then stops
    reader.join(5)
    assert not reader.is_alive()


def test_an_async_host_subscriber_takes_patterns_too(router):
    async def run() -> list[str]:
        received: asyncio.Queue = asyncio.Queue()

        async def collect() -> None:
            async for delivery in client.subscribe_async(["vm:*", "metrics.*"], state_root=router.state_root):
                await received.put(delivery)

        async def heard(timeout: float) -> bool:
            try:
                await asyncio.wait_for(received.get(), timeout)
            except asyncio.TimeoutError:
                return False
            return True

        reader = asyncio.create_task(collect())
        try:
            for _ in range(100):
                host_publish(router, "vm:probe")
                if await heard(0.1):
                    break
            for topic in ("vm:alpha", "broadcast", "metrics.cpu", "metricsX"):
                host_publish(router, topic)
            last = host_publish(router, "vm:beta")
            deliveries = []
            while not deliveries or deliveries[-1].seq < last:
                deliveries.append(await asyncio.wait_for(received.get(), 5))
            return vm_topics_after_probes(deliveries, last)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    assert asyncio.run(run()) == ["vm:alpha", "metrics.cpu", "vm:beta"]


def test_bus_tail_topic_pattern_reads_the_log_and_follows_it(router):
    root = str(router.state_root)
    for topic in ("vm:alpha", "broadcast", "vm:beta", "vmX"):
        host_publish(router, topic, topic)
    result = castra("bus", "tail", "--state-root", root, "--topic", "vm:*", "-n", "2", "--json")
    assert result.returncode == 0 and result.stderr == ""
    vm_lines = [line for line in (router.logs / "bus.log").read_text().splitlines()
                if json.loads(line)["topic"].startswith("vm:")]
    assert result.stdout.splitlines() == vm_lines[-2:]
    assert [json.loads(line)["payload"] for line in vm_lines[-2:]] == ["vm:alpha", "vm:beta"]

    following = Follow(router.state_root, "-n", "1", "--json", "--topic", "vm:*")
    try:
        assert following.next_record()["payload"] == "vm:beta"  # it has read the log and is following
        sent = [host_publish(router, topic, topic) for topic in ("broadcast", "vm:gamma", "vmX", "vm:delta")]
        assert [following.next_record()["seq"], following.next_record()["seq"]] == [sent[1], sent[3]]
    finally:
        status = following.stop()
    assert status == 0
