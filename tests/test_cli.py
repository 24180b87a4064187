"""The operator commands as an operator runs them: real subprocesses, real routers.

``castra bus publish``, ``castra status`` and ``castra bus tail`` each run as
``python -m castra_zmq.cli.main ...`` does, forked from a zygote that imported castra-zmq
once (``tests/zygote.py``); on a terminal, into a closed pipe and on impossible state
roots as fresh interpreters. The example host tool runs as a script. The pure parts
of ``castra_zmq.tail`` (formatting, torn lines, truncation) are tested first, on
plain files, without processes. Tests that need no router of their own share the
module's, each with its own VMs and reading only the seqs and log lines after the
log's end at its start.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from castra_zmq import client, logfiles, tail
from castra_zmq.cli.tail import format_record
from castra_zmq.endpoints import Endpoints
from castra_zmq.events import now_ms
from castra_zmq.statustable import StatusTable, VmRecord, write_snapshot
from castra_zmq.statusview import collect_status
from castra_zmq.wire import decode_log_record

from .conftest import Lines, Router, shared_router, wait_for
from .guest import Guest, connect_bus
from .zygote import castra_command, run_castra

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VM_KEYS = {
    "name", "reachable", "last_handshake_age_ms", "capabilities", "bus_protocol", "bus_subscribed",
    "subscribed_topics", "last_publish_age_ms", "last_heartbeat_age_ms", "session", "sessions",
}
AGE_KEYS = ("last_handshake_age_ms", "last_publish_age_ms", "last_heartbeat_age_ms")
ROLES = {"proxy", "journal", "status", "bridge"}


def record_line(seq: int, topic: str = "broadcast", payload=None, vm: str = "alpha") -> bytes:
    """A bus log line as PROTOCOL.md section 4 describes it."""
    ts_ms = 1_700_000_000_000 + seq
    record = {"timestamp": ts_ms / 1000, "ts_ms": ts_ms, "seq": seq, "vm": vm, "topic": topic, "payload": payload}
    return json.dumps(record, separators=(",", ":")).encode()


def write_log(state_root: Path, *lines: bytes, tail_bytes: bytes = b"") -> Path:
    """A shared log holding ``lines`` and then ``tail_bytes`` (no newline: a torn line)."""
    path = Endpoints(state_root).bus_log
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines) + tail_bytes)
    return path


def castra(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return run_castra(list(args), input=input)


# A shell starts `cmd &` with SIGINT ignored, and exec keeps it so: like this prefix
# of a Python command line (a preexec_fn is unsafe while the test runs threads).
_IGNORE_SIGINT_THEN_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
SIGINT_IGNORED = [sys.executable, "-c", _IGNORE_SIGINT_THEN_EXEC]


class Follow:
    """``castra bus tail -f`` running in the background."""

    def __init__(self, state_root: Path, *args: str, ignore_sigint: bool = False):
        self.process = castra_command(["bus", "tail", "-f", "--state-root", str(state_root), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, sigint_ignored=ignore_sigint)
        self.stdout = Lines(self.process.stdout)
        self.stderr = Lines(self.process.stderr)

    def next_record(self, timeout: float = 5.0) -> dict:
        return json.loads(self.stdout.next(timeout)[1])

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        return self.process.wait(10)


# -- pure: castra_zmq.tail on plain files -----------------------------------------------


def test_format_record_is_iso_local_time_vm_topic_and_compact_payload():
    record = decode_log_record(b'{"timestamp":1700000000.042,"ts_ms":1700000000042,"seq":7,'
                               b'"vm":"alpha","topic":"vm:beta","payload":{"a": [1, 2], "s": "x y"}}')
    local = time.localtime(1_700_000_000)
    offset = time.strftime("%z", local)
    clock = time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".042{offset[:3]}:{offset[3:]}"
    assert format_record(record).split() == [clock, "alpha", "vm:beta", '{"a":[1,2],"s":"x', 'y"}']
    assert format_record(record, utc=True).split()[0] == "2023-11-14T22:13:20.042+00:00"


def test_format_record_escapes_control_characters_and_colours_only_when_asked():
    # A topic may hold any character but NUL; U+009B is a one-character CSI on some terminals.
    record = decode_log_record(b'{"timestamp":1,"ts_ms":1000,"seq":1,"vm":"a",'
                               b'"topic":"x\\u001b[2Jy","payload":"\xc2\x9b"}')
    plain = format_record(record)
    assert "\x1b" not in plain and "\x9b" not in plain
    assert "x\\x1b[2Jy" in plain and '"\\x9b"' in plain
    coloured = format_record(record, color=True)
    assert coloured.count("\x1b[") > plain.count("\x1b[") and "\x1b[2J" not in coloured


def test_parse_entries_keeps_chosen_topics_and_notes_undecodable_lines():
    notes = []
    lines = [record_line(1, "a"), b"not json", record_line(2, "b"), b'{"seq":3}', record_line(3, "c")]
    entries = list(tail.parse_entries(lines, {"a", "c"}, notes.append))
    assert [entry.record.seq for entry in entries] == [1, 3]
    assert entries[0].line == lines[0]
    assert len(notes) == 2 and all("not a bus log record" in note for note in notes)
    assert [e.record.seq for e in tail.parse_entries(lines, (), notes.append)] == [1, 2, 3]


def test_lines_before_reads_back_across_chunk_boundaries(tmp_path):
    # Lines longer than the 64 KiB backward chunk, and lines split by its boundaries.
    lines = [b"a" * 70_000, b"", b"b", b"c" * 65_535, b"d" * 200_000, b"e"]
    path = tmp_path / "log"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(logfiles.lines_before(fd, path.stat().st_size)) == lines[::-1]
        assert logfiles.complete_end(fd, path.stat().st_size) == path.stat().st_size
    finally:
        os.close(fd)


def test_follower_holds_a_torn_line_until_its_newline_lands(tmp_path):
    path = write_log(tmp_path, record_line(1), record_line(2), tail_bytes=record_line(3)[:20])
    follower = tail.LogFollower(path, notify=pytest.fail)
    try:
        assert list(follower.existing_lines()) == [record_line(2), record_line(1)]
        assert list(follower.new_lines()) == []
        with open(path, "ab") as log:
            log.write(record_line(3)[20:])
            assert list(follower.new_lines()) == []  # still no newline
            log.write(b"\n" + record_line(4)[:5])
        assert list(follower.new_lines()) == [record_line(3)]
    finally:
        follower.close()


def test_follower_reads_a_truncated_or_replaced_log_from_its_start(tmp_path):
    path = write_log(tmp_path, record_line(1), record_line(2))
    notes = []
    follower = tail.LogFollower(path, notes.append)
    try:
        os.truncate(path, 0)
        assert list(follower.new_lines()) == [] and "truncated" in notes[-1]
        path.write_bytes(record_line(3) + b"\n")
        assert list(follower.new_lines()) == [record_line(3)]
        # Rotation: lines added to the old file before the swap are still read.
        with open(path, "ab") as old:
            old.write(record_line(4) + b"\n")
        path.rename(tmp_path / "bus.log.1")
        write_log(tmp_path, record_line(5))
        assert list(follower.new_lines()) == [record_line(4), record_line(5)]
        assert "replaced" in notes[-1]
        path.unlink()
        assert list(follower.new_lines()) == [] and follower.fd is None and "removed" in notes[-1]
        write_log(tmp_path, record_line(6))
        assert list(follower.new_lines()) == [record_line(6)] and "appeared" in notes[-1]
    finally:
        follower.close()


def test_follower_reads_a_renamed_log_until_the_writer_moves_to_the_new_one(tmp_path):
    """Issue 12, defect 5: the journal appends to a renamed log until its next health
    tick; lines it writes there after the rename are read, in order, before the new
    log's."""
    path = write_log(tmp_path, record_line(1))
    follower = tail.LogFollower(path, notify=lambda note: None)
    old = open(path, "ab")  # noqa: SIM115 - the writer's descriptor, as the journal holds it
    try:
        assert list(follower.new_lines()) == []
        path.rename(tmp_path / "bus.log.1")
        old.write(record_line(2) + b"\n")
        old.flush()
        assert list(follower.new_lines()) == [record_line(2)]
        path.touch()  # logrotate's `create`: a new, empty log before the writer moves
        old.write(record_line(3) + b"\n")
        old.flush()
        assert list(follower.new_lines()) == [record_line(3)]
        old.write(record_line(4) + b"\n")  # its last line there, then the writer moves on
        old.flush()
        write_log(tmp_path, record_line(5))
        assert list(follower.new_lines()) == [record_line(4), record_line(5)]
        assert len(follower.files) == 1 and follower.fd is not None  # the old file is let go
        with open(path, "ab") as new:
            new.write(record_line(6) + b"\n")
        assert list(follower.new_lines()) == [record_line(6)]
    finally:
        old.close()
        follower.close()


def test_tail_entries_gives_the_last_n_matching_oldest_first(tmp_path):
    path = write_log(tmp_path, *(record_line(seq, "odd" if seq % 2 else "even") for seq in range(1, 30)))
    picked = tail.tail_entries(path, count=3, topics={"even"}, notify=pytest.fail)
    assert [entry.record.seq for entry in picked] == [24, 26, 28]
    assert list(tail.tail_entries(tmp_path / "none.log", count=3, notify=pytest.fail)) == []


# -- one router for the module -----------------------------------------------------------


@pytest.fixture(scope="module")
def router():
    """One router for the tests that need none of their own (those that do use
    ``router_factory``). Each uses its own VM names, and reads the seqs and log lines
    after the log's end at its start (``log_end``, ``log_after``): what earlier
    tests left is no concern of it."""
    yield from shared_router()


def log_end(router: Router) -> int:
    """The seq of the last line of ``bus.log`` (0 while it has none)."""
    lines = router.read_log()
    return lines[-1]["seq"] if lines else 0


def log_after(router: Router, seq: int) -> list[dict]:
    """The lines of ``bus.log`` after ``seq``."""
    return [line for line in router.read_log() if line["seq"] > seq]


# -- castra bus publish -----------------------------------------------------------------


def test_publish_prints_seq_and_the_line_is_in_the_bus_log(router):
    root = str(router.state_root)
    start = log_end(router)
    result = castra("bus", "publish", "--state-root", root, "--topic", "vm:alpha", "--payload", '{"cmd":"reload"}')
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"seq={start + 1} topic=vm:alpha log={router.logs / 'bus.log'}\n"
    result = castra("bus", "publish", "--state-root", root, "--payload", "[1, 2]", "--json")
    assert json.loads(result.stdout) == {"seq": start + 2, "topic": "broadcast", "log": str(router.logs / "bus.log")}
    first, second = log_after(router, start)
    assert (first["seq"], first["vm"], first["topic"], first["payload"]) == \
        (start + 1, "host", "vm:alpha", {"cmd": "reload"})
    assert (second["seq"], second["payload"]) == (start + 2, [1, 2])


def test_publish_reads_the_payload_from_stdin(router):
    start = log_end(router)
    result = castra("bus", "publish", "--state-root", str(router.state_root), "--topic", "builds",
                    "--payload", "-", input='{"build": 42,\n "ok": true}\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"seq={start + 1} ")
    [line] = log_after(router, start)
    assert line["topic"] == "builds" and line["payload"] == {"build": 42, "ok": True}


@pytest.mark.parametrize(("payload", "stdin", "message"), [
    ("{oops", None, "payload is not valid JSON"),
    ("-", "not json", "payload is not valid JSON"),
    ("-", "", "no payload on stdin"),
])
def test_publish_refuses_a_payload_that_is_not_json(router, payload, stdin, message):
    start = log_end(router)
    result = castra("bus", "publish", "--state-root", str(router.state_root), "--payload", payload, input=stdin)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert log_after(router, start) == []


def test_publish_without_a_router_says_how_to_start_one(state_root):
    result = castra("bus", "publish", "--state-root", str(state_root), "--payload", "1")
    assert result.returncode == 1
    assert "no router is running" in result.stderr
    assert f"`castra up --state-root {state_root}`" in result.stderr


def test_publish_not_committed_in_time_exits_1(router):
    bridge = router.role_pid("bridge")  # the writer of bus.log
    os.kill(bridge, signal.SIGSTOP)
    try:
        result = castra("bus", "publish", "--state-root", str(router.state_root), "--payload", "1",
                        "--timeout", "0.3")
    finally:
        os.kill(bridge, signal.SIGCONT)
    assert result.returncode == 1
    assert "no commit within 0.3s" in result.stderr


# -- castra status ------------------------------------------------------------------------


def status_json(state_root: Path) -> dict:
    result = castra("status", "--json", "--state-root", str(state_root))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check_vm_schema(vm: dict) -> None:
    assert VM_KEYS <= vm.keys()
    assert isinstance(vm["name"], str) and isinstance(vm["capabilities"], list)
    assert isinstance(vm["reachable"], bool) and isinstance(vm["bus_subscribed"], bool)
    assert isinstance(vm["subscribed_topics"], list)
    assert type(vm["sessions"]) is int and vm["sessions"] >= 0 and (vm["sessions"] > 0) is vm["bus_subscribed"]
    for key in AGE_KEYS:
        assert vm[key] is None or (type(vm[key]) is int and vm[key] >= 0), (key, vm[key])


def live_vm(router, name: str):
    """``name``'s entry in the live status, or None while the router has not seen it."""
    return next((vm for vm in collect_status(router.state_root).vms if vm.name == name), None)


def bus_subscribed(router, name: str) -> bool:
    vm = live_vm(router, name)
    return vm is not None and vm.bus_subscribed


def test_status_json_for_handshake_only_subscribed_and_disconnected_guests(router):
    before = {vm.name for vm in collect_status(router.state_root).vms}  # earlier tests' VMs
    assert before.isdisjoint({"legacy", "sub", "gone"})
    with Guest(router.port) as legacy:
        assert legacy.hello("legacy", capabilities=None) == "ok"
    with connect_bus(router.port, "sub") as subscribed:
        subscribed.subscribe("vm:sub")
        subscribed.subscribe("news")
        subscribed.publish({"n": 1})
        with connect_bus(router.port, "gone") as gone:
            gone.subscribe("news")
            wait_for(lambda: bus_subscribed(router, "gone"), what="gone's session")
        # Its session ends with the connection: no heartbeat timeout to wait for.
        wait_for(lambda: not bus_subscribed(router, "gone"), timeout=0.5, what="gone unsubscribed")
        wait_for(lambda: live_vm(router, "legacy") and live_vm(router, "sub").last_publish_age_ms is not None,
                 what="legacy's handshake and sub's publish")
        status = status_json(router.state_root)
    vms = {vm["name"]: vm for vm in status["vms"]}
    assert set(vms) - before == {"legacy", "sub", "gone"}
    for vm in vms.values():
        check_vm_schema(vm)
    legacy, sub, gone = vms["legacy"], vms["sub"], vms["gone"]
    assert legacy["reachable"] and legacy["bus_protocol"] is None and legacy["capabilities"] == []
    assert not legacy["bus_subscribed"] and legacy["session"] is None
    assert legacy["last_handshake_age_ms"] is not None and legacy["last_publish_age_ms"] is None
    assert sub["reachable"] and sub["bus_subscribed"] and sub["bus_protocol"] == "bus-v1"
    assert sorted(sub["subscribed_topics"]) == ["news", "vm:sub"]
    assert sub["session"] == subscribed.session and sub["capabilities"] == ["bus-v1"] and sub["sessions"] == 1
    assert sub["last_publish_age_ms"] is not None and sub["last_heartbeat_age_ms"] is not None
    assert gone["reachable"]  # its handshake is still fresh
    assert not gone["bus_subscribed"] and gone["subscribed_topics"] == [] and gone["session"] is None

    # The shape scripts rely on, keys in order (README "Operator commands").
    assert list(status) == ["vms", "router", "journal", "refused_handshakes"]
    assert list(sub) == ["name", "reachable", "last_handshake_age_ms", "capabilities", "bus_protocol",
                         "bus_subscribed", "subscribed_topics", "last_publish_age_ms", "last_heartbeat_age_ms",
                         "session", "last_reason", "sessions"]
    assert list(status["journal"]) == ["state", "reason", "seq"]
    info = status["router"]
    assert list(info) == ["running", "pid", "listen", "uptime_ms", "state_root", "source", "processes"]
    assert all(list(role) == ["state", "pid", "restarts", "last_exit"] for role in info["processes"].values())
    assert info["running"] is True and info["listen"] == f"127.0.0.1:{router.port}"
    assert type(info["uptime_ms"]) is int and info["uptime_ms"] >= 0
    assert set(info["processes"]) == ROLES
    assert all(role["state"] == "running" for role in info["processes"].values())


def test_status_without_router_exits_0_and_shows_a_stale_vm_from_the_snapshot(state_root):
    assert status_json(state_root)["vms"] == []
    endpoints = Endpoints(state_root)
    endpoints.prepare()
    old = VmRecord(name="old", capabilities=["bus-v1"], bus_protocol="bus-v1", session="s1", session_open=True,
                   topics=["t"], last_handshake_ms=now_ms() - 120_000)
    write_snapshot(endpoints, StatusTable(vms={"old": old}, bridge_seen_ms=now_ms()))

    status = status_json(state_root)
    [vm] = status["vms"]
    check_vm_schema(vm)
    assert not vm["reachable"] and vm["last_handshake_age_ms"] >= 120_000
    assert not vm["bus_subscribed"] and vm["session"] is None  # no router: no session can be open
    assert status["router"]["running"] is False and status["router"]["source"] == "snapshot"
    table = castra("status", "--state-root", str(state_root))
    assert table.returncode == 0
    assert "not running" in table.stdout and "stale" in table.stdout and "\x1b[" not in table.stdout


# -- castra bus tail ----------------------------------------------------------------------


def test_tail_shows_the_last_lines_filtered_by_topic(router):
    # A VM of its own: other tests of the module publish to vm:alpha.
    with Guest(router.port) as tailed:  # a VM that connected gets a log
        assert tailed.hello("tailed", capabilities=None) == "ok"
    seqs = [client.publish("vm:tailed" if n % 3 == 0 else "broadcast", {"n": n}, state_root=router.state_root)
            for n in range(12)]
    root = str(router.state_root)

    result = castra("bus", "tail", "--state-root", root)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 10
    assert lines[-1].split()[1:] == ["host", "broadcast", '{"n":11}']

    result = castra("bus", "tail", "--state-root", root, "--topic", "vm:tailed", "-n", "3", "--json")
    raw = [line for line in (router.logs / "bus.log").read_text().splitlines() if '"topic":"vm:tailed"' in line]
    assert result.stdout.splitlines() == raw[-3:]  # the log's own lines, unchanged
    assert [json.loads(line)["payload"]["n"] for line in raw[-3:]] == [3, 6, 9]

    result = castra("bus", "tail", "--state-root", root, "--vm", "tailed", "--json")
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == seqs[0::3]  # n = 0, 3, 6, 9


def test_tail_skips_a_torn_last_line_and_prints_it_once_complete(state_root, follow):
    torn = record_line(3)
    path = write_log(state_root, record_line(1), b"garbage", record_line(2), tail_bytes=torn[:30])
    result = castra("bus", "tail", "--state-root", str(state_root), "--json")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [record_line(1).decode(), record_line(2).decode()]
    assert "skipped a line that is not a bus log record" in result.stderr and "Traceback" not in result.stderr

    following = follow(state_root, "-n", "1", "--json")
    assert following.next_record()["seq"] == 2
    with open(path, "ab") as log:
        log.write(torn[30:] + b"\n")
    assert following.next_record()["seq"] == 3


def test_tail_follow_sees_a_new_line_within_200ms_of_the_ack(router, follow):
    first = client.publish("broadcast", {"n": 0}, state_root=router.state_root)
    following = follow(router.state_root, "-n", "1", "--json")
    assert following.next_record()["seq"] == first  # it has read the log and is following
    delays = []
    for n in range(1, 6):
        seq = client.publish("broadcast", {"n": n}, state_root=router.state_root)
        acked = time.monotonic()
        arrived, line = following.stdout.next()
        assert json.loads(line)["seq"] == seq
        delays.append(arrived - acked)
    assert max(delays) < 0.2, delays


def test_tail_follow_survives_truncation(router, follow):
    client.publish("broadcast", "before", state_root=router.state_root)
    following = follow(router.state_root, "-n", "1", "--json")
    assert following.next_record()["payload"] == "before"
    os.truncate(router.logs / "bus.log", 0)
    following.stderr.until(lambda line: "truncated" in line)
    seq = client.publish("broadcast", "after", state_root=router.state_root)
    assert following.next_record()["seq"] == seq


def test_tail_follow_waits_for_the_log_and_survives_a_router_restart(router_factory, state_root, follow):
    following = follow(state_root, "--json")  # no state root yet, let alone a log
    router = router_factory()
    first = client.publish("broadcast", "first", state_root=state_root)
    assert following.next_record()["seq"] == first
    router.stop()
    router_factory()
    second = client.publish("broadcast", "second", state_root=state_root)
    assert following.next_record()["seq"] == second == first + 1


@pytest.mark.parametrize("ignore_sigint", [False, True], ids=["", "started-with-SIGINT-ignored"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_tail_follow_stops_quietly_with_status_0(state_root, follow, sig, ignore_sigint):
    """Also when its shell started it with SIGINT ignored (`castra bus tail -f &`, tox &)."""
    write_log(state_root, record_line(1))
    following = follow(state_root, "-n", "1", ignore_sigint=ignore_sigint)
    following.stdout.next()
    assert following.stop(sig) == 0
    assert following.stderr.remaining() == []  # no traceback, no "Aborted!"


def test_tail_follow_loses_no_line_at_rename_rotation(router, follow):
    """Issue 12, defect 5: rotated by renaming under steady publishing, three times;
    the journal writes to the renamed file until its next health tick (0.5 s)."""
    published = [client.publish("broadcast", "first", state_root=router.state_root)]
    following = follow(router.state_root, "-n", "1", "--json")
    seen = [following.next_record()["seq"]]  # it has read the log and is following
    stop = threading.Event()

    def publish_steadily() -> None:
        with client.Publisher(state_root=router.state_root) as publisher:
            while not stop.is_set():
                [result] = publisher.publish_batch([("broadcast", {"n": len(published)})])
                assert result.reason is None, result.reason
                published.append(result.seq)
                time.sleep(0.002)

    def last_seq_at_path() -> int | None:
        """The seq of the last whole line of the file named bus.log now."""
        try:
            data = (router.logs / "bus.log").read_bytes()
        except FileNotFoundError:
            return None
        lines = data[:data.rfind(b"\n") + 1].splitlines()
        return json.loads(lines[-1])["seq"] if lines else None

    publisher = threading.Thread(target=publish_steadily)
    publisher.start()
    try:
        for rotation in range(1, 4):
            count = len(published) + 60
            wait_for(lambda count=count: len(published) >= count and last_seq_at_path() is not None, timeout=10,
                     what="messages in a new log to rotate")
            # tail follows a path: one renamed twice before it got there is skipped
            # whole (as with tail -F), so it reads a line of the file at the path
            # before that is renamed (the last acked seq may still be in the older
            # file, the writer having moved on since).
            caught_up = max(published[-1], last_seq_at_path())
            while seen[-1] < caught_up:
                seen.append(following.next_record()["seq"])
            (router.logs / "bus.log").rename(router.logs / f"bus.log.{rotation}")
        count = len(published) + 200
        wait_for(lambda: len(published) >= count, timeout=10, what="messages after the last rotation")
    finally:
        stop.set()
        publisher.join(10)
    last = published[-1]
    while seen[-1] < last:
        seen.append(following.next_record()["seq"])
    assert seen == published == list(range(published[0], last + 1))
    # bus.log.1 also holds what earlier tests of the module published: the lines
    # from this test's first on.
    kept = [seq for name in ("bus.log.1", "bus.log.2", "bus.log.3", "bus.log")
            for line in (router.logs / name).read_text().splitlines()
            if (seq := json.loads(line)["seq"]) >= published[0]]
    assert kept == seen  # every rotated file got lines after the rename was seen


# -- examples/watch_vm.py -----------------------------------------------------------------


def test_watch_vm_example_prints_each_message_for_its_vm(router):
    watcher = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "watch_vm.py"), "alpha", "--state-root", str(router.state_root),
         "--count", "2"],
        stdout=subprocess.PIPE,
    )
    try:
        output = Lines(watcher.stdout)

        def publish_pair() -> int:
            """vm:alpha2 first: a prefix match would show it before vm:alpha."""
            client.publish("vm:alpha2", {"not": "mine"}, state_root=router.state_root)
            return client.publish("vm:alpha", {"cmd": "reload"}, state_root=router.state_root)

        def received() -> str | None:
            # The subscription reaches the bus a few ms after start: publish until it does.
            publish_pair()
            try:
                return output.next(timeout=0.2)[1]
            except AssertionError:
                return None

        first = wait_for(received, timeout=10, what="the watcher's first message")
        publish_pair()
        second = output.next()[1]
        shown = [re.fullmatch(r'seq=(\d+) from=host topic=vm:alpha \{"cmd":"reload"\}', line)
                 for line in (first, second)]
        assert all(shown), (first, second)
        assert int(shown[0].group(1)) < int(shown[1].group(1))
        assert watcher.wait(10) == 0  # --count 2
    finally:
        watcher.kill()
        watcher.wait()


def test_publish_to_the_subscribe_all_topic_is_refused(router):
    result = castra("bus", "publish", "--state-root", str(router.state_root), "--topic", "*", "--payload", "1")
    assert result.returncode == 1 and "topic * is only for subscribe" in result.stderr


# -- issue 12: impossible state roots, closed pipes, empty results, status, publish -------


def impossible_roots(tmp_path: Path) -> dict[str, str]:
    """State roots no command can use: under a regular file, and in /proc."""
    afile = tmp_path / "afile"
    afile.write_text("")
    return {"under-a-file": str(afile / "sub"), "in-proc": "/proc/castra"}


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
@pytest.mark.parametrize("command", [
    ("up", "--port", "0"), ("status",), ("bus", "publish", "-m", "1"), ("bus", "tail"),
], ids=" ".join)
def test_an_impossible_state_root_is_an_error_not_a_traceback(tmp_path, command, where):
    """Issue 12, defect 3: `Error: ...` and exit 1, or for a root that merely does not
    exist (nothing can be made in /proc) what a missing root means to that command."""
    root = impossible_roots(tmp_path)[where]
    result = run_castra([*command, "--state-root", root])
    assert "Traceback" not in result.stderr
    if command[0] == "up" or where == "under-a-file":
        assert result.returncode == 1, result
        assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
        assert "not a directory" in result.stderr.lower() or "cannot use /proc/castra" in result.stderr
    elif command == ("bus", "publish", "-m", "1"):
        assert result.returncode == 1 and "no router is running" in result.stderr
    else:  # a state root that does not exist: no router, no log
        assert result.returncode == 0, result


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """``castra ARGS`` with its stdout a pipe whose reader is gone (`| head -1` after its line)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, "-m", "castra_zmq.cli.main", *args], stdout=writer, stderr=subprocess.PIPE,
                              text=True, timeout=30, check=False)
    finally:
        os.close(writer)


def test_a_reader_gone_is_a_normal_end(router):
    """Issue 12, defect 7: `castra bus tail -n 1000 | head -1` exits 0, silently; so
    does every command that prints."""
    with client.Publisher(state_root=router.state_root) as publisher:
        publisher.publish_batch([("broadcast", n) for n in range(1000)])
    root = ("--state-root", str(router.state_root))
    for args in (("bus", "tail", "-n", "1000", *root), ("bus", "tail", "-n", "1000", "--json", *root),
                 ("status", *root), ("status", "--json", *root), ("bus", "publish", "-m", "1", *root),
                 ("bus", "--help",)):
        result = run_into_closed_pipe(*args)
        assert (result.returncode, result.stderr) == (0, ""), args


def run_on_a_terminal(*args: str, **env: str) -> tuple[int, str, str]:
    """``castra ARGS`` with its stdout a pseudo-terminal, ``env`` added to the
    environment: (status, stdout, stderr)."""
    import pty

    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "castra_zmq.cli.main", *args], stdout=terminal,
                                stderr=subprocess.PIPE, text=True, timeout=30, check=False,
                                env=dict(os.environ, **env))
        os.close(terminal)
        terminal = -1
        out = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    return result.returncode, out.decode().replace("\r\n", "\n"), result.stderr


@pytest.mark.parametrize(("env", "coloured"), [
    ({"TERM": "xterm-256color", "NO_COLOR": ""}, True),
    ({"TERM": "xterm-256color", "NO_COLOR": "1"}, False),
    ({"TERM": "dumb", "NO_COLOR": ""}, False),
])
def test_status_on_a_terminal_is_coloured_unless_no_color_or_term_dumb(state_root, env, coloured):
    status, out, _ = run_on_a_terminal("status", "--state-root", str(state_root), **env)
    assert status == 0 and "router: not running" in out
    assert ("\x1b[" in out) == coloured, out


def test_tail_says_when_there_are_no_entries(state_root):
    """On a terminal, `-- No entries --` (as journalctl); for scripts stdout stays empty
    and stderr tells a log that does not exist."""
    root = ("--state-root", str(state_root))
    for args in (("--vm", "nosuch"), ()):  # no state root at all yet
        status, out, err = run_on_a_terminal("bus", "tail", *args, *root)
        assert (status, out) == (0, "-- No entries --\n")
        assert "no log yet" in err and "does not exist" in err
        piped = castra("bus", "tail", *args, *root)
        assert (piped.returncode, piped.stdout) == (0, "") and "no log yet" in piped.stderr
    write_log(state_root, record_line(1, "a"))
    status, out, err = run_on_a_terminal("bus", "tail", "--topic", "b", *root)
    assert (status, out, err) == (0, "-- No entries --\n", "")
    assert castra("bus", "tail", "--topic", "b", "--json", *root).stdout == ""


def test_tail_shows_the_date_and_utc_on_request(state_root):
    write_log(state_root, record_line(1))  # ts_ms 1_700_000_000_001
    result = castra("bus", "tail", "--utc", "--state-root", str(state_root))
    assert result.stdout.split()[0] == "2023-11-14T22:13:20.001+00:00"
    local = castra("bus", "tail", "--state-root", str(state_root)).stdout.split()[0]
    assert re.fullmatch(r"2023-11-1[45]T\d\d:\d\d:\d\d\.001[+-]\d\d:\d\d", local)


def test_status_check_exit_code_and_the_router_column(router, state_root):
    """`--check`: 0 while the router runs, 3 when not (as `systemctl status`)."""
    assert castra("status", "--check", "--state-root", str(state_root)).returncode == 3  # no router there
    result = castra("status", "--check", "--state-root", str(router.state_root))
    assert result.returncode == 0 and "router: running" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("VM "))
    assert header.split()[:2] == ["VM", "ROUTER"] and "BROKER" not in result.stdout
    assert castra("status", "--check", "--json", "--state-root", str(router.state_root)).returncode == 0


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_status_watch_shows_it_again_until_ctrl_c(state_root, as_json):
    process = subprocess.Popen(  # started as `castra status --watch &` is: SIGINT ignored
        [*SIGINT_IGNORED, "-m", "castra_zmq.cli.main", "status", "--watch", "0.1", *(["--json"] if as_json else []),
         "--state-root", str(state_root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        lines = Lines(process.stdout)
        for _ in range(3):
            line = lines.until(lambda line: line.startswith(("router:", "{")))
            assert json.loads(line)["router"]["running"] is False if as_json else "not running" in line
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert process.stderr.read() == b""
    finally:
        process.kill()
        process.wait()


def test_publish_takes_topic_and_payload_as_arguments_or_short_flags(router):
    root = ("--state-root", str(router.state_root))
    start = log_end(router)
    assert castra("bus", "publish", "vm:alpha", '{"cmd":"x"}', *root).stdout.startswith(
        f"seq={start + 1} topic=vm:alpha ")
    assert castra("bus", "publish", "-t", "builds", "-m", "[2]", *root).stdout.startswith(
        f"seq={start + 2} topic=builds ")
    assert castra("bus", "publish", "news", *root).stdout.startswith(f"seq={start + 3} topic=news ")  # payload null
    assert castra("bus", "publish", "-m", "-", "logs", *root, input='"x"').returncode == 0
    assert [(line["topic"], line["payload"]) for line in log_after(router, start)] == [
        ("vm:alpha", {"cmd": "x"}), ("builds", [2]), ("news", None), ("logs", "x")]
    twice = castra("bus", "publish", "-t", "a", "b", *root)
    assert twice.returncode == 2 and "give the topic once" in twice.stderr
    bare = castra("bus", "publish", "--payload", "hello", *root)
    assert bare.returncode == 1 and "payload is not valid JSON" in bare.stderr
    assert """castra bus publish broadcast '"hello"'""" in bare.stderr and "Traceback" not in bare.stderr


def test_publish_to_a_vm_that_never_connected_says_so_and_succeeds(router):
    root = ("--state-root", str(router.state_root))
    start = log_end(router)
    with connect_bus(router.port, "alpha"):
        wait_for(lambda: "alpha" in {vm.name for vm in collect_status(router.state_root).vms}, what="alpha in status")
        known = castra("bus", "publish", "vm:alpha", "1", *root)
        typo = castra("bus", "publish", "vm:alpah", "2", *root)
        lines = castra("bus", "publish", "-l", "vm:nosuch", *root, input="3\n")
        broadcast = castra("bus", "publish", "news", *root)
    assert (known.returncode, known.stderr, broadcast.stderr) == (0, "", "")
    for result, vm in ((typo, "alpah"), (lines, "nosuch")):
        assert result.returncode == 0 and result.stdout.startswith("seq="), result.stderr
        assert result.stderr == (f"castra bus publish: note: no VM named {vm} has connected to this router "
                                 "(in the last 7 days); the message is in the bus log only\n")
    assert [line["payload"] for line in log_after(router, start)] == [1, 2, 3, None]


def test_publish_lines_publishes_each_stdin_line_and_tells_each_result(router):
    lines = ['{"n":1}', "", "2", "not json", '"three"']
    start = log_end(router)
    result = castra("bus", "publish", "-l", "--json", "builds", "--state-root", str(router.state_root),
                    input="\n".join(lines))  # no newline after the last line: it counts too
    assert result.returncode == 1  # one line was not published
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == [start + 1, start + 2, start + 3]
    assert result.stderr.splitlines() == [
        "castra bus publish: line 4: payload is not valid JSON: JSON is malformed: invalid character (byte 1)"]
    assert [line["payload"] for line in log_after(router, start)] == [{"n": 1}, 2, "three"]

    many = "".join(f'{{"n":{n}}}\n' for n in range(3000))
    result = castra("bus", "publish", "-l", "-t", "bulk", "--state-root", str(router.state_root), input=many)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3000 and result.stdout.splitlines()[-1].startswith(f"seq={start + 3003} ")
    assert [line["payload"]["n"] for line in log_after(router, start)[3:]] == list(range(3000))


def test_publish_batch_returns_a_result_per_message_in_order(router):
    start = log_end(router)
    with client.Publisher(state_root=router.state_root) as publisher:
        results = publisher.publish_batch([("a", 1), ("*", 2), ("b", b"{oops"), ("c", "x" * 70_000), ("d", 3)])
    assert [(r.corr, r.seq) for r in results] == [(0, start + 1), (1, None), (2, None), (3, None), (4, start + 2)]
    assert results[1].reason == "topic * is only for subscribe"
    assert results[2].reason.startswith("payload is not valid JSON") and results[3].reason == "message too large"


@pytest.mark.parametrize("command", [(), ("up",), ("status",), ("bus",), ("bus", "publish"), ("bus", "tail")],
                         ids=lambda command: " ".join(("castra", *command)))
def test_every_help_has_an_example(command):
    result = castra(*command, "--help")
    assert result.returncode == 0
    assert re.search(r"^\s+castra .+", result.stdout.split("Options:")[0], re.MULTILINE), result.stdout
