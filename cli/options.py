"""Options shared by several commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from castra_zmq.endpoints import default_state_root

state_root_option = click.option(
    "--state-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: str(default_state_root()),
    show_default="$CASTRA_STATE_ROOT or ~/.local/state/castra",
    help="Directory holding the router's sockets, logs and status.",
)


def stdout_wants_color() -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")
