"""``castra status``: the per-VM table, live or from the last snapshot."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import msgspec

from castra_zmq.errors import CastraError
from castra_zmq.statustable import FleetStatus, StatusView, UplinkStatus
from castra_zmq.statusview import collect_status
from castra_zmq.terminal import json_for_terminal, printable

from .options import interrupt_on_signals, state_root_option, stdout_wants_color

NOT_RUNNING = 3  # as `systemctl status` and LSB `status` actions: "program is not running"
_CLEAR = "\x1b[H\x1b[2J"


@click.command()
@state_root_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable field names).")
@click.option("--fleet", is_flag=True,
              help="Also show where every VM of the fleet lives (with --uplink; JSON: a 'fleet' object). "
                   "Read from this host's uplink, never from NATS: says so when NATS is unreachable.")
@click.option("--check", is_flag=True,
              help=f"Exit {NOT_RUNNING} when the router is not running (0 when it is), as `systemctl status`.")
@click.option("--watch", "interval", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0,
              metavar="[SECONDS]",
              help="Show it again every SECONDS (2 if not given) until Ctrl-C: redrawn on a terminal, "
                   "one table (or JSON line) after another otherwise.")
def status(state_root: Path, as_json: bool, fleet: bool, check: bool, interval: float | None) -> None:
    """Show each VM's reachability and bus session, and the router's state.

    Never blocks: asks the status process (250 ms deadline) and otherwise reads
    the last snapshot; the output says which. Exits 0 even with no router (3 with
    --check), and 1 when the state root or its run/ directory could be changed by
    another user.

    \b
    Examples:
      castra status
      castra status --watch 1                          # redraw every second
      castra status --json | jq '.vms[] | select(.reachable)'
      castra status --check >/dev/null || castra up &  # start it unless running
      castra status --fleet                            # and which host owns each VM
      castra status --fleet --json | jq -r '.fleet.vms[] | select(.host == "b") | .vm'
    """
    if interval is not None and check:
        raise click.UsageError("--check and --watch exclude each other")
    if interval is not None:
        _watch(state_root, as_json, fleet, interval)
        return
    result = _show(state_root, as_json, fleet)
    if check and not result.router.running:
        sys.exit(NOT_RUNNING)


def _show(state_root: Path, as_json: bool, fleet: bool, clear: bool = False):
    try:
        result = collect_status(state_root, fleet=fleet)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    if as_json:
        click.echo(json_for_terminal(msgspec.json.encode(result)))
    else:
        text = render_table(result, color=stdout_wants_color())
        click.echo(_CLEAR + text if clear else text)
    return result


def _watch(state_root: Path, as_json: bool, fleet: bool, interval: float) -> None:
    """Show the status every ``interval`` seconds until Ctrl-C or SIGTERM (status 0)."""
    interrupt_on_signals()
    redraw = sys.stdout.isatty() and not as_json
    try:
        next_at = time.monotonic()
        first = True
        while True:
            if not (first or redraw or as_json):
                click.echo()  # a blank line between the tables
            _show(state_root, as_json, fleet, clear=redraw)
            first = False
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        pass


def age_text(age_ms: int | None) -> str:
    if age_ms is None:
        return "—"
    if age_ms < 1000:
        return f"{age_ms}ms"
    if age_ms < 120_000:
        return f"{age_ms / 1000:.1f}s"
    if age_ms < 7_200_000:
        return f"{age_ms // 60_000}m"
    return f"{age_ms // 3_600_000}h"


_REMOTE_HOSTS_SHOWN = 8  # in the table; --json has them all


def uplink_text(uplink: UplinkStatus) -> str:
    """Two lines: the connection with the upload and download positions, then the
    other hosts this one downloaded from."""
    if uplink.state == "connected":
        connection = f"connected to {uplink.server}"
    else:
        connection = uplink.state + (f" ({printable(uplink.reason)})" if uplink.reason else "")
    if uplink.upload_lag_messages is None:
        upload = "upload waiting for the bridge"
    else:
        upload = f"upload lag {uplink.upload_lag_messages} messages"
        if uplink.upload_lag_messages:
            upload += f", oldest {age_text(uplink.upload_lag_ms)}"
    download = ("download not started" if uplink.downloaded_stream_seq is None else
                f"download at stream seq {uplink.downloaded_stream_seq}, {uplink.download_pending} pending")
    hosts = [f"{printable(seen.host)} (seq {seen.last_seq}, {age_text(seen.last_seen_age_ms)} ago)"
             for seen in uplink.remote_hosts[:_REMOTE_HOSTS_SHOWN]]
    if len(uplink.remote_hosts) > _REMOTE_HOSTS_SHOWN:
        hosts.append(f"{len(uplink.remote_hosts) - _REMOTE_HOSTS_SHOWN} more")
    return (f"uplink {printable(uplink.host)}: {connection}; {upload}; {download}\n"
            f"remote hosts: {', '.join(hosts) or 'none seen'}")


_FLEET_HEADERS = ("VM", "HOST", "STATE", "SINCE")


def fleet_text(fleet: FleetStatus | None) -> str:
    """Where every VM lives: a line on how current that is, then a row per VM
    (this host's marked ``*``) and the VMs connected here that another host owns."""
    if fleet is None:
        return "fleet: no uplink running (castra up --uplink nats://...)"
    if fleet.nats == "connected":
        head = f"fleet, as {printable(fleet.host)} sees it"
    else:
        reason = "NATS unreachable" if fleet.nats == "unreachable" else "the uplink is not running"
        head = f"fleet: unknown, {reason}"
        if fleet.known_age_ms is not None:
            head += f"; last known {age_text(fleet.known_age_ms)} ago"
    if fleet.known_age_ms is None:
        return head + ": nothing known yet"
    rows = [(printable(vm.vm), printable(vm.host) + (" *" if vm.here else ""), vm.state, age_text(vm.since_age_ms))
            for vm in fleet.vms]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(_FLEET_HEADERS)]
    lines = [head + ":", "  ".join(h.ljust(w) for h, w in zip(_FLEET_HEADERS, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows] or ["(no VM owned yet)"]
    if fleet.waiting:
        lines.append("connected here, owned by another host: " + ", ".join(
            f"{printable(vm)} ({printable(host)})" for vm, host in fleet.waiting.items()))
    return "\n".join(lines)


def render_table(result: StatusView, color: bool = False) -> str:
    """An aligned table with a legend, styled when ``color`` (the CLI decides).

    Names and topics are chosen by guests: they are shown through ``printable``.
    """
    headers = ("VM", "ROUTER", "HANDSHAKE AGE", "BUS", "SESSIONS", "BUS AGE", "TOPICS")
    rows = []
    for vm in result.vms:
        bus = "subscribed" if vm.bus_subscribed else ("idle" if vm.bus_protocol else "—")
        bus_age = min((a for a in (vm.last_publish_age_ms, vm.last_heartbeat_age_ms) if a is not None), default=None)
        rows.append((printable(vm.name), "reachable" if vm.reachable else "stale",
                     age_text(vm.last_handshake_age_ms), bus, str(vm.sessions) if vm.sessions else "—",
                     age_text(bus_age),
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
    if router.running:
        head = f"router: running on {router.listen} (pid {router.pid}), status {router.source}"
    else:
        head = f"router: not running (start it with `castra up`), status from {router.source}"
    if result.journal is not None and result.journal.state != "ok":
        head += f"\njournal: {result.journal.state}" + (f" ({result.journal.reason})" if result.journal.reason else "")
    if result.refused_handshakes:
        head += f"\nhandshakes refused: {result.refused_handshakes} (each in the router's log)"
    if result.uplink:
        head += "\n" + uplink_text(result.uplink)
    out = [head, "", line(headers, bold=True)]
    out += [line(r) for r in rows] or ["(no VMs seen yet)"]
    out += ["", ("ROUTER reachable: the router heard the VM (handshake under 45 s old or a live bus session); "
                "BUS subscribed: session open, idle: no session now, —: handshake-only; "
                "SESSIONS: bus sessions open under the name (processes of one guest).")]
    if result.fleet is not msgspec.UNSET:
        out += ["", fleet_text(result.fleet)]
    return "\n".join(out)
