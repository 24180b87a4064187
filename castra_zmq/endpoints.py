"""Every path and ipc endpoint under ``<state_root>``, in one place.

```
<state_root>/            0700
  run/                   0700  ipc sockets, lock and router.json (live only)
  logs/bus/bus.log             every committed message
  logs/bus/<vm>.log            per-VM logs (names encoded by ``logfiles``)
  state/status.json            the status role's last snapshot
  state/journal.json           how far the per-VM logs are known to be on disk
  state/bus.json               the seq a rotated bus.log goes on from
  state/uplink.json            the uplink's epoch: which seq space its uploads are in
  state/origins.json           per other host, its last message in bus.log, and the seq that covers
```

Who may control these directories, and the directories above them, is
``statefs``'s to check: ``prepare`` for the router, ``check_run_dir`` for host tools.

Runs in: every process.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError
from .statefs import check_state_root

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_IPC_PATH = 107


def default_state_root() -> Path:
    env = os.environ.get("CASTRA_STATE_ROOT")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "castra"


class Endpoints:
    """Paths of one router instance, derived from its state root."""

    def __init__(self, state_root: os.PathLike | str):
        self.state_root = Path(state_root).absolute()
        self.run_dir = self.state_root / "run"
        self.logs_dir = self.state_root / "logs" / "bus"
        self.state_dir = self.state_root / "state"
        self.bus_log = self.logs_dir / "bus.log"
        self.snapshot = self.state_dir / "status.json"
        self.journal_checkpoint = self.state_dir / "journal.json"  # per-VM logs synced up to
        self.bus_seq_floor = self.state_dir / "bus.json"  # seq a rotated, empty bus.log goes on from
        self.log_identity = self.state_dir / "log.json"  # the name of bus.log's seq space, for bus-v2 guests
        self.uplink_state = self.state_dir / "uplink.json"  # the uplink's epoch
        self.origins_checkpoint = self.state_dir / "origins.json"  # other hosts' last messages in bus.log
        self.fleet = self.state_dir / "fleet.json"  # where every VM lives, as the uplink last saw it
        self.handovers = self.state_dir / "handovers.json"  # the uplink's handovers the bridge has not delivered
        self.lock_file = self.run_dir / "router.lock"
        self.router_info = self.run_dir / "router.json"
        self.publish_socket = self.run_dir / "bus-in.sock"  # proxy XSUB: publishers connect
        self.subscribe_socket = self.run_dir / "bus-out.sock"  # proxy XPUB: subscribers connect
        self.status_socket = self.run_dir / "status.sock"  # status ROUTER: queries
        self.journal_socket = self.run_dir / "journal.sock"  # bridge ROUTER: host publishes (name kept)

    @property
    def publish(self) -> str:
        return _ipc(self.publish_socket)

    @property
    def subscribe(self) -> str:
        return _ipc(self.subscribe_socket)

    @property
    def status(self) -> str:
        return _ipc(self.status_socket)

    @property
    def journal(self) -> str:
        return _ipc(self.journal_socket)

    def prepare(self) -> None:
        """Create the directories with owner-only modes (0700), fixing looser ones.

        Raises ``UnsafeStateRoot`` when another user could change the state root or
        a directory above it, or left a symbolic link or a file of theirs in it.
        """
        for sock in (self.publish_socket, self.subscribe_socket, self.status_socket, self.journal_socket):
            if len(os.fsencode(sock)) > _MAX_IPC_PATH:
                raise ConfigError(
                    f"state root {self.state_root} is too long for ipc socket paths "
                    f"({_MAX_IPC_PATH} bytes max); choose a shorter --state-root"
                )
        check_state_root(self.state_root, (self.run_dir, self.logs_dir.parent, self.logs_dir, self.state_dir),
                         prepare=True)

    def check_run_dir(self) -> bool:
        """Whether ``run/`` exists; raises ``UnsafeStateRoot`` when another user could
        change it, the state root or a directory above.

        Host tools find the router's sockets by path: they call this before they
        connect, so a socket someone else put there never gets their messages.
        """
        return check_state_root(self.state_root, (self.run_dir,), prepare=False)


def _ipc(path: Path) -> str:
    return f"ipc://{path}"
