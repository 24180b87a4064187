"""``castra bus tail``: the last lines of a bus log, then with -f each new one."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec

from castra_zmq import tail as bus_tail
from castra_zmq.errors import CastraError
from castra_zmq.terminal import json_for_terminal, printable
from castra_zmq.wire import LogRecord

from .options import interrupt_on_signals, no_entries_note, state_root_option, stdout_wants_color

_VM_WIDTH = 12
_TOPIC_WIDTH = 16


def format_record(record: LogRecord, color: bool = False, utc: bool = False) -> str:
    """``2024-05-01T12:00:00.042+02:00  vm  topic  payload``: the time as
    ``tail.format_time``, the payload as compact JSON, guest-chosen text through
    ``printable``."""
    clock = bus_tail.format_time(record.ts_ms, utc)
    payload = msgspec.json.format(record.payload, indent=-1).decode("utf-8", "replace")
    cells = (
        (clock, {"dim": True}),
        (printable(record.vm).ljust(_VM_WIDTH), {"fg": "cyan"}),
        (printable(record.topic).ljust(_TOPIC_WIDTH), {"fg": "yellow"}),
        (printable(payload), {}),
    )
    return "  ".join(click.style(text, **style) if color and style else text for text, style in cells)


@click.command()
@state_root_option
@click.option("--shared", is_flag=True, help="Read the shared log of all traffic (the default).")
@click.option("--vm", metavar="NAME",
              help="Read one VM's log instead: what it published and what was addressed to it.")
@click.option("-n", "--tail", "count", type=click.IntRange(min=0), default=bus_tail.DEFAULT_COUNT,
              show_default=True, help="How many of the last lines to show first.")
@click.option("-f", "--follow", is_flag=True, help="Then print each new line as it is appended, until Ctrl-C.")
@click.option("--topic", "topics", metavar="T", multiple=True,
              help="Only messages on topic T; T ending in * is every topic starting with what comes "
                   "before it (--topic 'vm:*': every VM's topic, quoted for the shell). Repeat for "
                   "several.")
@click.option("--utc", is_flag=True, help="Show times in UTC instead of local time.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the log's JSON lines (for jq), C1 control characters \\u-escaped.")
def tail(state_root: Path, shared: bool, vm: str | None, count: int, follow: bool,
         topics: tuple[str, ...], utc: bool, as_json: bool) -> None:
    """Show the last lines of a bus log; with -f, follow it.

    Each line shows the time (ISO 8601 with the date, local time or --utc),
    sender, topic and payload. A line still being written (or torn by a crash) is
    not shown until it is complete; a line that is not a log record is skipped
    with a note on stderr. A log that does not exist (yet) is said so on stderr,
    and on a terminal an empty result shows `-- No entries --`. --follow keeps
    reading across log truncation, rotation and router restarts, and waits for a
    log that does not exist yet; Ctrl-C ends it with status 0.

    \b
    Examples:
      castra bus tail                          # the last 10 messages
      castra bus tail -f --vm alpha            # follow alpha's traffic
      castra bus tail -n 50 --topic builds --topic broadcast --utc
      castra bus tail -f --topic 'vm:*'        # every topic starting with vm:
      castra bus tail -f --json | jq -c '{seq, payload}'
    """
    if shared and vm is not None:
        raise click.UsageError("--shared and --vm exclude each other")
    if vm == "":
        raise click.BadParameter("a VM name is not empty", param_hint="--vm")
    color = stdout_wants_color()
    path = bus_tail.log_path(state_root, vm)
    shown = 0

    def caught_up(exists: bool) -> None:
        if not exists:
            # A VM's log starts with the first message from or to it after it connected.
            whose = f"VM {printable(vm)} (none sent or received yet)" if vm is not None else "the bus"
            click.echo(f"castra bus tail: no log yet for {whose}: {path} does not exist", err=True)
        if shown == 0 and count > 0 and not as_json:
            no_entries_note()

    entries = bus_tail.tail_entries(
        path, count=count, follow=follow, topics=frozenset(topics), caught_up=caught_up,
        notify=lambda note: click.echo(f"castra bus tail: {printable(note)}", err=True),
    )
    # Ctrl-C and SIGTERM end a follow quietly, with status 0, even when the shell
    # started it with SIGINT ignored (`castra bus tail -f &`).
    interrupt_on_signals()
    try:
        for entry in entries:
            text = json_for_terminal(entry.line) if as_json else format_record(entry.record, color, utc)
            click.echo(text)
            shown += 1
    except KeyboardInterrupt:
        pass
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
