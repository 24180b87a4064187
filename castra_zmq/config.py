"""Router settings: one Struct with sensible defaults, shared by every role.

``castra up`` builds it from its options and hands it to each child process as JSON
in the ``CASTRA_SETTINGS`` environment variable.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from .endpoints import Endpoints, default_state_root
from .errors import ConfigError

SETTINGS_ENV = "CASTRA_SETTINGS"


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    state_root: str
    host: str = "127.0.0.1"
    port: int = 7070
    # Guest connections (PROTOCOL.md section 1 and 3).
    handshake_timeout: float = 5.0
    heartbeat_timeout: float = 60.0
    handshake_fresh: float = 45.0  # a handshake younger than this makes a VM reachable
    publish_window: int = 64  # un-acked publishes per session before reading pauses
    subscriber_queue_bytes: int = 4 * 1024 * 1024  # past this: slow_consumer
    max_connections: int = 20_000
    # 0: no cap. Guests behind QEMU user networking all arrive from 127.0.0.1, so a
    # per-address cap only makes sense for guests on a bridged network.
    max_connections_per_address: int = 0
    identities_file: str | None = None  # allow-list and per-VM secrets (see identity.py)
    # Journal: "batch" fsyncs once per group commit, "never" leaves it to the OS.
    fsync: Literal["batch", "never"] = "batch"
    commit_timeout: float = 5.0  # a publish not committed by then gets an error ack
    batch_max: int = 1024  # publishes in one bridge message, and about in one group commit
    # Internal bus.
    hwm: int = 200_000
    health_interval: float = 0.5  # journal health and bridge session sync period
    snapshot_interval: float = 0.25  # status snapshot file, at most this often

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(self.state_root)

    def validate(self) -> Settings:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range 0..65535")
        for name in ("handshake_timeout", "heartbeat_timeout", "commit_timeout", "health_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.publish_window < 1:
            raise ConfigError("publish_window must be at least 1")
        return self

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: msgspec.json.encode(self).decode()}


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
