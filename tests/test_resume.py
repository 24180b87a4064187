"""Resume (bus-v2): a guest that was away gets what it missed, from the log, in seq
order, exactly once; a bus-v1 guest sees not one byte changed (PROTOCOL.md 4.3.1).

The pure part (reading a log by seq) first; then one router for the module, each
test on its own topics; the tests that restart or rotate get routers of their own.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from castra_zmq.buslog import encode_lines
from castra_zmq.replay import (
    Cursor,
    Expired,
    offset_after,
    records_with,
    segments,
    topic_needles,
    ts_ms_of_line,
)
from castra_zmq.resume import STEP_SECONDS, ReplayTurns
from castra_zmq.subscriptions import topic_patterns

from .conftest import Router, host_publish, shared_router, wait_for
from .guest import Guest

V2 = "bus-v1,bus-v2"


# -- pure: reading a log by seq --------------------------------------------------------


def write_log(path: Path, first_seq: int, count: int, ts_ms: int = 1_000) -> list[bytes]:
    messages = [("alpha", f"t{seq % 3}", msgspec.Raw(b'{"n":%d,"pad":"%s"}' % (seq, b"x" * (seq * 37 % 300))))
                for seq in range(first_seq, first_seq + count)]
    lines = encode_lines(ts_ms, first_seq, messages)
    with open(path, "ab") as file:
        file.write(b"".join(lines))
    return lines


def test_offset_after_finds_the_first_line_past_any_seq(tmp_path):
    lines = write_log(tmp_path / "bus.log", 101, 500)
    data = (tmp_path / "bus.log").read_bytes()
    fd = os.open(tmp_path / "bus.log", os.O_RDONLY)
    try:
        for since in (0, 100, 101, 102, 350, 599, 600, 10_000):
            offset = offset_after(fd, len(data), since)
            expected = sum(len(line) for line in lines[:max(0, min(500, since - 100))])
            assert offset == expected, since
        # Only the first ``size`` bytes count: a line cut there is not there.
        assert offset_after(fd, len(data) - 5, 599) == len(data) - len(lines[-1])
        assert offset_after(fd, len(data), 999, key=ts_ms_of_line) == 0
        assert offset_after(fd, len(data), 1_000, key=ts_ms_of_line) == len(data)
    finally:
        os.close(fd)


def test_cursor_reads_across_rotated_copies_in_seq_order(tmp_path):
    old = write_log(tmp_path / "bus.log-20261201", 1, 300)
    middle = write_log(tmp_path / "bus.log.1", 301, 300)
    new = write_log(tmp_path / "bus.log", 601, 300)
    (tmp_path / "bus.log.tmp").write_bytes(b"not a log\n")
    assert [seq for seq, _ in segments(tmp_path)] == [1, 301, 601]
    cursor, read = Cursor(tmp_path, 150), []
    while lines := cursor.read(850, max_bytes=5_000):
        read += lines
    assert read == (old + middle + new)[150:850]
    assert cursor.read(850) == []  # nothing past what the caller knows is committed
    assert cursor.read(900) == new[250:]


def test_cursor_expires_when_the_old_lines_are_gone(tmp_path):
    write_log(tmp_path / "bus.log.1.gz", 1, 10)  # compressed: not readable line by line
    write_log(tmp_path / "bus.log", 11, 10)
    with pytest.raises(Expired) as caught:
        Cursor(tmp_path, 5).read(20)
    assert caught.value.oldest == 11
    assert len(Cursor(tmp_path, 10).read(20)) == 10


def test_cursor_reads_on_after_the_file_it_read_was_rotated_or_replaced(tmp_path):
    first = write_log(tmp_path / "bus.log", 1, 100)
    cursor = Cursor(tmp_path, 0)
    read = cursor.read(100, max_bytes=3_000)
    os.rename(tmp_path / "bus.log", tmp_path / "bus.log.1")  # rotated: its rest is read from the copy
    second = write_log(tmp_path / "bus.log", 101, 100)
    while lines := cursor.read(200, max_bytes=3_000):
        read += lines
    assert read == first + second
    # Replaced by a file of other lines at the same name (a restore): found again by seq.
    os.unlink(tmp_path / "bus.log.1")
    os.rename(tmp_path / "bus.log", tmp_path / "old")
    write_log(tmp_path / "bus.log", 201, 10)
    assert cursor.read(210) == (tmp_path / "bus.log").read_bytes().splitlines(keepends=True)


topic_names = st.sampled_from(["t", "t.a", "t.ab", "u", "vm:beta", "vm:be", "é", 'q"t', "\\x", "\x01"])
payloads = st.sampled_from([b'{"n":1}', b'{"topic":"t","payload":1}', b'["\\",\\"topic\\":\\"t\\",\\"payload\\":"]',
                            b'{"k":",\\"topic\\":\\"u"}', b'"vm:beta"', b"null"])
pattern_sets = st.lists(st.sampled_from(["t", "t.*", "t.a", "u", "vm:beta", "vm:*", "*", "é", 'q"*', "\\*",
                                          "\x01", "nothing"]), max_size=4)


@given(st.lists(st.tuples(topic_names, payloads), max_size=30), pattern_sets)
def test_records_with_finds_every_line_of_the_topics_wanted(messages, patterns):
    lines = encode_lines(1_000, 1, [("alpha", topic, msgspec.Raw(payload)) for topic, payload in messages])
    wanted = topic_patterns(patterns)
    records, bad = records_with(b"".join(lines), topic_needles(wanted))
    assert bad == []
    # More may be found (a needle in a payload), never fewer, in order; the topics tell.
    found = [record.seq for record in records]
    assert found == sorted(set(found))
    assert [seq for seq in found if wanted.match(records[found.index(seq)].topic)] == [
        seq for seq, (topic, _) in enumerate(messages, 1) if wanted.match(topic)]


def test_records_with_leaves_out_a_line_that_is_not_a_record(tmp_path):
    lines = encode_lines(1_000, 1, [("alpha", "t", msgspec.Raw(b"1"))] * 3)
    records, bad = records_with(lines[0] + b'{"not":"a record","topic":"t","payload":1}\n' + b"".join(lines[1:]),
                                topic_needles(topic_patterns(["t"])))
    assert [record.seq for record in records] == [1, 2, 3]
    assert bad == [b'{"not":"a record","topic":"t","payload":1}\n']


class Reader:
    """A stand-in catch-up for ``ReplayTurns``: ``reads`` reads of ``cost`` seconds each."""

    def __init__(self, name: str, reads: int, cost: float, log: list, turn: list):
        self.name, self.reads, self.cost, self.log, self.turn = name, reads, cost, log, turn
        self.scheduled = False

    def step(self) -> bool:
        end = time.monotonic() + self.cost
        while time.monotonic() < end:
            pass
        self.reads -= 1
        self.log.append((self.turn[0], self.name))
        return self.reads > 0


def test_replays_of_all_sessions_share_one_step_a_loop_turn_in_turn():
    """However many sessions replay, a loop turn gives them STEP_SECONDS in all (one
    read past it at most), one read each round the ring; the next turn goes on where
    this one stopped, and a catch-up asked for twice is in the ring once."""
    loop = asyncio.new_event_loop()
    turn, log = [0], []
    readers = [Reader(f"s{n}", reads=20, cost=STEP_SECONDS / 8, log=log, turn=turn) for n in range(6)]
    try:
        turns = ReplayTurns()

        async def replay():
            for reader in readers:
                turns.add(reader)
                turns.add(reader)
            while turns.waiting:
                await asyncio.sleep(0)  # one loop turn: the replays' callback runs in it
                turn[0] += 1

        loop.run_until_complete(asyncio.wait_for(replay(), 30))
    finally:
        loop.close()
    assert len(log) == 6 * 20 and all(reader.reads == 0 for reader in readers)
    assert [name for _, name in log[:12]] == [f"s{n}" for n in range(6)] * 2  # each once before any again
    reads_a_turn = collections.Counter(when for when, _ in log)
    assert max(reads_a_turn.values()) <= 8 + 1  # 1/8 of a step each: a step's worth and one past it
    assert len(reads_a_turn) >= 6 * 20 // 9


# -- a router ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router():
    yield from shared_router()


def connect(router: Router, vm: str, capabilities: str = V2) -> Guest:
    guest = Guest(router.port)
    reply = guest.hello(vm, capabilities)
    assert reply.startswith("ok session="), reply
    return guest


def receive_messages(guest: Guest, count: int, timeout: float = 30.0) -> list[dict]:
    return [guest.recv_until(lambda frame: frame["type"] == "message", timeout) for _ in range(count)]


def test_a_bus_v1_guest_gets_the_same_bytes_and_since_is_ignored(router):
    guest = Guest(router.port)
    assert guest.greeting == "castra-broker 0.1.0 ready capabilities=bus-v1,bus-v2"
    guest.sock.sendall(b"hello vm:v1bytes capabilities=bus-v1\n")
    assert re.fullmatch(r"ok session=[0-9a-f]{16}", guest.read_line())
    host_publish(router, "v1bytes.t", 3)
    guest.send({"type": "subscribe", "topic": "v1bytes.t", "since": 0})
    assert guest.recv_raw() == b'{"type":"ack","ack":"subscribe","status":"ok","topic":"v1bytes.t"}'
    with connect(router, "v2bytes") as v2:
        v2.send({"type": "subscribe", "topic": "v1bytes.t"})  # no since: live only, v1's ack
        assert v2.recv_raw() == b'{"type":"ack","ack":"subscribe","status":"ok","topic":"v1bytes.t"}'
        [seq] = host_publish(router, "v1bytes.t", 1)
        frames = {guest.recv_raw(), v2.recv_raw()}
    assert len(frames) == 1  # the same delivery bytes for both
    assert json.loads(frames.pop())["seq"] == seq
    guest.close()


def test_bus_v2_is_named_in_the_answer_line(router):
    for capabilities in (V2, "bus-v2", "BUS-V2,bus-v1"):
        with Guest(router.port) as guest:
            reply = guest.hello("named", capabilities)
            assert re.fullmatch(r"ok session=[0-9a-f]{16} protocol=bus-v2 log=[0-9a-f]{16}", reply)
    with Guest(router.port) as guest:
        assert guest.hello("named", "bus-v3") == "ok"


def test_a_guest_away_gets_every_message_it_missed_once_in_order(router):
    guest = connect(router, "away")
    assert guest.subscribe("vm:away")["status"] == "ok"
    before = host_publish(router, "vm:away", 5)
    assert [m["seq"] for m in receive_messages(guest, 5)] == before
    guest.close()  # away: its socket is gone
    missed = host_publish(router, "vm:away", 10_000, start=5)
    guest = connect(router, "away")
    guest.send({"type": "subscribe", "topic": "vm:away", "since": before[-1]})
    ack = guest.recv()
    assert ack == {"type": "ack", "ack": "subscribe", "status": "ok", "topic": "vm:away",
                   "seq": ack["seq"], "since": before[-1]}
    assert ack["seq"] >= missed[-1]
    live = host_publish(router, "vm:away", 100, start=10_005)
    got = receive_messages(guest, 10_100)
    assert [m["seq"] for m in got] == missed + live
    assert [m["payload"]["n"] for m in got] == list(range(5, 10_105))
    assert {m["from"] for m in got} == {"host"}
    with pytest.raises(TimeoutError):
        guest.recv_raw(timeout=0.3)  # and nothing twice
    guest.close()


def test_replay_and_live_traffic_interleave_without_reordering(router):
    publisher = connect(router, "mixpub")
    history = host_publish(router, "mix", 3_000)
    guest = connect(router, "mixer")
    guest.send({"type": "subscribe", "topic": "mix", "since": history[0]})
    # While the replay runs, another guest publishes to the same topic.
    live = [publisher.publish({"k": k}, topic="mix")["seq"] for k in range(200)]
    ack = guest.recv_until(lambda frame: frame["type"] == "ack")
    assert ack["since"] == history[0]
    got = [m["seq"] for m in receive_messages(guest, len(history) - 1 + len(live))]
    assert got == sorted(history[1:] + live)
    publisher.close()
    guest.close()


def test_patterns_and_live_subscriptions_share_one_stream_without_duplicates(router):
    guest = connect(router, "pat")
    assert guest.subscribe("pat.a")["status"] == "ok"  # live: already has what comes
    first = host_publish(router, "pat.a", 3) + host_publish(router, "pat.b", 3)
    assert [m["seq"] for m in receive_messages(guest, 3)] == first[:3]
    # What since asks for comes, though pat.a's were had live: once each, in order.
    guest.send({"type": "subscribe", "topic": "pat.*", "since": first[0] - 1})
    assert [m["seq"] for m in receive_messages(guest, 6)] == first
    more = host_publish(router, "pat.a", 2)
    assert [m["seq"] for m in receive_messages(guest, 2)] == more  # once, though both match
    with pytest.raises(TimeoutError):
        guest.recv_raw(timeout=0.3)
    guest.close()


def test_a_guest_never_gets_its_own_publishes_nor_other_vms_private_topics(router):
    alpha = connect(router, "ralpha")
    mine = [alpha.publish({"k": k}, topic="own.t")["seq"] for k in range(3)]
    host_publish(router, "vm:rbeta", 2)
    others = host_publish(router, "own.t", 2)
    alpha.send({"type": "subscribe", "topic": "*", "since": mine[0] - 1})
    alpha.recv_until(lambda frame: frame["type"] == "ack")
    got = receive_messages(alpha, 2)
    assert [m["seq"] for m in got] == others
    alpha.close()


def test_since_is_checked_and_clamped(router):
    guest = connect(router, "checked")
    for since in (-1, "1", 1.5, True, 2**63):
        guest.send({"type": "subscribe", "topic": "chk", "since": since})
        assert guest.recv() == {"type": "ack", "ack": "subscribe", "status": "error", "topic": "chk",
                                "reason": "invalid since"}
    guest.send({"type": "subscribe", "topic": "chk", "since": 10**12})  # ahead of the log
    ack = guest.recv()
    assert ack["status"] == "ok" and ack["since"] == ack["seq"]
    [seq] = host_publish(router, "chk", 1)
    assert receive_messages(guest, 1)[0]["seq"] == seq
    guest.close()


# -- restarts and rotation ---------------------------------------------------------------


@pytest.fixture
def own_router(state_root):
    routers = []

    def start() -> Router:
        routers.append(Router(state_root).start())
        return routers[-1]

    yield start
    for router in routers:
        if router.process.poll() is None:
            router.stop()


def test_resume_across_a_kill_9_of_the_router(own_router):
    router = own_router()
    sent = host_publish(router, "vm:survivor", 500)
    router.kill_9()
    router = own_router()
    after = host_publish(router, "vm:survivor", 500, start=500)
    guest = connect(router, "survivor")
    guest.send({"type": "subscribe", "topic": "vm:survivor", "since": 0})
    assert guest.recv()["since"] == 0
    assert [m["seq"] for m in receive_messages(guest, 1000)] == sent + after
    guest.close()


def test_rotated_logs_are_replayed_and_an_expired_since_is_refused(own_router):
    router = own_router()
    first = host_publish(router, "rot", 300)
    os.rename(router.logs / "bus.log", router.logs / "bus.log.1")
    wait_for(lambda: _next_commit_makes_a_new_log(router), timeout=10, what="a new bus.log")
    second = host_publish(router, "rot", 300, start=300)
    guest = connect(router, "rotator")
    guest.send({"type": "subscribe", "topic": "rot", "since": first[9]})
    assert guest.recv()["status"] == "ok"
    assert [m["seq"] for m in receive_messages(guest, 590)] == first[10:] + second
    guest.close()
    os.rename(router.logs / "bus.log.1", router.logs / "bus.log.1.gz")  # compressed: gone for replay
    guest = connect(router, "rotator3")
    guest.send({"type": "subscribe", "topic": "rot", "since": first[9]})
    oldest = min(seq for seq, _ in segments(router.logs))
    assert guest.recv() == {"type": "ack", "ack": "subscribe", "status": "error", "topic": "rot",
                            "reason": "since expired", "oldest": oldest}
    guest.send({"type": "subscribe", "topic": "rot", "since": oldest - 1})
    assert guest.recv()["status"] == "ok"
    assert [m["seq"] for m in receive_messages(guest, 300)] == second  # all that is left on rot
    guest.close()


def _next_commit_makes_a_new_log(router: Router) -> bool:
    """Publish one message; true once it lands in a new bus.log (the bridge noticed the rename)."""
    host_publish(router, "rot.probe", 1)
    return (router.logs / "bus.log").exists()


def test_replayed_frames_are_byte_for_byte_the_live_ones(router):
    """Replay builds frames from the log line's bytes: the same bytes live delivery
    encodes, for names, topics and payloads with escapes and other scripts."""
    topic = 'bytes.ü\\"t\u2028'
    live = connect(router, "bytes-live", "bus-v1")
    assert live.subscribe(topic)["status"] == "ok"
    sender = connect(router, 'bytesé"\\x')
    payloads = ['{"k":"v\\u0000\\n","ü":[1,2.5e-3,null,true],"s":"\\"\\\\"}', '"plain"', "0", "null", "[]",
                '{"nested":{"a":[{"b":"c"}]}}']
    seqs = [sender.request({"type": "publish", "topic": topic, "payload": json.loads(p)})["seq"]
            for p in payloads]
    seqs += host_publish(router, topic, 2)
    expected = [live.recv_raw() for _ in seqs]
    resumed = connect(router, "bytes-resumed")
    resumed.send({"type": "subscribe", "topic": topic, "since": seqs[0] - 1})
    assert resumed.recv()["status"] == "ok"
    assert [resumed.recv_raw() for _ in seqs] == expected
    for guest in (live, sender, resumed):
        guest.close()
