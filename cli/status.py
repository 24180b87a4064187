"""``castra status``: the per-VM table, live or from the last snapshot."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import msgspec

from castra_zmq.errors import CastraError
from castra_zmq.statusview import collect_status, render_table
from castra_zmq.terminal import json_for_terminal

from .options import interrupt_on_signals, state_root_option, stdout_wants_color

NOT_RUNNING = 3  # as `systemctl status` and LSB `status` actions: "program is not running"
_CLEAR = "\x1b[H\x1b[2J"


@click.command()
@state_root_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable field names).")
@click.option("--check", is_flag=True,
              help=f"Exit {NOT_RUNNING} when the router is not running (0 when it is), as `systemctl status`.")
@click.option("--watch", "interval", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0,
              metavar="[SECONDS]",
              help="Show it again every SECONDS (2 if not given) until Ctrl-C: redrawn on a terminal, "
                   "one table (or JSON line) after another otherwise.")
def status(state_root: Path, as_json: bool, check: bool, interval: float | None) -> None:
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
    """
    if interval is not None and check:
        raise click.UsageError("--check and --watch exclude each other")
    if interval is not None:
        _watch(state_root, as_json, interval)
        return
    result = _show(state_root, as_json)
    if check and not result.router.get("running"):
        sys.exit(NOT_RUNNING)


def _show(state_root: Path, as_json: bool, clear: bool = False):
    try:
        result = collect_status(state_root)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    if as_json:
        click.echo(json_for_terminal(msgspec.json.encode(result)))
    else:
        text = render_table(result, color=stdout_wants_color())
        click.echo(_CLEAR + text if clear else text)
    return result


def _watch(state_root: Path, as_json: bool, interval: float) -> None:
    """Show the status every ``interval`` seconds until Ctrl-C or SIGTERM (status 0)."""
    interrupt_on_signals()
    redraw = sys.stdout.isatty() and not as_json
    try:
        next_at = time.monotonic()
        first = True
        while True:
            if not (first or redraw or as_json):
                click.echo()  # a blank line between the tables
            _show(state_root, as_json, clear=redraw)
            first = False
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        pass
