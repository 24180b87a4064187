"""What ``castra status`` shows, gathered without blocking (``cli/status.py`` renders it).

The status role is asked first (250 ms deadline); when it does not answer, the
last snapshot file is read instead, and ``router.source`` says which was used.

Status is four pieces: ``statustable`` the model (the table, how events fold into
it, the view of it), ``status`` the role process that keeps it, this module the
query (and ``client.query_status`` its socket), ``cli/status`` the rendering.

Runs in: ``castra status`` (the CLI).
"""

from __future__ import annotations

import os

import msgspec

from .client import query_status
from .endpoints import Endpoints
from .events import now_ms
from .owner import read_router_info, router_pid
from .statefs import read_regular
from .statustable import (
    FleetStatus,
    FleetVmStatus,
    RouterStatus,
    StatusTable,
    StatusView,
    UplinkStatus,
    decode_fleet,
    load_snapshot,
    view,
)

_decode_view = msgspec.json.Decoder(StatusView).decode


def collect_status(state_root: os.PathLike | str, timeout: float = 0.25, fleet: bool = False) -> StatusView:
    endpoints = Endpoints(state_root)
    pid = router_pid(endpoints)
    live = query_status(state_root=state_root, timeout=timeout) if pid is not None else None
    if live is not None:
        result, source = _decode_view(live), "live"
    else:
        snapshot = load_snapshot(endpoints)
        source = "snapshot" if snapshot is not None else "none"
        table = snapshot or StatusTable()
        if pid is None:
            # No router, no bridge: no session is open, whatever the file says, and
            # only a fresh handshake keeps a VM reachable.
            table.bridge_seen_ms = None
        result = view(table, now_ms())
        if pid is None:
            result.journal = None
            result.uplink = msgspec.UNSET
    info = read_router_info(endpoints) if pid is not None else None
    result.router = RouterStatus(
        running=pid is not None,
        pid=pid,
        listen=info.listen if info else None,
        uptime_ms=max(0, now_ms() - info.started_ms) if info else None,
        state_root=str(endpoints.state_root),
        source=source,
        processes=info.processes if info else {},
    )
    if fleet:
        result.fleet = fleet_status(endpoints, result.uplink)
    return result


def fleet_status(endpoints: Endpoints, uplink: UplinkStatus | msgspec.UnsetType) -> FleetStatus | None:
    """Where every VM lives, from the uplink's ``state/fleet.json``; whether that is
    current from the uplink's health (it reads nothing from NATS: never waits on it).
    None without an uplink."""
    if not uplink:
        return None
    nats = {"connected": "connected", "disconnected": "unreachable"}.get(uplink.state, "down")
    try:
        view = decode_fleet(read_regular(endpoints.fleet))
    except (OSError, msgspec.DecodeError):
        return FleetStatus(host=uplink.host, nats=nats, known_age_ms=None)
    now = now_ms()
    return FleetStatus(
        host=view.host, nats=nats, known_age_ms=max(0, now - view.written_ms),
        vms=[FleetVmStatus(vm.vm, vm.host, vm.state, max(0, now - vm.since_ms), vm.host == view.host)
             for vm in view.vms],
        waiting=view.waiting)


def vms_seen(state_root: os.PathLike | str, timeout: float = 0.25) -> set[str] | None:
    """The VMs the running router's status knows (connected in the last 7 days), or
    None when no status process answers: then nothing is known either way."""
    live = query_status(state_root=state_root, timeout=timeout)
    return None if live is None else {vm.name for vm in _decode_view(live).vms}
