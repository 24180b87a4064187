"""Every message shape castra-zmq speaks, declared once as ``msgspec.Struct``.

Three families:

* guest frames (JSON objects tagged on ``"type"``) and the broker's replies, as in
  PROTOCOL.md section 2. Replies are compact JSON with ``type`` first: guests match
  substrings such as ``"type":"ack"`` and ``"status":"ok"``;
* the bus log record (PROTOCOL.md section 4);
* the internal bus bodies carried through the ZeroMQ proxy (see ``topics``).

Payloads are ``msgspec.Raw``: the JSON bytes a guest sent pass through to the log and
to subscribers without being decoded and re-encoded. The Structs made per message are
``gc=False``: they never hold a reference cycle, and untracked objects neither
trigger nor lengthen the cyclic garbage collector's passes.

Runs in: every process that speaks the bus: the bridge, the journal, host tools, the
CLI.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import msgspec

from .errors import ConfigError, FrameError, FrameRejected
from .handshake import MAX_NAME

MAX_FRAME = 65536
MAX_TOPIC = 256
MAX_SUBSCRIPTIONS = 16
SUBSCRIBE_ALL = "*"
DEFAULT_TOPIC = "broadcast"
NULL = msgspec.Raw(b"null")

# A NUL would let one topic frame be the prefix of another (see topics.py).
Topic = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOPIC, pattern="^[^\x00]*$")]
MAX_ID = 1024  # characters: the ack echoes the id, so the ack stays under MAX_FRAME too
MessageId = Annotated[str, msgspec.Meta(max_length=MAX_ID)] | int | None


# -- guest -> broker ---------------------------------------------------------------


class GuestFrame(msgspec.Struct, tag_field="type", gc=False):
    """Base of the frames a guest sends in bus mode."""


class Publish(GuestFrame, tag="publish"):
    topic: Topic = DEFAULT_TOPIC
    payload: msgspec.Raw = NULL
    id: MessageId = None


class Subscribe(GuestFrame, tag="subscribe"):
    topic: Topic
    # bus-v2 (PROTOCOL.md 4.3.1), checked by the session: in bus-v1 an unknown
    # field, so any JSON value is taken and ignored, as before it existed.
    since: Any = None


class Unsubscribe(GuestFrame, tag="unsubscribe"):
    topic: Topic


class Heartbeat(GuestFrame, tag="heartbeat"):
    pass


class Acknowledge(GuestFrame, tag="ack"):
    """A guest's receipt for a delivered message; it needs no reply."""

    seq: int | None = None
    id: MessageId = None


GUEST_FRAME_TYPES = ("publish", "subscribe", "unsubscribe", "heartbeat", "ack")
_guest_decoder = msgspec.json.Decoder(Publish | Subscribe | Unsubscribe | Heartbeat | Acknowledge)


def decode_guest_frame(body: bytes) -> GuestFrame:
    """Decode one frame body.

    Raises ``FrameError`` for bodies that are not a JSON object with a string
    ``type`` (the guest gets ``{"type":"error",...}``) and ``FrameRejected`` for a
    known object shape with bad fields or an unknown ``type`` (an error ack).
    """
    # msgspec does not check the UTF-8 of strings it skips or keeps raw (payloads,
    # unknown fields), so the whole body is checked once: no invalid byte gets logged.
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("invalid JSON: frame is not UTF-8 JSON") from None
    try:
        return _guest_decoder.decode(body)
    except msgspec.ValidationError as exc:
        validation_error = str(exc)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise FrameError("invalid JSON: frame is not UTF-8 JSON") from None
    except RecursionError:
        raise FrameError("invalid JSON: nested too deeply") from None
    # The slow path only runs for rejected frames: find out which answer they get.
    # The typed decoder stops at the first bad field, so the rest may not be JSON.
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise FrameError("invalid JSON: frame is not UTF-8 JSON") from None
    except RecursionError:
        raise FrameError("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object")
    frame_type = obj.get("type")
    if frame_type is None:
        raise FrameError("missing type")
    if not isinstance(frame_type, str):
        raise FrameError("type must be a string")
    if frame_type not in GUEST_FRAME_TYPES:
        raise FrameRejected(frame_type[:MAX_TOPIC], "unknown type")
    raise FrameRejected(frame_type, validation_error)


def compact_payload(payload: bytes) -> bytes:
    """Return ``payload`` as single-line JSON, so it fits in one log line.

    A raw newline can only be whitespace between JSON tokens (inside strings it must
    be escaped), so most payloads pass through untouched.
    """
    if b"\n" in payload or b"\r" in payload:
        return msgspec.json.format(payload, indent=0)
    return payload


# -- broker -> guest ---------------------------------------------------------------


class Reply(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    """Base of the frames the broker sends; ``type`` is always encoded first."""


class AckReply(Reply, tag="ack"):
    ack: str
    status: str
    topic: str | None = None
    seq: int | None = None
    since: int | None = None  # bus-v2 subscribe: where replay starts (seq is where it ends)
    id: MessageId = None
    reason: str | None = None
    oldest: int | None = None  # bus-v2 subscribe refused as "since expired": the oldest seq left


class ErrorReply(Reply, tag="error"):
    reason: str


class Delivery(Reply, tag="message"):
    """A committed message pushed to a subscribed guest or a host tool."""

    topic: str
    sender: str = msgspec.field(name="from")
    ts_ms: int = 0
    seq: int = 0
    payload: msgspec.Raw = NULL


# -- bus log -----------------------------------------------------------------------

MAX_HOST_NAME = 253  # a DNS name's length
# msgspec searches the pattern: \Z, since $ would also match before a final newline.
HostName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HOST_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")]


def check_host_name(name: str) -> str:
    """``name`` if it may name a host in the fleet: 1 to 253 letters, digits, ``.``,
    ``_`` or ``-``, starting with a letter or digit (a DNS name fits). It is the
    first part of every message id, so it never holds the ``:`` that separates them."""
    try:
        return msgspec.convert(name, HostName)
    except msgspec.ValidationError:
        raise ConfigError(f"host name {name[:80]!r} is not 1-{MAX_HOST_NAME} letters, digits, '.', '_' "
                          "or '-' starting with a letter or digit: choose one with --host-name") from None
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Origin(msgspec.Struct, frozen=True, gc=False):
    """Where a message committed on another host of the fleet comes from (issue
    14): that host, its seq space (``epoch``) and the message's seq there."""

    host: HostName
    epoch: Count
    seq: Count

    @property
    def message_id(self) -> str:
        """Its ``Nats-Msg-Id`` in the federation's stream."""
        return f"{self.host}:{self.epoch}:{self.seq}"


class LogRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """One line of ``logs/bus/*.log``. ``origin`` only in a line of a message from
    another host (PROTOCOL.md 7.2): a local line's bytes are as they always were."""

    timestamp: float
    ts_ms: int
    seq: int
    vm: str
    topic: str
    payload: msgspec.Raw
    origin: Origin | None = None


# -- internal bus bodies -----------------------------------------------------------


class PublishRequest(msgspec.Struct, omit_defaults=True, gc=False):
    """One publish of a host tool to the bridge's host socket (``run/journal.sock``,
    PROTOCOL.md 8.2), alone or in an array of them: the whole batch is one frame.

    ``deadline`` is a ``time.monotonic()`` value: CLOCK_MONOTONIC is one clock for
    every process of the host, so the bridge can refuse work its sender gave up on.
    ``origin``: a message of another host, which the uplink hands in; it is
    committed once per origin (a second time it gets ``DUPLICATE``).
    """

    corr: int
    vm: str
    topic: str
    deadline: float
    payload: msgspec.Raw
    origin: Origin | None = None


HANDOVER_VERB = b"handover"  # the frame before a HandoverRequest's body (PROTOCOL.md 8.2.1)


class HandoverRequest(msgspec.Struct, frozen=True, gc=False):
    """The uplink to the bridge (``run/journal.sock``, PROTOCOL.md 8.2.1): VM ``vm``
    was claimed on this host from a release (``ownership``). Its session is to get
    the messages to ``vm:<vm>`` of ``bus.log`` after seq ``after`` that the host it
    left had not committed when it left: this host's own above ``local_upto``,
    another host's above that host's mark in ``marks`` (``(epoch, seq)``; none: all).
    ``claim``: the revision of this host's claim of ``vm`` in ``CASTRA_VMS``, which
    names the request (the uplink sends it again to a restarted bridge; a bridge
    does not hand over a claim twice)."""

    vm: str
    after: Count
    local_upto: Count
    marks: dict[HostName, tuple[Count, Count]] = {}
    claim: Count = 0


# A JSON string of a name or topic takes at most 6 bytes per character (``\u001f``).
_JSON_BYTES_PER_CHAR = 6
_REQUEST_OVERHEAD = 128  # "corr", "deadline", the keys and the punctuation, at their widest
_ORIGIN_OVERHEAD = 96  # "origin", its keys, two 19-digit counts and the punctuation
PUBLISH_REQUEST_MAX = (_REQUEST_OVERHEAD + _JSON_BYTES_PER_CHAR * (MAX_NAME + MAX_TOPIC) + MAX_FRAME
                       + _ORIGIN_OVERHEAD + MAX_HOST_NAME)
"""The largest useful PublishRequest: a guest frame's payload, the sender and
topic encoded at their widest and an origin (a batch must take one)."""


_TS_MS_WIDEST = 10**13 - 1  # unix ms have 13 digits until the year 2286
_ONE_BYTE = msgspec.Raw(b"0")  # not NULL: a payload left at its default is not encoded


@functools.lru_cache(maxsize=4096)  # called for every message, with few distinct topics and senders
def _delivery_envelope_bytes(topic: str, sender: str) -> int:
    """A Delivery's JSON size less its payload and its ``seq`` digits."""
    return len(json_encode(Delivery(topic, sender, _TS_MS_WIDEST, 1, _ONE_BYTE))) - 2


def delivery_bytes(topic: str, sender: str, payload_bytes: int, seq: int) -> int:
    """The size of a message's Delivery JSON: the body of its guest frame, which
    PROTOCOL.md limits to ``MAX_FRAME`` bytes."""
    return _delivery_envelope_bytes(topic, sender) + payload_bytes + len(str(seq))



MESSAGE_TOO_LARGE = "message too large"
"""The reason a publish is refused when its delivery would not fit in a guest frame."""

COMMIT_TIMEOUT = "commit_timeout"
"""A host tool's publish read after its deadline: not committed, may be sent again."""

LOG_WRITE_FAILED = "log_write_failed"
"""How the reason of a commit that could not be written starts (``log_write_failed: <why>``)."""

DUPLICATE = "duplicate"
"""The result of a message from another host that ``bus.log`` already holds (its
origin at or below the last one committed from that host): not committed again."""

BUS_MESSAGE_MAX = MAX_FRAME + 4 * (MAX_TOPIC + MAX_NAME) + 16
"""The largest message the bridge puts on the bus: a Delivery, its topic frame and
its sender (UTF-8: at most 4 bytes a character); its events stay under it too."""


class CommitResult(msgspec.Struct, array_like=True, gc=False):
    """Outcome of one publish: ``seq`` when committed, ``reason`` when not."""

    corr: int
    seq: int | None = None
    reason: str | None = None


class CommitBatch(msgspec.Struct, gc=False):
    """The answer to one host tool for one commit: the results of its publishes."""

    results: list[CommitResult]


json_encode = msgspec.json.Encoder().encode
decode_publish_requests = msgspec.json.Decoder(PublishRequest | list[PublishRequest]).decode
decode_commit_batch = msgspec.json.Decoder(CommitBatch).decode
decode_handover_request = msgspec.json.Decoder(HandoverRequest).decode
decode_delivery = msgspec.json.Decoder(Delivery).decode
decode_log_record = msgspec.json.Decoder(LogRecord).decode
_log_lines_decoder = msgspec.json.Decoder(list[LogRecord])


PAYLOAD_ALWAYS_FITS = MAX_FRAME - delivery_bytes("\x01" * MAX_TOPIC, "vm:" + "\x01" * MAX_NAME, 0, 2**63 - 1)
"""A payload of at most this many bytes fits in a delivery of any topic, sender and
seq (each character of the widest escaped as ``\\u0001``): most need no ``delivery_bytes``."""


def decode_log_lines(data: bytes) -> list[LogRecord]:
    """The records of whole log lines (each ends with its newline) in one decode:
    a payload is compact JSON, so a newline only ever ends a line."""
    return _log_lines_decoder.decode(b"[" + data[:-1].replace(b"\n", b",") + b"]") if data else []
