"""Where each VM lives in the fleet, the pure part: the key-value buckets' names and
settings, VM names as keys, the ownership record and the rules for claiming one
(issue 14). No sockets: the uplink's ``claims`` half does the I/O.

Two JetStream key-value buckets, replicated like the stream:

* ``CASTRA_VMS``: ``<vm key>`` -> ``VmOwner`` (JSON): which host owns the VM, since
  when, and, once released, where the releasing host's ``bus.log`` stood when the
  VM's last session there closed (``Release``: the new owner delivers what was sent
  to the VM beyond that, see ``handover``). Also, under ``checkpoint_key(host)``
  (a key no VM has), each host's ``HostCheckpoint``: where its ``bus.log`` stood
  lately, the release of the VMs taken over from it once it is gone.
* ``CASTRA_HOSTS``: ``<host token>`` -> ``HostAlive``, put by each uplink every
  ``ALIVE_INTERVAL_S``; the bucket's max age (``ALIVE_TTL_S``) removes the key of a
  host whose uplink stopped. A VM owned by a host without a key is stale: another
  host may take it over. No cluster protocol of our own: JetStream's max age is the
  failure detector, and it errs on the side of waiting (a host away from NATS for
  longer than the TTL loses its VMs to whoever claims them; the VMs it still has
  connected then show as conflicts in its log and status).

**Keys.** A KV key allows only ``[-/_=.a-zA-Z0-9]`` (a NATS subject token each
``.``); VM names are up to 128 printable Unicode characters. A name's letters,
digits, ``-`` and ``_`` stand for themselves; every other character is its UTF-8
bytes as ``=XX`` (uppercase hex): ``beta`` -> ``beta``, ``web.1`` -> ``web=2E1``,
``é`` -> ``=C3=A9``. One key per name, one name per key (decoding refuses any other
spelling).

**Claims.** A host claims a VM when a guest of that name opens a bus session there
(``claim_action``): ``kv.create`` when the key is absent; ``kv.update`` with the
revision it read (compare-and-set) when the record is this host's (an uplink
restarted), released, or its owner's liveness key is gone. Otherwise it waits: a
VM owned by a live host is never taken (two hosts never both own one; the bucket's
revision check settles a race). The last session closing releases it, with the
same compare-and-set.

Runs in: the uplink role, ``castra status --fleet`` and the tests.
"""

from __future__ import annotations

import enum
import re

import msgspec
from nats.js.api import KeyValueConfig, StorageType

from .federation import HOSTS_BUCKET, OWNERS_BUCKET, STREAM_REPLICAS, FederationError, host_key
from .handshake import MAX_NAME
from .wire import Count, HandoverRequest, HostName

ALIVE_INTERVAL_S = 2.0  # how often an uplink puts its liveness key
ALIVE_TTL_S = 15.0  # a host's key is gone this long after its last put: its VMs may be taken over
CHECKPOINT_INTERVAL_S = 5.0  # at most this often an uplink puts its log's checkpoint (only when it moved)
# A host's checkpoint key in CASTRA_VMS: a VM's key never has a "." (vm_key escapes it).
CHECKPOINT_KEY_PREFIX = "host."
OWNER_VALUE_MAX = 64 * 1024  # bytes of one record (a release's marks are its bulk)
OWNERS_BUCKET_BYTES = 256 * 1024**2
# A release lists at most this many other hosts' marks (each at most 253 + 45 bytes of JSON).
# A host left out counts as one whose messages the releasing host had none of (they may come twice).
MARKS_MAX = 128

_PLAIN_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_KEY_ESCAPE = re.compile(r"=([0-9A-F]{2})")

Mark = tuple[int, int]  # (epoch, seq) of an origin host, as origins.OriginMarks


class OwnerState(str, enum.Enum):
    OWNED = "owned"
    RELEASED = "released"


class Release(msgspec.Struct, frozen=True):
    """Where the releasing host's ``bus.log`` stood when the VM's last session there
    closed: its own seq (``seq``, of its ``epoch``) and, per other host, the last of
    that host's messages it had committed (``marks``). What any host committed
    beyond these marks the VM had not been sent there."""

    seq: Count
    marks: dict[HostName, Mark] = {}


class VmOwner(msgspec.Struct, frozen=True, omit_defaults=True):
    """A ``CASTRA_VMS`` record: the VM's host, that host's epoch, owned or released,
    since when (Unix ms), and with a release where its host's log stood."""

    host: HostName
    epoch: Count
    state: OwnerState
    since_ms: Count
    release: Release | None = None


class HostAlive(msgspec.Struct, frozen=True):
    """A ``CASTRA_HOSTS`` record: an uplink's latest sign of life."""

    host: HostName
    epoch: Count
    ts_ms: Count


class HostCheckpoint(msgspec.Struct, frozen=True):
    """A ``CASTRA_VMS`` record under ``checkpoint_key(host)``: where host ``host``'s
    ``bus.log`` stood at ``ts_ms`` (its seq, of ``epoch``, and its marks of the
    other hosts), put every ``CHECKPOINT_INTERVAL_S`` while that moves. A VM taken
    over from the host once it is gone is handed over from there."""

    host: HostName
    epoch: Count
    ts_ms: Count
    release: Release


class ClaimAction(str, enum.Enum):
    CREATE = "create"  # no record: kv.create
    UPDATE = "update"  # this host's, released, or stale: kv.update(last=revision)
    WAIT = "wait"  # owned by another live host: watch until released


_encode = msgspec.json.Encoder().encode
_decode_owner = msgspec.json.Decoder(VmOwner).decode
_decode_alive = msgspec.json.Decoder(HostAlive).decode
_decode_checkpoint = msgspec.json.Decoder(HostCheckpoint).decode


class OwnershipError(FederationError):
    """A key or record of the buckets that castra did not write."""


def vm_key(vm: str) -> str:
    """``vm``'s key in ``CASTRA_VMS`` (see the module's docstring)."""
    return "".join(char if char in _PLAIN_KEY else "".join(f"={byte:02X}" for byte in char.encode())
                   for char in vm)


def vm_of_key(key: str) -> str:
    """The VM name ``vm_key`` made ``key`` from; ``OwnershipError`` otherwise."""
    try:
        name = _KEY_ESCAPE.sub(lambda match: chr(int(match.group(1), 16)), key).encode("latin-1").decode()
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise OwnershipError(f"not a castra VM key: {key[:80]!r}") from None
    if not name or len(name) > MAX_NAME or vm_key(name) != key:
        raise OwnershipError(f"not a castra VM key: {key[:80]!r}")
    return name


def encode_owner(owner: VmOwner) -> bytes:
    return _encode(owner)


def decode_owner(data: bytes) -> VmOwner:
    return _decoded(_decode_owner, data, "VM record")


def checkpoint_key(host: str) -> str:
    """Host ``host``'s checkpoint key in ``CASTRA_VMS`` (no VM's key has a dot)."""
    return CHECKPOINT_KEY_PREFIX + host_key(host)


def is_checkpoint_key(key: str) -> bool:
    return key.startswith(CHECKPOINT_KEY_PREFIX)


def encode_checkpoint(checkpoint: HostCheckpoint) -> bytes:
    return _encode(checkpoint)


def decode_checkpoint(data: bytes) -> HostCheckpoint:
    return _decoded(_decode_checkpoint, data, "host checkpoint")


def encode_alive(alive: HostAlive) -> bytes:
    return _encode(alive)


def decode_alive(data: bytes) -> HostAlive:
    return _decoded(_decode_alive, data, "host record")


def _decoded(decode, data: bytes, what: str):
    try:
        return decode(data)
    except msgspec.DecodeError as exc:
        raise OwnershipError(f"not a castra {what}: {exc}") from None


def claim_action(current: VmOwner | None, host: str, owner_alive: bool) -> ClaimAction:
    """What host ``host`` does to own a VM whose record is ``current`` (None:
    none), ``owner_alive`` telling whether the owner's liveness key is there."""
    if current is None:
        return ClaimAction.CREATE
    if current.host == host or current.state is OwnerState.RELEASED or not owner_alive:
        return ClaimAction.UPDATE
    return ClaimAction.WAIT


def release_of(seq: int, marks: dict[str, Mark]) -> Release:
    """A release at this host's ``seq`` with the other hosts' ``marks``, at most
    ``MARKS_MAX`` of them (the last ones a host was first seen in)."""
    kept = dict(list(marks.items())[-MARKS_MAX:])
    return Release(seq, kept)


def carried_release(request: HandoverRequest) -> Release:
    """The release of a VM leaving this host before its handover ``request`` was
    delivered: the VM was sent none of it here (it never subscribed to its topic),
    so the release says what the host it came from had: this host's own lines up
    to ``local_upto``, the others' (that host's included) up to ``marks``."""
    return release_of(request.local_upto, dict(request.marks))


def checkpoint_release(checkpoint: HostCheckpoint) -> VmOwner:
    """A host gone released nothing: its last checkpoint stands for the release
    of each VM taken over from it."""
    return VmOwner(checkpoint.host, checkpoint.epoch, OwnerState.RELEASED, checkpoint.ts_ms, checkpoint.release)


def owners_config() -> KeyValueConfig:
    return KeyValueConfig(bucket=OWNERS_BUCKET, history=1, replicas=STREAM_REPLICAS, storage=StorageType.FILE,
                          max_value_size=OWNER_VALUE_MAX, max_bytes=OWNERS_BUCKET_BYTES)


def hosts_config() -> KeyValueConfig:
    return KeyValueConfig(bucket=HOSTS_BUCKET, history=1, replicas=STREAM_REPLICAS, storage=StorageType.FILE,
                          ttl=ALIVE_TTL_S, max_value_size=1024)

