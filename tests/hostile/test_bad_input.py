"""Hostile and broken guests against a real router: each gets the answer PROTOCOL.md
promises, and no router process dies or is restarted.

Most cases share one router per module (starting one takes about two seconds);
each test uses its own VM names and ends by checking that the router's role
processes are still the ones it started with.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import zmq

from castra_zmq import client
from castra_zmq.errors import PublishFailed

from ..conftest import Router, wait_for
from ..guest import Guest, connect_bus

ROLES = ("proxy", "journal", "status", "bridge")
MAX_FRAME = 65536
_started_pids: dict[Path, dict[str, int]] = {}
_log_marks: dict[Path, int] = {}  # router log size when the current test started


def role_pids(router: Router) -> dict[str, int]:
    return {role: router.role_pid(role) for role in ROLES}


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def remember_pids(router: Router) -> Router:
    _started_pids[router.state_root] = role_pids(router)
    return mark_log(router)


def mark_log(router: Router) -> Router:
    _log_marks[router.state_root] = router.log_path.stat().st_size
    return router


def assert_router_intact(router: Router) -> None:
    """Same role processes as at start, all running, no exception escaped a handler
    since the test began."""
    assert router.process.poll() is None, "supervisor exited"
    pids = role_pids(router)
    assert pids == _started_pids[router.state_root]
    assert all(is_running(pid) for pid in pids.values()), pids
    new_log = router.log_path.read_bytes()[_log_marks[router.state_root] :]
    assert b"Traceback" not in new_log, new_log.decode(errors="replace")[-3000:]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def assert_open(guest: Guest) -> None:
    """The session still answers: a heartbeat is acked."""
    guest.send({"type": "heartbeat"})
    assert guest.recv_raw() == b'{"type":"ack","ack":"heartbeat","status":"ok"}'


@pytest.fixture(scope="module")
def shared_router():
    path = Path(tempfile.mkdtemp(prefix="cz", dir="/tmp"))
    router = remember_pids(Router(path / "root").start())
    yield router
    try:
        router.stop()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bus_router(shared_router):
    """The module's router; its log is checked for escaped exceptions from here on."""
    return mark_log(shared_router)


# -- handshake (line mode) ----------------------------------------------------------


def test_text_before_hello_gets_expected_hello_then_close(bus_router):
    with Guest(bus_router.port) as guest:
        guest.send_raw(b"GET / HTTP/1.1\r\n")
        assert guest.read_line() == "error: expected hello"
        assert guest.is_closed()
    assert_router_intact(bus_router)


def test_binary_garbage_before_hello_gets_an_error_line_then_close(bus_router):
    with Guest(bus_router.port) as guest:
        guest.send_raw(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\xff\n")  # a TLS hello
        assert guest.read_line().startswith("error: ")
        assert guest.is_closed()
    assert_router_intact(bus_router)


def test_frame_before_hello_gets_expected_hello(bus_router):
    with Guest(bus_router.port) as guest:
        guest.send_raw(frame(b'{"type":"publish","payload":"\n"}'))
        assert guest.read_line() == "error: expected hello"
        assert guest.is_closed()
    assert_router_intact(bus_router)


def test_hello_sent_one_byte_at_a_time_opens_a_session(bus_router):
    with Guest(bus_router.port) as guest:
        for byte in b"hello vm:trickle capabilities=bus-v1\n":
            guest.send_raw(bytes([byte]))
        assert guest.read_line().startswith("ok session=")
        assert guest.publish({"n": 1})["status"] == "ok"
    assert_router_intact(bus_router)


def test_crlf_hello_and_first_frame_in_one_segment(bus_router):
    with Guest(bus_router.port) as guest:
        guest.send_raw(b"HELLO VM:crlf capabilities=BUS-V1\r\n" + frame(b'{"type":"heartbeat"}'))
        assert guest.read_line().startswith("ok session=")
        assert guest.recv()["ack"] == "heartbeat"
    assert_router_intact(bus_router)


def padded_hello(vm: str, size: int) -> bytes:
    """A bus hello line of exactly ``size`` bytes, padded with an ignored field."""
    line = f"hello vm:{vm} capabilities=bus-v1 pad=".encode()
    return line + b"x" * (size - len(line))


def test_hello_line_of_512_bytes_is_accepted(bus_router):
    for ending in (b"\n", b"\r\n"):
        with Guest(bus_router.port) as guest:
            guest.send_raw(padded_hello("edge512", 512) + ending)
            assert guest.read_line().startswith("ok session=")
    assert_router_intact(bus_router)


def test_hello_line_of_513_bytes_gets_line_too_long(bus_router):
    for ending in (b"\n", b"\r\n"):
        with Guest(bus_router.port) as guest:
            guest.send_raw(padded_hello("edge513", 513) + ending)
            assert guest.read_line() == "error: line too long"
            assert guest.is_closed()
    assert_router_intact(bus_router)


def test_endless_line_gets_line_too_long_without_waiting_for_a_newline(bus_router):
    with Guest(bus_router.port) as guest:
        guest.send_raw(b"hello vm:" + b"z" * 600)
        assert guest.read_line() == "error: line too long"
        assert guest.is_closed()
    assert_router_intact(bus_router)


def test_no_hello_within_the_deadline_gets_handshake_timeout(router_factory):
    router = remember_pids(router_factory("--handshake-timeout", "1"))
    with Guest(router.port) as silent, Guest(router.port) as partial:
        partial.send_raw(b"hello vm:slo")  # never finishes its line
        started = time.monotonic()
        assert silent.read_line() == "error: handshake timeout"
        assert partial.read_line() == "error: handshake timeout"
        assert time.monotonic() - started < 4
        assert silent.is_closed() and partial.is_closed()
    assert_router_intact(router)


def test_200_silent_connections_do_not_delay_a_real_guest(bus_router):
    with ExitStack() as stack:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", bus_router.port), timeout=5)
            stack.callback(sock.close)
        started = time.monotonic()
        with connect_bus(bus_router.port, "busy-day") as guest:
            assert guest.publish({"n": 1})["status"] == "ok"
        assert time.monotonic() - started < 5
    assert_router_intact(bus_router)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("a\x00b", "invalid vm name"),
        ("a\x1bb", "invalid vm name"),
        ("n" * 129, "vm name too long"),
        ("host", "reserved vm name"),
        ("HOST", "reserved vm name"),
        ("", "missing vm name"),
    ],
    ids=["nul", "escape", "129-chars", "host", "HOST", "empty"],
)
def test_invalid_vm_name_is_refused(bus_router, name, reason):
    with Guest(bus_router.port) as guest:
        assert guest.hello(name) == f"error: {reason}"
        assert guest.is_closed()
    assert_router_intact(bus_router)


# -- frames: length violations close the session ------------------------------------


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 2**32 - 1])
def test_bad_frame_length_gets_error_frame_then_close(bus_router, length):
    with connect_bus(bus_router.port, f"len{length}") as guest:
        guest.send_raw(struct.pack(">I", length))  # the header alone: no body follows
        assert guest.recv() == {"type": "error", "reason": f"invalid frame length {length}"}
        assert guest.is_closed()
    assert_router_intact(bus_router)


def test_frame_of_exactly_65536_bytes_is_read(bus_router):
    with connect_bus(bus_router.port, "maxframe") as guest:
        prefix, suffix = b'{"type":"publish","topic":"big","payload":"', b'"}'
        guest.send_raw(frame(prefix + b"x" * (MAX_FRAME - len(prefix) - len(suffix)) + suffix))
        # Read as a frame; its delivery would be over the limit, so the publish is refused.
        ack = guest.recv()
        assert (ack["ack"], ack["status"], ack["reason"]) == ("publish", "error", "message too large")
        assert_open(guest)
    assert_router_intact(bus_router)


def test_length_prefix_then_stall_does_not_disturb_another_session(bus_router):
    body = b'{"type":"publish","topic":"stall","payload":"' + b"s" * 60 + b'"}'
    with connect_bus(bus_router.port, "staller") as staller, \
            connect_bus(bus_router.port, "bystander") as bystander:
        staller.send_raw(frame(body)[:14])  # header and 10 body bytes, then nothing
        assert bystander.publish({"n": 1})["status"] == "ok"
        assert_open(bystander)
        staller.send_raw(frame(body)[14:])  # the stalled frame completes later
        assert staller.recv()["status"] == "ok"
    assert_router_intact(bus_router)


def test_truncated_frame_then_disconnect_leaves_the_router_working(bus_router):
    with connect_bus(bus_router.port, "quitter") as quitter:
        quitter.send_raw(struct.pack(">I", 1000) + b'{"type":"publish","payload":' + b"1" * 20)
    with connect_bus(bus_router.port, "survivor") as survivor:
        ack = survivor.publish({"n": 1})
        assert ack["status"] == "ok"
    assert all(line["vm"] != "quitter" for line in bus_router.read_log())
    assert_router_intact(bus_router)


# -- frames: bad bodies get an error and the session stays open ---------------------


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe", b'{"type":"publish","payload":"\xff"}', b'{"type":"heartbeat","note":"\xc3"}'],
    ids=["whole-body", "in-payload", "in-unknown-field"],
)
def test_invalid_utf8_body_gets_error_frame_and_session_stays_open(bus_router, body):
    with connect_bus(bus_router.port, "badutf8") as guest:
        guest.send_raw(frame(body))
        reply = guest.recv()
        assert reply["type"] == "error" and "UTF-8" in reply["reason"]
        assert_open(guest)
    assert all(line["vm"] != "badutf8" for line in bus_router.read_log())
    assert_router_intact(bus_router)


@pytest.mark.parametrize("body", [b"[1,2]", b'"publish"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_gets_error_frame_and_session_stays_open(bus_router, body):
    with connect_bus(bus_router.port, "notobject") as guest:
        guest.send_raw(frame(body))
        assert guest.recv() == {"type": "error", "reason": "frame is not a JSON object"}
        assert_open(guest)
    assert_router_intact(bus_router)


def test_invalid_json_gets_error_frame_and_session_stays_open(bus_router):
    with connect_bus(bus_router.port, "notjson") as guest:
        guest.send_raw(frame(b"{not json"))
        assert guest.recv()["type"] == "error"
        assert_open(guest)
    assert_router_intact(bus_router)


def test_missing_type_gets_error_frame_and_session_stays_open(bus_router):
    with connect_bus(bus_router.port, "notype") as guest:
        guest.send({"topic": "x", "payload": 1})
        assert guest.recv_raw() == b'{"type":"error","reason":"missing type"}'
        assert_open(guest)
    assert_router_intact(bus_router)


def test_unknown_type_gets_error_ack_and_session_stays_open(bus_router):
    with connect_bus(bus_router.port, "oddtype") as guest:
        guest.send({"type": "frobnicate", "topic": "x"})
        raw = guest.recv_raw()
        assert raw.startswith(b'{"type":"ack","ack":"frobnicate","status":"error"')
        assert json.loads(raw)["reason"] == "unknown type"
        assert_open(guest)
    assert_router_intact(bus_router)


@pytest.mark.parametrize(
    "body",
    [b'{"type":"publish","topic":1,', b'{"type":"publish","topic":1}garbage', b'{"type":"frobnicate",'],
    ids=["truncated", "trailing-garbage", "unknown-type-truncated"],
)
def test_bad_field_then_broken_json_gets_error_frame_and_session_stays_open(bus_router, body):
    with connect_bus(bus_router.port, "halfjson") as guest:
        guest.send_raw(frame(body))
        reply = guest.recv()
        assert reply["type"] == "error" and "invalid JSON" in reply["reason"]
        assert_open(guest)
    assert_router_intact(bus_router)


def test_json_nested_10000_deep_in_payload_gets_error_and_session_stays_open(bus_router):
    with connect_bus(bus_router.port, "deep") as guest:
        guest.send_raw(frame(b'{"type":"publish","payload":' + b"[" * 10_000 + b"]" * 10_000 + b"}"))
        reply = guest.recv()
        assert reply["type"] == "error" and "nested" in reply["reason"]
        assert_open(guest)
    assert all(line["vm"] != "deep" for line in bus_router.read_log())
    assert_router_intact(bus_router)


def test_64k_topic_gets_error_ack_and_session_stays_open(bus_router):
    prefix, suffix = b'{"type":"publish","topic":"', b'"}'
    topic = b"t" * (MAX_FRAME - len(prefix) - len(suffix))  # the largest frame there is
    with connect_bus(bus_router.port, "longtopic") as guest:
        guest.send_raw(frame(prefix + topic + suffix))
        reply = guest.recv()
        assert reply["type"] == "ack" and reply["ack"] == "publish" and reply["status"] == "error"
        assert_open(guest)
    assert_router_intact(bus_router)


def test_star_topic_on_publish_gets_error_ack(bus_router):
    with connect_bus(bus_router.port, "star") as guest:
        reply = guest.publish({"n": 1}, topic="*")
        assert reply["type"] == "ack" and reply["ack"] == "publish" and reply["status"] == "error"
        assert reply["topic"] == "*" and reply["reason"]
        assert_open(guest)
    assert all(line["vm"] != "star" for line in bus_router.read_log())
    assert_router_intact(bus_router)


def test_host_payload_with_invalid_utf8_is_refused_by_the_journal(bus_router):
    with pytest.raises(PublishFailed, match="payload is not valid JSON"):
        client.publish("hostbad", b'{"s":"\xff"}', state_root=bus_router.state_root, timeout=3)
    assert all(line["topic"] != "hostbad" for line in bus_router.read_log())
    assert_router_intact(bus_router)


# -- VM names are identities, never paths -------------------------------------------

HOSTILE_NAMES = [
    "../x", "a/b", "..", ".", "n" * 128, "bus", "%2E%2E", "-rf", "a\\b",
    "alpha", "Alpha", "\u0430lpha",  # Latin, capital, Cyrillic "а"
    "caf\u00e9", "cafe\u0301",  # composed and decomposed é
]


def test_hostile_vm_names_get_their_own_log_files_inside_logs_bus(bus_router):
    root = bus_router.state_root
    with connect_bus(bus_router.port, "mailer") as mailer:
        for name in HOSTILE_NAMES:
            with connect_bus(bus_router.port, name) as guest:
                assert guest.publish({"from": name})["status"] == "ok"
            assert mailer.publish({"to": name}, topic=f"vm:{name}")["status"] == "ok"
    bus_router.wait_filed()

    allowed = [root / "logs" / "bus", root / "run", root / "state"]
    records: dict[Path, list[dict]] = {}
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = Path(dirpath) / filename
            assert any(path.parent == top or top in path.parents for top in allowed), path
            if path.parent == bus_router.logs:
                records[path] = [json.loads(line) for line in path.read_text().splitlines()]

    bus_log = bus_router.logs / "bus.log"
    for name in HOSTILE_NAMES:
        sent = [path for path, lines in records.items()
                if path != bus_log and any(line["vm"] == name for line in lines)]
        assert len(sent) == 1, (name, sent)  # exactly one per-VM file holds its publish
        [own] = sent
        assert all(line["vm"] == name or line["topic"] == f"vm:{name}" for line in records[own])
        assert any(line["topic"] == f"vm:{name}" for line in records[own])  # mail reached it
    owners = {path: {line["vm"] for line in lines} - {"mailer"} for path, lines in records.items()}
    own_files = [path for path, vms in owners.items() if path != bus_log and vms]
    assert len(own_files) >= len(HOSTILE_NAMES)
    assert all(len(owners[path]) == 1 for path in own_files)  # no two names share a file
    assert_router_intact(bus_router)


# -- the journal socket (host tools) ---------------------------------------------------

_REQUEST = b'{"corr":1,"vm":"host","topic":"t","deadline":1e18,"payload":1}'


@pytest.mark.parametrize("frames", [
    [b"", b"not json"],
    [b"", _REQUEST.replace(b',"payload":1', b"")],
    [b"", _REQUEST, _REQUEST],  # one frame per batch, not per request
    [b"", b'[{"corr":1,"vm":"host","topic":"t","deadline":1e18,"payload":' + b"[" * 10000 + b"]" * 10000 + b"}]"],
    [b"no empty delimiter frame"],
], ids=["not-json", "payload-missing", "two-frames", "nested-10000-deep", "no-delimiter"])
def test_malformed_journal_socket_message_is_dropped_and_logged(bus_router, frames):
    warnings = bus_router.log_text().count("dropped malformed")
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.linger = 1000
        sock.connect(f"ipc://{bus_router.state_root}/run/journal.sock")
        sock.send_multipart(frames)
        assert not sock.poll(300), "a malformed message got an answer"
    wait_for(lambda: bus_router.log_text().count("dropped malformed") > warnings, timeout=5,
             what="the journal's warning")
    assert client.publish("after", 1, state_root=bus_router.state_root, timeout=3) > 0
    assert_router_intact(bus_router)


@pytest.mark.parametrize("body", [b"not json\n", b'{"seq":1}\n', b'[1,2]\n{"seq":2}\n', b""],
                         ids=["not-json", "not-a-record", "two-lines-one-array", "empty"])
def test_malformed_log_message_on_the_bus_is_dropped_by_the_journal(bus_router, body):
    """A local peer of the proxy may send ``log`` messages that are not whole log
    lines: the journal logs and drops them, and goes on filing the real ones."""
    warnings = bus_router.log_text().count("dropped malformed log message")
    with zmq.Context() as context, context.socket(zmq.PUB) as sock:
        sock.linger = 1000
        sock.connect(f"ipc://{bus_router.state_root}/run/bus-in.sock")
        deadline = time.monotonic() + 5  # a PUB drops what it sends before the proxy subscribes it
        while (bus_router.log_text().count("dropped malformed log message") == warnings
               and time.monotonic() < deadline):
            sock.send_multipart([b"log\0", body])
            time.sleep(0.1)
    assert bus_router.log_text().count("dropped malformed log message") > warnings
    assert client.publish("after", 1, state_root=bus_router.state_root, timeout=3) > 0
    assert_router_intact(bus_router)


def test_publish_id_over_1024_characters_gets_error_ack_and_no_ack_exceeds_the_frame_limit(bus_router):
    """The ack echoes the id: an id of ~65 KB would make an ack over 65,536 bytes,
    which guests reject. Longer ids are refused; the longest id allowed, all
    escaped 6x and with the longest escaped topic, still makes an ack in bounds."""
    with connect_bus(bus_router.port, "longid") as guest:
        reply = guest.publish(1, id="i" * 1025)
        assert reply["ack"] == "publish" and reply["status"] == "error" and "id" in reply["reason"]
        assert "id" not in reply
        topic, message_id = "\x01" * 256, "\x02" * 1024
        guest.send({"type": "publish", "topic": topic, "payload": 1, "id": message_id})
        body = guest.recv_raw()
        assert len(body) + 4 <= MAX_FRAME
        reply = json.loads(body)
        assert (reply["status"], reply["id"], reply["topic"]) == ("ok", message_id, topic)
        assert_open(guest)
    assert_router_intact(bus_router)
