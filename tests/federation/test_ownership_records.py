"""Ownership's pure part (``castra_zmq.ownership``): VM names as KV keys, the
records, and the rule for claiming. No sockets, no server."""

from __future__ import annotations

import time
from types import SimpleNamespace

import nats.js.kv
import pytest
from hypothesis import given
from hypothesis import strategies as st

from castra_zmq import handover as handover_module
from castra_zmq.claims import MarkTracker
from castra_zmq.endpoints import Endpoints
from castra_zmq.events import now_ms
from castra_zmq.federation import host_key
from castra_zmq.handover import (
    HANDOVER_TTL_S,
    HANDOVERS_MAX,
    Handover,
    Handovers,
    PendingHandovers,
    decode_pending,
    handover_request,
)
from castra_zmq.handshake import is_vm_name
from castra_zmq.ownership import (
    MARKS_MAX,
    ClaimAction,
    HostCheckpoint,
    OwnershipError,
    OwnerState,
    Release,
    VmOwner,
    carried_release,
    checkpoint_key,
    checkpoint_release,
    claim_action,
    decode_checkpoint,
    decode_owner,
    encode_checkpoint,
    encode_owner,
    is_checkpoint_key,
    release_of,
    vm_key,
    vm_of_key,
)
from castra_zmq.wire import HandoverRequest, LogRecord, decode_log_record

vm_names = st.text(min_size=1, max_size=128).filter(is_vm_name)


@pytest.mark.parametrize(("vm", "key"), [
    ("beta", "beta"),
    ("web-1_a", "web-1_a"),
    ("web.1", "web=2E1"),
    ("a=b", "a=3Db"),
    ("a b", "a=20b"),
    ("é", "=C3=A9"),
    ("vm/x", "vm=2Fx"),
])
def test_vm_keys(vm, key):
    assert vm_key(vm) == key
    assert vm_of_key(key) == vm


@given(vm_names)
def test_every_vm_name_is_one_valid_key_and_back(vm):
    key = vm_key(vm)
    assert nats.js.kv._is_key_valid(key) and "." not in key
    assert vm_of_key(key) == vm


@pytest.mark.parametrize("key", ["", "=2e", "=41", "=C3", "a=", "=ZZ", "x" * 129])
def test_keys_castra_does_not_make_are_refused(key):
    with pytest.raises(OwnershipError):
        vm_of_key(key)


def test_host_keys_are_valid_keys():
    assert host_key("node-1.example") == "node-1=2Eexample"
    assert nats.js.kv._is_key_valid(host_key("a" * 253))


def test_record_json_shape():
    owned = VmOwner("a", 7, OwnerState.OWNED, 1000)
    assert encode_owner(owned) == b'{"host":"a","epoch":7,"state":"owned","since_ms":1000}'
    released = VmOwner("a", 7, OwnerState.RELEASED, 2000, Release(42, {"b": (3, 9)}))
    assert encode_owner(released) == (b'{"host":"a","epoch":7,"state":"released","since_ms":2000,'
                                      b'"release":{"seq":42,"marks":{"b":[3,9]}}}')
    assert decode_owner(encode_owner(released)) == released
    with pytest.raises(OwnershipError):
        decode_owner(b'{"host":"a b","epoch":7,"state":"owned","since_ms":1}')


@pytest.mark.parametrize(("current", "alive", "action"), [
    (None, True, ClaimAction.CREATE),
    (VmOwner("me", 1, OwnerState.OWNED, 1), True, ClaimAction.UPDATE),  # an uplink restarted
    (VmOwner("other", 1, OwnerState.RELEASED, 1), True, ClaimAction.UPDATE),
    (VmOwner("other", 1, OwnerState.OWNED, 1), False, ClaimAction.UPDATE),  # its host is gone
    (VmOwner("other", 1, OwnerState.OWNED, 1), True, ClaimAction.WAIT),
])
def test_claim_action(current, alive, action):
    assert claim_action(current, "me", alive) is action


def test_a_release_keeps_at_most_marks_max_hosts():
    marks = {f"h{n}": (1, n) for n in range(MARKS_MAX + 10)}
    release = release_of(5, marks)
    assert release.seq == 5 and len(release.marks) == MARKS_MAX
    assert release.marks[f"h{MARKS_MAX + 9}"] == (1, MARKS_MAX + 9)


def log_line(seq: int, origin: tuple[str, int, int] | None = None, payload: bytes = b'{"n":1}') -> bytes:
    line = b'{"timestamp":1.0,"ts_ms":1000,"seq":%d,"vm":"host","topic":"vm:beta","payload":%s' % (seq, payload)
    if origin is not None:
        line += b',"origin":{"host":"%s","epoch":%d,"seq":%d}' % (origin[0].encode(), origin[1], origin[2])
    return line + b"}\n"


def log_record(seq: int, origin: tuple[str, int, int] | None = None, payload: bytes = b'{"n":1}') -> LogRecord:
    return decode_log_record(log_line(seq, origin, payload))


def test_a_handover_request_marks_each_hosts_messages_the_old_host_had():
    released = VmOwner("a", 5, OwnerState.RELEASED, 9000, Release(40, {"b": (7, 12), "c": (3, 30)}))
    request = handover_request("beta", released, "b", 7, 100)
    assert (request.vm, request.after, request.local_upto) == ("beta", 100, 12)
    assert request.marks == {"a": (5, 40), "c": (3, 30)}
    # This host's mark of an older epoch: none of its present seqs were had.
    assert handover_request("beta", released, "b", 8, 100).local_upto == 0
    # Claimed back by the host that released it: its own lines up to the release.
    again = handover_request("beta", released, "a", 5, 100)
    assert again.local_upto == 40 and "a" not in again.marks


def test_a_handover_wants_the_lines_beyond_the_marks():
    handover = Handover(HandoverRequest("beta", 100, 12, {"a": (5, 40), "c": (3, 30)}), 0.0)
    assert not handover.wants(log_record(12)) and handover.wants(log_record(13))  # this host's
    assert not handover.wants(log_record(200, ("a", 5, 40)))
    assert handover.wants(log_record(201, ("a", 5, 41)))
    assert handover.wants(log_record(202, ("a", 6, 1)))  # a's next epoch
    assert not handover.wants(log_record(203, ("c", 2, 999)))  # c's older epoch
    assert handover.wants(log_record(204, ("d", 1, 1)))  # a host the old one had nothing of
    # A payload that looks like an origin is not one.
    assert handover.wants(log_record(14, payload=b'{"origin":{"host":"a","epoch":5,"seq":1}}'))


def test_pending_handovers_are_bounded_one_per_vm(monkeypatch):
    handovers = Handovers()
    for n in range(HANDOVERS_MAX + 5):
        handovers.add(HandoverRequest(f"vm{n}", n, 0))
    handovers.add(HandoverRequest("vm10", 99, 0))  # replaces the older one of the VM
    assert len(handovers.pending) == HANDOVERS_MAX
    assert handovers.take("vm0") is None  # the oldest went first
    assert handovers.take("vm10").request.after == 99
    later = time.monotonic() + HANDOVER_TTL_S + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert len(handovers.expire()) == HANDOVERS_MAX - 1 and not handovers.pending


def test_a_claim_handed_to_a_session_is_not_handed_again():
    handovers = Handovers()
    request = HandoverRequest("beta", 10, 0, claim=7)
    assert handovers.handed_state(request) is None
    handovers.handing(request, done=False)
    assert handovers.handed_state(request) is False  # being sent
    assert handovers.handed_state(HandoverRequest("beta", 10, 0, claim=6)) is False  # an older claim
    assert handovers.handed_state(HandoverRequest("beta", 10, 0, claim=8)) is None  # a newer claim: a new move
    handovers.handing(request, done=True)
    assert handovers.handed_state(request) is True
    handovers.unhand(request)
    assert handovers.handed_state(request) is None
    handovers.handing(HandoverRequest("gamma", 1, 0), done=True)  # no claim: not remembered
    assert "gamma" not in handovers.handed


def test_the_uplink_keeps_its_requests_until_settled_bounded(monkeypatch):
    pending = PendingHandovers()
    for n in range(HANDOVERS_MAX + 5):
        pending.add(HandoverRequest(f"vm{n}", n, 0, claim=n + 1), since_ms=1000 + n)
    assert len(pending.all()) == HANDOVERS_MAX and pending.get("vm0") is None
    assert not pending.settle("vm10", 99)  # another claim's report
    assert pending.settle("vm10", 11) and pending.get("vm10") is None
    assert pending.get("vm11").since_ms == 1011
    kept = decode_pending(pending.encode())  # state/handovers.json: across an uplink restart
    assert list(kept.pending.items()) == list(pending.pending.items()) and not kept.dirty
    later = now_ms() + int(HANDOVER_TTL_S * 1000) + 1
    monkeypatch.setattr(handover_module, "now_ms", lambda: later)
    assert pending.all() == [] and pending.dirty
    assert decode_pending(kept.encode()).pending == {}


def test_a_release_carries_on_a_handover_not_delivered():
    """beta left a (a's seq 2210, c's mark), was claimed by b (epoch 7) and left b
    before its handover was delivered: b's release says what a had, so the next host
    hands over the same lines."""
    released_by_a = VmOwner("a", 5, OwnerState.RELEASED, 1, Release(2210, {"b": (7, 300), "c": (9, 930)}))
    request = handover_request("beta", released_by_a, "b", 7, after=100, claim=3)
    carried = carried_release(request)
    assert carried == Release(300, {"c": (9, 930), "a": (5, 2210)})
    again = handover_request("beta", VmOwner("b", 7, OwnerState.RELEASED, 1, carried), "d", 2, after=50)
    assert again.marks == {"c": (9, 930), "a": (5, 2210), "b": (7, 300)} and again.local_upto == 0


def test_a_host_checkpoint_has_a_key_no_vm_has_and_stands_for_a_release():
    key = checkpoint_key("a.example")
    assert key == "host.a=2Eexample" and is_checkpoint_key(key) and nats.js.kv._is_key_valid(key)
    with pytest.raises(OwnershipError):
        vm_of_key(key)
    checkpoint = HostCheckpoint("a", 5, 1796191219002, Release(2210, {"c": (9, 930)}))
    assert encode_checkpoint(checkpoint) == (b'{"host":"a","epoch":5,"ts_ms":1796191219002,'
                                             b'"release":{"seq":2210,"marks":{"c":[9,930]}}}')
    assert decode_checkpoint(encode_checkpoint(checkpoint)) == checkpoint
    request = handover_request("beta", checkpoint_release(checkpoint), "b", 7, after=40)
    assert (request.marks, request.local_upto) == ({"c": (9, 930), "a": (5, 2210)}, 0)
    with pytest.raises(OwnershipError):
        decode_checkpoint(b'{"host":"a"}')


def test_a_pending_handover_and_a_checkpoint_stay_under_40_kib():
    """README's bounds: a request of MARKS_MAX + 1 marks of the longest host names
    (253 characters), the longest VM name (each character 4 bytes of UTF-8) and the
    largest numbers, as the uplink keeps it, and a checkpoint of MARKS_MAX such marks."""
    big = 2**63 - 1
    marks = {f"{n:03d}" + "h" * 250: (big, big) for n in range(MARKS_MAX + 1)}
    pending = PendingHandovers()
    pending.add(HandoverRequest("\U0001F600" * 128, big, big, marks, big), since_ms=big)
    assert len(pending.encode()) < 40 * 1024
    checkpoint = HostCheckpoint("h" * 253, big, big, release_of(big, marks))
    assert len(encode_checkpoint(checkpoint)) < 40 * 1024


@given(vm_names)
def test_no_vm_key_is_a_checkpoint_key(vm):
    assert not is_checkpoint_key(vm_key(vm))


def test_the_mark_tracker_gives_the_marks_at_a_seq_not_after_it(tmp_path):
    """What a release carries: the other hosts' marks at the close's seq, read from
    bus.log (no sockets)."""
    endpoints = Endpoints(tmp_path)
    endpoints.logs_dir.mkdir(parents=True)
    lines = [log_line(1), log_line(2, ("c", 3, 7)), log_line(3, ("d", 1, 2)), log_line(4, ("c", 3, 8)), log_line(5)]
    endpoints.bus_log.write_bytes(b"".join(lines))
    tracker = MarkTracker(SimpleNamespace(endpoints=endpoints))
    assert tracker.marks_at(1) == {}
    assert tracker.marks_at(3) == {"c": (3, 7), "d": (1, 2)}
    assert tracker.marks_at(5) == {"c": (3, 8), "d": (1, 2)}
    assert tracker.marks_at(4) == {"c": (3, 8), "d": (1, 2)}  # past it already: where it is
