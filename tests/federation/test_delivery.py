"""Delivery into each host, with three routers (hosts ``a``, ``b``, ``c``) each
``castra up --uplink`` to a real 3-node NATS cluster: a message committed on one
host is committed into the others' ``bus.log`` with its origin, once, and
delivered there as any message; nothing loops.

The routers and the cluster are shared by the module (tests run in file order;
the last one checks the whole fleet). Real processes and sockets on 127.0.0.1;
every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import nats
import pytest
import zmq

from castra_zmq.federation import STREAM_NAME, consumer_config, consumer_name, origin_filter

from ..conftest import Router, host_publish, restarted, wait_for
from ..guest import connect_bus
from .conftest import uplinked_routers
from .test_uplink import delete_stream, query

pytestmark = pytest.mark.timeout(120)
HOSTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def fleet(nats_cluster):
    """Three routers on state roots of their own, each uplinked as its host name,
    once each one's consumer is there (it starts at the host's epoch)."""
    delete_stream(nats_cluster)
    def each_consumer_there(_routers) -> None:
        wait_for(lambda: consumers(nats_cluster) == {consumer_name(host) for host in HOSTS}, timeout=20,
                 interval=0.1, what="a consumer for each host")

    yield from uplinked_routers(nats_cluster, HOSTS, "czfed", each_consumer_there)


def consumers(nats_cluster) -> set[str]:
    async def body(js):
        try:
            return {info.name for info in await js.consumers_info(STREAM_NAME)}
        except nats.js.errors.NotFoundError:
            return set()

    try:
        return query(nats_cluster, body)
    except (nats.errors.Error, OSError, TimeoutError):  # still electing
        return set()


def epoch(router: Router) -> int:
    return json.loads((router.state_root / "state" / "uplink.json").read_text())["epoch"]


def local_lines(router: Router) -> list[dict]:
    return [line for line in router.read_log() if "origin" not in line]


def remote_lines(router: Router, origin: str) -> list[dict]:
    return [line for line in router.read_log() if line.get("origin", {}).get("host") == origin]


def received_everything(fleet) -> bool:
    """Whether each host's log holds every other host's local messages, in order, once."""
    logs = {host: router.read_log() for host, router in fleet.items()}
    local = {host: [line["seq"] for line in lines if "origin" not in line] for host, lines in logs.items()}
    return all([line["origin"]["seq"] for line in lines if line.get("origin", {}).get("host") == origin]
               == local[origin] for host, lines in logs.items() for origin in HOSTS if origin != host)


def wait_received(fleet, timeout: float = 20.0) -> None:
    wait_for(lambda: received_everything(fleet), timeout=timeout, interval=0.2,
             what="every host's messages in every other host's bus.log")


def test_vm_topic_reaches_its_guest_on_another_host_once(fleet):
    a, b = fleet["a"], fleet["b"]
    assert "downloading" in b.log_text()  # this checkout's castra_zmq runs the roles
    with connect_bus(b.port, "beta") as beta, connect_bus(a.port, "alpha") as alpha:
        assert beta.subscribe("vm:beta")["status"] == "ok"
        sent = alpha.publish({"n": 1}, topic="vm:beta")
        frame = beta.recv_raw(timeout=10)
        [line] = [line for line in b.read_log() if line.get("origin", {}).get("seq") == sent["seq"]
                  and line["origin"]["host"] == "a"]
        # The frame a bus-v1 guest gets, byte for byte: no origin in it, the seq of B's log.
        assert frame == b'{"type":"message","topic":"vm:beta","from":"vm:alpha","ts_ms":%d,"seq":%d,"payload":{"n":1}}' % (
            line["ts_ms"], line["seq"])
        assert line["origin"] == {"host": "a", "epoch": epoch(a), "seq": sent["seq"]}
        assert (line["vm"], line["topic"], line["payload"]) == ("alpha", "vm:beta", {"n": 1})
        assert list(line) == ["timestamp", "ts_ms", "seq", "vm", "topic", "payload", "origin"]
        # Once: what comes next is the next message, not the first again.
        alpha.publish({"n": 2}, topic="vm:beta")
        assert beta.recv(timeout=10)["payload"] == {"n": 2}
    assert all("origin" not in line for line in local_lines(a))


def test_broadcast_reaches_a_guest_on_every_host_once(fleet):
    guests = [connect_bus(fleet[host].port, f"g{host}") for host in HOSTS]
    try:
        for guest in guests:
            assert guest.subscribe("broadcast")["status"] == "ok"
        with connect_bus(fleet["a"].port, "pub") as pub:
            pub.publish({"k": "x"})
            pub.publish({"k": "y"})
            for guest in guests:
                first, second = guest.recv(timeout=10), guest.recv(timeout=10)
                assert [(f["from"], f["topic"], f["payload"]) for f in (first, second)] == [
                    ("vm:pub", "broadcast", {"k": "x"}), ("vm:pub", "broadcast", {"k": "y"})]
    finally:
        for guest in guests:
            guest.close()


def test_host_publish_on_c_reaches_a_guest_on_a(fleet):
    with connect_bus(fleet["a"].port, "watcher") as watcher:
        assert watcher.subscribe("metrics.cpu")["status"] == "ok"
        [seq] = host_publish(fleet["c"], "metrics.cpu", 1)
        frame = watcher.recv(timeout=10)
    assert (frame["from"], frame["topic"], frame["payload"]) == ("host", "metrics.cpu", {"n": 0})
    line = next(line for line in fleet["a"].read_log() if line["seq"] == frame["seq"])
    assert line["origin"] == {"host": "c", "epoch": epoch(fleet["c"]), "seq": seq}


def test_uplink_killed_while_downloading_no_gap_no_duplicate(fleet):
    a, b = fleet["a"], fleet["b"]
    wait_received(fleet)
    before = len(remote_lines(b, "a"))
    publishing = threading.Thread(target=host_publish, args=(a, "bulk", 800))
    publishing.start()
    try:
        wait_for(lambda: len(remote_lines(b, "a")) >= before + 50, timeout=15, interval=0.02,
                 what="B downloading A's messages")
        pid = b.role_pid("uplink")
        os.kill(pid, signal.SIGKILL)
        at_kill = len(remote_lines(b, "a")) - before
    finally:
        publishing.join(30)
    wait_for(lambda: restarted(b, "uplink", pid), timeout=10, what="B's uplink restarted")
    wait_received(fleet, timeout=30)
    assert 50 <= at_kill < 800  # it was killed mid-stream
    assert b.log_text().count("downloading consumer=castra-b") >= 2  # the restarted one made it again


def test_acks_lost_everything_redelivered_nothing_committed_twice(fleet, nats_cluster):
    """As if B's uplink had died after each commit and before its ack: B stopped,
    its consumer made again from the stream's start, B started again. Every
    message comes again; its restarted bridge (marks rebuilt from the log) commits
    none of them twice."""
    b = fleet["b"]
    wait_received(fleet)
    remote_before = len(b.read_log()) - len(local_lines(b))
    b.stop()

    async def forget_acks(js):
        await js.delete_consumer(STREAM_NAME, consumer_name("b"))
        await js.add_consumer(STREAM_NAME, consumer_config("b", after_stream_seq=0))

    query(nats_cluster, forget_acks)
    b.start()
    wait_for(lambda: "downloading consumer=castra-b after_stream_seq=0" in b.log_text(), timeout=10,
             what="B downloading from the stream's start")
    redelivered = re.compile(r"already in bus.log \(redelivered\).* count=(\d+)")
    wait_for(lambda: sum(map(int, redelivered.findall(b.log_text()))) >= remote_before, timeout=20,
             interval=0.1, what=f"{remote_before} messages redelivered to B")
    wait_received(fleet)
    assert len(b.read_log()) - len(local_lines(b)) == remote_before


def test_a_resent_message_is_stored_once_and_committed_once(fleet, nats_cluster):
    a, b = fleet["a"], fleet["b"]
    wait_received(fleet)

    async def resend_last_of_a(js):
        last = await js.get_last_msg(STREAM_NAME, origin_filter("a"))
        # Its id and origin; not the order check, nor the atomic batch it came in.
        headers = {key: value for key, value in last.headers.items()
                   if not key.startswith(("Nats-Expected", "Nats-Batch"))}
        ack = await js.publish(last.subject, last.data, headers=headers)
        return ack.duplicate, ack.seq == last.seq, json.loads(last.data)["seq"]

    duplicate, same_seq, seq = query(nats_cluster, resend_last_of_a)
    assert duplicate and same_seq
    # The bridge's own check, which also holds past the stream's duplicate window:
    # the same origin handed to it again is not committed again, even after a restart.
    lines = len(b.read_log())
    assert commit_remote(b, "a", epoch(a), seq) == [None, "duplicate"]
    assert commit_remote(b, "z", 7, 1) == [lines + 1, None]
    assert commit_remote(b, "z", 7, 1) == [None, "duplicate"]
    pid = b.role_pid("bridge")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: restarted(b, "bridge", pid), timeout=10, what="B's bridge restarted")
    assert commit_remote(b, "z", 7, 1) == [None, "duplicate"]
    assert commit_remote(b, "z", 6, 99) == [None, "duplicate"]  # an older epoch
    assert len(b.read_log()) == lines + 1
    assert "origins of remote messages rebuilt" in b.log_text()


def commit_remote(router: Router, host: str, epoch_ms: int, seq: int) -> list:
    """Hand the bridge a message of ``host`` as the uplink does; its [seq, reason]."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"ipc://{router.state_root}/run/journal.sock")
        request = {"corr": 1, "vm": "zed", "topic": "resent", "deadline": 1e12, "payload": {"seq": seq},
                   "origin": {"host": host, "epoch": epoch_ms, "seq": seq}}
        sock.send_multipart([b"", json.dumps(request).encode()])
        assert sock.poll(5000), "no answer from the bridge"
        [[_, committed, reason]] = json.loads(sock.recv_multipart()[-1])["results"]
        return [committed, reason]
    finally:
        sock.close()
        context.term()


def test_nothing_loops(fleet, nats_cluster):
    """Each host's subjects in the stream are exactly its local messages, and each
    host's log has every other host's, once: nothing came back or went round."""
    wait_received(fleet)

    async def counts(js):
        totals = {}
        for host in HOSTS:
            info = await js.stream_info(STREAM_NAME, subjects_filter=origin_filter(host))
            totals[host] = sum((info.state.subjects or {}).values())
        return totals

    local = {host: len(local_lines(router)) for host, router in fleet.items()}
    wait_for(lambda: query(nats_cluster, counts) == local, timeout=10, interval=0.1,
             what=f"the stream to hold each host's local messages: {local}")
    for host, router in fleet.items():
        assert len(router.read_log()) == sum(local.values()) + (1 if host == "b" else 0)  # b: the test's "z"
