"""What ``castra status`` shows: gathering it without blocking, and the table.

The status role is asked first (250 ms deadline); when it does not answer, the
last snapshot file is read instead, and ``router.source`` says which was used.
"""

from __future__ import annotations

import os

import msgspec

from .client import query_status
from .endpoints import Endpoints
from .events import now_ms
from .owner import read_router_info, router_pid
from .statustable import StatusTable, StatusView, load_snapshot, view
from .terminal import printable

_decode_view = msgspec.json.Decoder(StatusView).decode


def collect_status(state_root: os.PathLike | str, timeout: float = 0.25) -> StatusView:
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
            table.bridge_sync_ms = None
        result = view(table, now_ms())
        if pid is None:
            result.journal = None
    info = read_router_info(endpoints) if pid is not None else None
    result.router = {
        "running": pid is not None,
        "pid": pid,
        "listen": info.listen if info else None,
        "uptime_ms": max(0, now_ms() - info.started_ms) if info else None,
        "state_root": str(endpoints.state_root),
        "source": source,
        "processes": {name: msgspec.to_builtins(state) for name, state in info.processes.items()} if info else {},
    }
    return result


def _age_text(age_ms: int | None) -> str:
    if age_ms is None:
        return "—"
    if age_ms < 1000:
        return f"{age_ms}ms"
    if age_ms < 120_000:
        return f"{age_ms / 1000:.1f}s"
    if age_ms < 7_200_000:
        return f"{age_ms // 60_000}m"
    return f"{age_ms // 3_600_000}h"


def render_table(result: StatusView, color: bool = False) -> str:
    """An aligned table with a legend, styled when ``color`` (the CLI decides).

    Names and topics are chosen by guests: they are shown through ``printable``.
    """
    import click  # only the CLI renders tables

    headers = ("VM", "ROUTER", "HANDSHAKE AGE", "BUS", "BUS AGE", "TOPICS")
    rows = []
    for vm in result.vms:
        bus = "subscribed" if vm.bus_subscribed else ("idle" if vm.bus_protocol else "—")
        bus_age = min((a for a in (vm.last_publish_age_ms, vm.last_heartbeat_age_ms) if a is not None), default=None)
        rows.append((printable(vm.name), "reachable" if vm.reachable else "stale",
                     _age_text(vm.last_handshake_age_ms), bus, _age_text(bus_age),
                     ",".join(map(printable, vm.subscribed_topics)) or "—"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    styles = {"reachable": "green", "stale": "yellow", "subscribed": "green"}

    def line(cells, bold=False):
        parts = []
        for cell, width in zip(cells, widths):
            text = cell.ljust(width)
            if color:
                text = click.style(text, fg=styles.get(cell), bold=bold)
            parts.append(text)
        return "  ".join(parts).rstrip()

    router = result.router
    if router.get("running"):
        head = f"router: running on {router.get('listen')} (pid {router.get('pid')}), status {router.get('source')}"
    else:
        head = f"router: not running (start it with `castra up`), status from {router.get('source')}"
    if result.journal is not None and result.journal.state != "ok":
        head += f"\njournal: {result.journal.state}" + (f" ({result.journal.reason})" if result.journal.reason else "")
    if result.refused_handshakes:
        head += f"\nhandshakes refused: {result.refused_handshakes} (each in the router's log)"
    out = [head, "", line(headers, bold=True)]
    out += [line(r) for r in rows] or ["(no VMs seen yet)"]
    out += ["", ("ROUTER reachable: the router heard the VM (handshake under 45 s old or a live bus session); "
                "BUS subscribed: session open, idle: no session now, —: handshake-only.")]
    return "\n".join(out)
