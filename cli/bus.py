"""``castra bus``: publish to and read the bus from the host."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
import msgspec

from castra_zmq import client
from castra_zmq import tail as bus_tail
from castra_zmq.endpoints import Endpoints
from castra_zmq.errors import CastraError
from castra_zmq.terminal import json_for_terminal, printable

from .options import state_root_option, stdout_wants_color


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
@click.option("--json", "as_json", is_flag=True, help='Print {"seq":..,"topic":..,"log":..} instead.')
def publish(state_root: Path, topic: str, payload: str, timeout: float, as_json: bool) -> None:
    """Publish one message as `host`; exit 0 once it is in the bus log.

    Prints the message's seq and the log it went to. Exits 1 when the payload is
    not JSON, the message is too large (its delivery over 65,536 bytes), no router
    runs, or the commit failed or timed out.

    \b
    Examples:
      castra bus publish --payload '{"event":"maintenance","in_s":60}'
      castra bus publish --topic vm:alpha --payload '{"cmd":"reload"}'
      jq -c . event.json | castra bus publish --topic builds --payload -
      castra bus publish --payload 1 --json | jq .seq
    """
    text = sys.stdin.read() if payload == "-" else payload
    if payload == "-" and not text.strip():
        raise click.ClickException("no payload on stdin: pipe one JSON value into --payload -")
    try:
        seq = client.publish(topic, text.encode(), state_root=state_root, timeout=timeout)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    log = Endpoints(state_root).bus_log
    if as_json:
        click.echo(msgspec.json.encode({"seq": seq, "topic": topic, "log": str(log)}))
    else:
        click.echo(f"seq={seq} topic={topic} log={log}")


@bus.command()
@state_root_option
@click.option("--shared", is_flag=True, help="Read the shared log of all traffic (the default).")
@click.option("--vm", metavar="NAME",
              help="Read one VM's log instead: what it published and what was addressed to it.")
@click.option("-n", "--tail", "count", type=click.IntRange(min=0), default=bus_tail.DEFAULT_COUNT,
              show_default=True, help="How many of the last lines to show first.")
@click.option("-f", "--follow", is_flag=True, help="Then print each new line as it is appended, until Ctrl-C.")
@click.option("--topic", "topics", metavar="T", multiple=True,
              help="Only messages on topic T (exact match; repeat for several).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the log's JSON lines (for jq), C1 control characters \\u-escaped.")
def tail(state_root: Path, shared: bool, vm: str | None, count: int, follow: bool,
         topics: tuple[str, ...], as_json: bool) -> None:
    """Show the last lines of a bus log; with -f, follow it.

    Each line shows local time, sender, topic and payload. A line still being
    written (or torn by a crash) is not shown until it is complete; a line that is
    not a log record is skipped with a note on stderr. --follow keeps reading
    across log truncation, rotation and router restarts, and waits for a log that
    does not exist yet; Ctrl-C ends it with status 0.

    \b
    Examples:
      castra bus tail                          # the last 10 messages
      castra bus tail -f --vm alpha            # follow alpha's traffic
      castra bus tail -n 50 --topic builds --topic broadcast
      castra bus tail -f --json | jq -c '{seq, payload}'
    """
    if shared and vm is not None:
        raise click.UsageError("--shared and --vm exclude each other")
    if vm == "":
        raise click.BadParameter("a VM name is not empty", param_hint="--vm")
    color = stdout_wants_color()
    entries = bus_tail.tail_entries(
        bus_tail.log_path(state_root, vm), count=count, follow=follow, topics=frozenset(topics),
        notify=lambda note: click.echo(f"castra bus tail: {printable(note)}", err=True),
    )
    # SIGTERM ends a follow the way Ctrl-C does: quietly, with status 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for entry in entries:
            text = json_for_terminal(entry.line) if as_json else bus_tail.format_record(entry.record, color)
            click.echo(text)
    except KeyboardInterrupt:
        pass
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
