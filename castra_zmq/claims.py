"""The uplink's ownership half: claims and releases this host's VMs in the
``CASTRA_VMS`` bucket, watches the bucket so the host knows where every VM lives,
and keeps this host's liveness key (``ownership``, issue 14).

What is connected here comes from the bridge's events on the bus
(``LocalSessions``): ``session_open`` and ``session_close`` (whose ``seq`` is
``bus.log``'s last committed seq when the session closed), mended by each complete
``sessions`` sync (an event dropped by the proxy, an uplink started after the
guests). A VM is wanted while it has a session here.

Claims are level-triggered: each turn (``reconcile``, on a change and every
``ALIVE_INTERVAL_S``) claims what is wanted and not owned, and releases what is
owned and no longer wanted, so an outage or an uplink restart only delays them.
A VM owned by another live host is waited for: one WARNING (``reason=owned by
<host>``), listed in ``state/fleet.json`` as a conflict, claimed once the watch
shows it released or its owner's liveness key gone.

A release carries where ``bus.log`` stood when the VM's last session closed
(``ownership.Release``): that seq, and the other hosts' marks at it, which
``MarkTracker`` follows through the log as the uplink learns its committed seq
(the marks at a seq need the lines up to it, not after: a close event comes after
every commit before it on the bus, so the tracker is never past a close it has
yet to see).

Claiming a VM from a release, or taking it over from a host gone (from that
host's checkpoint, which this host puts every ``CHECKPOINT_INTERVAL_S`` while its
log moves), asks the bridge for a handover (``HandoverLink``), kept until the
bridge reports it delivered; a VM released before then carries it on
(``ownership.carried_release``).

The fleet as this host knows it (``FleetView``) goes to ``state/fleet.json`` on
each change, for ``castra status --fleet`` (which works with NATS down: the file
says when it was written, and the uplink's health whether it is connected).

Runs in: the uplink role.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import nats.js.errors
import zmq
from loguru import logger

from .config import Settings
from .errors import CastraError
from .events import (
    AnyEvent,
    EventKind,
    HandoverEvent,
    HandoverOutcome,
    JournalEvent,
    SessionCloseEvent,
    SessionOpenEvent,
    SessionsEvent,
    now_ms,
)
from .federation import host_key
from .handover import (
    HANDOVER_MARGIN_MS,
    PendingHandover,
    PendingHandovers,
    decode_pending,
    handover_request,
)
from .origins import OriginMarks, follow, read_origin_checkpoint
from .ownership import (
    ALIVE_INTERVAL_S,
    CHECKPOINT_INTERVAL_S,
    ClaimAction,
    HostAlive,
    HostCheckpoint,
    OwnershipError,
    OwnerState,
    Release,
    VmOwner,
    carried_release,
    checkpoint_key,
    checkpoint_release,
    claim_action,
    decode_alive,
    decode_checkpoint,
    decode_owner,
    encode_alive,
    encode_checkpoint,
    encode_owner,
    hosts_config,
    is_checkpoint_key,
    owners_config,
    release_of,
    vm_key,
    vm_of_key,
)
from .replay import BUS_LOG, Cursor
from .statefs import read_regular, replace_file
from .statustable import FleetView, FleetVm
from .tail import seq_at_time
from .wire import HANDOVER_VERB, json_encode

_TRACK_INTERVAL_S = 0.5  # how often the mark tracker follows bus.log
_RELEASES_MAX = 4096  # releases kept until the bucket takes them (the oldest dropped: a VM not owned here)
_TURN_MIN_S = 0.05  # between reconcile turns (each may write state/fleet.json)


class MarkTracker:
    """The other hosts' marks in ``bus.log`` at a seq, read from the log: from the
    bridge's origins checkpoint at start, then line by line as asked."""

    def __init__(self, settings: Settings):
        self.endpoints = settings.endpoints
        self.marks: OriginMarks | None = None
        self.cursor: Cursor | None = None
        self.failure: str | None = None  # why the log was last not followed

    def marks_at(self, seq: int) -> dict[str, tuple[int, int]]:
        """The marks up to ``seq``; past it already (a start after it), the
        marks where the tracker is, which may hold a little more. A log that
        cannot be read leaves them where they are (one WARNING a reason)."""
        if self.marks is None:
            saved = read_origin_checkpoint(self.endpoints.origins_checkpoint)
            self.marks = OriginMarks(dict(saved.marks) if saved else {})
            self.cursor = Cursor(self.endpoints.logs_dir, saved.seq if saved else 0)
        try:
            follow(self.marks, self.cursor, seq)
        except (CastraError, OSError) as exc:
            reason = str(exc)
            if reason != self.failure:
                logger.bind(reason=reason).warning("bus.log not followed: releases carry the marks as they were")
            self.failure = reason
        else:
            self.failure = None
        return dict(self.marks.marks)


LOCAL_SESSION_EVENTS = (EventKind.SESSION_OPEN, EventKind.SESSION_CLOSE, EventKind.SESSIONS)
"""The bridge's events ``LocalSessions`` follows, beside the committed seq."""


class LocalSessions:
    """The VMs with a bus session on this host, from the bridge's events; the seq
    ``bus.log`` stood at when each one's last session closed."""

    def __init__(self, tracker: MarkTracker, changed: asyncio.Event):
        self.tracker = tracker
        self.changed = changed
        self.sessions: dict[str, set[str]] = {}  # vm -> its open sessions' tokens
        self.released: dict[str, Release] = {}  # vm -> where the log stood when its last session closed
        self.committed = 0  # the last committed seq the bus told (no close to come is below it)
        self.tracked = time.monotonic()  # when the tracker last followed the log
        self.synced = False  # a whole session sync seen: ``sessions`` holds every VM connected here
        self.sync_round: int | None = None
        self.sync_parts: dict[str, set[str]] = {}
        self.sync_seen = 0

    def observe(self, committed: int | None, event: AnyEvent | None) -> None:
        """One bus message (``buswatch``). Every ``_TRACK_INTERVAL_S`` the tracker
        moves on to the committed seq (no close still to come is below it), so a
        close reads little of the log, not all that came since the last one."""
        if committed is not None:
            self.committed = max(self.committed, committed)
        else:
            self.take_event(event)
        if time.monotonic() - self.tracked >= _TRACK_INTERVAL_S:
            self.tracker.marks_at(self.committed)
            self.tracked = time.monotonic()

    def take_event(self, event: AnyEvent) -> None:
        match event:
            case SessionOpenEvent():
                self.sessions.setdefault(event.vm, set()).add(event.session)
                self.released.pop(event.vm, None)
                self.changed.set()
            case SessionCloseEvent():
                if event.seq is not None:
                    self.committed = max(self.committed, event.seq)
                open_sessions = self.sessions.get(event.vm)
                if open_sessions is not None:
                    open_sessions.discard(event.session)
                    if not open_sessions:
                        self.close(event.vm, self.committed if event.seq is None else event.seq)
            case SessionsEvent():
                self.handle_sync(event)
            case JournalEvent(seq=int(seq)):
                self.committed = max(self.committed, seq)

    def handle_sync(self, event: SessionsEvent) -> None:
        """A complete sync (all its parts) is every open session: VMs missing from
        it closed unseen (their release is at the last committed seq known)."""
        if event.sync_round != self.sync_round:
            self.sync_round, self.sync_parts, self.sync_seen = event.sync_round, {}, 0
        for info in event.sessions:
            self.sync_parts.setdefault(info.vm, set()).add(info.session)
        self.sync_seen += 1
        if self.sync_seen != (event.sync_parts or 1):
            return
        for vm in [vm for vm in self.sessions if vm not in self.sync_parts]:
            self.close(vm, self.committed)
        for vm, tokens in self.sync_parts.items():
            if vm not in self.sessions or not self.sessions[vm]:
                self.released.pop(vm, None)
                self.changed.set()
            self.sessions[vm] = tokens
        self.synced = True

    def close(self, vm: str, seq: int) -> None:
        self.sessions.pop(vm, None)
        self.released.pop(vm, None)
        self.released[vm] = release_of(seq, self.tracker.marks_at(seq))
        while len(self.released) > _RELEASES_MAX:  # VMs that closed here and were not this host's
            del self.released[next(iter(self.released))]
        self.changed.set()

    def wanted(self) -> set[str]:
        return {vm for vm, tokens in self.sessions.items() if tokens}


class HandoverLink:
    """Asks the bridge to deliver what a VM claimed from a release was sent while
    it moved (``handover``; ``run/journal.sock``, PROTOCOL.md 8.2.1), and keeps
    each request until the bridge reports it delivered or dropped
    (``HandoverEvent``): a restarted bridge (another ``started_ms`` in its health
    event) is sent them all again. They are kept in ``state/handovers.json`` too,
    so a restarted uplink sends them again to the bridge it finds. Follows the bus
    as a ``buswatch`` observer."""

    def __init__(self, settings: Settings):
        self.logs_dir = settings.endpoints.logs_dir
        self.path = settings.endpoints.handovers
        self.pending = self.load()
        self.bridge_started: int | None = None  # the bridge's started_ms, as last seen
        self.unsent: list[str] = []  # VMs whose request found the socket's queue full: sent on the next tick
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 64
        self.sock.connect(settings.endpoints.journal)

    def ask(self, vm: str, released: VmOwner, claim: int, host: str, epoch: int) -> None:
        """Ask for ``vm``'s handover from ``released``, for this host's claim of revision ``claim``."""
        log = logger.bind(vm=vm)
        try:
            after = seq_at_time(self.logs_dir, BUS_LOG, released.since_ms - HANDOVER_MARGIN_MS)
        except CastraError as exc:
            log.bind(reason=exc.reason).error("handover not asked: bus.log not read")
            return
        request = handover_request(vm, released, host, epoch, after, claim)
        self.pending.add(request, released.since_ms)
        self.save()
        self.unsent.append(vm)
        if self.send_unsent():
            log.info("handover asked", after=after, released_by=released.host, release_seq=released.release.seq,
                     claim=claim)

    def send_unsent(self) -> int:
        """Send the requests not sent yet, in order, until the socket's queue is
        full (the bridge not reading: the rest go on the next health tick); how many went."""
        sent = 0
        while self.unsent:
            pending = self.pending.get(self.unsent[0])
            if pending is not None:
                try:
                    self.sock.send_multipart([b"", HANDOVER_VERB, json_encode(pending.request)], zmq.NOBLOCK)
                except zmq.Again:
                    logger.bind(reason="the bridge is not reading").warning("handovers not sent now: again in a tick",
                                                                            count=len(self.unsent))
                    return sent
                sent += 1
            self.unsent.pop(0)
        return sent

    def observe(self, committed: int | None, event: AnyEvent | None) -> None:
        match event:
            case JournalEvent(started_ms=int(started)):
                if started != self.bridge_started:  # all of them again, to a bridge started since
                    restarted = self.bridge_started is not None
                    self.bridge_started = started
                    self.unsent = [request.vm for request in self.pending.all()]
                    if self.unsent:
                        logger.bind(reason="the bridge restarted" if restarted else "the bridge seen first").info(
                            "handovers asked again", count=self.send_unsent())
                elif self.unsent:
                    self.send_unsent()
                if self.pending.dirty:  # what settled since the last tick: at most one write a tick
                    self.save()
            case HandoverEvent(outcome=HandoverOutcome.DELIVERED | HandoverOutcome.DROPPED):
                self.pending.settle(event.vm, event.claim)

    def load(self) -> PendingHandovers:
        try:
            return decode_pending(read_regular(self.path))
        except FileNotFoundError:
            return PendingHandovers()
        except (OSError, msgspec.DecodeError) as exc:
            logger.bind(reason=str(exc)).warning("pending handovers not read: none kept", path=str(self.path))
            return PendingHandovers()

    def save(self) -> None:
        try:
            replace_file(self.path, self.pending.encode(), sync=False)
        except OSError as exc:
            logger.bind(reason=exc.strerror).warning("pending handovers not saved")

    def unfinished(self, vm: str) -> PendingHandover | None:
        """``vm``'s request the bridge has not reported delivered or dropped."""
        return self.pending.get(vm)

    def forget(self, vm: str) -> None:
        self.pending.discard(vm)
        if self.pending.dirty:
            self.save()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


class Claims:
    def __init__(self, settings: Settings, epoch: Callable[[], int]):
        self.host = settings.host_name
        self.epoch = epoch
        self.fleet_path = settings.endpoints.fleet
        self.changed = asyncio.Event()
        self.tracker = MarkTracker(settings)
        self.local = LocalSessions(self.tracker, self.changed)
        self.handover = HandoverLink(settings)
        # vm -> its record and revision: as watched, and as this host wrote it (the
        # watch may tell an older revision after that: it is not taken).
        self.fleet: dict[str, tuple[VmOwner, int]] = {}
        self.owned: dict[str, int] = {}  # vm -> the revision of this host's claim
        self.waiting: dict[str, str] = {}  # vm wanted here -> the live host that owns it
        self.waited: dict[str, tuple[int, float]] = {}  # vm waiting -> (revision, monotonic time) of the look
        self.turns = 0  # reconcile turns done (progress, for the back-off)
        self.alive_put = 0.0  # monotonic time of the last put of this host's liveness key
        self.checkpoint_put = 0.0  # monotonic time of the last put of this host's checkpoint
        self.checkpointed: int | None = None  # the seq that checkpoint is at
        self.fleet_written = 0.0  # monotonic time state/fleet.json was last written
        self.fleet_dirty = True

    # -- one session on NATS ------------------------------------------------------------

    async def session(self, js) -> None:
        """Make sure of the buckets, watch the owners, and claim, release and say
        this host is alive until something fails (raised) or the role stops."""
        owners = await self.bucket(js, owners_config())
        hosts = await self.bucket(js, hosts_config())
        watcher = await owners.watchall()
        watching = asyncio.create_task(self.watch(watcher))
        logger.info("watching VM owners", bucket=owners_config().bucket)
        self.alive_put = 0.0
        try:
            while True:
                if watching.done():
                    watching.result()
                    raise OwnershipError("the watch of the owners bucket ended")
                self.changed.clear()
                if time.monotonic() - self.alive_put >= ALIVE_INTERVAL_S:
                    await hosts.put(host_key(self.host), encode_alive(HostAlive(self.host, self.epoch(), now_ms())))
                    self.alive_put = time.monotonic()
                if time.monotonic() - self.checkpoint_put >= CHECKPOINT_INTERVAL_S:
                    await self.put_checkpoint(owners)
                await self.reconcile(owners, hosts)
                self.turns += 1
                await asyncio.sleep(_TURN_MIN_S)  # a burst of changes is one turn
                try:
                    await asyncio.wait_for(self.changed.wait(), ALIVE_INTERVAL_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            try:
                await watcher.stop()
            except (nats.errors.Error, OSError, asyncio.TimeoutError):
                pass

    async def bucket(self, js, config):
        try:
            return await js.key_value(config.bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(config)
            logger.info("bucket created", bucket=config.bucket, replicas=config.replicas)
            return kv

    async def watch(self, watcher) -> None:
        """Follow every record of the owners bucket (nats-py's ordered consumer)."""
        async for entry in watcher:
            if entry is None or is_checkpoint_key(entry.key):  # the start's records all in; a host's checkpoint
                continue
            try:
                vm = vm_of_key(entry.key)
                known = self.fleet.get(vm)
                if known is not None and known[1] > entry.revision:
                    continue  # older than what this host wrote since
                if entry.operation in ("DEL", "PURGE"):
                    self.fleet.pop(vm, None)
                else:
                    self.fleet[vm] = (decode_owner(entry.value), entry.revision)
            except OwnershipError as exc:
                logger.bind(reason=exc.reason).warning("skipped a record castra did not write", key=entry.key[:80])
                continue
            self.fleet_dirty = True
            self.changed.set()

    async def reconcile(self, owners, hosts) -> None:
        """Claim what has a session here and is not this host's; release what is
        this host's and has none."""
        wanted = self.local.wanted()
        for vm, (record, revision) in list(self.fleet.items()):
            if vm in self.owned and record.host != self.host and revision > self.owned[vm]:
                del self.owned[vm]
                self.handover.forget(vm)
                logger.bind(vm=vm, reason=f"owned by {record.host}").warning("VM taken over by another host")
        now = time.monotonic()
        for vm in sorted(wanted - self.owned.keys()):
            waited = self.waited.get(vm)
            known = self.fleet.get(vm)
            if (waited is not None and known is not None and known[1] == waited[0]
                    and now - waited[1] < ALIVE_INTERVAL_S):
                continue  # owned by a live host, unchanged since the last look
            await self.claim(owners, hosts, vm)
        for vm in [vm for vm in self.owned if vm not in wanted]:
            await self.release(owners, vm)
        if self.local.synced:  # records of this host left from before a restart, no session here now
            for vm, (record, revision) in list(self.fleet.items()):
                if (record.host == self.host and record.state is OwnerState.OWNED and vm not in wanted
                        and vm not in self.owned):
                    self.owned[vm] = revision
                    await self.release(owners, vm)
        for vm in [vm for vm in self.waiting if vm not in wanted]:
            del self.waiting[vm]
            self.waited.pop(vm, None)
            self.fleet_dirty = True
        self.write_fleet()

    async def claim(self, owners, hosts, vm: str) -> None:
        key = vm_key(vm)
        try:
            entry = await owners.get(key)
            current, revision = decode_owner(entry.value), entry.revision
        except nats.js.errors.KeyNotFoundError:
            current, revision = None, 0
        alive = True
        if current is not None and current.host != self.host and current.state is OwnerState.OWNED:
            alive = await self.alive(hosts, current.host)
        action = claim_action(current, self.host, alive)
        log = logger.bind(vm=vm)
        if action is ClaimAction.WAIT:
            self.waited[vm] = (revision, time.monotonic())
            if self.waiting.get(vm) != current.host:
                self.waiting[vm] = current.host
                self.fleet_dirty = True
                log.bind(reason=f"owned by {current.host}").warning(
                    "VM connected here is owned by another host: waiting for its release")
            return
        record = VmOwner(self.host, self.epoch(), OwnerState.OWNED, now_ms())
        try:
            if action is ClaimAction.CREATE:
                self.owned[vm] = await owners.create(key, encode_owner(record))
            else:
                self.owned[vm] = await owners.update(key, encode_owner(record), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.bind(reason="another host wrote it first").info("claim lost a race; looking again")
            self.changed.set()
            return
        self.fleet[vm] = (record, self.owned[vm])
        self.waiting.pop(vm, None)
        self.waited.pop(vm, None)
        self.fleet_dirty = True
        if current is None:
            log.info("VM claimed")
        elif current.state is OwnerState.RELEASED:
            log.info("VM claimed", released_by=current.host)
            if current.release is not None:
                self.handover.ask(vm, current, self.owned[vm], self.host, self.epoch())
        elif current.host == self.host:
            log.info("VM claimed again")
        else:
            log.bind(reason=f"{current.host} not alive").warning("VM taken over from a host gone",
                                                                 previous=current.host)
            checkpoint = await self.checkpoint_of(owners, current.host)
            if checkpoint is None:
                log.bind(reason=f"no checkpoint of {current.host}").warning("taken over with no handover")
            else:
                self.handover.ask(vm, checkpoint_release(checkpoint), self.owned[vm], self.host, self.epoch())

    async def release(self, owners, vm: str) -> None:
        """Release ``vm``: where the log stood when its last session closed, or,
        its handover not delivered yet, where the host it came from stood
        (``carried_release``; its time too, for the next handover's margin)."""
        unfinished = self.handover.unfinished(vm)
        if unfinished is not None:
            release, since_ms = carried_release(unfinished.request), unfinished.since_ms
            logger.bind(vm=vm, reason="its handover was not delivered here").info("release carries the handover on")
        else:
            release = self.local.released.get(vm) or release_of(self.local.committed,
                                                                self.tracker.marks_at(self.local.committed))
            since_ms = now_ms()
        self.handover.forget(vm)
        record = VmOwner(self.host, self.epoch(), OwnerState.RELEASED, since_ms, release)
        try:
            revision = await owners.update(vm_key(vm), encode_owner(record), last=self.owned[vm])
        except nats.js.errors.KeyWrongLastSequenceError:
            logger.bind(vm=vm, reason="another host wrote it since").info("VM not released: no longer this host's")
        else:
            self.fleet[vm] = (record, revision)
            logger.bind(vm=vm).info("VM released", seq=release.seq, hosts=len(release.marks))
        del self.owned[vm]
        self.local.released.pop(vm, None)
        self.fleet_dirty = True

    async def put_checkpoint(self, owners) -> None:
        """This host's checkpoint, when the log moved since the last one: a
        takeover after this host is gone hands over from it."""
        seq = self.local.committed
        if seq and seq != self.checkpointed:  # 0: the bridge not heard from yet (an uplink just started)
            release = release_of(seq, self.tracker.marks_at(seq))
            checkpoint = HostCheckpoint(self.host, self.epoch(), now_ms(), release)
            await owners.put(checkpoint_key(self.host), encode_checkpoint(checkpoint))
            self.checkpointed = seq
        self.checkpoint_put = time.monotonic()

    async def checkpoint_of(self, owners, host: str) -> HostCheckpoint | None:
        try:
            entry = await owners.get(checkpoint_key(host))
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            checkpoint = decode_checkpoint(entry.value)
        except OwnershipError as exc:
            logger.bind(reason=exc.reason).warning("skipped a host checkpoint castra did not write", host=host)
            return None
        return checkpoint if checkpoint.host == host else None

    async def alive(self, hosts, host: str) -> bool:
        try:
            entry = await hosts.get(host_key(host))
        except nats.js.errors.KeyNotFoundError:
            return False
        try:
            return decode_alive(entry.value).host == host
        except OwnershipError:
            return False

    # -- the fleet file -------------------------------------------------------------------

    def write_fleet(self) -> None:
        """``state/fleet.json``, when the fleet changed, and every ``ALIVE_INTERVAL_S``
        while the session runs: its time says how current it is (it ages while NATS
        is out of reach)."""
        now = time.monotonic()
        if not self.fleet_dirty and now - self.fleet_written < ALIVE_INTERVAL_S:
            return
        view = FleetView(host=self.host, written_ms=now_ms(), vms=[
            FleetVm(vm, record.host, record.state.value, record.since_ms)
            for vm, (record, _) in sorted(self.fleet.items())], waiting=dict(sorted(self.waiting.items())))
        try:
            replace_file(self.fleet_path, json_encode(view), sync=False)
        except OSError as exc:
            logger.warning("fleet view not written", reason=exc.strerror)
            return
        self.fleet_written, self.fleet_dirty = now, False

    def close(self) -> None:
        self.handover.close()
