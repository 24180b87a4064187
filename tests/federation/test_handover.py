"""A VM's handover when things fail, with three routers (hosts ``a``, ``b``, ``c``)
each ``castra up --uplink`` to a real 3-node NATS cluster: the bridge of the host a
VM moves to killed -9 between the claim and the VM's subscribe; the host a VM was
on killed -9 (router and uplink), the VM taken over by another host. Each time the
VM gets what was sent to it meanwhile, once.

The cluster's ``CASTRA_HOSTS`` bucket is made by the test with a max age of
``ALIVE_AGE_S`` (the uplinks take an existing bucket as it is, as one an operator
made): a host gone is known as such in seconds, not 15. Real processes and sockets
on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import nats.js.errors
import pytest

from castra_zmq.federation import host_key
from castra_zmq.ownership import (
    HOSTS_BUCKET,
    OWNERS_BUCKET,
    OwnerState,
    checkpoint_key,
    decode_checkpoint,
    hosts_config,
)
from castra_zmq.supervisor import process_runs

from ..conftest import host_publish, restarted, wait_for
from ..guest import connect_bus
from .conftest import each_log_says, uplinked_routers
from .test_ownership import delete_buckets, owned_by, payloads
from .test_uplink import delete_stream, query

pytestmark = pytest.mark.timeout(180)
HOSTS = ("a", "b", "c")
ALIVE_AGE_S = 6.0  # the liveness keys' max age here (puts every 2 s)


@pytest.fixture(scope="module")
def fleet(nats_cluster):
    delete_stream(nats_cluster)
    delete_buckets(nats_cluster)

    async def short_lived_hosts(js):
        await js.create_key_value(dataclasses.replace(hosts_config(), ttl=ALIVE_AGE_S))

    query(nats_cluster, short_lived_hosts)
    yield from uplinked_routers(nats_cluster, HOSTS, "czhand", each_log_says("watching VM owners"))


def moved_while_away(fleet, nats_cluster, vm: str) -> None:
    """``vm`` gets m1 on a, leaves it; c sends it m2 and m3, which reach b's bus.log."""
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    topic = f"vm:{vm}"
    with connect_bus(a.port, vm) as on_a:
        assert on_a.subscribe(topic)["status"] == "ok"
        owned_by(nats_cluster, vm, "a")
        host_publish(c, topic, 1, start=1)
        assert on_a.recv(timeout=10)["payload"] == {"n": 1}
    owned_by(nats_cluster, vm, "a", OwnerState.RELEASED)
    in_b(b, topic, host_publish(c, topic, 2, start=2))


def in_b(b, topic: str, sent: list[int]) -> None:
    wait_for(lambda: [line["origin"]["seq"] for line in b.read_log()
                      if line["topic"] == topic and line.get("origin", {}).get("host") == "c"][-len(sent):] == sent,
             timeout=15, interval=0.1, what="the messages in b's bus.log")


def gets_them_once_then_live(fleet, on_b, vm: str) -> None:
    topic = f"vm:{vm}"
    assert on_b.subscribe(topic)["status"] == "ok"
    assert payloads(on_b, quiet=2.0) == [{"n": 2}, {"n": 3}], story(fleet["b"], vm)
    host_publish(fleet["c"], topic, 1, start=4)  # and live after it, once
    assert payloads(on_b) == [{"n": 4}], story(fleet["b"], vm)


def story(router, vm: str) -> str:
    """What ``router``'s log says of ``vm`` and its handovers, for a failure's message."""
    return "\n".join(line for line in router.log_text().splitlines() if f"vm={vm}" in line or "handovers" in line)


@pytest.mark.parametrize("reconnect", ["at_once", "after_the_release", "uplink_killed_too"])
def test_a_handover_survives_the_bridge_killed_between_the_claim_and_the_subscribe(fleet, nats_cluster, reconnect):
    """beta's session on b (not subscribed yet) makes b claim it; b's bridge keeps
    the handover in memory and is killed -9. At once: beta's new session, taken by
    the restarted bridge, is still b's VM, and the uplink asks the new bridge again.
    After the release: b released beta with the handover carried on (beta never had
    it), and claims it again from that release. With b's uplink killed -9 too: the
    restarted uplink reads the request from state/handovers.json and asks the
    bridge again. Each way beta gets m2, m3 once."""
    b = fleet["b"]
    vm = f"bridgekill-{reconnect}"
    moved_while_away(fleet, nats_cluster, vm)
    first = connect_bus(b.port, vm)
    try:
        owned_by(nats_cluster, vm, "b")
        wait_for(lambda: f"handover kept for the VM's next session vm={vm}" in b.log_text(), timeout=10,
                 what="the handover kept by b's bridge")
        pid = b.role_pid("bridge")
        if reconnect == "uplink_killed_too":
            os.kill(b.role_pid("uplink"), signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        if reconnect == "after_the_release":
            wait_for(lambda: restarted(b, "bridge", pid), timeout=15, what="b's bridge restarted")
            owned_by(nats_cluster, vm, "b", OwnerState.RELEASED)
            wait_for(lambda: f"release carries the handover on vm={vm}" in b.log_text(), timeout=10,
                     what="the release carrying the handover")
        # Now: the connection waits in the listener's backlog, for the restarted bridge.
        with connect_bus(b.port, vm) as on_b:
            owned_by(nats_cluster, vm, "b")
            gets_them_once_then_live(fleet, on_b, vm)
    finally:
        first.close()
    if reconnect != "after_the_release":  # the uplink asked the restarted bridge again
        why = "the bridge restarted" if reconnect == "at_once" else "the bridge seen first"
        assert any("handovers asked again" in line and why in line for line in b.log_text().splitlines())


def test_a_handover_from_before_the_oldest_line_left_reads_from_that_line(fleet, nats_cluster):
    """b's bus.log was rotated away (renamed, then the copy deleted) less than 60 s
    before the release, so the handover's start is before b's oldest line: it reads
    from that line on, and the VM's session is not closed as ``replay_expired``."""
    b = fleet["b"]
    host_publish(b, "filler", 3)  # lines to rotate away
    (b.logs / "bus.log").rename(b.logs / "bus.log.1")
    wait_for(lambda: "bus.log moved away" in b.log_text(), timeout=10, what="b following the rotation")
    (b.logs / "bus.log.1").unlink()
    vm = "rotated"
    moved_while_away(fleet, nats_cluster, vm)
    with connect_bus(b.port, vm) as on_b:
        owned_by(nats_cluster, vm, "b")
        gets_them_once_then_live(fleet, on_b, vm)
    assert "replay_expired" not in b.log_text()


def test_a_vm_taken_over_from_a_host_gone_gets_what_was_sent_meanwhile(fleet, nats_cluster):
    """The module's last test: it kills host a. omega gets m1 on a; a's checkpoint
    covers it; a dies (router and uplink, kill -9) with omega on it; c sends m2, m3;
    once a's liveness key is gone omega connects to b, which takes it over and hands
    over from a's checkpoint: m2 and m3, once, not m1."""
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    vm, topic = "omega", "vm:omega"
    on_a = connect_bus(a.port, vm)
    try:
        assert on_a.subscribe(topic)["status"] == "ok"
        owned_by(nats_cluster, vm, "a")
        [m1] = host_publish(c, topic, 1, start=1)
        assert on_a.recv(timeout=10)["payload"] == {"n": 1}

        def checkpoint_past_m1():
            async def body(js):
                kv = await js.key_value(OWNERS_BUCKET)
                try:
                    return decode_checkpoint((await kv.get(checkpoint_key("a"))).value)
                except nats.js.errors.KeyNotFoundError:
                    return None

            checkpoint = query(nats_cluster, body)
            return checkpoint is not None and checkpoint.release.marks.get("c", (0, 0))[1] >= m1

        wait_for(checkpoint_past_m1, timeout=20, interval=0.5, what="a's checkpoint covering m1")
        # As a host that dies: no role may close a session or release a VM (a.kill_9 alone
        # gives the roles a SIGTERM, and a bridge stopping closes its sessions).
        uplink = a.role_pid("uplink")
        os.kill(a.process.pid, signal.SIGSTOP)  # its supervisor restarts nothing
        os.kill(uplink, signal.SIGKILL)
        os.kill(a.role_pid("bridge"), signal.SIGKILL)
        a.kill_9()
        wait_for(lambda: not process_runs(uplink), timeout=10, what="a's uplink gone")
    finally:
        on_a.close()
    in_b(b, topic, host_publish(c, topic, 2, start=2))

    def a_gone():
        async def body(js):
            kv = await js.key_value(HOSTS_BUCKET)
            try:
                await kv.get(host_key("a"))
            except nats.js.errors.KeyNotFoundError:
                return True
            return False

        return query(nats_cluster, body)

    wait_for(a_gone, timeout=ALIVE_AGE_S + 20, interval=0.5, what="a's liveness key gone")
    with connect_bus(b.port, vm) as on_b:
        owned_by(nats_cluster, vm, "b")
        gets_them_once_then_live(fleet, on_b, vm)
    assert any("VM taken over from a host gone" in line and f"vm={vm}" in line for line in b.log_text().splitlines())
    assert "skipped a record castra did not write" not in b.log_text() + c.log_text()
