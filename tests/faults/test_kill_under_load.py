"""kill -9 under load: 8 guests publish continuously while processes die.

Afterwards every publish that was acked ok is in ``bus.log`` exactly once, with
the seq its ack gave, lines in seq order, and no line of any log torn.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ..conftest import Router, process_runs, restarted, wait_for
from ..guest import connect_bus

GUESTS = 8
TIME_LIMIT = 60.0  # the whole load run stops by itself at the latest then


class PublishingGuest(threading.Thread):
    """Publishes numbered messages, reconnecting when the session breaks."""

    def __init__(self, router: Router, number: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.router, self.vm, self.stop = router, f"load{number}", stop
        self.acked: dict[str, int] = {}  # message id -> seq of its ok ack
        self.errors: list[str] = []
        self.sent = 0

    def run(self) -> None:
        deadline = time.monotonic() + TIME_LIMIT
        guest = None
        while not self.stop.is_set() and time.monotonic() < deadline and self.sent < 100_000:
            try:
                if guest is None:
                    guest = connect_bus(self.router.port, self.vm)
                message_id = f"{self.vm}-{self.sent}"
                self.sent += 1
                ack = guest.publish({"id": message_id}, id=message_id)
                if ack["status"] == "ok":
                    self.acked[message_id] = ack["seq"]
                else:
                    self.errors.append(ack["reason"])
            except (OSError, AssertionError, ValueError):
                if guest is not None:
                    guest.close()
                guest = None
                time.sleep(0.05)  # the bridge is being restarted
        if guest is not None:
            guest.close()


def run_load(router: Router, during) -> list[PublishingGuest]:
    stop = threading.Event()
    guests = [PublishingGuest(router, n, stop) for n in range(GUESTS)]
    for guest in guests:
        guest.start()
    try:
        wait_for(lambda: all(g.acked for g in guests), timeout=10, what="every guest publishing")
        during()
        progress = sum(len(g.acked) for g in guests)
        wait_for(lambda: sum(len(g.acked) for g in guests) > progress + 100, timeout=15,
                 what="publishing to carry on")
    finally:
        stop.set()
        for guest in guests:
            guest.join(TIME_LIMIT)
    return guests


def check_logs(router: Router, guests: list[PublishingGuest]) -> None:
    # The journal may still be filing (a rebuild after the kill copies many lines
    # at once): a reader racing a write in progress would see half of it.
    router.wait_filed(timeout=15)
    for path in router.logs.iterdir():
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"torn last line in {path.name}"
        for line in data.splitlines():
            json.loads(line)  # raises on a torn or interleaved line
    lines = router.read_log()
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    logged: dict[str, list[int]] = {}
    for line in lines:
        logged.setdefault(line["payload"]["id"], []).append(line["seq"])
    acked = {mid: seq for guest in guests for mid, seq in guest.acked.items()}
    assert acked, "no publish was acked"
    for message_id, seq in acked.items():
        assert logged.get(message_id) == [seq], f"{message_id}: acked seq {seq}, logged {logged.get(message_id)}"


@pytest.mark.parametrize("role", ["bridge", "proxy", "journal", "status"])
def test_kill_9_of_a_role_under_load_loses_no_acked_message(router, role):
    def kill_and_wait() -> None:
        pid = router.role_pid(role)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: restarted(router, role, pid), timeout=15, what=f"{role} restart")

    guests = run_load(router, kill_and_wait)
    check_logs(router, guests)
    for guest in guests:
        assert set(guest.errors) <= {"journal_unavailable", "commit_timeout"}, guest.errors


def test_kill_9_of_the_whole_router_then_up_again(router_factory, state_root):
    router = router_factory()
    before = []

    def kill_router() -> None:
        before.extend(router.role_pid(role) for role in ("proxy", "journal", "status", "bridge"))
        router.process.kill()  # the supervisor: its roles get SIGTERM from the kernel
        router.process.wait()

    stop = threading.Event()
    guests = [PublishingGuest(router, n, stop) for n in range(GUESTS)]
    for guest in guests:
        guest.start()
    wait_for(lambda: all(g.acked for g in guests), timeout=10, what="every guest publishing")
    kill_router()
    stop.set()
    for guest in guests:
        guest.join(TIME_LIMIT)
    last_seq = max(seq for guest in guests for seq in guest.acked.values())
    # Same state root, same port: the stale lock, sockets, router.json and the
    # orphaned roles still exiting must not stop it.
    again = subprocess.Popen(
        [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(state_root), "--port", str(router.port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert b"castra router ready" in again.stdout.readline()
        with connect_bus(router.port, "after") as guest:
            assert guest.publish({"id": "after"})["seq"] > last_seq
        for pid in before:
            assert not process_runs(pid), f"role {pid} of the killed router is still running"
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(15)
    check_logs(router, guests)
