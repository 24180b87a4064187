"""The systems under test: how each server is started, reached and measured.

Every server is started by the bench on 127.0.0.1 (a free port, or ipc sockets in a
temp directory), with its output in a log file there, and stopped afterwards. Its
CPU time and memory are read from ``/proc`` for the server's process and all its
descendants (for castra: the supervisor and every role).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import zmq
import zmq.asyncio

from castra_zmq import __version__ as castra_version
from castra_zmq import topics
from castra_zmq.endpoints import Endpoints

from .clients import CastraClient, MqttClient, NatsClient, ZmqClient, ZmqSubscriber, open_tcp

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SBIN = os.pathsep.join(["/usr/sbin", "/usr/local/sbin"])  # Debian puts both brokers there
_STREAM = "BENCH"
_REPO = Path(__file__).resolve().parent.parent  # where `python -m bench.*` resolves


class ProcessTree:
    """A server's process and its descendants, as seen in ``/proc``."""

    def __init__(self, root: int):
        self.root = root

    def pids(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _read_stat(int(entry))
                if stat is not None:
                    parents[int(entry)] = int(stat[1])
        tree, frontier = [self.root], [self.root]
        while frontier:
            frontier = [pid for pid, parent in parents.items() if parent in frontier]
            tree += frontier
        return tree

    def cpu_seconds(self) -> dict[int, float]:
        """utime + stime of each live process of the tree."""
        seconds = {}
        for pid in self.pids():
            stat = _read_stat(pid)
            if stat is not None:  # fields after "(comm)": utime and stime are 14th/15th of stat
                seconds[pid] = (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS
        return seconds

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE
            except (OSError, IndexError):
                pass  # exited meanwhile
        return total


def _read_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, from state on."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s") from None
            time.sleep(0.02)


def read_ready_line(process: subprocess.Popen, timeout: float = START_TIMEOUT) -> str:
    """The first line the server prints on stdout, within ``timeout``."""
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline().decode(errors="replace") if readable else ""
    if not line:
        process.kill()
        raise RuntimeError(f"server printed no ready line within {timeout:g}s")
    return line


def find_binary(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + _SBIN)


class System:
    """One server kind. ``start`` and ``stop`` bracket one round of workloads."""

    name = ""
    #: workloads this system has no equivalent for, with the reason
    unsupported: ClassVar[dict[str, str]] = {}
    #: seconds for ZeroMQ subscriptions to reach the publishers (the slow-joiner)
    settle_s = 0.0

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.log = None
        self.workdir: Path | None = None
        self.context: zmq.asyncio.Context | None = None  # for this round's ZeroMQ clients

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def version(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """How the bench drives this system, for the notes."""
        raise NotImplementedError

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.context = zmq.asyncio.Context()
        self.launch(workdir)

    def launch(self, workdir: Path) -> None:
        """Start the server; return once it accepts clients."""
        raise NotImplementedError

    def spawn(self, argv: list[str], workdir: Path, **kwargs) -> subprocess.Popen:
        self.log = open(workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=self.log, cwd=_REPO, **kwargs)
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        if self.log is not None:
            self.log.close()
        self.process = None
        if self.context is not None:
            self.context.destroy(linger=0)  # closes what a failed workload left open
            self.context = None

    def log_tail(self, size: int = 2000) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_bytes()[-size:].decode(errors="replace") if path.exists() else ""

    @property
    def tree(self) -> ProcessTree:
        return ProcessTree(self.process.pid)

    def process_names(self) -> dict[int, str]:
        """A label for each server process, for the CPU breakdown."""
        return {}

    async def guest(self, name: str):
        raise NotImplementedError

    async def host_subscriber(self):
        """What a host tool would use to watch the traffic: a guest-like client by default."""
        client = await self.guest("host-subscriber")
        await client.subscribe()
        return client

    async def prepare_acked(self) -> None:
        """Set up what acked publishes need (a JetStream stream); nothing by default."""


class Castra(System):
    name = "castra"
    settle_s = 0.3  # the ipc host subscriber is a ZeroMQ SUB

    def __init__(self, fsync: str):
        super().__init__()
        self.fsync = fsync
        self.port = 0
        self.endpoints: Endpoints | None = None

    def version(self) -> str:
        return f"castra-zmq {castra_version}"

    def describe(self) -> str:
        return (f"castra: `castra up --fsync {self.fsync}`; guests speak bus-v1 over TCP (every publish is "
                "acked after it is in the log); the host subscriber is a SUB on run/bus-out.sock")

    def launch(self, workdir: Path) -> None:
        state_root = workdir / "s"  # short: ipc socket paths are limited to 107 bytes
        process = self.spawn(
            [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(state_root),
             "--port", "0", "--fsync", self.fsync],
            workdir, stdout=subprocess.PIPE,
        )
        line = read_ready_line(process)
        match = re.search(r"ready on 127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(f"castra did not start: {line!r}")
        self.port = int(match.group(1))
        self.endpoints = Endpoints(state_root)

    def process_names(self) -> dict[int, str]:
        info = json.loads(self.endpoints.router_info.read_text())
        names = {role["pid"]: name for name, role in info["processes"].items() if role.get("pid")}
        names[self.process.pid] = "supervisor"
        return names

    async def guest(self, name: str):
        return await open_tcp(CastraClient, self.port, name)

    async def host_subscriber(self):
        return ZmqSubscriber(self.context, self.endpoints.subscribe, topics.BUS_ALL, 2)


class Mosquitto(System):
    name = "mosquitto"
    _CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
log_dest stderr
"""

    def __init__(self):
        super().__init__()
        self.port = 0

    def missing(self) -> str | None:
        return None if find_binary("mosquitto") else "mosquitto is not installed (Debian package `mosquitto`)"

    def version(self) -> str:
        result = subprocess.run([find_binary("mosquitto"), "-h"], capture_output=True, text=True, timeout=10,
                                check=False)
        return result.stdout.splitlines()[0] if result.stdout else "mosquitto"

    def describe(self) -> str:
        return ("mosquitto: MQTT 3.1.1 spoken by the bench; QoS 0 publishes and subscriptions, QoS 1 "
                "(PUBACK) for the acked workloads; set_tcp_nodelay on, persistence off (a PUBACK is not a "
                "disk write)")

    def launch(self, workdir: Path) -> None:
        self.port = free_port()
        text = self._CONFIG.format(port=self.port)
        if os.geteuid() == 0:  # else it switches to the mosquitto user, who cannot read our temp dir
            text += "user root\n"
        config = workdir / "mosquitto.conf"
        config.write_text(text)
        wait_for_port(self.port, self.spawn([find_binary("mosquitto"), "-c", str(config)], workdir))

    async def guest(self, name: str):
        return await open_tcp(MqttClient, self.port, name)


class Nats(System):
    name = "nats"
    _CONFIG = """\
listen: 127.0.0.1:{port}
jetstream {{
  store_dir: "{store}"
}}
"""

    def __init__(self):
        super().__init__()
        self.port = 0

    def missing(self) -> str | None:
        return None if find_binary("nats-server") else "nats-server is not installed (Debian package `nats-server`)"

    def version(self) -> str:
        result = subprocess.run([find_binary("nats-server"), "--version"], capture_output=True, text=True,
                                timeout=10, check=False)
        return result.stdout.strip() or "nats-server"

    def describe(self) -> str:
        return ("nats: the NATS text protocol spoken by the bench; core PUB/SUB, and for the acked workloads "
                f"publishes with a reply inbox into a JetStream file-store stream ({_STREAM}) whose "
                "acknowledgement is the ack (nats-server fsyncs its file store on a timer, not per ack)")

    def launch(self, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "nats.conf"
        config.write_text(self._CONFIG.format(port=self.port, store=workdir / "jetstream"))
        wait_for_port(self.port, self.spawn([find_binary("nats-server"), "-c", str(config)], workdir))

    async def guest(self, name: str):
        return await open_tcp(NatsClient, self.port, name)

    async def prepare_acked(self) -> None:
        client = await self.guest("stream-admin")
        try:
            config = {"name": _STREAM, "subjects": ["bench"], "storage": "file", "retention": "limits",
                      "discard": "old", "num_replicas": 1}
            answer = await client.request(f"$JS.API.STREAM.CREATE.{_STREAM}".encode(), json.dumps(config).encode())
        finally:
            client.close()
        if b'"error"' in answer and b"already in use" not in answer:
            raise RuntimeError(f"JetStream stream not created: {answer[:300]!r}")


class ZmqFloor(System):
    name = "zmq"
    unsupported: ClassVar[dict[str, str]] = {
        "acked": "a bare proxy has no acknowledgements",
        "pipelined": "a bare proxy has no acknowledgements",
        "sessions": "a bare proxy has no sessions or handshakes",
    }
    settle_s = 0.3

    def __init__(self):
        super().__init__()
        self.publish_endpoint = self.subscribe_endpoint = ""

    def version(self) -> str:
        return f"libzmq {zmq.zmq_version()} (pyzmq {zmq.__version__})"

    def describe(self) -> str:
        return ("zmq: a bare zmq.proxy XSUB/XPUB on ipc in its own process, the floor of any ZeroMQ design; "
                "guests are PUB/SUB sockets on ipc (no TCP, no acks, no durability)")

    def launch(self, workdir: Path) -> None:
        self.publish_endpoint = f"ipc://{workdir}/in.sock"
        self.subscribe_endpoint = f"ipc://{workdir}/out.sock"
        process = self.spawn(
            [sys.executable, "-m", "bench.zmq_floor", self.publish_endpoint, self.subscribe_endpoint],
            workdir, stdout=subprocess.PIPE,
        )
        read_ready_line(process)

    async def guest(self, name: str):
        return ZmqClient(self.context, self.publish_endpoint, self.subscribe_endpoint)

    async def host_subscriber(self):
        client = await self.guest("host-subscriber")
        await client.subscribe()
        return client


def make_systems(names: list[str], fsync: str) -> list[System]:
    factories = {"castra": lambda: Castra(fsync), "mosquitto": Mosquitto, "nats": Nats, "zmq": ZmqFloor}
    unknown = [name for name in names if name not in factories]
    if unknown:
        raise SystemExit(f"unknown system(s): {', '.join(unknown)} (choose from {', '.join(factories)})")
    return [factories[name]() for name in names]
