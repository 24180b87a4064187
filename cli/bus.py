"""``castra bus``: publish to and read the bus from the host."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import msgspec

from castra_zmq import client
from castra_zmq import tail as bus_tail
from castra_zmq.endpoints import Endpoints
from castra_zmq.errors import CastraError
from castra_zmq.terminal import json_for_terminal, printable
from castra_zmq.wire import MAX_FRAME

from .options import interrupt_on_signals, no_entries_note, state_root_option, stdout_wants_color

DEFAULT_TOPIC = "broadcast"
NOT_JSON = "payload is not valid JSON"
_STDIN_CHUNK = 64 * 1024
_LINE_MAX = 4 * MAX_FRAME  # a longer line is refused unread (the journal would refuse it anyway)


@click.group()
def bus() -> None:
    """Publish to the bus and read its log.

    \b
    Examples:
      castra bus publish vm:alpha '{"cmd":"reload"}'
      castra bus tail -f --vm alpha
    """


@bus.command()
@state_root_option
@click.argument("topic_arg", metavar="[TOPIC]", required=False)
@click.argument("payload_arg", metavar="[PAYLOAD]", required=False)
@click.option("-t", "--topic", help=f"The topic, instead of TOPIC: {DEFAULT_TOPIC} (the default), vm:<name> "
                                    "for one VM, or any topic (1..256 characters).")
@click.option("-m", "--payload", help="The payload, instead of PAYLOAD: JSON text (null by default; a string "
                                      "is quoted: '\"hello\"'), or - to read it from stdin.")
@click.option("-l", "--lines", "line_mode", is_flag=True,
              help="Publish each line of stdin as one message (a JSON payload a line, blank lines "
                   "skipped), as many as are ready in one commit; one result line per message.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for the commit.")
@click.option("--json", "as_json", is_flag=True, help='Print {"seq":..,"topic":..,"log":..} instead.')
def publish(state_root: Path, topic_arg: str | None, payload_arg: str | None, topic: str | None,
            payload: str | None, line_mode: bool, timeout: float, as_json: bool) -> None:
    """Publish as `host` to TOPIC (default broadcast); exit 0 once it is in the bus log.

    PAYLOAD is JSON text: '{"cmd":"reload"}', 42, '"a string"'. Prints the
    message's seq and the log it went to. Exits 1 when the payload is not JSON,
    the message is too large (its delivery over 65,536 bytes), no router runs, or
    the commit failed or timed out. With -l, exits 1 when any line was not
    published (each one told on stderr with its line number).

    \b
    Examples:
      castra bus publish vm:alpha '{"cmd":"reload"}'
      castra bus publish -t broadcast -m '{"event":"maintenance","in_s":60}'
      castra bus publish builds '"a JSON string is quoted"'
      jq -c . event.json | castra bus publish builds -
      producer | castra bus publish -l metrics          # one JSON payload a line
      castra bus publish -m 1 --json | jq .seq
    """
    if topic_arg is not None and topic is not None:
        raise click.UsageError("give the topic once: as TOPIC or with -t/--topic")
    if payload_arg is not None and payload is not None:
        raise click.UsageError("give the payload once: as PAYLOAD or with -m/--payload")
    topic = topic_arg if topic_arg is not None else topic if topic is not None else DEFAULT_TOPIC
    payload = payload_arg if payload_arg is not None else payload
    log = Endpoints(state_root).bus_log
    if line_mode:
        if payload is not None:
            raise click.UsageError("-l/--lines reads the payloads from stdin: give no PAYLOAD")
        _publish_lines(state_root, topic, timeout, as_json, log)
        return
    if payload is None:
        payload = "null"
    text = sys.stdin.read() if payload == "-" else payload
    if payload == "-" and not text.strip():
        raise click.ClickException("no payload on stdin: pipe one JSON value into --payload -")
    try:
        seq = client.publish(topic, text.encode(), state_root=state_root, timeout=timeout)
    except CastraError as exc:
        raise click.ClickException(_with_hint(exc.reason, text, topic)) from None
    _print_result(seq, topic, log, as_json)


def _print_result(seq: int, topic: str, log: Path, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode({"seq": seq, "topic": topic, "log": str(log)}))
    else:
        click.echo(f"seq={seq} topic={printable(topic)} log={log}")


def _with_hint(reason: str, text: str, topic: str) -> str:
    """A payload that is not JSON is most often a bare word meant as a string."""
    if not reason.startswith(NOT_JSON):
        return reason
    plain = text.strip()
    if plain and "\n" not in plain and len(plain) <= 80:
        example = f"castra bus publish {shlex.quote(topic)} {shlex.quote(json.dumps(plain))}"
        return f"{reason}\nA string is JSON in double quotes: {printable(example)}"
    return f"{reason}\nA string is JSON in double quotes: castra bus publish {shlex.quote(topic)} '\"hello\"'"


def _stdin_line_batches() -> Iterator[list[tuple[int, bytes | None]]]:
    """The lines of stdin as they arrive, numbered from 1: each read's complete lines
    as one batch (an unterminated last one at the end too); a line over
    ``_LINE_MAX`` bytes comes as None, unread."""
    number = 0
    pending = bytearray()
    oversized = False  # the line in ``pending`` is too long already: its bytes are dropped
    while True:
        chunk = os.read(sys.stdin.fileno(), _STDIN_CHUNK)
        if chunk:
            pending += chunk
            *lines, rest = pending.split(b"\n")
            pending = bytearray(rest)
        else:
            lines = [bytes(pending)] if pending or oversized else []
        batch = []
        for line in lines:
            number += 1
            batch.append((number, None if oversized else line))
            oversized = False
        if len(pending) > _LINE_MAX:
            pending.clear()
            oversized = True
        if batch:
            yield batch
        if not chunk:
            return


def _publish_lines(state_root: Path, topic: str, timeout: float, as_json: bool, log: Path) -> None:
    interrupt_on_signals()
    failed = 0
    try:
        with client.Publisher(state_root=state_root) as publisher:
            for batch in _stdin_line_batches():
                lines = [(number, line) for number, line in batch if line is None or line.strip()]
                sendable = [(number, line) for number, line in lines if line is not None]
                results = publisher.publish_batch([(topic, line) for _, line in sendable], timeout=timeout)
                outcome = {number: (result.seq, result.reason) for (number, _), result in zip(sendable, results)}
                for number, line in lines:
                    seq, reason = outcome.get(number, (None, client.MESSAGE_TOO_LARGE))
                    if reason is None:
                        _print_result(seq, topic, log, as_json)
                    else:
                        failed += 1
                        click.echo(f"castra bus publish: line {number}: {reason}", err=True)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    except KeyboardInterrupt:
        sys.exit(130)  # interrupted: what was printed is committed, what was not may be lost
    if failed:
        sys.exit(1)


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
            whose = f"VM {printable(vm)} (a VM gets one once it connects)" if vm is not None else "the bus"
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
            text = json_for_terminal(entry.line) if as_json else bus_tail.format_record(entry.record, color, utc)
            click.echo(text)
            shown += 1
    except KeyboardInterrupt:
        pass
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
