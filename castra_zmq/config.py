"""Router settings: one Struct with sensible defaults, shared by every role.

``castra up`` builds it from its options and hands it to each child process as JSON
in the ``CASTRA_SETTINGS`` environment variable.

Runs in: the supervisor (from ``castra up``'s options) and each role (from the
environment).
"""

from __future__ import annotations

import os
import re
from typing import Literal, get_args

import msgspec

from .endpoints import Endpoints, default_state_root
from .errors import ConfigError
from .wire import BUS_MESSAGE_MAX, PUBLISH_REQUEST_MAX, check_host_name

SETTINGS_ENV = "CASTRA_SETTINGS"
LogLevel = Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
KIB = 1024
MIB = 1024 * KIB


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    state_root: str
    host: str = "127.0.0.1"
    port: int = 7070
    # Guest connections (PROTOCOL.md section 1 and 3).
    handshake_timeout: float = 5.0
    heartbeat_timeout: float = 60.0
    handshake_fresh: float = 45.0  # a handshake younger than this makes a VM reachable
    publish_window: int = 64  # un-acked publishes per session before reading pauses
    # Everything queued to one guest (acks, error acks, heartbeat replies, deliveries):
    # past half of it the bridge stops reading that guest; past all of it, or still
    # past half after slow_consumer_timeout seconds, the guest is reset as slow_consumer.
    subscriber_queue_bytes: int = 4 * 1024 * 1024
    slow_consumer_timeout: float = 10.0
    max_connections: int = 20_000
    # 0: no cap. Guests behind QEMU user networking all arrive from 127.0.0.1, so a
    # per-address cap only makes sense for guests on a bridged network.
    max_connections_per_address: int = 0
    # Bus sessions one VM may hold at once (an agent, a publish, a second agent...):
    # a hello past it gets "error: too many sessions for this vm". A guest reset
    # without closing its connections keeps its sessions until heartbeat_timeout.
    max_sessions_per_vm: int = 8
    identities_file: str | None = None  # allow-list and per-VM secrets (see identity.py)
    # bus.log: "batch" fsyncs once per group commit, "never" leaves it to the OS.
    fsync: Literal["batch", "never"] = "batch"
    commit_timeout: float = 5.0  # --commit-timeout, kept for compatibility: nothing waits for a commit now
    batch_max: int = 1024  # publishes in one host tool's message, and host messages in one commit
    # Internal queues, in bytes. ZeroMQ counts a queue in messages, so each role sets
    # its high-water marks to queue_bytes over the largest message the queue can hold
    # (``hwm_for``), and caps what peers may send it (ZMQ_MAXMSGSIZE).
    # One queue of one role socket, for one peer. 128 MiB: the bus queues (frames of
    # up to 65.5 KiB) then hold about 2,000 messages, a whole commit's worth of small
    # ones (up to 2 x batch_max), so a host subscriber that reads loses none in a burst.
    queue_bytes: int = 128 * MIB
    batch_bytes_max: int = 256 * KIB  # one host tool's message to run/journal.sock
    commit_bytes_max: int = 1 * MIB  # a group commit takes no further message past this
    # One frame into the proxy: the largest the router sends (a bus message's body;
    # events are at most 32 KiB): the proxy's queues are queue_bytes over it.
    bus_frame_bytes_max: int = BUS_MESSAGE_MAX
    # Messages: the bench's ZeroMQ floor queues alike (bench/zmq_floor.py).
    hwm: int = 200_000
    vm_logs_max: int = 10_000  # per-VM log files; a VM past it is logged in bus.log only
    health_interval: float = 0.5  # bus.log health, rotation checks and the bridge's session sync period
    snapshot_interval: float = 0.25  # status snapshot file, at most this often
    # Logs on stderr, alike in every process (see runtime.setup_logging). Colour is
    # decided once, by ``castra up``: the roles share its stderr.
    log_level: LogLevel = "INFO"
    log_json: bool = False
    log_color: bool = False
    # Federation (issue 14): with NATS servers, the uplink role uploads this host's
    # committed messages to JetStream under ``host_name``. None: no uplink.
    uplink_servers: list[str] | None = None
    host_name: str | None = None
    # The uplink's credentials and TLS (``uplinkconnect``): absolute paths, a user name.
    # A password is never a setting: it stays in CASTRA_UPLINK_PASSWORD.
    uplink_creds: str | None = None
    uplink_user: str | None = None
    uplink_tls_ca: str | None = None
    uplink_tls_cert: str | None = None
    uplink_tls_key: str | None = None
    uplink_tls_first: bool | None = None  # True: TLS before anything else (never plain text)

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(self.state_root)

    def hwm_for(self, message_bytes_max: int) -> int:
        """The high-water mark (in messages) that keeps a queue of messages of at
        most ``message_bytes_max`` bytes within ``queue_bytes``."""
        return max(1, self.queue_bytes // message_bytes_max)

    @property
    def host_reply_bytes_max(self) -> int:
        """The largest reply the bridge sends a host tool: the results of one commit,
        each no longer than its request. A commit takes no further host message
        once ``commit_bytes_max`` is reached, so the last one it took is over it."""
        return self.commit_bytes_max + self.batch_bytes_max

    def validate(self) -> Settings:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range 0..65535")
        for name in ("handshake_timeout", "heartbeat_timeout", "commit_timeout", "health_interval",
                     "slow_consumer_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.publish_window < 1:
            raise ConfigError("publish_window must be at least 1")
        if self.max_sessions_per_vm < 1:
            raise ConfigError("max_sessions_per_vm must be at least 1")
        if self.batch_bytes_max < PUBLISH_REQUEST_MAX:
            raise ConfigError(f"batch_bytes_max must be at least {PUBLISH_REQUEST_MAX} (one publish)")
        if self.bus_frame_bytes_max < BUS_MESSAGE_MAX:
            raise ConfigError(f"bus_frame_bytes_max must be at least {BUS_MESSAGE_MAX} (one delivery)")
        for name in ("queue_bytes", "commit_bytes_max", "vm_logs_max"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.uplink_servers is not None:
            check_uplink_servers(self.uplink_servers)
            if self.host_name is None:
                raise ConfigError("an uplink needs a host name")
        self.check_uplink_security()
        if self.host_name is not None:
            check_host_name(self.host_name)
        return self

    def check_uplink_security(self) -> None:
        """The credential and TLS options make sense together (their files are
        checked by ``uplinkconnect.connect_options``)."""
        given = [f"--{name.replace('_', '-')}" for name in UPLINK_SECURITY if getattr(self, name) is not None]
        if given and self.uplink_servers is None:
            raise ConfigError(f"{' '.join(given)} without --uplink: there is no NATS connection to use it")
        if self.uplink_creds is not None and self.uplink_user is not None:
            raise ConfigError("--uplink-creds and --uplink-user exclude each other: a .creds file or nkey seed "
                              "names its user itself")
        if (self.uplink_tls_cert is None) != (self.uplink_tls_key is None):
            raise ConfigError("--uplink-tls-cert and --uplink-tls-key go together: a client certificate and its key")

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: msgspec.json.encode(self).decode()}


UPLINK_SECURITY = ("uplink_creds", "uplink_user", "uplink_tls_ca", "uplink_tls_cert", "uplink_tls_key",
                   "uplink_tls_first")
_NATS_URL = re.compile(r"nats://[^\s/,@]+:[0-9]{1,5}")


def check_uplink_servers(servers: list[str]) -> list[str]:
    """``servers`` if each is ``nats://<host>:<port>``: no user or password in a URL
    (the command line is readable by every local user); credentials and TLS have
    options of their own (``uplinkconnect``)."""
    if not servers:
        raise ConfigError("--uplink needs at least one nats://<host>:<port>")
    for url in servers:
        if not _NATS_URL.fullmatch(url):
            raise ConfigError(f"uplink server {url[:80]!r} is not nats://<host>:<port>")
    return servers


DEFAULTS = Settings(state_root="")  # what every option defaults to, for --help


def settings_from_env() -> Settings:
    """The settings a child role was started with."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        return Settings(state_root=str(default_state_root()))
    try:
        return msgspec.json.decode(raw, type=Settings).validate()
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid {SETTINGS_ENV}: {exc}") from None
