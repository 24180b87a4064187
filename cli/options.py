"""Options shared by several commands."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from castra_zmq.endpoints import default_state_root
from castra_zmq.terminal import wants_color

state_root_option = click.option(
    "--state-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: str(default_state_root()),
    show_default="$CASTRA_STATE_ROOT or ~/.local/state/castra",
    help="Directory holding the router's sockets, logs and status.",
)


def stdout_wants_color() -> bool:
    return wants_color(sys.stdout)


def interrupt_on_signals() -> None:
    """Make Ctrl-C and SIGTERM raise ``KeyboardInterrupt`` in a long-running command.

    Set whatever the parent left: a shell starts ``cmd &`` with SIGINT ignored, and
    Python then leaves it ignored. The command catches the interrupt and ends
    quietly.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def no_entries_note() -> None:
    """``-- No entries --`` on a terminal, as journalctl says it; nothing for scripts."""
    if sys.stdout.isatty():
        click.echo("-- No entries --")
