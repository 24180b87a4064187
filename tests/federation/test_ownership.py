"""Where each VM lives, with three routers (hosts ``a``, ``b``, ``c``) each ``castra
up --uplink`` to a real 3-node NATS cluster: a VM is owned by the host it is
connected to (``CASTRA_VMS``), never by two, handed over when released, taken over
from a host gone; ``castra status --fleet`` shows it; a VM moving from one host to
another gets the messages sent to it meanwhile, once.

The routers and the cluster are shared by the module. Real processes and sockets
on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import nats.js.errors
import pytest
import zmq

from castra_zmq.ownership import (
    HOSTS_BUCKET,
    OWNERS_BUCKET,
    OwnerState,
    VmOwner,
    decode_owner,
    encode_owner,
    vm_key,
)

from ..conftest import Router, host_publish, wait_for
from ..guest import connect_bus
from ..zygote import run_castra
from .conftest import each_log_says, uplinked_routers
from .test_uplink import delete_stream, query

pytestmark = pytest.mark.timeout(120)
HOSTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def fleet(nats_cluster):
    delete_stream(nats_cluster)
    delete_buckets(nats_cluster)
    yield from uplinked_routers(nats_cluster, HOSTS, "czown", each_log_says("watching VM owners"))


def delete_buckets(nats_cluster) -> None:
    async def body(js):
        for bucket in (OWNERS_BUCKET, HOSTS_BUCKET):
            try:
                await js.delete_key_value(bucket)
            except nats.js.errors.NotFoundError:
                pass

    query(nats_cluster, body)


def owner(nats_cluster, vm: str) -> VmOwner | None:
    async def body(js):
        kv = await js.key_value(OWNERS_BUCKET)
        try:
            return decode_owner((await kv.get(vm_key(vm))).value)
        except nats.js.errors.KeyNotFoundError:
            return None

    return query(nats_cluster, body)


def fleet_file(router: Router) -> dict:
    try:
        return json.loads((router.state_root / "state" / "fleet.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def owned_by(nats_cluster, vm: str, host: str, state: OwnerState = OwnerState.OWNED) -> VmOwner:
    def check():
        record = owner(nats_cluster, vm)
        return record if record is not None and (record.host, record.state) == (host, state) else None

    return wait_for(check, timeout=15, interval=0.1, what=f"{vm} {state.value} by {host}")


def test_a_vm_is_owned_by_the_host_it_connects_to_and_every_host_knows(fleet, nats_cluster):
    with connect_bus(fleet["a"].port, "alpha"):
        record = owned_by(nats_cluster, "alpha", "a")
        assert record.release is None
        for router in fleet.values():
            wait_for(lambda router=router: ["alpha", "a", "owned", record.since_ms] in fleet_file(router).get("vms", []),
                     timeout=10, interval=0.1, what="alpha in every host's fleet view")
    record = owned_by(nats_cluster, "alpha", "a", OwnerState.RELEASED)
    assert record.release is not None and record.release.seq >= 0
    wait_for(lambda: "VM released vm=alpha" in fleet["a"].log_text(), timeout=5, what="a's log line")


def test_a_vm_owned_elsewhere_is_waited_for_then_claimed_once_released(fleet, nats_cluster):
    a, b = fleet["a"], fleet["b"]
    on_a = connect_bus(a.port, "beta")
    try:
        owned_by(nats_cluster, "beta", "a")
        with connect_bus(b.port, "beta"):
            wait_for(lambda: "owned by a" in b.log_text(), timeout=10, interval=0.1, what="b's warning")
            wait_for(lambda: fleet_file(b).get("waiting") == {"beta": "a"}, timeout=10, interval=0.1,
                     what="the conflict in b's fleet view")
            assert owner(nats_cluster, "beta").host == "a"
            on_a.close()  # its session on a ends: a releases it, b claims it
            owned_by(nats_cluster, "beta", "b")
            wait_for(lambda: fleet_file(b).get("waiting") == {}, timeout=10, interval=0.1,
                     what="no conflict left in b's fleet view")
        owned_by(nats_cluster, "beta", "b", OwnerState.RELEASED)
    finally:
        on_a.close()


def test_two_hosts_racing_for_a_vm_one_owns_it(fleet, nats_cluster):
    b, c = fleet["b"], fleet["c"]
    for round_ in range(3):
        vm = f"gamma{round_}"
        with connect_bus(b.port, vm), connect_bus(c.port, vm):
            record = wait_for(lambda vm=vm: owner(nats_cluster, vm), timeout=15, interval=0.1, what=f"{vm} owned")
            loser, winner = (c, "b") if record.host == "b" else (b, "c")
            wait_for(lambda vm=vm, loser=loser, winner=winner: fleet_file(loser).get("waiting", {}).get(vm) == winner,
                     timeout=10, interval=0.1, what="the other host waiting")
            assert owner(nats_cluster, vm) == record


def test_a_vm_of_a_host_gone_is_taken_over(fleet, nats_cluster):
    async def body(js):
        kv = await js.key_value(OWNERS_BUCKET)
        await kv.put(vm_key("delta"), encode_owner(VmOwner("ghost", 1, OwnerState.OWNED, 1)))

    query(nats_cluster, body)
    with connect_bus(fleet["c"].port, "delta"):
        owned_by(nats_cluster, "delta", "c")
    assert "VM taken over from a host gone" in fleet["c"].log_text()


def payloads(guest, quiet: float = 1.0) -> list[dict]:
    """What ``guest`` receives until nothing comes for ``quiet`` seconds."""
    received = []
    while True:
        try:
            frame = guest.recv(timeout=quiet)
        except (TimeoutError, OSError):
            return received
        if frame.get("type") == "message":
            received.append(frame["payload"])


@pytest.mark.parametrize("subscribe_after_claim", [False, True])
def test_a_vm_moving_from_a_to_b_gets_what_was_sent_meanwhile_once(fleet, nats_cluster, subscribe_after_claim):
    """beta gets m1 on a, leaves; c publishes m2, m3 to it; beta comes back on b:
    it gets m2 and m3 once, not m1. Subscribed before b's claim, the handover
    reaches its session at once; after it, the handover waits for the subscribe."""
    a, b, c = fleet["a"], fleet["b"], fleet["c"]
    vm = f"mover{int(subscribe_after_claim)}"
    topic = f"vm:{vm}"
    with connect_bus(a.port, vm) as on_a:
        assert on_a.subscribe(topic)["status"] == "ok"
        owned_by(nats_cluster, vm, "a")
        host_publish(c, topic, 1, start=1)
        assert on_a.recv(timeout=10)["payload"] == {"n": 1}
    owned_by(nats_cluster, vm, "a", OwnerState.RELEASED)
    sent = host_publish(c, topic, 2, start=2)
    wait_for(lambda: [line["origin"]["seq"] for line in b.read_log()
                      if line["topic"] == topic and line.get("origin", {}).get("host") == "c"][-2:] == sent,
             timeout=15, interval=0.1, what="m2 and m3 in b's bus.log")
    with connect_bus(b.port, vm) as on_b:
        if subscribe_after_claim:
            owned_by(nats_cluster, vm, "b")
            wait_for(lambda: f"handover kept for the VM's next session vm={vm}" in b.log_text(), timeout=10,
                     what="the handover kept by b's bridge")
        assert on_b.subscribe(topic)["status"] == "ok"
        assert payloads(on_b) == [{"n": 2}, {"n": 3}]
        host_publish(c, topic, 1, start=4)  # and live after it, once
        assert payloads(on_b) == [{"n": 4}]
    owned_by(nats_cluster, vm, "b", OwnerState.RELEASED)


def test_a_late_copy_of_what_the_old_host_had_is_not_delivered_live(fleet):
    """The handover's marks also hold for messages committed here after the session
    subscribed (this host's download behind the old host's): the bridge does not send
    those again. Driven on b's bridge socket as the uplink drives it."""
    b = fleet["b"]
    context = zmq.Context()
    bridge = context.socket(zmq.DEALER)
    bridge.linger = 0
    bridge.connect(f"ipc://{b.state_root}/run/journal.sock")
    try:
        with connect_bus(b.port, "late") as guest:
            assert guest.subscribe("vm:late")["status"] == "ok"
            request = {"vm": "late", "after": max((line["seq"] for line in b.read_log()), default=0), "local_upto": 0, "marks": {"zz": [1, 10]}}
            bridge.send_multipart([b"", b"handover", json.dumps(request).encode()])
            wait_for(lambda: "handover: messages sent while the VM moved" in b.log_text(), what="the handover taken")
            publishes = [{"corr": n, "vm": "host", "topic": "vm:late", "deadline": time.monotonic() + 5,
                          "payload": {"n": n}, "origin": {"host": "zz", "epoch": 1, "seq": n}} for n in (9, 10, 11)]
            bridge.send_multipart([b"", json.dumps(publishes).encode()])
            assert bridge.poll(5000)
            results = json.loads(bridge.recv_multipart()[-1])["results"]
            assert all(seq is not None for _corr, seq, _reason in results), results
            assert payloads(guest) == [{"n": 11}]  # 9 and 10 were the old host's
    finally:
        bridge.close()
        context.term()


def castra_status(router: Router, *args: str) -> subprocess.CompletedProcess:
    return run_castra(["status", "--fleet", "--state-root", str(router.state_root), *args], timeout=20)


def fleet_json(router: Router) -> dict:
    result = castra_status(router, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_fleet_shows_every_hosts_vms(fleet, nats_cluster):
    with connect_bus(fleet["a"].port, "epsilon"), connect_bus(fleet["b"].port, "zeta"):
        owned_by(nats_cluster, "epsilon", "a")
        owned_by(nats_cluster, "zeta", "b")

        def listed(router, vm, host, here):
            rows = fleet_json(router)["fleet"]["vms"]
            return any(row["vm"] == vm and row["host"] == host and row["state"] == "owned" and row["here"] is here
                       for row in rows)

        wait_for(lambda: listed(fleet["c"], "epsilon", "a", False) and listed(fleet["c"], "zeta", "b", False),
                 timeout=10, interval=0.2, what="c's fleet view")
        wait_for(lambda: listed(fleet["a"], "epsilon", "a", True), timeout=10, interval=0.2, what="a's own VM")
        status = fleet_json(fleet["c"])
        assert list(status) == ["vms", "router", "journal", "refused_handshakes", "uplink", "fleet"]
        assert list(status["fleet"]) == ["host", "nats", "known_age_ms", "vms", "waiting"]
        assert list(status["fleet"]["vms"][0]) == ["vm", "host", "state", "since_age_ms", "here"]
        assert (status["fleet"]["host"], status["fleet"]["nats"]) == ("c", "connected")
        text = castra_status(fleet["a"]).stdout
        assert "fleet, as a sees it:" in text
        assert re.search(r"^epsilon +a \* +owned +", text, re.MULTILINE), text
        assert re.search(r"^zeta +b +owned +", text, re.MULTILINE), text


def test_status_fleet_with_nats_down_says_unknown_without_waiting(fleet, nats_cluster):
    """The module's last test: it stops the cluster. (First: no host lost a VM it
    owned, or failed a release, in the tests before: none was taken from a live one.)"""
    for router in fleet.values():
        text = router.log_text()
        assert "VM taken over by another host" not in text and "VM not released" not in text
    nats_cluster.stop()
    wait_for(lambda: fleet_json(fleet["a"])["fleet"]["nats"] == "unreachable", timeout=20, interval=0.2,
             what="a's uplink reporting NATS unreachable")
    started = time.monotonic()
    result = castra_status(fleet["a"])
    assert time.monotonic() - started < 5
    assert "fleet: unknown, NATS unreachable; last known" in result.stdout, result.stdout
    assert re.search(r"^epsilon +a \* +(owned|released) +", result.stdout, re.MULTILINE), result.stdout
