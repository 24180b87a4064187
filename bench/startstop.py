"""How long ``castra up`` takes to serve guests, and to stop.

    python -m bench.startstop [--runs 20] [--against DIR]

Each run starts ``castra up`` on a fresh state root and a free 127.0.0.1 port,
times the first greeting a guest gets on that port (the port is bound before the
roles start, so this is when the bridge serves) and the ready line, then sends
SIGINT and times the exit. Prints the median, 90th percentile and maximum of each.

``--against DIR`` runs another checkout too (``git worktree add /tmp/old HEAD~1``),
alternating with this one run by run: on a shared machine, the fair comparison.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from castra_zmq.handshake import GREETING

_RUN_TIMEOUT = 30.0  # seconds: a router slower than this is broken, not slow


def free_port() -> int:
    """A free port below the kernel's ephemeral range: connecting to a port in that
    range before the router binds it can connect the client to itself."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        ephemeral_low = int(ports.read().split()[0])
    while True:
        port = random.randrange(10000, ephemeral_low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def first_greeting(port: int, process: subprocess.Popen, deadline: float) -> None:
    """Connect until the bridge greets; before the supervisor binds, connect is refused."""
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=deadline - time.monotonic()) as sock:
                received = b""
                while not received.endswith(b"\n"):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    received += chunk
                if received == GREETING:
                    return
        except OSError:
            pass
        time.sleep(0.002)
    raise TimeoutError("no greeting")


def cli_module(checkout: Path) -> str:
    """The CLI's module in ``checkout`` (it moved into the package)."""
    return "castra_zmq.cli.main" if (checkout / "castra_zmq" / "cli" / "main.py").exists() else "cli.main"


def one_run(checkout: Path, state_root: Path) -> tuple[float, float, float]:
    """Seconds to the first greeting, to the ready line, and from SIGINT to exit."""
    port = free_port()
    started = time.monotonic()
    deadline = started + _RUN_TIMEOUT
    # From the checkout's directory, ``-m`` imports its castra_zmq, and so do the roles.
    process = subprocess.Popen(
        [sys.executable, "-m", cli_module(checkout), "up", "--state-root", str(state_root), "--port", str(port)],
        cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        first_greeting(port, process, deadline)
        greeted = time.monotonic() - started
        if b"castra router ready" not in process.stdout.readline():
            raise RuntimeError("castra up printed no ready line")
        ready = time.monotonic() - started
        stopping = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(_RUN_TIMEOUT)
        stopped = time.monotonic() - stopping
        if code != 0:
            raise RuntimeError(f"castra up exited with {code}")
        return greeted, ready, stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered) * 1000:6.0f} ms  p90 {p90 * 1000:6.0f} ms  " \
           f"max {ordered[-1] * 1000:6.0f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startstop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--against", type=Path, help="another checkout, to run alternately with this one")
    args = parser.parse_args(argv)
    checkouts = [Path(__file__).resolve().parent.parent]
    if args.against is not None:
        checkouts.insert(0, args.against.resolve())
    times: dict[Path, list[tuple[float, float, float]]] = {checkout: [] for checkout in checkouts}
    for _ in range(args.runs):
        for checkout in checkouts:
            directory = Path(tempfile.mkdtemp(prefix="czb", dir="/tmp"))  # ipc paths: 107 bytes at most
            try:
                times[checkout].append(one_run(checkout, directory / "root"))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    print(f"{args.runs} runs each, {os.cpu_count()} CPUs")
    for checkout, runs in times.items():
        greeted, ready, stopped = zip(*runs)
        print(checkout)
        print(f"  start -> first greeting  {summary(greeted)}")
        print(f"  start -> ready line      {summary(ready)}")
        print(f"  SIGINT -> exit           {summary(stopped)}")


if __name__ == "__main__":
    main()
