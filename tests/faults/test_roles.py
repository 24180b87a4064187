"""Faults on real processes: a role killed, the log directory unwritable."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import msgspec
import pytest
import zmq

from castra_zmq import client, topics
from castra_zmq.errors import PublishFailed
from castra_zmq.statusview import collect_status

from ..conftest import restarted, wait_for
from ..guest import Guest, connect_bus


def kill_role(router, role: str) -> int:
    pid = router.role_pid(role)
    os.kill(pid, signal.SIGKILL)
    return pid


def vm_log_matches_bus_log(router, vm: str) -> bool:
    """Whether ``<vm>.log`` has exactly the lines of ``bus.log`` that ``vm`` sent."""
    return router.read_log(f"{vm}.log") == [line for line in router.read_log() if line["vm"] == vm]


def test_killed_journal_holds_back_no_publish_and_its_successor_completes_the_vm_logs(router):
    """The journal only files the per-VM logs: while it is down, publishes are
    acked and delivered as ever, and the restarted one copies what it missed from
    bus.log."""
    with connect_bus(router.port, "alpha") as guest, connect_bus(router.port, "watcher") as watcher:
        watcher.subscribe("broadcast")
        assert guest.publish(1)["status"] == "ok"
        old = kill_role(router, "journal")
        assert guest.publish(2)["status"] == "ok"
        assert watcher.recv_until(lambda frame: frame.get("payload") == 2)["from"] == "vm:alpha"
        wait_for(lambda: restarted(router, "journal", old), timeout=10, what="journal restart")
        assert guest.publish(3)["status"] == "ok"
    seqs = [line["seq"] for line in router.read_log()]
    assert seqs == [1, 2, 3]
    wait_for(lambda: vm_log_matches_bus_log(router, "alpha"), what="alpha.log completed")
    assert "journal died" in router.log_text()


def test_every_ok_ack_is_in_the_log_when_journal_is_killed_mid_stream(router):
    acked = []
    with connect_bus(router.port, "alpha") as guest:
        for n in range(300):
            if n == 100:
                old = kill_role(router, "journal")
            ack = guest.publish({"n": n}, id=n)
            if ack["status"] == "ok":
                acked.append((n, ack["seq"]))
            else:
                assert ack["reason"] in ("journal_unavailable", "commit_timeout")
        wait_for(lambda: restarted(router, "journal", old), timeout=10, what="journal restart")
    logged = {line["payload"]["n"]: line["seq"] for line in router.read_log()}
    for n, seq in acked:
        assert logged.get(n) == seq
    seqs = [line["seq"] for line in router.read_log()]
    assert seqs == sorted(set(seqs))
    wait_for(lambda: vm_log_matches_bus_log(router, "alpha"), what="alpha.log completed")


def test_host_subscriber_gets_the_first_commit_of_a_restarted_bridge(router):
    """A restarted bridge reads the bus's subscriptions before it commits: a host
    tool subscribed all along misses nothing, not even the first commit after."""
    with zmq.Context() as context, context.socket(zmq.SUB) as subscriber:
        subscriber.linger = 0
        subscriber.subscribe(topics.bus("watched"))
        subscriber.connect(f"ipc://{router.state_root}/run/bus-out.sock")

        def subscribed() -> bool:
            client.publish("watched", "before", state_root=router.state_root)
            return subscriber.poll(100) != 0
        wait_for(subscribed, timeout=10, what="the subscription reaching the bridge")
        old = kill_role(router, "bridge")
        wait_for(lambda: restarted(router, "bridge", old), timeout=10, what="bridge restart")
        seq = client.publish("watched", "first", state_root=router.state_root)
        while subscriber.poll(5000):  # past those of before the restart
            delivery = msgspec.json.decode(subscriber.recv_multipart()[2])
            if delivery["seq"] == seq:
                assert delivery["payload"] == "first"
                break
        else:
            raise AssertionError("the first commit after the restart did not reach the subscriber")


def test_killed_bridge_is_restarted_and_guests_reconnect(router):
    with connect_bus(router.port, "alpha") as guest:
        guest.publish(1)
        old = kill_role(router, "bridge")
        assert guest.is_closed(timeout=5)
    wait_for(lambda: restarted(router, "bridge", old), timeout=10, what="bridge restart")
    with connect_bus(router.port, "alpha") as guest:
        assert guest.publish(2)["seq"] == 2


@pytest.fixture
def small_log_disk(state_root):
    """A 256 KiB tmpfs mounted where the bus logs go (needs root, as in CI)."""
    logs = state_root / "logs" / "bus"
    logs.mkdir(parents=True, mode=0o700)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(logs)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield logs
    subprocess.run(["umount", "-l", str(logs)], check=False)


def fill(directory, name="filler"):
    """Write zeros until the file system is full; returns the filler path."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def test_full_log_disk_gives_error_acks_and_recovers(router_factory, small_log_disk):
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        assert guest.publish(1)["status"] == "ok"
        router.wait_filed()  # then the disk is full for bus.log, not for the journal's first line
        filler = fill(small_log_disk)
        big = "x" * 8000  # larger than any slack left in a partly filled page
        ack = guest.publish(big)
        assert ack["status"] == "error" and ack["reason"].startswith("log_write_failed"), ack
        with pytest.raises(PublishFailed, match="log_write_failed"):
            client.publish("broadcast", big, state_root=router.state_root)
        wait_for(lambda: collect_status(router.state_root).journal.state == "error", timeout=5,
                 what="status showing the journal error")
        assert "log_write_failed" in collect_status(router.state_root).journal.reason
        assert guest.request({"type": "heartbeat"})["status"] == "ok"  # the session survived
        filler.unlink()
        ack = guest.publish(4)
        assert ack["status"] == "ok" and ack["seq"] == 2
    # Nothing half-written: every line of every log parses, and only 1 and 4 are there.
    assert [line["payload"] for line in router.read_log()] == [1, 4]
    wait_for(lambda: [line["payload"] for line in router.read_log("alpha.log")] == [1, 4], what="alpha.log")
    wait_for(lambda: collect_status(router.state_root).journal.state == "ok", timeout=5, what="journal ok")


def test_restart_after_crash_mid_commit_repairs_the_logs(router_factory):
    """A crash after bus.log was written but before the per-VM logs (and with a torn
    line at the end) leaves logs that the next start completes and trims."""
    router = router_factory()
    with Guest(router.port) as beta:  # a VM that connected gets a log
        assert beta.hello("beta", capabilities=None) == "ok"
    with connect_bus(router.port, "alpha") as guest:
        guest.publish(1, topic="vm:beta")
    router.stop()
    # What a kill -9 between the two writes of seq 2 leaves behind, plus a torn line.
    crashed = b'{"timestamp":1.0,"ts_ms":1000,"seq":2,"vm":"alpha","topic":"vm:beta","payload":2}\n'
    with open(router.logs / "bus.log", "ab") as bus_log:
        bus_log.write(crashed + b'{"timestamp":1.0,"ts_ms":1000,"seq":3,"vm":"al')
    with open(router.logs / "beta.log", "ab") as beta_log:
        beta_log.write(b'{"timestamp":1.0,"ts_')
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        assert guest.publish(3)["seq"] == 3
    assert [line["seq"] for line in router.read_log("bus.log")] == [1, 2, 3]
    wait_for(lambda: [line["seq"] for line in router.read_log("alpha.log")] == [1, 2, 3], what="alpha.log")
    assert [line["seq"] for line in router.read_log("beta.log")] == [1, 2]


def test_subscriber_that_stops_reading_is_dropped_as_slow_consumer(router_factory):
    router = router_factory("--subscriber-queue", "65536")
    stalled = Guest(router.port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert stalled.hello("stalled").startswith("ok session=")
    assert stalled.subscribe("flood")["status"] == "ok"
    big = "x" * 1000
    with connect_bus(router.port, "flooder") as flooder:
        deadline = time.monotonic() + 30
        sent = 0
        # Bounded: stop as soon as the broker has dropped the stalled subscriber.
        while "reason=slow_consumer" not in router.log_text():
            assert sent < 50_000 and time.monotonic() < deadline, "slow subscriber was never dropped"
            for _ in range(50):
                flooder.send({"type": "publish", "topic": "flood", "payload": big})
            for _ in range(50):
                assert flooder.recv()["status"] == "ok"  # the publisher is never held back
            sent += 50
        assert flooder.publish(1)["status"] == "ok"
    assert stalled.is_closed(timeout=5)
    stalled.close()

    def stalled_rows():
        return [vm for vm in collect_status(router.state_root).vms if vm.name == "stalled"]
    # The row is there since its handshake; the close reaches the status process a moment after.
    wait_for(lambda: [vm.last_reason for vm in stalled_rows()] == ["slow_consumer"], what="status row closed")
    [vm] = stalled_rows()
    assert not vm.bus_subscribed and vm.last_reason == "slow_consumer"


def test_per_vm_logs_lost_by_an_os_crash_are_rebuilt_from_bus_log(router_factory):
    """Only bus.log is fsynced per commit; the per-VM logs are synced about once a
    second. What an OS crash took from them after the checkpoint comes back."""
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        for n in range(5):
            guest.publish(n)
    router.stop()
    checkpoint = router.state_root / "state" / "journal.json"
    assert json.loads(checkpoint.read_text()) == {"vm_logs_synced_seq": 5}
    # As after an OS crash: the last 3 lines never reached the disk.
    alpha = router.logs / "alpha.log"
    alpha.write_bytes(b"".join(alpha.read_bytes().splitlines(keepends=True)[:2]))
    checkpoint.write_text('{"vm_logs_synced_seq":2}')
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        assert guest.publish(5)["seq"] == 6
    wait_for(lambda: [line["payload"] for line in router.read_log("alpha.log")] == [0, 1, 2, 3, 4, 5],
             what="alpha.log rebuilt")


def test_rotation_by_rename_starts_new_logs_and_seq_goes_on(router_factory):
    """logrotate without copytruncate: bridge and journal notice within a health tick,
    and a restart that finds the new, maybe empty bus.log still goes on from seq."""
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        assert [guest.publish(n)["seq"] for n in range(3)] == [1, 2, 3]
        router.wait_filed()
        for name in ("bus.log", "alpha.log"):
            (router.logs / name).rename(router.logs / f"{name}.1")
        sent = iter(range(3, 1000))
        wait_for(lambda: guest.publish(next(sent))["status"] == "ok" and (router.logs / "bus.log").exists(),
                 timeout=5, what="a new bus.log")
        last = guest.publish("last")["seq"]
    both = router.read_log("bus.log.1") + router.read_log("bus.log")
    assert [line["seq"] for line in both] == list(range(1, last + 1))
    wait_for(lambda: router.read_log("alpha.log.1") + router.read_log("alpha.log") == both, what="alpha.log")
    router.stop()
    (router.logs / "bus.log").rename(router.logs / "bus.log.2")  # rotated while stopped
    router = router_factory()
    with connect_bus(router.port, "alpha") as guest:
        assert guest.publish("after restart")["seq"] == last + 1
