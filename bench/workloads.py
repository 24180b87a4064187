"""The six workloads of issue 6, and issue 14's federation. Each returns one dict of
figures for one system.

Every message carries its publisher's timestamp and index (``"bench":[ns,index]``)
in a ~200-byte JSON payload; receivers find it by substring, whatever the framing
around it. Only messages published inside the measurement window (after a warm-up)
count; after it, publishers stop and in-flight messages drain for a bounded time.
Server CPU is read around window plus drain and divided by the receipts (or acks,
or handshakes and heartbeats) in the same span.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .clients import ProtocolError
from .systems import System

_MARK = b'"bench":['
_NOTE = b"x" * 96  # pads the payload to ~200 bytes
_PACE_TICK_S = 0.001
_STALL_S = 2.0  # a window with no credit back for this long has lost messages
_DRAIN_S = 3.0  # at most this long for in-flight messages after the window
_IDLE_S = 0.5  # ... and stop early once nothing arrived for this long
# Handshakes in progress at once in the sessions workload: below every server's listen
# backlog (mosquitto's is 100), so the rate is the server's, not SYN retransmits'.
_OPEN_CONCURRENCY = 64


@dataclass(frozen=True)
class Settings:
    duration: float  # seconds of the measurement window
    sessions: int  # concurrent sessions in the sessions workload

    @property
    def warmup(self) -> float:
        return min(1.0, self.duration / 5)


def now_ns() -> int:
    return time.perf_counter_ns()


def stamp_of(message: bytes | bytearray) -> tuple[int, int]:
    """The publisher's (timestamp ns, index) inside a received message."""
    start = message.find(_MARK) + len(_MARK)
    sent, publisher = message[start : message.find(b"]", start)].split(b",")
    return int(sent), int(publisher)


def percentile(ordered: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in milliseconds."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1e6 if ordered else math.nan


class Recorder:
    """Counts and latency samples of the messages sent inside the window."""

    def __init__(self):
        self.start = self.end = math.inf  # the window, in perf_counter ns
        self.sent = 0
        self.received = 0
        self.failed = 0
        self.events = 0  # every receipt or ack, in the window or not: CPU's denominator
        self.latencies = array("q")

    def open(self) -> None:
        self.start = now_ns()

    def close(self) -> None:
        self.end = now_ns()

    def stamped(self, publisher: int, n: int) -> tuple[int, bytes]:
        sent = now_ns()
        if self.start <= sent < self.end:
            self.sent += 1
        return sent, (b'{"bench":[%d,%d],"n":%d,"vm":"guest-%02d","kind":"metric","values":[1.5,2.25,3.125],'
                      b'"note":"%s"}' % (sent, publisher, n, publisher, _NOTE))

    def record(self, sent: int, received: int) -> None:
        self.events += 1
        if self.start <= sent < self.end:
            self.received += 1
            self.latencies.append(received - sent)

    def percentiles(self, prefix: str = "") -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {f"{prefix}p50_ms": percentile(ordered, 0.50), f"{prefix}p99_ms": percentile(ordered, 0.99),
                f"{prefix}max_ms": percentile(ordered, 1.0)}


class Credit:
    """How many more messages a publisher may have in flight."""

    def __init__(self, size: int):
        self.size = self.free = size
        self.waiter: asyncio.Future | None = None
        self.wanted = 1

    def release(self) -> None:
        self.free += 1
        if self.waiter is not None and self.free >= self.wanted and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float, wanted: int = 1) -> bool:
        """Until ``wanted`` are free; False if ``timeout`` seconds pass first."""
        if self.free >= wanted:
            return True
        self.waiter, self.wanted = asyncio.get_running_loop().create_future(), wanted
        try:
            await asyncio.wait_for(self.waiter, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self.waiter = None


class Receiver:
    """``on_delivery`` for subscribers: latency, and credit back to windowed publishers."""

    def __init__(self, recorder: Recorder, credits: list[Credit] | None = None):
        self.recorder = recorder
        self.credits = credits

    def __call__(self, message: bytes | bytearray) -> None:
        received = now_ns()
        sent, publisher = stamp_of(message)
        self.recorder.record(sent, received)
        if self.credits is not None:
            self.credits[publisher].release()


async def paced(clients: list, rate: float, recorder: Recorder, stop: asyncio.Event) -> None:
    """Each client publishes ``rate`` messages a second, their phases spread evenly."""
    start = time.perf_counter()
    sent = [0] * len(clients)
    phases = [index / len(clients) for index in range(len(clients))]
    while not stop.is_set():
        periods = (time.perf_counter() - start) * rate
        for index, client in enumerate(clients):
            due = int(periods + phases[index])
            while sent[index] < due:
                client.publish(recorder.stamped(index, sent[index])[1], False)
                sent[index] += 1
        await asyncio.sleep(_PACE_TICK_S)


async def windowed(client, index: int, credit: Credit, recorder: Recorder, stop: asyncio.Event,
                   acked: bool) -> None:
    """Keep up to ``credit.size`` messages in flight until ``stop``, then drain them.

    Acked: an ack ends a message's flight (and is its latency sample). Otherwise the
    subscriber's ``Receiver`` gives the credit back; a message the server dropped
    never comes back, so after ``_STALL_S`` without credit the window is refilled.
    """
    sent_at: collections.deque[int] = collections.deque()
    if acked:
        def on_ack(ok: bool) -> None:
            sent = sent_at.popleft()
            if ok:
                recorder.record(sent, now_ns())
            else:
                recorder.failed += 1
            credit.release()

        client.on_ack = on_ack
    n = 0
    while not stop.is_set():
        if not await credit.wait(_STALL_S):
            if acked:
                raise RuntimeError(f"no publish ack for {_STALL_S:g}s")
            credit.free = credit.size
            continue
        while credit.free and not stop.is_set():
            credit.free -= 1
            sent, message = recorder.stamped(index, n)
            if acked:
                sent_at.append(sent)
            client.publish(message, acked)
            n += 1
    await credit.wait(_DRAIN_S, credit.size)


@dataclass
class Window:
    """What the server did while the window was open and the traffic drained."""

    seconds: float
    cpu_seconds: float
    generator_cpu_pct: float

    def figures(self, events: int) -> dict[str, float]:
        """Server CPU per message (``events`` of them) and the load generator's own CPU."""
        return {"server_cpu_us_per_msg": self.cpu_seconds / events * 1e6 if events else math.nan,
                "generator_cpu_pct": self.generator_cpu_pct}


class Run:
    """One workload on one started system: its clients, and readings of the server."""

    def __init__(self, system: System, settings: Settings):
        self.system = system
        self.settings = settings
        self.clients: list = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.details: dict = {}

    async def guest(self, name: str):
        client = await self.system.guest(name)
        self.clients.append(client)
        return client

    async def guests(self, prefix: str, count: int) -> list:
        return [await self.guest(f"{prefix}{index:03d}") for index in range(count)]

    async def subscriber(self, name: str, on_delivery: Callable) -> object:
        client = await self.guest(name)
        client.on_delivery = on_delivery
        await client.subscribe()
        return client

    async def remote_guest(self, name: str):
        client = await self.system.remote_guest(name)
        self.clients.append(client)
        return client

    async def host_subscriber(self, on_delivery: Callable) -> object:
        client = await self.system.host_subscriber()
        self.clients.append(client)
        client.on_delivery = on_delivery
        return client

    def cpu_reading(self) -> dict[int, float]:
        return self.system.tree.cpu_seconds()

    async def measure(self, recorder: Recorder, publishers: list[Awaitable], drained: Callable[[], bool],
                      others: tuple[Recorder, ...] = ()) -> Window:
        """Start the publishers, warm up, open the window for ``duration``, stop
        the publishers and let what is in flight drain. ``others`` record other
        receivers of the same messages: the same window, drained alike."""
        recorders = (recorder, *others)
        # ZeroMQ subscriptions reach publishers some time after connect: a message sent
        # before then is dropped unseen, and would cost a windowed publisher its credit.
        await asyncio.sleep(self.system.settle_s)
        self.tasks = [asyncio.ensure_future(publisher) for publisher in publishers]
        await self.sleep_watching(self.settings.warmup)
        cpu_before, generator_before = self.cpu_reading(), _own_cpu()
        for each in recorders:
            each.open()
        await self.sleep_watching(self.settings.duration)
        for each in recorders:
            each.close()
        self.stop.set()
        seconds = (recorder.end - recorder.start) / 1e9
        generator = (_own_cpu() - generator_before) / seconds * 100
        await self.drain(recorders, drained)
        await asyncio.gather(*self.tasks)  # publishers end after their own drain; raises their errors
        cpu_after = self.cpu_reading()
        return self.window(seconds, cpu_before, cpu_after, generator)

    def window(self, seconds: float, before: dict[int, float], after: dict[int, float],
               generator_pct: float) -> Window:
        names = self.system.process_names()
        by_process: dict[str, float] = collections.Counter()
        for pid, seconds_now in after.items():
            by_process[names.get(pid, self.system.name)] += seconds_now - before.get(pid, 0.0)
        self.details["server_cpu_s_by_process"] = {name: round(cpu, 3) for name, cpu in by_process.items()}
        return Window(seconds, sum(by_process.values()), generator_pct)

    async def sleep_watching(self, seconds: float) -> None:
        """Sleep, but surface a publisher's failure at once."""
        done, _ = await asyncio.wait(self.tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()

    @staticmethod
    async def drain(recorders: tuple[Recorder, ...], drained: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _DRAIN_S
        events, idle_since = sum(each.events for each in recorders), time.monotonic()
        while not drained() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            if sum(each.events for each in recorders) != events:
                events, idle_since = sum(each.events for each in recorders), time.monotonic()
            elif time.monotonic() - idle_since > _IDLE_S:
                break

    def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        for client in self.clients:
            client.close()


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


# -- the workloads -----------------------------------------------------------------

NOMINAL_GUESTS, NOMINAL_RATE = 32, 200.0
ACKED_GUESTS, PIPELINE_WINDOW = 8, 64
FANOUT_SUBSCRIBERS, FANOUT_RATE = 100, 1000.0
FEDERATION_RATE = 1000.0
FEDERATION_RECEIVER = "receiver"  # the guest the federation workload publishes to, on host b
_FLEET_READY_S = 30.0  # for a first message to cross from host a to host b


async def nominal(run: Run) -> dict[str, float]:
    recorder = Recorder()
    receiver = Receiver(recorder)
    await run.host_subscriber(receiver)
    await run.subscriber("subscriber", receiver)
    publishers = await run.guests("publisher", NOMINAL_GUESTS)
    receivers = 2
    window = await run.measure(recorder, [paced(publishers, NOMINAL_RATE, recorder, run.stop)],
                               lambda: recorder.received >= recorder.sent * receivers)
    return {
        "sent_per_s": recorder.sent / window.seconds,
        **recorder.percentiles(),
        "delivered_ratio": recorder.received / (recorder.sent * receivers),
        **window.figures(recorder.events),
    }


async def _acked(run: Run, window_size: int) -> dict[str, float]:
    await run.system.prepare_acked()
    recorder = Recorder()
    publishers = await run.guests("publisher", ACKED_GUESTS)
    credits = [Credit(window_size) for _ in publishers]
    window = await run.measure(
        recorder,
        [windowed(client, index, credits[index], recorder, run.stop, acked=True)
         for index, client in enumerate(publishers)],
        lambda: all(credit.free == credit.size for credit in credits),
    )
    return {
        "acked_per_s": recorder.received / window.seconds,
        **recorder.percentiles("ack_"),
        "failed": recorder.failed,
        **window.figures(recorder.events),
    }


async def acked(run: Run) -> dict[str, float]:
    return await _acked(run, 1)


async def pipelined(run: Run) -> dict[str, float]:
    return await _acked(run, PIPELINE_WINDOW)


async def saturation(run: Run) -> dict[str, float]:
    recorder = Recorder()
    credits = [Credit(PIPELINE_WINDOW) for _ in range(ACKED_GUESTS)]
    await run.subscriber("subscriber", Receiver(recorder, credits))
    publishers = await run.guests("publisher", ACKED_GUESTS)
    window = await run.measure(
        recorder,
        [windowed(client, index, credits[index], recorder, run.stop, acked=False)
         for index, client in enumerate(publishers)],
        lambda: recorder.received >= recorder.sent,
    )
    return {
        "delivered_per_s": recorder.received / window.seconds,
        **recorder.percentiles(),
        "delivered_ratio": recorder.received / recorder.sent if recorder.sent else math.nan,
        **window.figures(recorder.events),
    }


async def fanout(run: Run) -> dict[str, float]:
    recorder = Recorder()
    receiver = Receiver(recorder)
    await asyncio.gather(*(run.subscriber(f"subscriber{index:03d}", receiver) for index in range(FANOUT_SUBSCRIBERS)))
    publisher = await run.guest("publisher")
    window = await run.measure(recorder, [paced([publisher], FANOUT_RATE, recorder, run.stop)],
                               lambda: recorder.received >= recorder.sent * FANOUT_SUBSCRIBERS)
    return {
        **recorder.percentiles(),
        "delivered_ratio": recorder.received / (recorder.sent * FANOUT_SUBSCRIBERS),
        **window.figures(recorder.events),
    }


async def sessions(run: Run) -> dict[str, float]:
    """Open ``settings.sessions`` bus sessions, then hold them for ``duration`` while
    each sends one heartbeat (spread evenly over the hold)."""
    count = run.settings.sessions
    tree = run.system.tree
    rss_before, cpu_before = tree.rss_bytes(), run.cpu_reading()
    gate = asyncio.Semaphore(_OPEN_CONCURRENCY)
    refused: list[str] = []

    async def open_one(index: int):
        async with gate:
            try:
                return await run.guest(f"session{index:05d}")
            except (OSError, asyncio.TimeoutError, ProtocolError) as exc:
                refused.append(f"{type(exc).__name__}: {exc}")
                return None

    started = time.perf_counter()
    opened = [client for client in await asyncio.gather(*map(open_one, range(count))) if client]
    open_seconds = time.perf_counter() - started
    if refused:
        run.details["refused"] = {"count": len(refused), "first": refused[0]}
    answered = 0

    def heartbeat_answered() -> None:
        nonlocal answered
        answered += 1

    hold_start = time.perf_counter()
    sent = 0
    generator_before = _own_cpu()
    while sent < len(opened):
        due = min(len(opened), int((time.perf_counter() - hold_start) / run.settings.duration * len(opened)) + 1)
        for client in opened[sent:due]:
            client.on_heartbeat = heartbeat_answered
            client.heartbeat()
        sent = due
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + _DRAIN_S
    while answered < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    hold_seconds = time.perf_counter() - hold_start
    rss_after = tree.rss_bytes()
    window = run.window(open_seconds + hold_seconds, cpu_before, run.cpu_reading(),
                        (_own_cpu() - generator_before) / hold_seconds * 100)
    return {
        "sessions": len(opened),
        "handshakes_per_s": len(opened) / open_seconds,
        "heartbeat_ratio": answered / sent if sent else math.nan,
        "rss_kib_per_session": (rss_after - rss_before) / 1024 / len(opened) if opened else math.nan,
        "server_rss_mib": rss_after / 2**20,
        **window.figures(len(opened) + answered),
    }


async def federation(run: Run) -> dict[str, float]:
    """A guest on host a publishes to ``vm:receiver`` at ``FEDERATION_RATE``: local
    figures from a host subscriber on a, cross-host ones from ``receiver`` on host b
    (``castra-uplink``). A system of one router has the same load and local figures,
    and no receiver (its cross-host figures are NaN): the local path with and without
    the uplink."""
    local, cross = Recorder(), Recorder()
    await run.host_subscriber(Receiver(local))
    publisher = await run.guest("publisher")
    publisher.topic = b"vm:" + FEDERATION_RECEIVER.encode()
    others: tuple[Recorder, ...] = ()
    if run.system.hosts > 1:
        receiver = await run.remote_guest(FEDERATION_RECEIVER)
        receiver.topic = publisher.topic
        await receiver.subscribe()
        await first_crossing(publisher, receiver, local)
        receiver.on_delivery = Receiver(cross)
        others = (cross,)
    window = await run.measure(local, [paced([publisher], FEDERATION_RATE, local, run.stop)],
                               lambda: local.received >= local.sent and cross.received >= local.sent * len(others),
                               others)
    return {
        "sent_per_s": local.sent / window.seconds,
        **local.percentiles("local_"),
        "local_delivered_ratio": local.received / local.sent if local.sent else math.nan,
        "cross_delivered_per_s": cross.received / window.seconds if others else math.nan,
        **cross.percentiles("cross_"),
        "cross_delivered_ratio": cross.received / local.sent if others and local.sent else math.nan,
        **window.figures(local.events + cross.events),
    }


async def first_crossing(publisher, receiver, recorder: Recorder) -> None:
    """Publish until a message reaches ``receiver``: both uplinks connected, the
    stream and host b's consumer made. Before the window: not counted."""
    arrived = asyncio.Event()
    receiver.on_delivery = lambda _message: arrived.set()
    deadline = time.monotonic() + _FLEET_READY_S
    while not arrived.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no message from host a reached host b in {_FLEET_READY_S:g}s")
        publisher.publish(recorder.stamped(0, 0)[1], False)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(arrived.wait(), 0.2)


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    run: Callable[[Run], Awaitable[dict[str, float]]]
    per_msg: str  # what "msg" means in server CPU per msg
    columns: tuple[str, ...]  # the figures shown in the table (the JSON has them all)


WORKLOADS = {
    workload.name: workload
    for workload in (
        Workload("nominal", f"{NOMINAL_GUESTS} guests x {NOMINAL_RATE:g} msg/s; a host subscriber and a "
                 "subscribed guest; end-to-end latency", nominal, "receipt",
                 ("sent_per_s", "p50_ms", "p99_ms", "max_ms", "delivered_ratio")),
        Workload("acked", f"{ACKED_GUESTS} guests, each waiting for its publish ack", acked, "ack",
                 ("acked_per_s", "ack_p50_ms", "ack_p99_ms")),
        Workload("pipelined", f"{ACKED_GUESTS} guests, up to {PIPELINE_WINDOW} publishes in flight each",
                 pipelined, "ack", ("acked_per_s", "ack_p50_ms", "ack_p99_ms")),
        Workload("saturation", f"{ACKED_GUESTS} guests as fast as a window of {PIPELINE_WINDOW} (until the "
                 "subscribed guest receives) allows", saturation, "receipt",
                 ("delivered_per_s", "p50_ms", "p99_ms", "delivered_ratio")),
        Workload("fanout", f"1 publisher at {FANOUT_RATE:g} msg/s, {FANOUT_SUBSCRIBERS} subscribed guests",
                 fanout, "receipt", ("p50_ms", "p99_ms", "max_ms", "delivered_ratio")),
        Workload("sessions", "concurrent bus sessions: open, then one heartbeat each over the hold",
                 sessions, "handshake or heartbeat",
                 ("sessions", "handshakes_per_s", "rss_kib_per_session", "heartbeat_ratio")),
        Workload("federation", f"1 guest on host a at {FEDERATION_RATE:g} msg/s to a guest on host b through "
                 "the uplinks and a 3-node NATS cluster; local: a host subscriber on a", federation, "receipt",
                 ("sent_per_s", "local_p50_ms", "local_p99_ms", "local_delivered_ratio", "cross_delivered_per_s",
                  "cross_p50_ms", "cross_p99_ms", "cross_max_ms", "cross_delivered_ratio")),
    )
}
