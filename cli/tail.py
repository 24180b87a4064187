"""``castra bus tail``: the last lines of a bus log (or those after a seq or a
time), then with -f each new one."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import click
import msgspec
from click.core import ParameterSource

from castra_zmq import tail as bus_tail
from castra_zmq.errors import CastraError
from castra_zmq.replay import Expired
from castra_zmq.terminal import json_for_terminal, printable
from castra_zmq.uplinkconnect import cancel_until_done
from castra_zmq.wire import LogRecord, check_host_name

from .options import (
    interrupt_on_signals,
    no_entries_note,
    split_servers,
    state_root_option,
    stdout_wants_color,
    uplink_security_options,
)

_HOST_WIDTH = 8
_VM_WIDTH = 12
_TOPIC_WIDTH = 16
EXIT_GAP = 3  # --since: messages it asked for were rotated away (everything left was printed)
EXIT_UNREACHABLE = 4  # --fleet: no NATS server answered


class SinceType(click.ParamType):
    """``--since``: a seq, a duration back from now, or an ISO 8601 time (``tail.parse_since``)."""

    name = "SEQ|DURATION|TIME"

    def convert(self, value, param, ctx) -> bus_tail.Since:
        if isinstance(value, bus_tail.Since):
            return value
        try:
            return bus_tail.parse_since(value.strip(), time.time_ns() // 1_000_000)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def format_record(record: LogRecord, color: bool = False, utc: bool = False, host: str | None = None) -> str:
    """``2024-05-01T12:00:00.042+02:00  vm  topic  payload``: the time as
    ``tail.format_time``, the payload as compact JSON, guest-chosen text through
    ``printable``; with ``host`` (``--fleet``), the host the message was committed
    on after the time."""
    clock = bus_tail.format_time(record.ts_ms, utc)
    payload = msgspec.json.format(record.payload, indent=-1).decode("utf-8", "replace")
    cells = (
        (clock, {"dim": True}),
        *(((printable(host).ljust(_HOST_WIDTH), {"fg": "magenta"}),) if host is not None else ()),
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
@click.option("--since", type=SinceType(), metavar="SEQ|DURATION|TIME",
              help="Instead of the last lines, every message after seq SEQ (a number), or committed "
                   "in the last DURATION (90s, 15m, 2h, 1d, 1h30m) or since TIME (ISO 8601, local "
                   "time without an offset), rotated copies of the log included.")
@click.option("-f", "--follow", is_flag=True, help="Then print each new line as it is appended, until Ctrl-C.")
@click.option("--topic", "topics", metavar="T", multiple=True,
              help="Only messages on topic T; T ending in * is every topic starting with what comes "
                   "before it (--topic 'vm:*': every VM's topic, quoted for the shell). Repeat for "
                   "several.")
@click.option("--utc", is_flag=True, help="Show times in UTC instead of local time.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the log's JSON lines (for jq), C1 control characters \\u-escaped.")
@click.option("--fleet", is_flag=True,
              help="Read every host's messages from the fleet's NATS JetStream stream instead of this "
                   "router's log (see Fleet below).")
@click.option("--host", "hosts", metavar="NAME", multiple=False,
              help="With --fleet: only the messages committed on host NAME.")
@click.option("--uplink", "uplink_servers", metavar="nats://HOST:PORT[,...]", callback=split_servers,
              help="With --fleet: the NATS servers [default: those of this state root's router's --uplink].")
@uplink_security_options
def tail(state_root: Path, shared: bool, vm: str | None, count: int, since: bus_tail.Since | None, follow: bool,
         topics: tuple[str, ...], utc: bool, as_json: bool, fleet: bool, hosts: str | None,
         uplink_servers: list[str] | None, **security: str | None) -> None:
    """Show the last lines of a bus log, or those after a seq or a time; with -f,
    follow it.

    Each line shows the time (ISO 8601 with the date, local time or --utc),
    sender, topic and payload. A line still being written (or torn by a crash) is
    not shown until it is complete; a line that is not a log record is skipped
    with a note on stderr. A log that does not exist (yet) is said so on stderr,
    and on a terminal an empty result shows `-- No entries --`. --follow keeps
    reading across log truncation, rotation and router restarts, and waits for a
    log that does not exist yet; Ctrl-C ends it with status 0 (3 after a gap, below).

    --since resumes where a reader left off: every message after that seq (or
    from that time), in seq order, each once, from the log's rotated copies
    (bus.log.1, bus.log-20261201: not compressed ones) and then the log, found by
    bisection, not by reading the log through. It takes the place of -n (give one
    of them). When messages after SEQ were rotated away (compressed or deleted)
    a warning on stderr names the oldest seq left, the rest is shown, and the
    status is 3 (also when -f ends). A VM's log has gaps in its seqs by design:
    with --vm the warning says messages may be gone, when the shared log lost
    them too or a compressed copy is there.

    \b
    Examples:
      castra bus tail                          # the last 10 messages
      castra bus tail -f --vm alpha            # follow alpha's traffic
      castra bus tail -n 50 --topic builds --topic broadcast --utc
      castra bus tail -f --topic 'vm:*'        # every topic starting with vm:
      castra bus tail -f --json | jq -c '{seq, payload}'
      castra bus tail --since 1200 -f --json   # every message after seq 1200, then follow
      castra bus tail --since 15m --vm alpha   # alpha's traffic of the last 15 minutes

    Fleet (--fleet, with `castra up --uplink`): every host's messages, from the
    stream CASTRA, each line with the host it was committed on after the time
    (--json: `host`, and `stream_seq`, the message's place in the stream). -n
    counts the stream's messages that pass the filters; --since takes a stream
    seq, a duration or a time (when the stream stored it); --host keeps one
    host's, --vm and --topic work as above. The NATS servers and credentials are
    those the router of --state-root runs its uplink with (its password, if any,
    from CASTRA_UPLINK_PASSWORD), or --uplink with the --uplink-* options, as for
    `castra up`; the user needs the permissions of README "Many hosts". It reads
    through an ephemeral ordered consumer, which the servers remove soon after it
    ends. No server answering within 5 s is exit status 4.

    \b
    Fleet examples:
      castra bus tail --fleet -f               # every host's messages, as they come
      castra bus tail --fleet -n 50 --host b   # the last 50 committed on host b
      castra bus tail --fleet --since 10m --vm beta --json | jq -c '{host, seq, topic}'
      castra bus tail --fleet -f --uplink nats://n1:4222,nats://n2:4222 --uplink-creds ops.creds
    """
    if shared and vm is not None:
        raise click.UsageError("--shared and --vm exclude each other")
    if vm == "":
        raise click.BadParameter("a VM name is not empty", param_hint="--vm")
    if since is not None and click.get_current_context().get_parameter_source("count") is ParameterSource.COMMANDLINE:
        raise click.UsageError("use one of -n and --since: -n shows the last lines, --since those after a point")
    if fleet:
        if shared:
            raise click.UsageError("--shared and --fleet exclude each other: --fleet reads every host's messages")
        tail_fleet(state_root, uplink_servers, security, hosts, vm, topics, count=count, since=since,
                   follow=follow, utc=utc, as_json=as_json)
        return
    fleet_only = [f"--{name.replace('_', '-')}" for name, value in
                  (("host", hosts), ("uplink", uplink_servers), *security.items()) if value is not None]
    if fleet_only:
        raise click.UsageError(f"{' '.join(fleet_only)} only with --fleet")
    color = stdout_wants_color()
    path = bus_tail.log_path(state_root, vm)
    shown = 0
    gaps: list[Expired] = []

    def caught_up(exists: bool) -> None:
        if not exists:
            # A VM's log starts with the first message from or to it after it connected.
            whose = f"VM {printable(vm)} (none sent or received yet)" if vm is not None else "the bus"
            click.echo(f"castra bus tail: no log yet for {whose}: {path} does not exist", err=True)
        if shown == 0 and (count > 0 or since is not None) and not as_json:
            no_entries_note()

    def notify(note: str) -> None:
        click.echo(f"castra bus tail: {printable(note)}", err=True)

    def on_gap(gap: Expired) -> None:
        gaps.append(gap)
        if vm is not None:
            notify(f"messages of VM {vm} after seq {gap.since} may be gone (rotated away): the oldest line "
                   f"left in its log is seq {gap.oldest}; going on from there")
        elif since.ts_ms is not None and gap.since == 0:
            notify(f"messages before seq {gap.oldest} are no longer in the logs (rotated away), and some may "
                   f"be from after {bus_tail.format_time(since.ts_ms, utc)}; going on from seq {gap.oldest}")
        else:
            notify(f"messages after seq {gap.since} are no longer all in the logs (rotated away): the oldest "
                   f"left is seq {gap.oldest}; going on from there")

    try:
        if since is None:
            entries = bus_tail.tail_entries(path, count=count, follow=follow, topics=frozenset(topics),
                                            caught_up=caught_up, notify=notify)
        else:
            entries = bus_tail.entries_after(path, bus_tail.start_after(path, since), follow=follow,
                                             topics=frozenset(topics), caught_up=caught_up, notify=notify,
                                             on_gap=on_gap)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
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
    if gaps:
        raise click.exceptions.Exit(EXIT_GAP)


def tail_fleet(state_root: Path, servers: list[str] | None, security: dict[str, str | None], host: str | None,
               vm: str | None, topics: tuple[str, ...], *, count: int, since: bus_tail.Since | None, follow: bool,
               utc: bool, as_json: bool) -> None:
    """``castra bus tail --fleet``: print the fleet's entries (``fleettail``) until done,
    or with -f until Ctrl-C or SIGTERM, which end it with status 0 (3 after a gap)."""
    # NATS's client only for --fleet: the local tail starts without it.
    from castra_zmq import fleettail

    if host is not None:
        try:
            check_host_name(host)
        except CastraError:
            raise click.BadParameter(f"{host[:80]!r} is not a host name (letters, digits, '.', '_' or '-', "
                                     "starting with a letter or digit)", param_hint="--host") from None
    fleet_filter = fleettail.FleetFilter(host, vm, topics)
    try:
        settings = fleettail.fleet_settings(state_root, servers, **security)
    except CastraError as exc:
        raise click.ClickException(exc.reason) from None
    color = stdout_wants_color()
    shown = 0
    gaps: list[Expired] = []

    def notify(note: str) -> None:
        click.echo(f"castra bus tail: {printable(note)}", err=True)

    def on_gap(gap: Expired) -> None:
        gaps.append(gap)
        notify(f"messages after stream seq {gap.since} are no longer in the stream (aged out): the oldest left "
               f"is stream seq {gap.oldest}; going on from there")

    def caught_up() -> None:
        if shown == 0 and (count > 0 or since is not None) and not as_json:
            no_entries_note()

    connection = None

    async def show() -> None:
        nonlocal connection, shown
        connection = await fleettail.connect(settings, notify)
        entries = fleettail.fleet_entries(connection, fleet_filter, count=count, since=since, follow=follow,
                                          notify=notify, on_gap=on_gap, caught_up=caught_up)
        async with contextlib.aclosing(entries):
            async for entry in entries:
                click.echo(json_for_terminal(fleettail.json_line(entry)) if as_json
                           else format_record(entry.record, color, utc, host=entry.origin.host))
                shown += 1

    async def run() -> None:
        """``show`` until it ends, or until Ctrl-C or SIGTERM, the normal end of a follow."""
        interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):  # even when the shell started it with SIGINT ignored
            loop.add_signal_handler(signum, interrupted.set)
        showing = asyncio.create_task(show())
        waiting = asyncio.create_task(interrupted.wait())
        try:
            await asyncio.wait((showing, waiting), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_until_done((showing, waiting))
            if connection is not None:
                with contextlib.suppress(*fleettail.NATS_FAILURES):
                    await asyncio.wait_for(connection.close(), 2)
        if not interrupted.is_set():
            showing.result()  # what ended it: its error, or None

    try:
        asyncio.run(run())
    except fleettail.FleetUnreachable as exc:
        click.echo(f"Error: {printable(exc.reason)}", err=True)
        raise click.exceptions.Exit(EXIT_UNREACHABLE) from None
    except CastraError as exc:
        raise click.ClickException(printable(exc.reason)) from None
    except fleettail.NATS_FAILURES as exc:
        raise click.ClickException(f"NATS: {printable(fleettail.describe(exc))}") from None
    if gaps:
        raise click.exceptions.Exit(EXIT_GAP)
