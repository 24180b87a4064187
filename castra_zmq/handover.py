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
subscribed to ``vm:<vm>`` (now, or when it subscribes) takes it: a catch-up
(``resume.Catchup``) reads the log from the start to the seq committed when the
session subscribed, and queues the lines the handover wants, in seq order before
what comes live after them; lines after that seq come live as usual, so none is
delivered twice, and a later one the old host had (this host's download
behind) is not delivered live either. Its reading and queueing are a resume's: steps of 1 ms, only
while the guest's outbound queue has room.

Runs in: the uplink (the request) and the bridge (the delivery).
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from .wire import HandoverRequest, LogRecord, Origin

if TYPE_CHECKING:  # the bridge imports this module, and needs no NATS client
    from .ownership import VmOwner

HANDOVERS_MAX = 1024  # pending in the bridge, one per VM; the oldest goes first
HANDOVER_TTL_S = 300.0  # a handover no session of its VM took by then is dropped
HANDOVER_MARGIN_MS = 60_000  # read from this long before the release (clock skew, downloads behind)


def handover_request(vm: str, released: VmOwner, host: str, epoch: int, after: int) -> HandoverRequest:
    """What to ask the bridge for ``vm``, claimed by ``host`` (its seq space
    ``epoch``) from the release ``released``, reading after seq ``after``. The
    releasing host's own lines are marked by its seq at the release; this host's
    lines by its mark there, if of this epoch (an older epoch's seqs are not ours)."""
    marks = dict(released.release.marks)
    marks[released.host] = (released.epoch, released.release.seq)
    mine = marks.pop(host, None)
    local_upto = mine[1] if mine is not None and mine[0] == epoch else 0
    return HandoverRequest(vm, after, local_upto, marks)


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
    """The pending handovers, by VM: at most ``HANDOVERS_MAX``, each for ``HANDOVER_TTL_S``."""

    def __init__(self) -> None:
        self.pending: collections.OrderedDict[str, Handover] = collections.OrderedDict()

    def add(self, request: HandoverRequest) -> None:
        self.pending.pop(request.vm, None)
        self.pending[request.vm] = Handover(request, time.monotonic())
        while len(self.pending) > HANDOVERS_MAX:
            self.pending.popitem(last=False)

    def take(self, vm: str) -> Handover | None:
        self.expire()
        return self.pending.pop(vm, None)

    def expire(self) -> list[str]:
        """Drop what is older than ``HANDOVER_TTL_S``; the VMs dropped."""
        limit = time.monotonic() - HANDOVER_TTL_S
        dropped = []
        while self.pending and next(iter(self.pending.values())).received < limit:
            dropped.append(self.pending.popitem(last=False)[0])
        return dropped
