"""End-to-end: real router processes, real TCP guests on loopback.

One router serves the module (``router``), and a second one with a 1 s heartbeat
timeout and one session per VM (``hb_router``) the tests of those limits: each test
uses its own VM names and topics, and reads the logs and the status relative to
what they held when it started, so that none hears another's messages or sees
another's state. Tests that stop or restart a router, or need other ``castra up``
options, start their own (``router_factory``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from castra_zmq import client
from castra_zmq.cli.status import render_table
from castra_zmq.statusview import collect_status

from .conftest import shared_router, wait_for
from .guest import Guest, connect_bus


@pytest.fixture(scope="module")
def router():
    yield from shared_router()


@pytest.fixture(scope="module")
def hb_router():
    yield from shared_router("--heartbeat-timeout", "1", "--max-sessions-per-vm", "1")


def last_seq(router) -> int:
    """The seq of the last line of ``bus.log`` (0 if none): a test's own lines come after it."""
    lines = router.read_log()
    return lines[-1]["seq"] if lines else 0


def log_offset(router) -> int:
    """Where the router's log (its stderr) ends now: ``log_since`` reads what comes after."""
    return router.log_path.stat().st_size


def log_since(router, offset: int) -> str:
    with open(router.log_path, "rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


def logged_line(router, offset: int, *parts: str) -> bool:
    """Whether a line of the router's log after ``offset`` holds every one of ``parts``."""
    return any(all(part in line for part in parts) for line in log_since(router, offset).splitlines())


def test_greeting_and_handshake_only_guest(router):
    with Guest(router.port) as guest:
        assert "ready" in guest.greeting and "capabilities=bus-v1" in guest.greeting
        assert guest.hello("legacy", capabilities=None) == "ok"
        assert guest.is_closed()


def test_unknown_bus_version_is_handshake_only(router):
    with Guest(router.port) as guest:
        assert guest.hello("future", capabilities="bus-v9,other") == "ok"
        assert guest.is_closed()


def test_publish_is_acked_after_it_is_in_bus_log_then_filed_in_the_vm_logs(router):
    before = last_seq(router)
    with Guest(router.port) as beta:  # a VM that connected gets a log (only the sender else)
        assert beta.hello("acked-beta", capabilities=None) == "ok"
    with connect_bus(router.port, "acked-alpha") as guest:
        ack = guest.publish({"n": 1}, topic="vm:acked-beta", id="m1")
        assert ack == {"type": "ack", "ack": "publish", "status": "ok", "topic": "vm:acked-beta", "seq": before + 1,
                       "id": "m1"}
    [line] = [line for line in router.read_log("bus.log") if line["seq"] > before]
    assert line["seq"] == before + 1 and line["vm"] == "acked-alpha" and line["topic"] == "vm:acked-beta"
    assert line["payload"] == {"n": 1}
    assert isinstance(line["ts_ms"], int) and abs(line["timestamp"] * 1000 - line["ts_ms"]) < 1
    # The per-VM logs are derived: the journal files the line after the ack.
    wait_for(lambda: router.read_log("acked-alpha.log") == [line], what="the line in acked-alpha.log")
    wait_for(lambda: router.read_log("acked-beta.log") == [line], what="the line in acked-beta.log")  # addressed to it


def test_reply_bytes_are_compact_for_substring_matching(router):
    with connect_bus(router.port, "compact") as guest:
        guest.send({"type": "publish", "payload": {"spaced": [1, 2]}})
        raw = guest.recv_raw()
        assert b'"type":"ack"' in raw and b'"ack":"publish"' in raw and b'"status":"ok"' in raw
        assert raw.startswith(b'{"type":"ack"') and b", " not in raw and b": " not in raw
        guest.send({"type": "heartbeat"})
        assert guest.recv_raw() == b'{"type":"ack","ack":"heartbeat","status":"ok"}'


def test_default_topic_and_payload(router):
    with connect_bus(router.port, "defaults") as guest:
        ack = guest.request({"type": "publish"})
        assert ack["status"] == "ok" and ack["topic"] == "broadcast"
    [line] = [line for line in router.read_log() if line["seq"] == ack["seq"]]
    assert line["vm"] == "defaults" and line["payload"] is None


def test_multiline_payload_stays_one_log_line(router):
    bus_log = router.logs / "bus.log"
    offset = bus_log.stat().st_size if bus_log.exists() else 0
    with connect_bus(router.port, "multiline") as guest:
        body = b'{"type":"publish","payload":{"a":\n[1,\r\n2]}}'
        guest.send_raw(len(body).to_bytes(4, "big") + body)
        assert guest.recv()["status"] == "ok"
    with open(bus_log, "rb") as file:
        file.seek(offset)
        [added] = file.read().splitlines()  # what this publish wrote: one line
    assert json.loads(added)["payload"] == {"a": [1, 2]}


def test_subscriber_receives_other_guests_publish_but_not_its_own(router):
    with connect_bus(router.port, "own-sub") as sub, connect_bus(router.port, "own-pub") as pub:
        assert sub.subscribe("own-news") == {"type": "ack", "ack": "subscribe", "status": "ok", "topic": "own-news"}
        assert sub.publish({"own": True}, topic="own-news")["status"] == "ok"
        ack = pub.publish({"hello": "world"}, topic="own-news")
        message = sub.recv()
        assert message == {"type": "message", "topic": "own-news", "from": "vm:own-pub", "ts_ms": message["ts_ms"],
                           "seq": ack["seq"], "payload": {"hello": "world"}}


def test_topic_match_is_exact_and_star_gets_everything_the_guest_may_read(router):
    with connect_bus(router.port, "match") as exact, connect_bus(router.port, "match2") as every, \
            connect_bus(router.port, "match-pub") as pub:
        exact.subscribe("vm:match")
        every.subscribe("*")
        pub.publish(1, topic="vm:match2")
        pub.publish(2, topic="vm:match")
        pub.publish(3, topic="match-news")
        assert exact.recv()["payload"] == 2  # vm:match2 did not match vm:match
        # match2 may read its own vm: topic and every other topic, not match's.
        assert [every.recv()["payload"], every.recv()["payload"]] == [1, 3]


def test_host_publish_reaches_guest_and_logs(router):
    with connect_bus(router.port, "commanded") as guest:
        guest.subscribe("vm:commanded")
        seq = client.publish("vm:commanded", {"cmd": "reload"}, state_root=router.state_root)
        message = guest.recv()
        assert message["from"] == "host" and message["seq"] == seq and message["payload"] == {"cmd": "reload"}
    router.wait_filed()
    assert [line["vm"] for line in router.read_log("host.log") if line["seq"] == seq] == ["host"]
    assert router.read_log("commanded.log")[0]["seq"] == seq


def test_journal_socket_answers_each_publish_of_a_batch(router):
    """The documented host-tool path: a DEALER on run/journal.sock sends a batch of
    requests in one frame, pretty-printed here; payloads are stored compacted."""
    deadline = time.monotonic() + 5
    requests = [{"corr": n, "vm": "host", "topic": topic, "deadline": deadline, "payload": payload}
                for n, topic, payload in ((1, "journal-batch", {"n": [1, 2]}), (2, "*", 2), (3, "journal-batch", "three"))]
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(f"ipc://{router.state_root}/run/journal.sock")
        sock.send_multipart([b"", json.dumps(requests, indent=2).encode()])
        assert sock.poll(5000)
        delimiter, body = sock.recv_multipart()
    assert delimiter == b""
    results = sorted(json.loads(body)["results"])  # [corr, seq, reason], in no promised order
    assert [corr for corr, *_ in results] == [1, 2, 3]
    (_, first, _), (_, refused, reason), (_, third, _) = results
    assert third == first + 1 and refused is None and "only for subscribe" in reason
    router.wait_filed()
    assert [(line["seq"], line["payload"]) for line in router.read_log("host.log") if line["seq"] >= first] == \
        [(first, {"n": [1, 2]}), (third, "three")]


def test_unsubscribe_stops_delivery(router):
    with connect_bus(router.port, "unsub") as sub, connect_bus(router.port, "unsub-pub") as pub:
        sub.subscribe("unsub-t")
        assert sub.request({"type": "unsubscribe", "topic": "unsub-t"})["status"] == "ok"
        pub.publish(1, topic="unsub-t")
        sub.send({"type": "heartbeat"})
        assert sub.recv()["ack"] == "heartbeat"  # the next frame is the heartbeat ack, no message


def test_seventeenth_subscription_is_refused(router):
    with connect_bus(router.port, "greedy") as guest:
        for n in range(16):
            assert guest.subscribe(f"t{n}")["status"] == "ok"
        reply = guest.subscribe("t16")
        assert reply["status"] == "error" and "16" in reply["reason"]
        assert guest.subscribe("t3")["status"] == "ok"  # re-subscribing is not a new topic


def test_a_second_session_of_a_vm_leaves_the_first_subscribed(router):
    """Issue 12: a guest's own publish (a second session of its name) must not kick
    its agent off; a host message to the VM meanwhile reaches the agent."""
    offset = log_offset(router)
    with connect_bus(router.port, "twice") as agent:
        assert agent.subscribe("vm:twice")["status"] == "ok"
        with connect_bus(router.port, "twice") as publisher:
            assert publisher.session != agent.session
            assert publisher.publish({"event": "booted"})["status"] == "ok"
            seq = client.publish("vm:twice", {"cmd": "reload"}, state_root=router.state_root)
            message = agent.recv()
            assert (message["from"], message["seq"], message["payload"]) == ("host", seq, {"cmd": "reload"})
        later = client.publish("vm:twice", {"cmd": "after"}, state_root=router.state_root)
        assert agent.recv()["seq"] == later  # the publisher's goodbye closed only its own session
        assert agent.request({"type": "heartbeat"})["status"] == "ok"
    assert "reason=replaced" not in log_since(router, offset)


def test_every_subscribed_session_of_a_vm_gets_a_delivery_but_none_its_own_publish(router):
    with connect_bus(router.port, "every") as first, connect_bus(router.port, "every") as second, \
            connect_bus(router.port, "every-beta") as beta:
        for session in (first, second):
            assert session.subscribe("every-news")["status"] == "ok"
        assert second.subscribe("vm:every")["status"] == "ok"
        ack = beta.publish({"n": 1}, topic="every-news")
        assert first.recv()["seq"] == second.recv()["seq"] == ack["seq"]
        command = client.publish("vm:every", {"n": 2}, state_root=router.state_root)
        assert second.recv()["seq"] == command  # only the session subscribed to it
        # No echo to the sender: to none of its VM's sessions, whichever sent it.
        assert first.publish({"own": True}, topic="every-news")["status"] == "ok"
        last = beta.publish({"n": 3}, topic="every-news")["seq"]
        assert first.recv()["seq"] == second.recv()["seq"] == last


def test_sessions_past_the_cap_of_a_vm_are_refused_and_the_others_go_on(router_factory):
    router = router_factory("--max-sessions-per-vm", "2")
    first, second = connect_bus(router.port, "capped"), connect_bus(router.port, "capped")
    with Guest(router.port) as third:
        assert third.hello("capped") == "error: too many sessions for this vm"
        assert third.is_closed()
    with Guest(router.port) as handshake_only:  # not a session: not counted
        assert handshake_only.hello("capped", capabilities=None) == "ok"
    with connect_bus(router.port, "other"):  # the cap is per VM
        pass
    for session in (first, second):
        assert session.publish(1)["status"] == "ok"
    wait_for(lambda: "vm=capped" in router.log_text() and "reason=too many sessions for this vm" in router.log_text(),
             what="the refusal's log line")
    first.close()  # its slot comes back once the router sees the connection end

    def reopened():
        guest = Guest(router.port)
        if guest.hello("capped").startswith("ok session="):
            return guest
        guest.close()
        return None

    with wait_for(reopened, what="a session in the freed place") as third:
        assert third.publish(2)["status"] == "ok"
    second.close()


def test_a_stale_session_holds_its_place_until_its_heartbeat_timeout(hb_router):
    """A guest reset without a FIN leaves a session that counts against the cap until
    the heartbeat timeout reaps it (the cap must leave room for those)."""
    router = hb_router  # --max-sessions-per-vm 1 --heartbeat-timeout 1
    offset = log_offset(router)
    with connect_bus(router.port, "rebooted") as stale:  # never heartbeats, never closes
        with Guest(router.port) as early:
            assert early.hello("rebooted") == "error: too many sessions for this vm"
        assert stale.is_closed(timeout=4)
        with connect_bus(router.port, "rebooted") as fresh:
            assert fresh.publish(1)["status"] == "ok"
    assert logged_line(router, offset, "vm=rebooted", "reason=heartbeat_timeout")


def test_status_shows_one_row_for_all_sessions_of_a_vm(router):
    def status_row():
        return next((vm for vm in collect_status(router.state_root).vms if vm.name == "rows"), None)

    known = {vm.name for vm in collect_status(router.state_root).vms}  # other tests' VMs
    with connect_bus(router.port, "rows") as agent, connect_bus(router.port, "rows") as second:
        agent.subscribe("vm:rows")
        second.subscribe("news")
        second.subscribe("vm:rows")
        row = wait_for(lambda: (vm := status_row()) and vm.sessions == 2 and len(vm.subscribed_topics) == 2 and vm,
                       what="rows' two sessions in status")
        assert [vm.name for vm in collect_status(router.state_root).vms if vm.name not in known] == ["rows"]
        assert row.bus_subscribed and row.subscribed_topics == ["news", "vm:rows"]  # the union
        assert row.session == agent.session  # the oldest open one
        table = render_table(collect_status(router.state_root)).splitlines()
        [header, cells] = [re.split(r"\s{2,}", line) for line in table if line.startswith(("VM ", "rows "))]
        assert dict(zip(header, cells))["SESSIONS"] == "2", table
        agent.close()
        row = wait_for(lambda: (vm := status_row()) and vm.sessions == 1 and vm, what="one session left")
        assert row.session == second.session and row.subscribed_topics == ["news", "vm:rows"]
        assert row.bus_subscribed and row.last_reason == "disconnect"
    row = wait_for(lambda: (vm := status_row()) and not vm.bus_subscribed and vm, what="rows closed")
    assert (row.sessions, row.session, row.subscribed_topics) == (0, None, [])


def test_heartbeat_timeout_closes_session_and_clears_subscriptions(hb_router):
    router = hb_router
    known = {vm.name for vm in collect_status(router.state_root).vms}  # other tests' VMs
    offset = log_offset(router)
    with connect_bus(router.port, "quiet") as quiet:
        quiet.subscribe("t")
        assert quiet.is_closed(timeout=4)
    wait_for(lambda: logged_line(router, offset, "vm=quiet", "reason=heartbeat_timeout"), what="timeout log line")

    def new_vms():
        return [vm for vm in collect_status(router.state_root).vms if vm.name not in known]
    # The bridge logs the close, then its event reaches the status process: a moment later.
    wait_for(lambda: [vm.bus_subscribed for vm in new_vms()] == [False], what="status: the session closed")
    [vm] = new_vms()
    assert vm.name == "quiet" and not vm.bus_subscribed and vm.subscribed_topics == []
    assert vm.last_reason == "heartbeat_timeout"


def test_heartbeats_keep_a_quiet_session_open(hb_router):
    with connect_bus(hb_router.port, "chatty") as guest:
        for _ in range(6):
            assert guest.request({"type": "heartbeat"})["status"] == "ok"
            assert not guest.is_closed(timeout=0.4)


def test_state_root_is_private(router):
    for path in (router.state_root, router.state_root / "run", router.logs):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for sock in (router.state_root / "run").glob("*.sock"):
        assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0
    with connect_bus(router.port, "private") as guest:
        guest.publish(1)
    assert stat.S_IMODE(os.stat(router.logs / "bus.log").st_mode) == 0o600


def test_second_router_on_same_state_root_is_refused(router):
    result = subprocess.run(
        [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(router.state_root), "--port", "0"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert "another router" in result.stderr and "owns" in result.stderr


def test_taken_port_is_refused(router):
    other = router.state_root.parent / "other"  # removed with the fixture's directory
    result = subprocess.run(
        [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(other), "--port", str(router.port)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert "already in use" in result.stderr


def test_clean_shutdown_removes_sockets_and_stops_roles(router_factory):
    router = router_factory()  # its own: it is stopped
    pids = [router.role_pid(role) for role in ("proxy", "journal", "status", "bridge")]
    assert router.stop() == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not list((router.state_root / "run").glob("*.sock"))


def test_seq_continues_after_restart(router_factory):
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        guest.publish(1)
        guest.publish(2)
    router.stop()
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        assert guest.publish(3)["seq"] == 3
    assert [line["seq"] for line in router.read_log()] == [1, 2, 3]


def test_bash_dev_tcp_guest_handshakes_publishes_and_heartbeats(router):
    script = os.path.join(os.path.dirname(__file__), "bash_guest.sh")
    result = subprocess.run(["bash", script, str(router.port), "bashvm"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "handshake: ok session=" in result.stdout
    assert '"status":"ok"' in result.stdout.split("publish: ")[1]
    router.wait_filed()
    [line] = router.read_log("bashvm.log")
    assert line["payload"] == {"from": "bash"} and line["topic"] == "vm:bashvm"


def test_a_descriptor_numbered_past_1023_is_waited_on():
    """select refuses such descriptors (a test worker that had leaked files got them
    in ``exits_within``); the supervisor's waits use poll."""
    from castra_zmq.supervisor import readable_within

    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = limits
    if soft <= 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    read_end, write_end = os.pipe()
    high = os.dup2(read_end, 1500)
    try:
        assert readable_within(high, 0.01) is False
        os.write(write_end, b"x")
        assert readable_within(high, 5.0) is True
    finally:
        for fd in (read_end, write_end, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)  # the worker's own, for the tests after it
