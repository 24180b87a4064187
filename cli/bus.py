"""``castra bus``: publish to and read the bus from the host."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from castra_zmq import client
from castra_zmq.endpoints import Endpoints
from castra_zmq.errors import CastraError

from .options import state_root_option


@click.group()
def bus() -> None:
    """Publish to the bus and read its log."""


@bus.command()
@state_root_option
@click.option("--topic", default="broadcast", show_default=True,
              help="broadcast, vm:<name> for one VM, or any topic (1..256 characters).")
@click.option("--payload", default="null", show_default=True,
              help="JSON text, or - to read it from stdin.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for the commit.")
def publish(state_root: Path, topic: str, payload: str, timeout: float) -> None:
    """Publish one message as `host`; exit 0 once it is in the bus log.

    Prints the message's seq and the log it went to. Exits 1 when the payload is
    not JSON, no router runs, or the commit failed or timed out.

    \b
    Examples:
      castra bus publish --payload '{"event":"maintenance","in_s":60}'
      castra bus publish --topic vm:alpha --payload '{"cmd":"reload"}'
      jq -c . event.json | castra bus publish --topic builds --payload -
    """
    text = sys.stdin.read() if payload == "-" else payload
    try:
        seq = client.publish(topic, text.encode(), state_root=state_root, timeout=timeout)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    log = Endpoints(state_root).bus_log
    click.echo(f"seq={seq} topic={topic} log={log}")
