"""Per-VM logs only for VMs that exist (issue 10): any guest may address any
``vm:<target>``, but only a VM that connected (a bus session or a handshake-only
hello), is listed in the identities file or already has a log gets a log file,
and no more than ``--max-vm-logs`` of them.
"""

from __future__ import annotations

import json
import os

from castra_zmq import client

from ..conftest import wait_for
from ..guest import Guest, connect_bus


def log_files(router) -> set[str]:
    return set(os.listdir(router.logs))


def say_hello(port: int, vm: str) -> None:
    """A handshake-only guest: it says hello and is gone."""
    with Guest(port) as guest:
        assert guest.hello(vm, capabilities=None) == "ok"


def test_messages_to_vms_that_never_connected_make_no_log_files(router):
    targets = [f"ghost{n}" for n in range(300)]
    with connect_bus(router.port, "mailer") as mailer, connect_bus(router.port, "member") as member:
        assert member.subscribe("vm:member")["status"] == "ok"
        for target in targets:  # pipelined: every ack is read below
            mailer.send({"type": "publish", "topic": f"vm:{target}", "payload": target})
        assert all(mailer.recv()["status"] == "ok" for _ in targets)
        router.wait_filed()
        assert log_files(router) == {"bus.log", "mailer.log"}  # a log is made by its first line
        say_hello(router.port, "late")
        for target in ("member", "late", "ghost0"):
            assert mailer.publish(target, topic=f"vm:{target}")["status"] == "ok"
        assert member.recv()["payload"] == "member"  # delivery does not depend on logs
    router.wait_filed()
    assert log_files(router) == {"bus.log", "mailer.log", "member.log", "late.log"}
    assert [line["payload"] for line in router.read_log("late.log")] == ["late"]
    assert [line["payload"] for line in router.read_log("member.log")] == ["member"]
    mailed = [line["payload"] for line in router.read_log("mailer.log")]
    assert mailed == [line["payload"] for line in router.read_log()] == [*targets, "member", "late", "ghost0"]


def test_listed_and_already_logged_vms_get_their_log_before_they_connect(router_factory, state_root, tmp_path):
    identities = tmp_path / "identities"
    identities.write_text("listed\nmailer\n")
    logs = state_root / "logs" / "bus"
    logs.mkdir(parents=True, mode=0o700)
    old_line = {"timestamp": 1.0, "ts_ms": 1000, "seq": 0, "vm": "host", "topic": "vm:old", "payload": 0}
    (logs / "old.log").write_text(json.dumps(old_line) + "\n")
    os.chmod(logs / "old.log", 0o600)
    router = router_factory("--identities", str(identities))
    for target in ("listed", "old", "stranger"):
        client.publish(f"vm:{target}", target, state_root=router.state_root)
    router.wait_filed()
    assert log_files(router) == {"bus.log", "host.log", "listed.log", "old.log"}
    assert [line["payload"] for line in router.read_log("listed.log")] == ["listed"]
    assert [line["payload"] for line in router.read_log("old.log")] == [0, "old"]


def test_per_vm_logs_stop_at_their_cap_and_resume_when_one_is_removed(router_factory):
    router = router_factory("--max-vm-logs", "3")
    vms = [f"vm{n}" for n in range(5)]
    for vm in vms:
        with connect_bus(router.port, vm) as guest:
            assert guest.publish(vm)["status"] == "ok"
    router.wait_filed()
    assert log_files(router) == {"bus.log", "vm0.log", "vm1.log", "vm2.log"}
    assert [line["vm"] for line in router.read_log()] == vms  # every message is in bus.log
    assert router.log_text().count("per-VM logs at their cap") == 1
    (router.logs / "vm0.log").unlink()  # as an operator pruning logs would

    def vm4_gets_a_log() -> bool:
        with connect_bus(router.port, "vm4") as guest:
            assert guest.publish("again")["status"] == "ok"
        router.wait_filed()
        return "vm4.log" in log_files(router)

    wait_for(vm4_gets_a_log, timeout=5, interval=0.2, what="a log for vm4 once vm0.log is gone")
    assert log_files(router) == {"bus.log", "vm1.log", "vm2.log", "vm4.log"}
