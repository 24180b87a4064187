"""A VM moving between hosts gets what was sent to it meanwhile (issue 14).

Every host's ``bus.log`` holds every host's messages, so the host a VM moves to
has the messages to ``vm:<vm>`` sent while it was between hosts; what it lacks is
knowing which of them the VM was already sent where it was. The release record
says it (``ownership.Release``: the host's seq and the other hosts' marks when the
VM's last session there closed). When the uplink claims a VM from a release it
asks the bridge (``wire.HandoverRequest``, PROTOCOL.md 8.2.1) to deliver the lines
of ``vm:<vm>`` that are beyond those marks, from a bounded start: the first line
this host committed ``HANDOVER_MARGIN_MS`` before the release (both hosts' clocks
in it), so a line the old host lacked and this one committed earlier than that
is not delivered.

The bridge holds at most ``HANDOVERS_MAX`` pending handovers, one per VM (a
newer one replaces it), each for ``HANDOVER_TTL_S``, each at most
``MARKS_MAX + 1`` marks (under 40 KiB). The first session of the VM that is
subscribed to ``vm:<vm>`` (exactly or through a pattern; now, or when it subscribes) takes it: a catch-up
(``resume.Catchup``) reads the log from the start to the seq committed when the
session subscribed, and queues the lines the handover wants, in seq order before
what comes live after them; lines after that seq come live as usual, so none is
delivered twice, and a later one the old host had (this host's download
behind) is not delivered live either. Its reading and queueing are a resume's: steps of 1 ms, only
while the guest's outbound queue has room.

**A bridge restart.** The uplink keeps each request it sent (``PendingHandovers``,
the same bounds; also in ``state/handovers.json``, for its own restart) until the
bridge reports on the bus (``events.HandoverEvent``) that a session was sent all
of it, or that it dropped it; it sends them all again when the bridge's health
event shows another ``started_ms`` (a restarted bridge).
A request names its claim (``claim``: the claim's revision in ``CASTRA_VMS``): a
bridge hands a claim to its VM's sessions once. One killed while it delivers may
deliver it again once restarted (at least once under a crash). A VM released
here before its handover was delivered carries it on: the release says where
the host it left stood, not this host's log (``ownership.carried_release``).

**A host gone.** A host whose liveness key is gone released nothing; each uplink
puts a checkpoint of its log (``ownership.HostCheckpoint``: its seq and marks,
every ``CHECKPOINT_INTERVAL_S`` while they move) in ``CASTRA_VMS``, and a
takeover asks for the handover from it as from a release
(``ownership.checkpoint_release``): what the dead host committed after its last
checkpoint may come twice.

Runs in: the uplink (the request) and the bridge (the delivery).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from .events import now_ms
from .wire import HandoverRequest, LogRecord, Origin

if TYPE_CHECKING:  # the bridge imports this module, and needs no NATS client
    from .ownership import VmOwner

HANDOVERS_MAX = 1024  # pending in the bridge, one per VM; the oldest goes first
HANDOVER_TTL_S = 300.0  # a handover no session of its VM took by then is dropped
HANDOVER_MARGIN_MS = 60_000  # read from this long before the release (clock skew, downloads behind)


def handover_request(vm: str, released: VmOwner, host: str, epoch: int, after: int,
                     claim: int = 0) -> HandoverRequest:
    """What to ask the bridge for ``vm``, claimed by ``host`` (its seq space
    ``epoch``; the claim's revision ``claim``) from the release ``released``,
    reading after seq ``after``. The releasing host's own lines are marked by its
    seq at the release; this host's lines by its mark there, if of this epoch (an
    older epoch's seqs are not ours)."""
    marks = dict(released.release.marks)
    marks[released.host] = (released.epoch, released.release.seq)
    mine = marks.pop(host, None)
    local_upto = mine[1] if mine is not None and mine[0] == epoch else 0
    return HandoverRequest(vm, after, local_upto, marks, claim)


class Handover:
    """One VM's pending handover, as the bridge holds it."""

    def __init__(self, request: HandoverRequest, received: float):
        self.request = request
        self.received = received  # monotonic

    def wants(self, record: LogRecord) -> bool:
        """Whether a ``vm:<vm>`` line is beyond the marks: the old host had not committed it."""
        if record.origin is None:
            return record.seq > self.request.local_upto
        return not self.had(record.origin)

    def had(self, origin: Origin) -> bool:
        """Whether the old host had committed the message of ``origin`` (another
        host's): it was sent to the VM there. Such a message committed here only
        after the VM subscribed is not delivered live either (``Bridge.deliver``)."""
        mark = self.request.marks.get(origin.host)
        return mark is not None and (origin.epoch, origin.seq) <= tuple(mark)


class Handovers:
    """The pending handovers, by VM: at most ``HANDOVERS_MAX``, each for
    ``HANDOVER_TTL_S``; and the claims handed to a session, the last per VM (at
    most ``HANDOVERS_MAX``), so that a request sent again is not handed again."""

    def __init__(self) -> None:
        self.pending: collections.OrderedDict[str, Handover] = collections.OrderedDict()
        self.handed: collections.OrderedDict[str, tuple[int, bool]] = collections.OrderedDict()  # vm -> claim, done

    def add(self, request: HandoverRequest) -> list[Handover]:
        """Keep ``request`` for its VM's next session; the oldest ones dropped for it."""
        self.pending.pop(request.vm, None)
        self.pending[request.vm] = Handover(request, time.monotonic())
        dropped = []
        while len(self.pending) > HANDOVERS_MAX:
            dropped.append(self.pending.popitem(last=False)[1])
        return dropped

    def take(self, vm: str) -> Handover | None:
        self.expire()
        return self.pending.pop(vm, None)

    def expire(self) -> list[Handover]:
        """Drop what is older than ``HANDOVER_TTL_S``; the handovers dropped."""
        limit = time.monotonic() - HANDOVER_TTL_S
        dropped = []
        while self.pending and next(iter(self.pending.values())).received < limit:
            dropped.append(self.pending.popitem(last=False)[1])
        return dropped

    def handing(self, request: HandoverRequest, done: bool) -> None:
        """``request`` was given to a session (``done``: all of it was sent)."""
        if request.claim:
            self.handed.pop(request.vm, None)
            self.handed[request.vm] = (request.claim, done)
            while len(self.handed) > HANDOVERS_MAX:
                self.handed.popitem(last=False)

    def handed_state(self, request: HandoverRequest) -> bool | None:
        """Whether ``request``'s claim was given to a session (True: all of it
        sent; False: being sent); None: not (or a request without a claim)."""
        handed = self.handed.get(request.vm)
        if not request.claim or handed is None or handed[0] < request.claim:
            return None
        return handed[1]

    def unhand(self, request: HandoverRequest) -> None:
        """Its session closed before all of it was sent: it may be handed again."""
        if self.handed.get(request.vm, (0, False))[0] == request.claim:
            del self.handed[request.vm]


class PendingHandover(msgspec.Struct, frozen=True):
    """A request the uplink sent, with the release's time (a release carrying it
    on keeps it) and its claim's (Unix ms: it outlives the uplink, in
    ``state/handovers.json``)."""

    request: HandoverRequest
    since_ms: int
    claimed_ms: int


class PendingHandovers:
    """The uplink's requests the bridge has not reported delivered or dropped, by
    VM: at most ``HANDOVERS_MAX``, each for ``HANDOVER_TTL_S`` from its claim (as
    the bridge holds them). ``dirty``: changed since last encoded."""

    def __init__(self, entries: Sequence[PendingHandover] = ()) -> None:
        self.pending: collections.OrderedDict[str, PendingHandover] = collections.OrderedDict()
        for entry in entries[-HANDOVERS_MAX:]:
            self.pending[entry.request.vm] = entry
        self.dirty = False
        self.expire()

    def add(self, request: HandoverRequest, since_ms: int) -> None:
        self.pending.pop(request.vm, None)
        self.pending[request.vm] = PendingHandover(request, since_ms, now_ms())
        while len(self.pending) > HANDOVERS_MAX:
            self.pending.popitem(last=False)
        self.dirty = True

    def get(self, vm: str) -> PendingHandover | None:
        self.expire()
        return self.pending.get(vm)

    def settle(self, vm: str, claim: int) -> bool:
        """The bridge is done with ``vm``'s request of ``claim``; whether it was pending."""
        pending = self.pending.get(vm)
        if pending is None or pending.request.claim != claim:
            return False
        del self.pending[vm]
        self.dirty = True
        return True

    def discard(self, vm: str) -> None:
        if self.pending.pop(vm, None) is not None:
            self.dirty = True

    def all(self) -> list[HandoverRequest]:
        self.expire()
        return [pending.request for pending in self.pending.values()]

    def expire(self) -> None:
        limit = now_ms() - int(HANDOVER_TTL_S * 1000)
        while self.pending and next(iter(self.pending.values())).claimed_ms < limit:
            self.pending.popitem(last=False)
            self.dirty = True

    def encode(self) -> bytes:
        self.dirty = False
        return _encode_pending(list(self.pending.values()))


_encode_pending = msgspec.json.Encoder().encode
_decode_pending = msgspec.json.Decoder(list[PendingHandover]).decode


def decode_pending(data: bytes) -> PendingHandovers:
    """``state/handovers.json`` as ``PendingHandovers.encode`` wrote it;
    ``msgspec.DecodeError`` otherwise."""
    return PendingHandovers(_decode_pending(data))
