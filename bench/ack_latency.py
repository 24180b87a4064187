"""Publish -> ack round trip and acked throughput of a real router on loopback.

    python -m bench.ack_latency [--count 3000] [--guests 8] [--window 64] [--fsync batch|never]

Starts ``castra up`` on a temp state root and port, then:
1. sequential: one guest, each publish waits for its ack (ack round trip percentiles);
2. pipelined: N guests, each keeping up to WINDOW publishes in flight (acked msgs/s).
Every loop is bounded by count and by a time limit; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAYLOAD = {"kind": "metric", "host": "guest-01", "values": [1.5, 2.25, 3.125], "note": "x" * 120}
TIME_LIMIT = 60.0


def frame(obj) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


async def open_session(port: int, vm: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await reader.readline()
    writer.write(f"hello vm:{vm} capabilities=bus-v1\n".encode())
    reply = await reader.readline()
    assert reply.startswith(b"ok session="), reply
    return reader, writer


async def read_frame(reader) -> bytes:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return await reader.readexactly(length)


async def sequential(port: int, count: int) -> list[float]:
    reader, writer = await open_session(port, "seq")
    message = frame({"type": "publish", "topic": "bench", "payload": PAYLOAD})
    samples = []
    stop = time.monotonic() + TIME_LIMIT
    for _ in range(count):
        start = time.perf_counter()
        writer.write(message)
        ack = await read_frame(reader)
        samples.append((time.perf_counter() - start) * 1000)
        assert b'"status":"ok"' in ack, ack
        if time.monotonic() > stop:
            break
    writer.close()
    return samples


async def pipelined(port: int, guests: int, window: int, count: int) -> tuple[int, float]:
    async def one(n: int) -> int:
        reader, writer = await open_session(port, f"pipe{n}")
        message = frame({"type": "publish", "topic": "bench", "payload": PAYLOAD})
        sent = acked = 0
        stop = time.monotonic() + TIME_LIMIT
        while acked < count and time.monotonic() < stop:
            while sent < count and sent - acked < window:
                writer.write(message)
                sent += 1
            ack = await read_frame(reader)
            assert b'"status":"ok"' in ack, ack
            acked += 1
        writer.close()
        return acked

    start = time.perf_counter()
    totals = await asyncio.gather(*(one(n) for n in range(guests)))
    return sum(totals), time.perf_counter() - start


def percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return f"p50 {q[49]:.3f} ms  p90 {q[89]:.3f} ms  p99 {q[98]:.3f} ms  max {max(samples):.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--fsync", choices=["batch", "never"], default="batch")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="czb", dir="/tmp"))
    router = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--state-root", str(root / "s"), "--port", "0", "--fsync", args.fsync],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        port = int(re.search(rb":(\d+) ", router.stdout.readline()).group(1))
        samples = asyncio.run(sequential(port, args.count))
        print(f"sequential ack round trip ({len(samples)} publishes, fsync={args.fsync}): {percentiles(samples)}")
        total, elapsed = asyncio.run(pipelined(port, args.guests, args.window, args.count))
        print(f"pipelined: {args.guests} guests x window {args.window}: {total} acked in {elapsed:.2f} s "
              f"= {total / elapsed:,.0f} msgs/s")
    finally:
        router.terminate()
        router.wait(15)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
