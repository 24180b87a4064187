"""Federation on NATS JetStream, the pure part: subjects, message ids, headers and
the stream's settings (issue 14). No sockets: the uplink role does the I/O.

A message committed on host ``<origin>`` is published to JetStream as

    castra.v1.<origin token>.<topic token>[.<topic token>...]

The topic is cut at each ``.`` (``metrics.cpu`` -> ``metrics.cpu``: subject
wildcards then work on topic prefixes), and each piece, like the host name, is made
one NATS token by **token escaping**:

* the printable ASCII characters other than ``%``, ``.``, ``*`` and ``>`` stand for
  themselves (``vm:beta`` -> ``vm:beta``, ``broadcast`` -> ``broadcast``);
* every other character (space and other whitespace, controls, DEL, ``%``, ``.``,
  ``*``, ``>``, anything beyond ASCII) is its UTF-8 bytes as ``%XX``, uppercase hex
  (``a b`` -> ``a%20b``, ``host.example`` -> ``host%2Eexample``, ``é`` -> ``%C3%A9``);
* the empty string (a topic ``a..b`` has an empty piece) is a lone ``%``, which no
  other name gives, since a ``%`` of a name is always ``%25``.

So a token never holds ``.``, ``*``, ``>``, whitespace or a control, each name has
exactly one token (decoding refuses any other spelling: a filter on one host's
subjects catches all of its messages), and decoding gives the name back.

Each message carries ``Nats-Msg-Id: <origin>:<epoch>:<seq>`` (JetStream drops a
second message with the same id within the stream's duplicate window) and the
origin headers below. ``seq`` is the seq of the line in the origin's ``bus.log``;
``epoch`` names that seq space: it changes when a host's seqs start again from 1
(a new state root), so an id is never reused.

Runs in: the uplink role (``uplink.py``), and the tests.
"""

from __future__ import annotations

import datetime
import re

import msgspec
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .errors import CastraError
from .wire import LogRecord, Origin, decode_log_record

SUBJECT_ROOT = "castra.v1"
STREAM_NAME = "CASTRA"
# The key-value buckets of where each VM lives (``ownership``).
OWNERS_BUCKET = "CASTRA_VMS"
HOSTS_BUCKET = "CASTRA_HOSTS"
STREAM_SUBJECTS = f"{SUBJECT_ROOT}.>"
# Replicated on three servers: a message the stream acked survives the loss of any one.
STREAM_REPLICAS = 3
STREAM_MAX_AGE_S = 7 * 24 * 3600.0  # what a host that was away longer misses is gone
STREAM_MAX_BYTES = 8 * 1024**3
# The stream's duplicate window: a message resent within it (an uplink killed
# between publish and ack, then restarted) is stored once.
STREAM_DUPLICATE_WINDOW_S = 120.0

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_ORIGIN = "Castra-Origin"
HEADER_ORIGIN_EPOCH = "Castra-Origin-Epoch"
HEADER_ORIGIN_SEQ = "Castra-Origin-Seq"
# A message handed to a host's bridge is acked (with every one before it: AckPolicy.ALL)
# once committed; it comes again only after this, or when the consumer is made again.
CONSUMER_ACK_WAIT_S = 60.0
CONSUMER_MAX_ACK_PENDING = 1024
# nats-server 2.11+: the publish is refused (error 10071, "wrong last sequence")
# unless the last message on the subjects matching the filter has this stream seq.
HEADER_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last check
# nats-server 2.12+, on a stream with ``allow_atomic``: messages with the same batch id,
# numbered from 1, are stored together when the one marked commit arrives, or none is
# (a gap in the numbers, a failed check, a duplicate id: error 10176, 10071, 10201).
HEADER_BATCH_ID = "Nats-Batch-Id"
HEADER_BATCH_SEQUENCE = "Nats-Batch-Sequence"
HEADER_BATCH_COMMIT = "Nats-Batch-Commit"
UPLOAD_BATCH_MAX = 1000  # messages in one atomic batch: nats-server's limit


_PLAIN = frozenset(map(chr, range(0x21, 0x7F))) - set("%.*>")  # printable ASCII but the space
_EMPTY_TOKEN = "%"
_ESCAPE = re.compile(r"%([0-9A-F]{2})")


class FederationError(CastraError):
    """A subject, message id or header set that castra did not make."""


class SubjectParts(msgspec.Struct, frozen=True):
    """What a message's subject says: the host it was committed on, and its topic."""

    origin: str
    topic: str


def escape_token(name: str) -> str:
    """``name`` as one NATS subject token (see the module's docstring)."""
    if not name:
        return _EMPTY_TOKEN
    if all(char in _PLAIN for char in name):
        return name
    return "".join(char if char in _PLAIN else "".join(f"%{byte:02X}" for byte in char.encode())
                   for char in name)


def unescape_token(token: str) -> str:
    """The name ``escape_token`` made ``token`` from; ``FederationError`` for any
    token it does not make (a stray ``%``, lowercase hex, an escaped plain
    character, bytes that are not UTF-8)."""
    if token == _EMPTY_TOKEN:
        return ""
    try:
        name = _ESCAPE.sub(lambda match: chr(int(match.group(1), 16)), token).encode("latin-1").decode()
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise FederationError(f"not a castra subject token: {token!r}") from None
    if escape_token(name) != token:
        raise FederationError(f"not a castra subject token: {token!r}")
    return name


def message_subject(origin: str, topic: str) -> str:
    """The subject of a message on ``topic`` committed on host ``origin``."""
    return ".".join((SUBJECT_ROOT, escape_token(origin), *map(escape_token, topic.split("."))))


def origin_filter(origin: str) -> str:
    """The subject filter for every message committed on host ``origin``."""
    return f"{SUBJECT_ROOT}.{escape_token(origin)}.>"


def parse_subject(subject: str) -> SubjectParts:
    """The origin and topic of a message subject (``message_subject`` reversed)."""
    tokens = subject.split(".")
    if len(tokens) < 4 or ".".join(tokens[:2]) != SUBJECT_ROOT:
        raise FederationError(f"not a castra message subject: {subject[:80]!r}")
    return SubjectParts(unescape_token(tokens[2]), ".".join(map(unescape_token, tokens[3:])))


def host_key(host: str) -> str:
    """Host ``host``'s liveness key in the bucket ``CASTRA_HOSTS`` (``ownership``):
    host names are letters, digits, ``.``, ``_`` and ``-``, all of them key
    characters, but a ``.`` splits a key in tokens: it is ``=2E``, as in VM keys."""
    return host.replace(".", "=2E")


def consumer_name(host: str) -> str:
    """The durable consumer through which host ``host`` gets the others' messages:
    one per host, named after it (a host name's ``.`` is not allowed in a
    consumer name, so it is the host's token)."""
    return f"castra-{escape_token(host)}"


def consumer_config(host: str, *, after_stream_seq: int | None = None, start_ms: int = 0) -> ConsumerConfig:
    """Host ``host``'s durable consumer: every message of the stream (its own are
    skipped by the uplink: a subject filter cannot leave one host out), in stream
    order, acked a batch at a time. It starts after ``after_stream_seq`` (its ack
    floor when it is made again), or, made the first time, at ``start_ms``: the
    messages committed since the host joined (its epoch), not the stream's days
    of history."""
    if after_stream_seq is not None:
        start = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after_stream_seq + 1}
    else:
        start = {"deliver_policy": DeliverPolicy.BY_START_TIME,
                 "opt_start_time": datetime.datetime.fromtimestamp(start_ms / 1000, datetime.timezone.utc)}
    return ConsumerConfig(durable_name=consumer_name(host), filter_subject=STREAM_SUBJECTS, ack_policy=AckPolicy.ALL,
                          ack_wait=CONSUMER_ACK_WAIT_S, max_ack_pending=CONSUMER_MAX_ACK_PENDING, max_deliver=-1,
                          **start)


def uplink_permissions(host: str) -> dict[str, list[str]]:
    """What host ``host``'s uplink must be allowed on NATS, and nothing more: publish
    under its own subjects only, the JetStream API calls it makes (the stream's
    info, creation, a last-message lookup; its own consumer's info, deletion,
    creation, fetches and acks), the two buckets of ``ownership`` (their info,
    creation and reads; a write to any VM's key, since VMs move, but only to its
    own liveness key; the watch of the owners), and replies on its inboxes; and what
    ``castra bus tail --fleet`` needs on that host with the same credentials: an
    ephemeral consumer (``CONSUMER.CREATE`` without a name) and its flow-control
    replies. For a server's ``permissions`` block (README "Many hosts"); checked
    against nats-server in tests/federation/test_security.py."""
    consumer = consumer_name(host)
    api = "$JS.API"
    buckets = []
    for bucket in (OWNERS_BUCKET, HOSTS_BUCKET):
        stream = f"KV_{bucket}"
        buckets += [f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.CREATE.{stream}",
                    f"{api}.STREAM.MSG.GET.{stream}"]
    owners = f"KV_{OWNERS_BUCKET}"
    buckets += [f"$KV.{OWNERS_BUCKET}.>", f"$KV.{HOSTS_BUCKET}.{host_key(host)}",
                f"{api}.CONSUMER.CREATE.{owners}", f"{api}.CONSUMER.INFO.{owners}.>",
                f"$JS.FC.{owners}.>"]  # the watch's flow control replies: under load only, not seen in the tests
    return {
        "publish": [origin_filter(host),
                    f"{api}.STREAM.INFO.{STREAM_NAME}", f"{api}.STREAM.CREATE.{STREAM_NAME}",
                    f"{api}.STREAM.MSG.GET.{STREAM_NAME}",
                    f"{api}.CONSUMER.INFO.{STREAM_NAME}.{consumer}", f"{api}.CONSUMER.DELETE.{STREAM_NAME}.{consumer}",
                    f"{api}.CONSUMER.DURABLE.CREATE.{STREAM_NAME}.{consumer}",
                    f"{api}.CONSUMER.MSG.NEXT.{STREAM_NAME}.{consumer}",
                    f"$JS.ACK.{STREAM_NAME}.{consumer}.>",
                    f"{api}.CONSUMER.CREATE.{STREAM_NAME}", f"$JS.FC.{STREAM_NAME}.>", *buckets],
        "subscribe": ["_INBOX.>"],
    }


class RemoteMessage(msgspec.Struct, frozen=True):
    """A message another host committed, as its bridge commits it here."""

    origin: Origin
    vm: str  # the sender's bare name on its host, or ``host``
    topic: str
    payload: msgspec.Raw


def stream_record(subject: str, headers: dict[str, str] | None, data: bytes) -> tuple[Origin, LogRecord]:
    """What a message of the stream says: its origin, and the origin's log line;
    ``FederationError`` if castra did not make it: its origin headers, its subject
    and its body must agree, and the line must be that host's own (a line with an
    origin was delivered to it, and uploading it would be a loop)."""
    origin = origin_of(headers)
    parts = parse_subject(subject)
    try:
        record = decode_log_record(data + b"\n")
    except msgspec.DecodeError as exc:
        raise FederationError(f"{origin.message_id}: not a bus log line: {exc}") from None
    if (parts.origin, parts.topic, record.seq) != (origin.host, record.topic, origin.seq):
        raise FederationError(f"{origin.message_id}: its subject {subject[:80]!r} or line is not of its origin")
    if record.origin is not None:
        raise FederationError(f"{origin.message_id}: a message of {record.origin.host} uploaded again")
    return origin, record


def remote_message(subject: str, headers: dict[str, str] | None, data: bytes) -> RemoteMessage:
    """A message of the stream as this host's bridge commits it (``stream_record``)."""
    origin, record = stream_record(subject, headers, data)
    return RemoteMessage(origin, record.vm, record.topic, record.payload)


def stream_config() -> StreamConfig:
    """The stream every host uploads to (created by the first uplink that finds none)."""
    return StreamConfig(
        name=STREAM_NAME,
        subjects=[STREAM_SUBJECTS],
        storage=StorageType.FILE,
        num_replicas=STREAM_REPLICAS,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=STREAM_MAX_AGE_S,
        max_bytes=STREAM_MAX_BYTES,
        duplicate_window=STREAM_DUPLICATE_WINDOW_S,
        allow_atomic=True,
    )


def upload_headers(origin: Origin, expected_last_subject_seq: int | None) -> dict[str, str]:
    """The headers of an upload: its id, its origin, and unless None the ordering
    check that the last message from this host in the stream is the one at stream
    seq ``expected_last_subject_seq`` (0: none yet)."""
    headers = {
        HEADER_MSG_ID: origin.message_id,
        HEADER_ORIGIN: origin.host,
        HEADER_ORIGIN_EPOCH: str(origin.epoch),
        HEADER_ORIGIN_SEQ: str(origin.seq),
    }
    if expected_last_subject_seq is not None:
        headers[HEADER_EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_subject_seq)
        headers[HEADER_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = origin_filter(origin.host)
    return headers


def batch_upload_headers(origins: list[Origin], expected_last_subject_seq: int, batch_id: str) -> list[dict[str, str]]:
    """The headers of an atomic batch of uploads, one host's messages in its seq
    order: each one's id and origin, the batch id and its place in the batch, the
    ordering check on the first and the commit mark on the last. The server checks
    the first's expectation against the stream as it was before the batch, when it
    commits, and stores the whole batch in a row or none of it: so the one check
    orders the batch after this host's previous message, and each message of it
    after the one before."""
    headers = []
    for index, origin in enumerate(origins, 1):
        each = upload_headers(origin, expected_last_subject_seq if index == 1 else None)
        each[HEADER_BATCH_ID] = batch_id
        each[HEADER_BATCH_SEQUENCE] = str(index)
        headers.append(each)
    headers[-1][HEADER_BATCH_COMMIT] = "1"
    return headers


def origin_of(headers: dict[str, str] | None) -> Origin:
    """The origin a stored message's headers give; ``FederationError`` if they
    do not give one, or disagree with its message id."""
    headers = headers or {}
    try:
        origin = msgspec.convert({"host": headers[HEADER_ORIGIN], "epoch": int(headers[HEADER_ORIGIN_EPOCH]),
                                  "seq": int(headers[HEADER_ORIGIN_SEQ])}, Origin)
    except msgspec.ValidationError as exc:  # a ValueError too: first
        raise FederationError(f"invalid castra origin headers: {exc}") from None
    except (KeyError, ValueError):
        raise FederationError("message without castra origin headers") from None
    if headers.get(HEADER_MSG_ID) != origin.message_id:
        raise FederationError(f"message id {headers.get(HEADER_MSG_ID)!r} is not {origin.message_id!r}")
    return origin


def resume_after(last: Origin | None, epoch: int, committed_seq: int) -> int | None:
    """The seq of this host's log after which to upload, given ``last``, the last
    message of this host in the stream, and ``committed_seq``, the log's last.

    0 when the stream has none, or only one of another epoch (a seq space this
    host left: an earlier state root): the whole log goes up. ``last.seq`` when it
    is of this epoch. None when that seq is past the log's end: the log started
    again below what was uploaded (its files removed, ``state/uplink.json`` kept),
    so its seqs need a new epoch, or their ids would be taken for the old ones.
    """
    if last is None or last.epoch != epoch:
        return 0
    return last.seq if last.seq <= committed_seq else None
