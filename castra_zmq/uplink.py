"""The uplink role: this host's committed messages to NATS JetStream, and the
other hosts' from it into this host's ``bus.log``.

Started by ``castra up --uplink nats://...`` only (issue 14). Two halves, each a
loop of sessions with its own back-off, on one NATS connection: the upload, here,
and the download (``downlink``: a durable consumer per host, each message
committed by the bridge with its origin, exactly once, then acked).

The upload reads ``bus.log`` in seq order (``replay.Cursor``) and publishes each line, as it
is, to the stream ``CASTRA`` under ``castra.v1.<host>.<topic tokens>``
(``federation``), in atomic batches (what one read of the log gives, up to
``UPLOAD_BATCH_MAX`` messages), each acked by JetStream before the next:

* **From the log, up to the committed seq.** The bridge sends the seq of
  ``bus.log`` into the proxy right after each commit (``topics.COMMITTED``, once
  fsynced), and on each health tick; this role listens to both (``CommitWatch``, fed by ``buswatch``)
  only to learn how far ``bus.log`` is committed, and reads the lines from the log. So a line
  of a commit that failed and was cut back is never uploaded, the proxy dropping a
  message only delays an upload, and a NATS outage only delays it too: the local
  bus never waits for this role (a local ack stays a local fsync).
* **Resume.** On every (re)connection it asks the stream for the last message on
  ``castra.v1.<host>.>`` (a wildcard last-by-subject lookup) and goes on after
  the origin seq in its headers (``federation.resume_after``).
* **Order, no gap.** A batch is stored whole, its messages in a row, or not at all
  (``federation.batch_upload_headers``), and its first message carries
  ``Nats-Expected-Last-Subject-Sequence`` (the stream seq of this host's previous
  message, the last of the batch before) with the filter ``castra.v1.<host>.>``:
  should a batch be lost, or land after a later one, the server refuses the next
  one (error 10071) instead of storing it out of order, and the uplink resumes
  from the stream again. One round trip a batch, not a message: what is
  committed while a batch is on its way goes up in the next one. ``Nats-Msg-Id``
  (``<host>:<epoch>:<seq>``) makes the server refuse a batch holding a message
  it has (error 10201): the session starts again after the stream's last.
* **Outages.** Any failure (no server, a timeout, a refused publish) ends the
  upload session: one log line with the reason, a back-off (doubling up to 5 s),
  and a new session that resumes from the stream.

Only lines without an origin are uploaded: the download commits other hosts'
messages with theirs, and ``upload`` passes over those lines, so nothing loops.

Credentials and TLS for the NATS connection: ``uplinkconnect``. Its health, every
``health_interval``, for ``castra status``: ``uplinkhealth``.

Runs in: the uplink process (``castra-uplink``), a role of ``castra up``.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import nats
import nats.errors
import nats.js.errors
from loguru import logger

from . import runtime
from .buswatch import BusWatch
from .claims import LOCAL_SESSION_EVENTS, Claims
from .config import Settings, settings_from_env
from .downlink import DeliveryFailed, Downlink
from .errors import CastraError
from .events import AnyEvent, EventKind, JournalEvent, now_ms
from .federation import (
    STREAM_NAME,
    STREAM_REPLICAS,
    STREAM_SUBJECTS,
    UPLOAD_BATCH_MAX,
    WRONG_LAST_SEQUENCE,
    FederationError,
    Origin,
    batch_upload_headers,
    message_subject,
    origin_filter,
    origin_of,
    resume_after,
    stream_config,
)
from .replay import Cursor, Expired
from .statefs import read_regular, replace_file
from .uplinkconnect import cancel_until_done, connect_options, quiet_tls_eof_warning
from .uplinkhealth import HealthReport, committed_ms
from .wire import LogRecord, decode_log_record

_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
_REQUEST_TIMEOUT = 2.0  # a JetStream publish or lookup; past it the session starts again
_CONNECT_TIMEOUT = 2.0
_READ_BYTES = 64 * 1024  # of bus.log at a time
# What nats-py raises for a server it cannot reach, a timeout or a refusal.
NATS_FAILURES = (nats.errors.Error, OSError, asyncio.TimeoutError)


class UplinkState(msgspec.Struct):
    """``state/uplink.json``: the epoch of this host's seq space (see ``federation``)."""

    epoch: int


class CommitWatch:
    """How far ``bus.log`` is committed, from what the bridge sends on the bus
    (``buswatch``): the log's seq after each commit, sent once fsynced, and its
    health event with it (``evt\\0journal\\0``, every ``health_interval``), which
    tells even when the proxy dropped a ``seq`` message or the bridge did not see
    the subscription yet."""

    def __init__(self) -> None:
        self.seq: int | None = None  # unknown until the bridge's first word
        self.changed = asyncio.Event()

    def observe(self, committed: int | None, event: AnyEvent | None) -> None:
        seq = event.seq if isinstance(event, JournalEvent) else committed
        if seq is not None and (self.seq is None or seq > self.seq):
            self.seq = seq
            self.changed.set()

    async def wait_past(self, seq: int) -> int:
        """The committed seq, once it is known and above ``seq``."""
        while self.seq is None or self.seq <= seq:
            self.changed.clear()
            await self.changed.wait()
        return self.seq


class Uplink:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.endpoints = settings.endpoints
        self.host = settings.host_name
        self.servers = settings.uplink_servers
        self.epoch = self.load_epoch()
        self.commits = CommitWatch()
        self.downlink = Downlink(settings)
        self.claims = Claims(settings, lambda: self.epoch)
        self.bus = BusWatch(settings, (EventKind.JOURNAL, EventKind.HANDOVER, *LOCAL_SESSION_EVENTS),
                            [self.commits, self.claims.local, self.claims.handover])
        self.connect_options = connect_options(settings)
        self.health = HealthReport(settings)
        self.connection: nats.NATS | None = None
        self.connecting = asyncio.Lock()  # both halves connect at first: one connection
        self.stopping = asyncio.Event()
        self.uploaded = 0  # the seq of bus.log's last line the upload is done with (acked, or another host's)
        self.uploads = 0  # lines the stream acked since the role started
        self.reachable = True  # until nats-py reports a failed attempt
        self.failure: str | None = None  # why NATS is out of reach: the outage's first error, until connected

    # -- the epoch ----------------------------------------------------------------------

    def load_epoch(self) -> int:
        try:
            return msgspec.json.decode(read_regular(self.endpoints.uplink_state), type=UplinkState).epoch
        except FileNotFoundError:
            return self.new_epoch(0)
        except (OSError, msgspec.DecodeError) as exc:
            raise CastraError(f"cannot read {self.endpoints.uplink_state}: {exc}") from None

    def new_epoch(self, old: int) -> int:
        """Start a seq space: its epoch is the time now (Unix ms), above ``old``."""
        epoch = max(now_ms(), old + 1)
        replace_file(self.endpoints.uplink_state, msgspec.json.encode(UplinkState(epoch)))
        return epoch

    # -- life cycle ---------------------------------------------------------------------

    async def serve(self) -> None:
        watch = asyncio.ensure_future(self.bus.watch())
        logger.info("uplink ready", host=self.host, epoch=self.epoch, servers=",".join(self.servers))
        runtime.notify_ready()
        halves = [asyncio.create_task(self.keep_going("upload", self.upload_session, lambda: self.uploads)),
                  asyncio.create_task(self.keep_going("download", self.download_session,
                                                      lambda: self.downlink.batches)),
                  asyncio.create_task(self.keep_going("ownership", self.ownership_session, lambda: self.claims.turns)),
                  asyncio.create_task(self.health.run(self.health_fields))]
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([stop, watch, *halves], return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                raise RuntimeError("the bus watch ended") from watch.exception()
            for half in halves:
                if half.done():
                    half.result()  # what ended it: a bug, which the supervisor's restart answers
        finally:
            await cancel_until_done((stop, watch, *halves))
            if self.connection is not None:
                await self.connection.close()
            self.bus.close()
            self.downlink.close()
            self.claims.close()
            self.health.close()

    async def keep_going(self, half: str, session: Callable[[], Awaitable[None]], progress: Callable[[], int]) -> None:
        """Run ``session`` again each time it fails on NATS, the stream or the
        bridge: one line with the reason, then a back-off, 0.1 s doubling up to
        5 s, from 0.1 s again after a session that got something done."""
        backoff = _BACKOFF_MIN
        while True:
            done_before = progress()
            try:
                await session()  # ends only by failing
            except (*NATS_FAILURES, UploadRefused, FederationError, DeliveryFailed) as failure:
                reason = describe(failure)
            if progress() != done_before:
                backoff = _BACKOFF_MIN
            logger.bind(reason=reason, uploaded=self.uploaded, downloaded=self.downlink.committed).warning(
                f"{half} interrupted; again in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def connect(self) -> nats.NATS:
        """The connection, made at the first session and kept: nats-py connects and
        reconnects it by itself, forever, going round the servers."""
        async with self.connecting:
            if self.connection is None or self.connection.is_closed:
                self.connection = await nats.connect(
                    servers=self.servers, name=f"castra-uplink {self.host}",
                    connect_timeout=_CONNECT_TIMEOUT, reconnect_time_wait=0.5, max_reconnect_attempts=-1,
                    error_cb=self.handle_nats_error, disconnected_cb=self.handle_disconnected,
                    reconnected_cb=self.handle_connected, **self.connect_options,
                )
                await self.handle_connected()
        return self.connection

    async def handle_nats_error(self, error: Exception) -> None:
        """nats-py reports each failed attempt while no server answers: one line an
        outage, the rest at DEBUG. Refused credentials are an error: they do not
        mend by waiting."""
        log = logger.bind(reason=describe(error))
        if "permissions violation" in str(error).lower():  # the connection stays; that one request fails
            log.error("NATS refused the uplink a permission: see README 'per-host permissions'")
            return
        if not self.reachable:
            log.debug("NATS still unreachable")
        elif credentials_refused(error):
            log.bind(user=self.settings.uplink_user or self.settings.uplink_creds).error(
                "NATS refused the uplink's credentials; retrying")
        else:
            log.warning("NATS unreachable; retrying")
        if self.reachable:  # the first error says why; the next ones follow from it
            self.failure = describe(error)
        self.reachable = False

    async def handle_disconnected(self) -> None:
        self.failure = self.failure or "connection lost"
        logger.bind(reason="connection lost").warning("disconnected from NATS; reconnecting")

    async def handle_connected(self) -> None:
        self.reachable = True
        self.failure = None
        logger.info("connected to NATS", server=self.connection.connected_url.netloc)

    # -- one upload session -------------------------------------------------------------

    async def upload_session(self) -> None:
        """Connect, make sure of the stream, find where to go on from, and upload
        until something fails (raised) or the role stops (cancelled)."""
        js = (await self.connect()).jetstream(timeout=_REQUEST_TIMEOUT)
        await self.ensure_stream(js)
        committed = await self.commits.wait_past(-1)
        last, last_stream_seq = await self.last_uploaded(js)
        after = resume_after(last, self.epoch, committed)
        if after is None:
            old, self.epoch = self.epoch, self.new_epoch(self.epoch)
            logger.bind(reason=f"the stream has seq {last.seq} of this epoch, the log ends at {committed}").warning(
                "bus.log started again below what was uploaded: a new epoch", old_epoch=old, epoch=self.epoch)
            after = 0
        self.uploaded = after
        logger.info("uploading", after=after, epoch=self.epoch, stream_seq=last_stream_seq)
        cursor = Cursor(self.endpoints.logs_dir, after)
        while True:
            committed = await self.commits.wait_past(cursor.after)
            try:
                lines = cursor.read(committed, _READ_BYTES)
            except Expired as gone:
                logger.bind(reason=str(gone)).error("messages rotated away before their upload: skipped",
                                                    first=gone.since + 1, last=gone.oldest - 1)
                cursor = Cursor(self.endpoints.logs_dir, gone.oldest - 1)
                continue
            # Lines of other hosts' messages (with an origin) are not uploaded again.
            records = [decode_log_record(line) for line in lines]
            local = [(record, line) for record, line in zip(records, lines) if record.origin is None]
            for start in range(0, len(local), UPLOAD_BATCH_MAX):
                last_stream_seq = await self.upload(js, local[start:start + UPLOAD_BATCH_MAX], last_stream_seq)
            if records:  # the upload is done with the other hosts' lines too
                self.uploaded = records[-1].seq
            await asyncio.sleep(0)  # a long backlog shares the loop with the bus watch

    async def upload(self, js, batch: list[tuple[LogRecord, bytes]], last_stream_seq: int) -> int:
        """Publish log lines of this host as one atomic batch; the stream seq of its
        last message. The batch's messages but the last go without a reply subject:
        the server answers the last, the commit, for the whole batch."""
        origins = [Origin(self.host, self.epoch, record.seq) for record, _ in batch]
        headers = batch_upload_headers(origins, last_stream_seq, uuid.uuid4().hex)
        subjects = [message_subject(self.host, record.topic) for record, _ in batch]
        for subject, (_, line), each in zip(subjects[:-1], batch, headers):
            await self.connection.publish(subject, line[:-1], headers=each)
        try:
            ack = await js.publish(subjects[-1], batch[-1][1][:-1], headers=headers[-1], timeout=_REQUEST_TIMEOUT)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise UploadRefused(f"seqs {origins[0].seq}-{origins[-1].seq}: this host's last message in the "
                                    f"stream is not at stream seq {last_stream_seq} ({exc.description})") from None
            raise
        self.uploaded = origins[-1].seq
        self.uploads += len(batch)
        return ack.seq

    async def download_session(self) -> None:
        """Connect, make sure of the stream, then deliver other hosts' messages
        (``Downlink.session``) from the consumer's ack floor, or from this host's
        epoch the first time."""
        connection = await self.connect()
        js = connection.jetstream(timeout=_REQUEST_TIMEOUT)
        await self.ensure_stream(js)
        await self.downlink.session(connection, js, start_ms=self.epoch)

    async def ownership_session(self) -> None:
        """Connect, then claim and release this host's VMs and watch everyone's
        (``claims``) until something fails (raised) or the role stops."""
        js = (await self.connect()).jetstream(timeout=_REQUEST_TIMEOUT)
        await self.claims.session(js)

    async def ensure_stream(self, js) -> None:
        """The stream, made if missing; one made before atomic batches were used
        gets ``allow_atomic`` added. Its other settings are taken as they are."""
        try:
            info = await js.stream_info(STREAM_NAME)
        except nats.js.errors.NotFoundError:
            info = await js.add_stream(stream_config())
            logger.info("stream created", stream=STREAM_NAME, subjects=STREAM_SUBJECTS, replicas=STREAM_REPLICAS)
        if not info.config.allow_atomic:
            info.config.allow_atomic = True
            info = await js.update_stream(info.config)
            logger.info("stream allows atomic batches now", stream=STREAM_NAME)
        if not info.config.allow_atomic:  # a server that does not know the setting does not echo it
            raise FederationError(f"the stream {STREAM_NAME} does not take atomic batches: nats-server 2.12 or "
                                  "later needed")

    async def last_uploaded(self, js) -> tuple[Origin | None, int]:
        """This host's last message in the stream: its origin and stream seq (None, 0: none)."""
        try:
            message = await js.get_last_msg(STREAM_NAME, origin_filter(self.host))
        except nats.js.errors.NotFoundError:
            return None, 0
        return origin_of(message.headers), message.seq

    def health_fields(self) -> dict:
        """The ``uplink`` event's fields now (``events.UplinkEvent``)."""
        connection = self.connection
        connected = connection is not None and connection.is_connected
        committed = self.commits.seq
        pending = committed is not None and committed > self.uploaded
        return {
            "reason": None if connected else self.failure, "host": self.host,
            "server": connection.connected_url.netloc if connected else None,
            "committed_seq": committed, "uploaded_seq": self.uploaded,
            "oldest_pending_ms": committed_ms(self.endpoints.logs_dir, self.uploaded, committed) if pending else None,
            "downloaded_stream_seq": self.downlink.acked_stream_seq, "download_pending": self.downlink.pending,
            "remote_hosts": self.downlink.remote_hosts.listed(),
        }

    def stop(self) -> None:
        self.stopping.set()


class UploadRefused(CastraError):
    """JetStream refused an upload on its order check: the stream's last message of
    this host is not the one the uplink sent last."""


def credentials_refused(error: Exception) -> bool:
    """Whether NATS refused the uplink's credentials: nats-py says so with its own
    class after the connection is made, but only in the text of a plain error
    while it connects (``-ERR 'Authorization Violation'``, ``'User Authentication
    Expired'``...)."""
    text = str(error).lower()
    return isinstance(error, nats.errors.AuthorizationError) or "authorization" in text or "authentication" in text


def describe(failure: BaseException) -> str:
    return str(failure) or type(failure).__name__


async def run(settings: Settings) -> None:
    uplink = Uplink(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, uplink.stop)
    await uplink.serve()


def main() -> None:
    runtime.setup_logging("uplink")
    runtime.die_with_parent()
    quiet_tls_eof_warning()
    asyncio.run(run(settings_from_env()))
    logger.info("uplink stopped")
    runtime.skip_final_collection()


if __name__ == "__main__":
    main()
