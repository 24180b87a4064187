"""``castra status``: the per-VM table, live or from the last snapshot."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec

from castra_zmq.errors import CastraError
from castra_zmq.statusview import collect_status, render_table
from castra_zmq.terminal import json_for_terminal

from .options import state_root_option, stdout_wants_color


@click.command()
@state_root_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable field names).")
def status(state_root: Path, as_json: bool) -> None:
    """Show each VM's reachability and bus session, and the router's state.

    Never blocks: asks the status process (250 ms deadline) and otherwise reads
    the last snapshot; the output says which. Exits 0 even with no router, and
    1 when the state root or its run/ directory could be changed by another user.

    \b
    Examples:
      castra status
      castra status --json | jq '.vms[] | select(.reachable)'
    """
    try:
        result = collect_status(state_root)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    if as_json:
        click.echo(json_for_terminal(msgspec.json.encode(result)))
    else:
        click.echo(render_table(result, color=stdout_wants_color()))
