"""Ownership's pure part (``castra_zmq.ownership``): VM names as KV keys, the
records, and the rule for claiming. No sockets, no server."""

from __future__ import annotations

import nats.js.kv
import pytest
from hypothesis import given
from hypothesis import strategies as st

from castra_zmq.federation import host_key
from castra_zmq.handshake import is_vm_name
from castra_zmq.ownership import (
    MARKS_MAX,
    ClaimAction,
    OwnershipError,
    OwnerState,
    Release,
    VmOwner,
    claim_action,
    decode_owner,
    encode_owner,
    release_of,
    vm_key,
    vm_of_key,
)

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
