"""Soak (opt-in: ``pytest -m soak``): 1,000 heartbeating sessions + 100 publishers.

For ``CASTRA_SOAK_SECONDS`` (default 300): 1,000 bus sessions heartbeat while 100
more publish at 50 msg/s each. Passes when no session was dropped, every ack was
ok, and the router's RSS (all its processes) stayed flat after warm-up. Prints a
table of the samples.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest

from ..conftest import Router

SECONDS = float(os.environ.get("CASTRA_SOAK_SECONDS", "300"))
IDLE_SESSIONS, PUBLISHERS, RATE = 1000, 100, 50.0
HEARTBEAT_EVERY = 20.0
SAMPLE_EVERY = max(1.0, SECONDS / 30)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SECONDS + 180)]
ROLES = ("proxy", "journal", "status", "bridge")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Session:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, vm: str) -> Session:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(f"hello vm:{vm} capabilities=bus-v1\n".encode())
        reply = await reader.readline()
        assert reply.startswith(b"ok session="), (vm, reply)
        return cls(reader, writer)

    async def request(self, body: bytes) -> bytes:
        self.writer.write(struct.pack(">I", len(body)) + body)
        (length,) = struct.unpack(">I", await self.reader.readexactly(4))
        return await self.reader.readexactly(length)


async def soak(port: int, pids: list[int]) -> tuple[list[tuple[float, int]], dict]:
    stats = {"acks": 0, "errors": [], "heartbeats": 0}
    idle = [await Session.open(port, f"idle{n}") for n in range(IDLE_SESSIONS)]
    publishers = [await Session.open(port, f"pub{n}") for n in range(PUBLISHERS)]
    start = time.monotonic()
    stop = start + SECONDS

    async def heartbeat(session: Session, offset: float) -> None:
        await asyncio.sleep(offset)
        while time.monotonic() < stop:
            reply = await session.request(b'{"type":"heartbeat"}')
            if b'"status":"ok"' not in reply:
                stats["errors"].append(reply)
            stats["heartbeats"] += 1
            await asyncio.sleep(HEARTBEAT_EVERY)

    async def publish(session: Session, n: int) -> None:
        body = b'{"type":"publish","topic":"soak","payload":{"n":%d,"pad":"%s"}}' % (n, b"x" * 150)
        next_at = time.monotonic()
        while time.monotonic() < stop:
            reply = await session.request(body)
            if b'"status":"ok"' in reply:
                stats["acks"] += 1
            else:
                stats["errors"].append(reply)
            next_at += 1 / RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def sample(samples: list) -> None:
        while time.monotonic() < stop:
            samples.append((time.monotonic() - start, sum(rss_kib(pid) for pid in pids)))
            await asyncio.sleep(SAMPLE_EVERY)

    samples: list[tuple[float, int]] = []
    tasks = [heartbeat(s, n * HEARTBEAT_EVERY / IDLE_SESSIONS) for n, s in enumerate(idle)]
    tasks += [publish(s, n) for n, s in enumerate(publishers)]
    await asyncio.wait_for(asyncio.gather(*tasks, sample(samples)), SECONDS + 60)
    for session in idle + publishers:  # every session must still be open
        reply = await session.request(b'{"type":"heartbeat"}')
        assert b'"status":"ok"' in reply
        session.writer.close()
    return samples, stats


def test_soak_sessions_and_publishers(router_factory):
    router: Router = router_factory()
    pids = [router.role_pid(role) for role in ROLES]
    samples, stats = asyncio.run(soak(router.port, pids))
    print(f"\n{'t (s)':>8} {'router RSS (MiB)':>17}")
    for elapsed, rss in samples:
        print(f"{elapsed:8.1f} {rss / 1024:17.1f}")
    print(f"acks {stats['acks']}  heartbeats {stats['heartbeats']}  errors {len(stats['errors'])}")
    assert not stats["errors"], stats["errors"][:5]
    assert stats["acks"] >= PUBLISHERS * RATE * SECONDS * 0.8
    warm = [rss for elapsed, rss in samples if elapsed >= SECONDS * 0.25]
    assert max(warm) <= min(warm) * 1.10 + 4096, "router RSS grew after warm-up"
    assert "reason=heartbeat_timeout" not in router.log_text()
