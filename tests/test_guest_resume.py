"""The guest library's resume (castra_zmq.guest, bus-v2, PROTOCOL.md 4.3.1): positions,
dedupe by seq, subscribe with since after reconnects and restarts, the state file.

Pure tests first (no sockets), then a real router on loopback. ``Gate`` relays a
guest's connection to the router so that a test can cut it and keep the guest out
while the host publishes: the guest then has to get what it missed by replay.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import threading
import time

import pytest
import zmq

from castra_zmq import guest, handshake, session
from castra_zmq.endpoints import Endpoints
from castra_zmq.guest import (
    GuestSession,
    GuestTimeout,
    Positions,
    decode_state,
    default_state_file,
    encode_state,
    load_state,
    parse_session_reply,
    save_state,
    state_file_name,
    topic_matches,
)
from castra_zmq.replay import segments
from castra_zmq.wire import HANDOVER_VERB, HandoverRequest, json_encode

from .conftest import host_publish, wait_for
from .guest import connect_bus
from .test_guest import GUEST_CLI, Child, environment, guest_env, run

# -- pure: the answer line, topics, positions ------------------------------------------------


def test_copied_bus_v2_constants_equal_the_routers():
    """guest.py is one stdlib file, so it copies what it needs of bus-v2 (the limits
    of bus-v1 are checked in test_guest)."""
    assert (guest.BUS_V2, guest.MAX_SINCE, guest.SINCE_EXPIRED, guest.INVALID_SINCE) == (
        handshake.BUS_V2, session.SEQ_MAX, session.SINCE_EXPIRED, session.INVALID_SINCE)



def test_the_session_token_is_parsed_with_and_without_a_protocol():
    assert parse_session_reply("ok session=704acec47cae7080") == ("704acec47cae7080", "bus-v1")
    assert parse_session_reply("ok session=3f5c0e1d9a7b2468 protocol=bus-v2") == ("3f5c0e1d9a7b2468", "bus-v2")
    assert parse_session_reply("ok  session=ab\tprotocol=bus-v2 later=1 word") == ("ab", "bus-v2")
    for reply in ("ok", "ok session=", "ok protocol=bus-v2", "error: unknown vm", "", "okay session=ab"):
        assert parse_session_reply(reply) is None, reply


def test_the_hello_offers_bus_v2_and_the_router_picks_it():
    offered = guest.hello_line("alpha", guest.CAPABILITIES)
    assert offered == b"hello vm:alpha capabilities=bus-v1,bus-v2\n"
    assert handshake.parse_hello(offered.rstrip(b"\n")).bus_protocol == "bus-v2"
    assert guest.hello_line("alpha") == b"hello vm:alpha capabilities=bus-v1\n"  # the default is unchanged


def test_topic_matches_follows_the_pattern_rules():
    assert topic_matches("vm:alpha", "vm:alpha") and not topic_matches("vm:alpha", "vm:alpha2")
    assert topic_matches("metrics.*", "metrics.cpu") and not topic_matches("metrics.*", "metrics")
    assert topic_matches("*", "anything") and topic_matches("*", "*")
    assert topic_matches("f*", "foo*") and topic_matches("foo*", "foo*")  # a published "foo*" is a plain topic
    assert not topic_matches("a*b*", "a-b") and topic_matches("a*b*", "a*bc")


def test_positions_hand_each_seq_once_per_matching_subscription():
    positions = Positions({"vm:a": 10})
    subscriptions = ["vm:a", "news"]
    assert not positions.take("vm:a", 10, subscriptions)  # had it
    assert not positions.take("vm:a", 7, subscriptions)
    assert positions.take("vm:a", 11, subscriptions)
    assert positions.take("news", 3, subscriptions)  # no position yet: it goes
    assert positions.last == {"vm:a": 11, "news": 3}
    assert not positions.take("news", 3, subscriptions)
    assert positions.take("other", 1, subscriptions)  # matches none (unsubscribed in flight): goes
    assert positions.last == {"vm:a": 11, "news": 3}


def test_positions_with_patterns_take_the_max_and_one_behind_is_enough():
    positions = Positions({"m.*": 50, "m.cpu": 100})
    subscriptions = ["m.cpu", "m.*"]
    assert positions.take("m.cpu", 60, subscriptions)  # m.* is behind: it goes (and m.cpu keeps 100)
    assert positions.last == {"m.*": 60, "m.cpu": 100}
    assert not positions.take("m.cpu", 60, subscriptions)
    assert positions.take("m.mem", 70, subscriptions)
    assert positions.last == {"m.*": 70, "m.cpu": 100}
    assert positions.take("m.cpu", 100, subscriptions)  # m.* had not handed it
    assert positions.last == {"m.*": 100, "m.cpu": 100}
    assert not positions.take("m.cpu", 100, subscriptions) and positions.take("m.cpu", 101, subscriptions)
    assert positions.last == {"m.*": 101, "m.cpu": 101}


def test_positions_without_dedupe_follow_a_bus_v1_host():
    positions = Positions({"vm:a": 500})
    version = positions.version
    assert positions.take("vm:a", 3, ["vm:a"], dedupe=False)  # a host whose log began again
    assert positions.last == {"vm:a": 3} and positions.version == version + 1
    positions.forget("vm:a")
    positions.forget("vm:a")
    assert positions.last == {} and positions.version == version + 2


def test_a_handovers_lines_below_a_fresh_position_are_taken_once():
    """A VM that moved here gets what was sent to it meanwhile (a handover, PROTOCOL.md
    8.2.1) at seqs below where this log ended when it subscribed: they go, once each,
    until something past that comes; a subscription with a position of its own takes none."""
    positions = Positions({"news": 40})
    positions.start("vm:a", 100)
    assert positions.last["vm:a"] == 100
    subscriptions = ["vm:a", "news"]
    assert positions.take("vm:a", 61, subscriptions) and positions.take("vm:a", 90, subscriptions)
    assert not positions.take("vm:a", 61, subscriptions) and not positions.take("vm:a", 75, subscriptions)
    assert positions.take("vm:a", 100, subscriptions) and not positions.take("vm:a", 100, subscriptions)
    assert not positions.take("news", 30, subscriptions)  # not started here: a repeat
    assert positions.take("vm:a", 101, subscriptions) and positions.started == {}  # live: none after
    assert not positions.take("vm:a", 95, subscriptions)
    assert positions.last == {"vm:a": 101, "news": 40}
    assert positions.take("t", 40, ["t"])  # a handover's line came before the ack was read
    positions.start("t", 50)
    assert not positions.take("t", 40, ["t"]) and positions.take("t", 45, ["t"]) and positions.last["t"] == 50
    positions = Positions(log="one log")
    positions.start("u", 10)
    assert positions.move_to("another log") and positions.started == {}


def test_since_is_checked_before_it_is_sent():
    for bad in (-1, 2**63, True, 1.0, "1", None):
        with pytest.raises(ValueError):
            guest.check_since(bad)
    assert guest.check_since(0) == 0 and guest.check_since(2**63 - 1) == 2**63 - 1


# -- pure: the state file --------------------------------------------------------------------


def test_state_file_round_trip_is_atomic(tmp_path):
    path = str(tmp_path / "alpha.json")
    save_state(path, "alpha", "10.0.2.2", 7070, {"vm:alpha": 42, "metrics.*": 7})
    assert load_state(path, "alpha", "10.0.2.2", 7070) == ({"vm:alpha": 42, "metrics.*": 7}, None)
    save_state(path, "alpha", "10.0.2.2", 7070, {"vm:alpha": 43}, "0123456789abcdef")
    assert load_state(path, "alpha", "10.0.2.2", 7070) == ({"vm:alpha": 43}, "0123456789abcdef")
    assert os.listdir(tmp_path) == ["alpha.json"]  # no temporary file left behind
    document = json.loads((tmp_path / "alpha.json").read_text())
    assert (document["vm"], document["host"], document["port"]) == ("alpha", "10.0.2.2", 7070)


def test_a_missing_state_file_starts_fresh_quietly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="castra_zmq.guest"):
        assert load_state(str(tmp_path / "none.json"), "alpha", "h", 1) == ({}, None)
    assert caplog.records == []


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not JSON"),
    (b"[]", "not a castra-guest state file"),
    (b'{"format": "something-else"}', "not a castra-guest state file"),
    (encode_state("beta", "10.0.2.2", 7070, {"vm:beta": 5}), "written for vm:beta, not vm:alpha"),
    (encode_state("alpha", "10.0.2.3", 7070, {}), "written for 10.0.2.3:7070, not 10.0.2.2:7070"),
    (encode_state("alpha", "10.0.2.2", 7071, {}), "written for 10.0.2.2:7071, not 10.0.2.2:7070"),
    (encode_state("alpha", "10.0.2.2", 7070, {"t": -1}), "bad position"),
    (encode_state("alpha", "10.0.2.2", 7070, {"t": True}), "bad position"),
    (encode_state("alpha", "10.0.2.2", 7070, {"x" * 257: 1}), "bad position"),
    (encode_state("alpha", "10.0.2.2", 7070, {}).replace(b'"version": 1', b'"version": 2'), "version 2"),
    (b" " * (guest.STATE_MAX_BYTES + 1), "over"),
    (encode_state("alpha", "10.0.2.2", 7070, {}, "x").replace(b'"log": "x"', b'"log": 5'), "bad log"),
], ids=["corrupt", "list", "format", "other-vm", "other-host", "other-port", "negative", "bool", "long-topic",
        "version", "too-large", "log"])
def test_a_corrupt_or_foreign_state_file_is_not_used(tmp_path, caplog, content, reason):
    path = tmp_path / "alpha.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="castra_zmq.guest"):
        assert load_state(str(path), "alpha", "10.0.2.2", 7070) == ({}, None)
    [record] = caplog.records
    assert reason in record.getMessage() and "starting without positions" in record.getMessage()


def test_decode_state_takes_only_its_own_vm_and_host():
    data = encode_state("alpha", "h", 1, {"a": 1})
    assert decode_state(data, "alpha", "h", 1) == ({"a": 1}, None)
    with pytest.raises(ValueError, match="written for vm:alpha"):
        decode_state(data, "beta", "h", 1)


def test_state_file_names_are_never_paths(tmp_path):
    assert state_file_name("alpha") == "alpha.json"
    assert state_file_name("..") == "%2E%2E.json"
    assert state_file_name("a/b") == "%61%2Fb.json"
    assert state_file_name("\u00dcn\u00ef") == "%C3%9Cn%C3%AF.json"
    assert re.fullmatch(r"%%[0-9a-f]{64}\.json", state_file_name("\u00e9" * 128))
    assert default_state_file("alpha", str(tmp_path)) == str(tmp_path / "alpha.json")
    assert default_state_file("alpha", str(tmp_path / "missing")) is None


def test_save_state_raises_when_it_cannot_write(tmp_path):
    with pytest.raises(OSError):
        save_state(str(tmp_path / "missing" / "alpha.json"), "alpha", "h", 1, {"a": 1})


# -- helpers with real sockets -----------------------------------------------------------------


class Gate:
    """A TCP relay on 127.0.0.1 from guests to the router. ``cut()`` ends every relayed
    connection and closes new ones at once (the guest sees the host go away during the
    handshake and retries) until ``open()``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_open = threading.Event()
        self.is_open.set()
        self.lock = threading.Lock()
        self.relayed: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.is_open.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.relayed += [conn, upstream]
            for source, target in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.is_open.clear()
        with self.lock:
            relayed, self.relayed = self.relayed, []
        for sock in relayed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def open(self) -> None:
        self.is_open.set()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def gate(router):
    relay = Gate(router.port)
    yield relay
    relay.close()


def receive_all(bus: GuestSession, count: int, timeout: float = 30.0) -> list[dict]:
    """``count`` messages, all within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    got = []
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{len(got)} of {count} messages within {timeout:g}s")
        try:
            got.append(bus.receive(timeout=left))
        except GuestTimeout:
            continue
    return got


def assert_nothing_more(bus: GuestSession) -> None:
    with pytest.raises(GuestTimeout):
        bus.receive(timeout=0.3)


def quick(**extra):
    """Session options for tests: reconnect fast."""
    return {"backoff_initial": 0.05, "backoff_max": 0.2, "connect_timeout": 5.0, **extra}


# -- against the router ------------------------------------------------------------------------


def test_bus_v2_is_negotiated_and_the_token_is_only_the_token(router):
    with GuestSession("127.0.0.1", router.port, "negotiate") as bus:
        assert bus.bus_protocol == "bus-v2"
        assert re.fullmatch(r"[0-9a-f]{16}", bus.session_token)
    with GuestSession("127.0.0.1", router.port, "negotiate", resume=False) as bus:
        assert bus.bus_protocol == "bus-v1"
        assert re.fullmatch(r"[0-9a-f]{16}", bus.session_token)


def test_a_guest_cut_off_gets_every_message_it_missed_once_in_order(router, gate, caplog):
    """(a) 2,000 host publishes while the guest cannot reach the router: after the
    reconnect the application gets each, once, in seq order, then live ones."""
    with caplog.at_level(logging.INFO, logger="castra_zmq.guest"), \
            GuestSession("127.0.0.1", gate.port, "alpha", **quick()) as bus:
        bus.subscribe("vm:alpha")
        [first] = host_publish(router, "vm:alpha", 1)
        assert bus.receive(timeout=5)["seq"] == first
        assert bus.positions == {"vm:alpha": first}

        gate.cut()
        wait_for(lambda: not bus.connected, what="the guest to see its connection end")
        missed = host_publish(router, "vm:alpha", 2000, start=1)
        assert not bus.connected  # the gate kept it out: what it gets now is replayed
        gate.open()
        got = receive_all(bus, 2000)
        assert [m["seq"] for m in got] == missed
        assert [m["payload"]["n"] for m in got] == list(range(1, 2001))
        live = host_publish(router, "vm:alpha", 5, start=2001)
        assert [m["seq"] for m in receive_all(bus, 5)] == live
        assert_nothing_more(bus)
        assert bus.positions == {"vm:alpha": live[-1]}
    assert f"subscribed to vm:alpha (replay after seq {first})" in caplog.text


def test_a_replay_of_what_is_already_queued_is_dropped(router):
    """(c) Messages read but not yet taken by the application come again after a
    reconnect (the position is what was handed); none reaches it twice."""
    with GuestSession("127.0.0.1", router.port, "dedupe", **quick()) as bus:
        bus.subscribe("vm:dedupe")
        sent = host_publish(router, "vm:dedupe", 500)
        assert [m["seq"] for m in receive_all(bus, 100)] == sent[:100]
        wait_for(lambda: len(bus._inbox) == 400, what="the other 400 read by the session")
        token = bus.session_token
        guest._shutdown(bus._sock)  # the connection ends under the session
        wait_for(lambda: bus.connected and bus.session_token != token, what="a new session")
        more = host_publish(router, "vm:dedupe", 100, start=500)
        got = receive_all(bus, 500)
        assert [m["seq"] for m in got] == sent[100:] + more
        assert_nothing_more(bus)
        assert bus.duplicates == 400  # the replay after sent[99]: everything that was queued
        assert bus.positions == {"vm:dedupe": more[-1]}


def test_positions_survive_a_restart_through_the_state_file(router, tmp_path):
    """(b) An agent restart: what the first session did not hand over, and what was
    published while none ran, reaches the second one once, in order."""
    state_file = tmp_path / "restart.json"
    with GuestSession("127.0.0.1", router.port, "restart", state_file=state_file, **quick()) as first:
        first.subscribe("vm:restart")
        sent = host_publish(router, "vm:restart", 20)
        assert [m["seq"] for m in receive_all(first, 10)] == sent[:10]
    saved = json.loads(state_file.read_text())
    assert saved["positions"] == {"vm:restart": sent[9]}
    assert (saved["vm"], saved["host"], saved["port"]) == ("restart", "127.0.0.1", router.port)

    missed = host_publish(router, "vm:restart", 2000, start=20)
    with GuestSession("127.0.0.1", router.port, "restart", subscribe=["vm:restart"], state_file=state_file,
                      **quick()) as second:
        assert second.positions == {"vm:restart": sent[9]}  # read from the file
        got = receive_all(second, 2010)
        assert [m["seq"] for m in got] == sent[10:] + missed
        assert [m["payload"]["n"] for m in got] == list(range(10, 2020))
        assert_nothing_more(second)
        # Written while messages flow, not only at close.
        wait_for(lambda: json.loads(state_file.read_text())["positions"] == {"vm:restart": missed[-1]},
                 what="the state file at the last position")
    assert json.loads(state_file.read_text())["positions"] == {"vm:restart": missed[-1]}


def test_a_foreign_state_file_is_replaced_and_an_unwritable_one_only_warned_about(router, tmp_path, caplog):
    foreign = tmp_path / "foreign.json"
    save_state(str(foreign), "someone-else", "127.0.0.1", router.port, {"vm:someone-else": 7})
    unwritable = tmp_path / "missing" / "state.json"
    last = {}
    with caplog.at_level(logging.WARNING, logger="castra_zmq.guest"):
        for path in (foreign, unwritable):
            with GuestSession("127.0.0.1", router.port, "owner", state_file=path, **quick()) as bus:
                bus.subscribe("vm:owner")
                sent = host_publish(router, "vm:owner", 3)
                assert [m["seq"] for m in receive_all(bus, 3)] == sent  # the session goes on regardless
                assert bus.positions == {"vm:owner": sent[-1]}
                last[path] = sent[-1]
    document = json.loads(foreign.read_text())
    assert (document["vm"], document["positions"]) == ("owner", {"vm:owner": last[foreign]})
    assert "written for vm:someone-else, not vm:owner" in caplog.text
    assert caplog.text.count(f"cannot write the state file {unwritable}") == 1  # once, not per attempt


def test_positions_of_another_log_are_dropped_not_replayed(router, tmp_path, caplog):
    """A VM moved to another host (or a state root made again) behind the same
    address: its positions are seqs of another log. The router names its log in
    the bus-v2 answer; the session drops positions of another one and starts live,
    instead of replaying this log's unrelated messages after those seqs."""
    unrelated = host_publish(router, "vm:moved", 5)
    state_file = tmp_path / "moved.json"
    save_state(str(state_file), "moved", "127.0.0.1", router.port, {"vm:moved": 0}, "0000000000000000")
    log_id = json.loads((router.state_root / "state" / "log.json").read_text())["id"]
    with caplog.at_level(logging.WARNING, logger="castra_zmq.guest"), \
            GuestSession("127.0.0.1", router.port, "moved", state_file=state_file, **quick()) as bus:
        bus.subscribe("vm:moved")  # from the file's position, were it of this log
        sent = host_publish(router, "vm:moved", 3, start=5)
        got = receive_all(bus, 3)
        assert [m["seq"] for m in got] == sent and not set(unrelated) & {m["seq"] for m in got}
        assert_nothing_more(bus)
    assert "positions were taken on another router log" in caplog.text
    saved = json.loads(state_file.read_text())
    assert (saved["log"], saved["positions"]) == (log_id, {"vm:moved": sent[-1]})


def test_positions_follow_the_log_they_were_taken_on():
    positions = Positions({"t": 5})
    assert not positions.move_to(None) and positions.last == {"t": 5}  # the router does not say
    assert not positions.move_to("aa") and (positions.log, positions.last) == ("aa", {"t": 5})  # first told
    assert not positions.move_to("aa")
    assert positions.move_to("bb") and (positions.log, positions.last) == ("bb", {})


def test_a_host_log_behind_the_position_resets_it(router, tmp_path, caplog):
    """A state file from a router whose log is gone (a new state root): the ack's
    lower since becomes the position, and new messages are not taken for repeats."""
    state_file = tmp_path / "behind.json"
    save_state(str(state_file), "behind", "127.0.0.1", router.port, {"vm:behind": 10**9})
    with caplog.at_level(logging.WARNING, logger="castra_zmq.guest"), \
            GuestSession("127.0.0.1", router.port, "behind", state_file=state_file, **quick()) as bus:
        bus.subscribe("vm:behind")  # not held yet: resumes from the file's position
        assert bus.positions["vm:behind"] < 10**9
        sent = host_publish(router, "vm:behind", 3)
        assert [m["seq"] for m in receive_all(bus, 3)] == sent
    assert "the host's log ends at seq" in caplog.text


def test_an_expired_since_skips_the_gap_with_a_warning(router_factory, tmp_path, caplog):
    """Messages rotated away (compressed) cannot be replayed: a warning names the gap
    and the session goes on from the oldest message left, by itself."""
    router = router_factory()
    state_file = tmp_path / "rot.json"
    with GuestSession("127.0.0.1", router.port, "rot", state_file=state_file, **quick()) as first:
        first.subscribe("rot")
        old = host_publish(router, "rot", 30)
        assert [m["seq"] for m in receive_all(first, 10)] == old[:10]
    os.rename(router.logs / "bus.log", router.logs / "bus.log.1")

    def new_log() -> bool:
        host_publish(router, "rot.probe", 1)
        return (router.logs / "bus.log").exists()

    wait_for(new_log, timeout=10, what="a new bus.log")
    left = host_publish(router, "rot", 50, start=30)
    os.rename(router.logs / "bus.log.1", router.logs / "bus.log.1.gz")  # compressed: gone for replay
    oldest = min(seq for seq, _ in segments(router.logs))

    with caplog.at_level(logging.INFO, logger="castra_zmq.guest"):
        # Resumed from the state file on connect (the reader's path)...
        with GuestSession("127.0.0.1", router.port, "rot", subscribe=["rot"], state_file=state_file,
                          **quick()) as second:
            assert [m["seq"] for m in receive_all(second, 50)] == left
            assert_nothing_more(second)
        assert (f"rot: messages after seq {old[9]} up to seq {oldest - 1} are no longer in the host's logs "
                f"and are lost; resuming from seq {oldest}") in caplog.text
        # ... and from an explicit since (the caller's path).
        with GuestSession("127.0.0.1", router.port, "rot2", **quick()) as third:
            ack = third.subscribe("rot", since=old[9])
            assert (ack["status"], ack["since"]) == ("ok", oldest - 1)
            assert [m["seq"] for m in receive_all(third, 50)] == left
            assert third.positions == {"rot": left[-1]}


def test_a_fresh_topic_starts_live_and_since_starts_where_asked(router):
    sent = host_publish(router, "fresh", 5)
    with GuestSession("127.0.0.1", router.port, "fresh", **quick()) as bus:
        ack = bus.subscribe("fresh")
        # Live, with a position at once: where the log ends (a reboot before any
        # message on it would otherwise lose what comes meanwhile).
        head = ack["seq"]
        assert ack["since"] == head >= sent[-1] and bus.positions == {"fresh": head}
        assert_nothing_more(bus)
        ack = bus.subscribe("fresh*", since=sent[2])  # replays from sent[3] on
        assert (ack["since"], bus.positions) == (sent[2], {"fresh": head, "fresh*": sent[2]})
        assert [m["seq"] for m in receive_all(bus, 2)] == sent[3:]
        later = host_publish(router, "fresh", 1, start=5)
        assert [m["seq"] for m in receive_all(bus, 1)] == later  # once, though both match
        assert_nothing_more(bus)
        assert bus.positions == {"fresh": later[0], "fresh*": later[0]}
        bus.unsubscribe("fresh")
        assert bus.positions == {"fresh*": later[0]}


# -- a bus-v1 host ---------------------------------------------------------------------------


def read_frame(conn: socket.socket) -> dict | None:
    stream = conn.makefile("rb")
    try:
        return guest.read_frame(stream)
    except guest.ConnectionLost:
        return None
    finally:
        stream.close()


def frame(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


@pytest.fixture
def v1_host():
    """A host that speaks bus-v1 only, on loopback: it records what each connection
    sends, answers subscribes and delivers ``deliveries[n]`` on connection n (then
    closes it, but for the last)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[list] = []  # per connection: the hello line, then the frames
    deliveries = [[{"type": "message", "topic": "vm:old", "from": "host", "ts_ms": 1, "seq": 5, "payload": 1}],
                  [{"type": "message", "topic": "vm:old", "from": "host", "ts_ms": 2, "seq": 3, "payload": 2}]]
    stop = threading.Event()

    def serve() -> None:
        for number in range(len(deliveries)):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                conn.sendall(b"castra-broker 0.0.9 ready capabilities=bus-v1\n")
                hello = b""
                while not hello.endswith(b"\n"):
                    hello += conn.recv(1)
                seen.append([hello.decode()])
                conn.sendall(b"ok session=0123456789abcdef\n")
                subscribe = read_frame(conn)
                seen[-1].append(subscribe)
                conn.sendall(frame({"type": "ack", "ack": "subscribe", "status": "ok",
                                    "topic": subscribe["topic"]}))
                for message in deliveries[number]:
                    conn.sendall(frame(message))
                if number == len(deliveries) - 1:
                    stop.wait(10)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], seen
    stop.set()
    listener.close()


def test_a_bus_v1_host_gets_bus_v1_bytes_and_every_message(v1_host):
    port, seen = v1_host
    with GuestSession("127.0.0.1", port, "old", subscribe=["vm:old"], **quick()) as bus:
        assert bus.receive(timeout=5)["seq"] == 5
        # The host closed; on the next connection the subscribe has no since, and a
        # lower seq (its log began again) is still handed: bus-v1 replays nothing.
        assert bus.receive(timeout=5)["seq"] == 3
        assert bus.bus_protocol == "bus-v1" and bus.session_token == "0123456789abcdef"
        assert bus.positions == {"vm:old": 3}
    assert [connection[0] for connection in seen] == ["hello vm:old capabilities=bus-v1,bus-v2\n"] * 2
    assert [connection[1] for connection in seen] == [{"type": "subscribe", "topic": "vm:old"}] * 2


# -- castra-guest agent ------------------------------------------------------------------------


def test_agent_restart_with_a_state_file_prints_each_message_once(router, tmp_path):
    state_file = tmp_path / "agent.json"
    command = [*GUEST_CLI, "agent", "--subscribe", "vm:agent", "--state-file", str(state_file),
               "--backoff", "0.1", "--backoff-max", "0.2"]
    env = guest_env(router.port, "agent")

    def run_agent(expected: list[int]) -> list[int]:
        agent = Child(command, env)
        try:
            agent.stderr.wait("subscribed to vm:agent")
            if not expected:  # live from here: the topic had no position yet
                expected += host_publish(router, "vm:agent", 50)
            wait_for(lambda: len(agent.stdout.lines) >= len(expected), timeout=30,
                     what=f"{len(expected)} messages printed (stderr: {agent.stderr.lines})")
            assert agent.terminate() == 0
        finally:
            if agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait(5)
        return [message["seq"] for message in agent.stdout.json()]

    first = []
    assert run_agent(first) == first
    assert json.loads(state_file.read_text())["positions"] == {"vm:agent": first[-1]}
    missed = host_publish(router, "vm:agent", 1000, start=50)
    assert run_agent(list(missed)) == missed


def test_agent_help_documents_the_state_file():
    result = run([*GUEST_CLI, "agent", "--help"], environment())
    assert result.returncode == 0
    assert b"--state-file PATH" in result.stdout and b"/var/lib/castra-guest/<vm>.json" in result.stdout
    assert b"castra-guest agent --subscribe vm:alpha --state-file /var/lib/castra-guest/alpha.json" in result.stdout


def test_agent_state_file_default_needs_a_writable_directory(tmp_path, monkeypatch):
    target = guest.Target("127.0.0.1", 7070, "alpha", None)

    def state_file(*options: str) -> str | None:
        return guest.agent_state_file(guest.build_parser().parse_args(["agent", *options]), target)

    monkeypatch.setattr(guest, "STATE_DIR", str(tmp_path / "absent"))
    assert state_file() is None
    monkeypatch.setattr(guest, "STATE_DIR", str(tmp_path))
    assert state_file() == str(tmp_path / "alpha.json")
    assert state_file("--no-state-file") is None
    assert state_file("--state-file", "/x.json") == "/x.json"


def ask_handover(router, request: HandoverRequest) -> None:
    """Send ``request`` to the router's bridge as the uplink sends it (PROTOCOL.md 8.2.1)."""
    with zmq.Context() as context, context.socket(zmq.DEALER) as uplink:
        uplink.linger = 1000
        uplink.connect(Endpoints(router.state_root).journal)
        uplink.send_multipart([b"", HANDOVER_VERB, json_encode(request)])


def test_a_session_is_handed_one_move_once(router):
    """A second request for a VM whose session got a handover is of the same move
    (found in CI: the uplink claimed the VM again from a release that carried the
    first request on, and the bridge sent the lines twice): reported delivered, not sent."""
    sent = host_publish(router, "vm:twice", 2)
    with connect_bus(router.port, "twice") as guest:
        assert guest.subscribe("vm:twice")["status"] == "ok"
        ask_handover(router, HandoverRequest("twice", after=sent[0] - 1, local_upto=0, claim=1))
        assert [guest.recv_until(lambda frame: frame["type"] == "message")["seq"] for _ in sent] == sent
        ask_handover(router, HandoverRequest("twice", after=sent[0] - 1, local_upto=0, claim=2))
        again = "handover not handed again vm=twice reason=its session had a handover already claim=2"
        wait_for(lambda: again in router.log_text(), timeout=10, what="the second request answered")
        with pytest.raises(TimeoutError):
            guest.recv(timeout=0.5)


@pytest.mark.parametrize("pattern", ["vm:*", "*"])
def test_a_handover_goes_to_a_session_subscribed_through_a_pattern(router, pattern):
    """A session that has its VM's topic through a pattern (``vm:*``: its own topic
    only without a grant; ``*``) is handed its move's messages as one subscribed to
    it exactly, in seq order before what comes live."""
    vm = "pat" + str(len(pattern))
    sent = host_publish(router, f"vm:{vm}", 2)
    ask_handover(router, HandoverRequest(vm, after=sent[0] - 1, local_upto=0, claim=1))
    wait_for(lambda: f"handover kept for the VM's next session vm={vm}" in router.log_text(), timeout=10,
             what="the bridge has the handover")
    with connect_bus(router.port, vm) as guest:
        assert guest.subscribe(pattern)["status"] == "ok"
        live = host_publish(router, f"vm:{vm}", 1, start=2)
        got = [guest.recv_until(lambda frame: frame["type"] == "message" and frame["topic"] == f"vm:{vm}")["seq"]
               for _ in range(3)]
        assert got == sent + live


def test_a_vm_that_moved_here_gets_its_handover_through_the_library(router):
    """What the uplink asks when a VM moves here (PROTOCOL.md 8.2.1), sent to the
    bridge as the uplink sends it: the lines of vm:<vm> the host it left had not
    committed. They are at seqs below where this log ends when the library
    subscribes (its first position here), and still reach the application, once."""
    sent = host_publish(router, "vm:mover", 3)
    ask_handover(router, HandoverRequest("mover", after=sent[0] - 1, local_upto=0))
    wait_for(lambda: "handover kept for the VM's next session vm=mover" in router.log_text(), timeout=10,
             what="the bridge has the handover")
    with GuestSession("127.0.0.1", router.port, "mover", subscribe=["vm:mover"], **quick()) as bus:
        assert [m["seq"] for m in receive_all(bus, 3)] == sent
        live = host_publish(router, "vm:mover", 1, start=3)
        assert [m["seq"] for m in receive_all(bus, 1)] == live
        assert_nothing_more(bus)
        assert bus.duplicates == 0


def test_a_reboot_before_any_message_loses_nothing(router, tmp_path):
    """The case resume is for: an agent subscribes at boot, nothing comes, the guest
    reboots, the operator publishes a command meanwhile; the agent gets it."""
    state = tmp_path / "reboot.json"
    with GuestSession("127.0.0.1", router.port, "reboot", state_file=state, **quick()) as bus:
        bus.subscribe("vm:reboot")
    command = host_publish(router, "vm:reboot", 1)  # while it is down
    with GuestSession("127.0.0.1", router.port, "reboot", state_file=state, subscribe=["vm:reboot"],
                      **quick()) as bus:
        assert [m["seq"] for m in receive_all(bus, 1)] == command
        assert_nothing_more(bus)
