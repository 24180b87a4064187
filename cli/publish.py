"""``castra bus publish``: publish as ``host``, exit 0 once it is in the bus log."""

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
from castra_zmq.endpoints import Endpoints
from castra_zmq.errors import CastraError
from castra_zmq.handshake import VM_TOPIC_PREFIX
from castra_zmq.statusview import vms_seen
from castra_zmq.terminal import printable
from castra_zmq.wire import MAX_FRAME

from .options import interrupt_on_signals, state_root_option

DEFAULT_TOPIC = "broadcast"
NOT_JSON = "payload is not valid JSON"
_STDIN_CHUNK = 64 * 1024
_LINE_MAX = 4 * MAX_FRAME  # a longer line is refused unread (the journal would refuse it anyway)


@click.command()
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
    _tell_if_never_seen(state_root, topic)


def _tell_if_never_seen(state_root: Path, topic: str) -> None:
    """A message to a VM that never connected is logged and delivered to no one: a
    typo in the name is the usual cause, so say it (the publish itself succeeded)."""
    if not topic.startswith(VM_TOPIC_PREFIX):
        return
    vm = topic[len(VM_TOPIC_PREFIX):]
    seen = vms_seen(state_root)
    if seen is not None and vm not in seen:
        click.echo(f"castra bus publish: note: no VM named {printable(vm)} has connected to this router "
                   "(in the last 7 days); the message is in the bus log only", err=True)


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
    _tell_if_never_seen(state_root, topic)
    if failed:
        sys.exit(1)
