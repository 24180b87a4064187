"""What ``castra bus tail --fleet`` does: every host's messages, from the fleet's
JetStream stream ``CASTRA`` (issue 14, Operators).

**Where NATS is** (``fleet_settings``): ``--uplink nats://...`` with the credential
and TLS options of ``castra up``; without ``--uplink``, what the router of the
state root runs its uplink with (``run/router.json``: servers, credential and TLS
files; a password again from ``CASTRA_UPLINK_PASSWORD``, never a file or an
argument). Credential or TLS options given with the router's servers replace the
router's. The first connection has ``_CONNECT_DEADLINE`` seconds, every server
tried; after that nats-py reconnects by itself, and a follow goes on.

**Reading** is through ordered consumers (nats-py's ``ordered_consumer``:
ephemeral, push, flow-controlled, in memory on one server, made again by the
client after a gap or missed heartbeats, removed by the server
``_INACTIVE_S`` after its reader went away), never a durable one: a tail leaves
nothing behind in the cluster and cannot disturb a host's own consumer.

* ``-n N``: the last N messages that pass the filters, read back in chunks of
  stream seqs (``_CHUNK`` messages, then four times more each time, at most
  ``_LOOK_BACK_MAX`` messages back), each chunk read forwards;
* ``--since SEQ|DURATION|TIME``: every message after stream seq SEQ, or stored
  since that time (the stream's time of receipt, found by bisecting the stream);
* ``-f``: then each new one, until the caller stops.

What was there at the start ends at the last message passing the subject filter
then (``StreamReader.bounds``): a read that ends there needs no timing guess.

**Filters**: ``--host`` is the subject filter ``castra.v1.<host>.>``: the server
leaves the other hosts out. ``--vm`` (what that VM sent, and what was sent to
``vm:<name>``, as a VM's own log holds) and ``--topic`` are applied here: the
sender is in a message's body, not in its subject.

A message castra did not make (``federation.stream_record`` refuses it) is passed
over with a note. Everything a guest or another host chose (names, topics,
payloads, the notes' text) reaches the terminal through ``terminal.printable``
or ``json_for_terminal``, in the CLI.

Runs in: ``castra bus tail --fleet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from .config import UPLINK_SECURITY, Settings, check_uplink_servers
from .endpoints import Endpoints
from .errors import CastraError, ConfigError
from .federation import STREAM_NAME, STREAM_SUBJECTS, FederationError, origin_filter, stream_record
from .owner import read_router_info
from .replay import Expired
from .subscriptions import topic_patterns
from .tail import Since
from .uplinkconnect import connect_options, quiet_tls_eof_warning
from .wire import LogRecord, Origin

_CONNECT_DEADLINE = 5.0  # seconds for the first connection, every server tried
_CONNECT_TIMEOUT = 2.0  # one server's
_REQUEST_TIMEOUT = 5.0  # one JetStream API request
_HEARTBEAT_S = 2.0  # the consumer's idle heartbeat: two missed and nats-py makes it again
_INACTIVE_S = 10.0  # the server removes a consumer whose reader has been gone this long
_CHUNK = 256  # stream seqs read back first for -n; four times more each time
_LOOK_BACK_MAX = 1_000_000  # stream seqs -n reads back at most
_STALL_S = 10.0  # no message for this long while reading what was there: it is gone (aged out)
_WAIT_S = 1.0  # a follow's wait for a message, between looks at the connection
NATS_FAILURES = (nats.errors.Error, OSError, asyncio.TimeoutError)

Notify = Callable[[str], None]


class FleetUnreachable(CastraError):
    """No NATS server answered within ``_CONNECT_DEADLINE``."""


class FleetEntry(msgspec.Struct, frozen=True):
    """One message of the stream: where it is in the stream, and its origin's log line."""

    stream_seq: int
    origin: Origin
    record: LogRecord


class FleetLine(msgspec.Struct):
    """A ``--json`` line: the stream seq (for ``--since``), the host the message was
    committed on with its seq space and seq there, and the fields of its log line."""

    stream_seq: int
    host: str
    epoch: int
    seq: int
    timestamp: float
    ts_ms: int
    vm: str
    topic: str
    payload: msgspec.Raw


_ENCODER = msgspec.json.Encoder()


def json_line(entry: FleetEntry) -> bytes:
    record = entry.record
    return _ENCODER.encode(FleetLine(entry.stream_seq, entry.origin.host, entry.origin.epoch, record.seq,
                                     record.timestamp, record.ts_ms, record.vm, record.topic, record.payload))


class FleetFilter:
    """Which messages to show: one host's (a subject filter), one VM's traffic, topics."""

    def __init__(self, host: str | None = None, vm: str | None = None, topics: Collection[str] = ()):
        self.host = host
        self.vm = vm
        self.topics = topic_patterns(topics) if topics else None
        self.subject = origin_filter(host) if host is not None else STREAM_SUBJECTS

    def keeps(self, record: LogRecord) -> bool:
        if self.vm is not None and record.vm != self.vm and record.topic != f"vm:{self.vm}":
            return False
        return self.topics is None or self.topics.match(record.topic)


# -- where NATS is ------------------------------------------------------------------


def fleet_settings(state_root: Path, servers: list[str] | None, **security: str | None) -> Settings:
    """The NATS servers, credentials and TLS files to read the stream with:
    ``servers`` and ``security`` (``Settings``' ``uplink_*`` credential fields), or
    the uplink settings of the router of ``state_root``."""
    given = {name: value for name, value in security.items() if value is not None}
    if set(given) - set(UPLINK_SECURITY):
        raise ValueError(f"not a credential or TLS setting: {sorted(set(given) - set(UPLINK_SECURITY))}")
    if servers is not None:
        fields: dict[str, object] = {"uplink_servers": check_uplink_servers(servers), **given}
    else:
        endpoints = Endpoints(state_root)
        info = read_router_info(endpoints) if endpoints.check_run_dir() else None
        if info is None or info.uplink is None:
            raise ConfigError(f"no NATS servers to read the fleet from: give --uplink nats://HOST:PORT[,...] "
                              f"(no router with --uplink runs on state root {endpoints.state_root})")
        fields = msgspec.structs.asdict(info.uplink)
        if given:  # the operator's own credentials, not the router's
            fields.update(dict.fromkeys(UPLINK_SECURITY), **given)
    settings = Settings(state_root=str(state_root), **fields)
    settings.check_uplink_security()
    return settings


async def connect(settings: Settings, notify: Notify) -> nats.NATS:
    """A connection to one of the servers; ``FleetUnreachable`` with the first
    failure when none answers within ``_CONNECT_DEADLINE``. Later losses and
    reconnections are told through ``notify``."""
    options = connect_options(settings)
    quiet_tls_eof_warning()
    failures: list[BaseException] = []
    connected = False

    async def on_error(error: Exception) -> None:
        failures.append(error)
        if connected and len(failures) == 1:
            notify(f"NATS: {describe(error)}; trying again")

    async def on_disconnected() -> None:
        if connected:
            notify("disconnected from NATS; reconnecting")

    async def on_reconnected() -> None:
        failures.clear()
        notify("reconnected to NATS")

    try:
        connection = await asyncio.wait_for(nats.connect(
            servers=settings.uplink_servers, name="castra bus tail --fleet", connect_timeout=_CONNECT_TIMEOUT,
            reconnect_time_wait=0.5, max_reconnect_attempts=-1, error_cb=on_error,
            disconnected_cb=on_disconnected, reconnected_cb=on_reconnected, **options), _CONNECT_DEADLINE)
    except NATS_FAILURES as exc:
        reason = describe(failures[0] if failures else exc)  # the first says why; the next follow from it
        raise FleetUnreachable(f"no NATS server answered at {','.join(settings.uplink_servers)} within "
                               f"{_CONNECT_DEADLINE:g}s: {reason}") from None
    connected = True
    failures.clear()
    return connection


def describe(failure: BaseException) -> str:
    return str(failure) or type(failure).__name__


# -- reading the stream -----------------------------------------------------------


class StreamReader:
    """The stream's messages passing ``fleet_filter``, through ordered consumers."""

    def __init__(self, connection: nats.NATS, fleet_filter: FleetFilter, notify: Notify):
        self.js = connection.jetstream(timeout=_REQUEST_TIMEOUT)
        self.filter = fleet_filter
        self.notify = notify

    async def bounds(self) -> tuple[int, int]:
        """The stream's first seq, and the seq of its last message on the subject
        filter (0: none)."""
        try:
            info = await self.js.stream_info(STREAM_NAME)
        except nats.js.errors.NotFoundError:
            raise CastraError(f"there is no stream {STREAM_NAME} on these servers: no host has uploaded "
                              "anything yet") from None
        first, last = info.state.first_seq, info.state.last_seq
        if self.filter.host is not None and last:
            try:
                last = (await self.js.get_last_msg(STREAM_NAME, self.filter.subject)).seq
            except nats.js.errors.NotFoundError:
                last = 0
        return first, last

    async def seq_at_time(self, ts_ms: int, first: int, last: int) -> int:
        """The stream seq of the first message on the subject filter stored at
        ``ts_ms`` or later (``last + 1`` when none is), by bisection."""
        when = datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.timezone.utc)
        low, high = max(first, 1), last + 1
        while low < high:
            middle = (low + high) // 2
            try:
                found = await self.js.get_msg(STREAM_NAME, seq=middle, subject=self.filter.subject, next=True)
            except nats.js.errors.NotFoundError:
                high = middle  # nothing at or after it: the answer is before it, or none
                continue
            if found.time >= when:
                high = middle
            else:
                low = found.seq + 1
        return low

    async def read(self, start: int, end: int | None) -> AsyncIterator[tuple[int, FleetEntry | None]]:
        """Each message from stream seq ``start`` on, as (its stream seq, its entry or
        None when castra did not make it or the filter leaves it out), up to seq
        ``end``, or on forever when ``end`` is None."""
        subscription = await self.js.subscribe(
            self.filter.subject, stream=STREAM_NAME, ordered_consumer=True, idle_heartbeat=_HEARTBEAT_S,
            inactive_threshold=_INACTIVE_S, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=max(start, 1)))
        try:
            while True:
                try:
                    message = await subscription.next_msg(timeout=_STALL_S if end is not None else _WAIT_S)
                except nats.errors.TimeoutError:
                    if end is None:
                        continue
                    self.notify(f"stream seqs {start}-{end} stopped coming (aged out or deleted meanwhile?)")
                    return
                seq = message.metadata.sequence.stream
                if end is not None and seq > end:
                    return
                yield seq, self.entry(seq, message)
                if end is not None and seq >= end:
                    return
        finally:
            with contextlib.suppress(*NATS_FAILURES):
                await subscription.unsubscribe()

    def entry(self, seq: int, message) -> FleetEntry | None:
        try:
            origin, record = stream_record(message.subject, message.headers, message.data)
        except FederationError as exc:
            self.notify(f"passed over stream seq {seq}, which castra did not make: {exc.reason}")
            return None
        return FleetEntry(seq, origin, record) if self.filter.keeps(record) else None

    async def last_entries(self, count: int, first: int, last: int) -> list[FleetEntry]:
        """The last ``count`` entries up to stream seq ``last``, oldest first."""
        found: list[FleetEntry] = []
        end, size = last, max(count, _CHUNK)
        while count and end >= max(first, 1):
            start = max(first, end - size + 1, 1)
            found[:0] = [entry async for _seq, entry in self.read(start, end) if entry is not None]
            if len(found) >= count or last - start + 1 >= _LOOK_BACK_MAX:
                break
            end, size = start - 1, size * 4
        return found[-count:] if count else []


async def fleet_entries(
    connection: nats.NATS,
    fleet_filter: FleetFilter,
    *,
    count: int,
    since: Since | None,
    follow: bool,
    notify: Notify,
    on_gap: Callable[[Expired], None],
    caught_up: Callable[[], None],
) -> AsyncIterator[FleetEntry]:
    """The last ``count`` entries, or with ``since`` every one after that stream seq
    or from that time; with ``follow``, then each new one until the caller stops.
    ``caught_up`` is called once what was there at the start is out."""
    reader = StreamReader(connection, fleet_filter, notify)
    first, last = await reader.bounds()
    if since is None:
        for entry in await reader.last_entries(count, first, last):
            yield entry
        start = last + 1
    else:
        if since.seq is not None:
            start = since.seq + 1
            if start < first:
                on_gap(Expired(since.seq, first))
                start = first
        else:
            start = await reader.seq_at_time(since.ts_ms, first, last)
        if start <= last:
            async for _seq, entry in reader.read(start, last):
                if entry is not None:
                    yield entry
        start = max(start, last + 1)
    caught_up()
    if follow:
        async for _seq, entry in reader.read(start, None):
            if entry is not None:
                yield entry
