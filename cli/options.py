"""Options shared by several commands."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from castra_zmq.config import check_uplink_servers
from castra_zmq.endpoints import default_state_root
from castra_zmq.errors import CastraError
from castra_zmq.terminal import wants_color
from castra_zmq.uplinkconnect import PASSWORD_ENV

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


def split_servers(_ctx, _param, value: str | None) -> list[str] | None:
    """``--uplink``: comma-separated ``nats://HOST:PORT``."""
    if value is None:
        return None
    try:
        return check_uplink_servers([url.strip() for url in value.split(",")])
    except CastraError as exc:
        raise click.BadParameter(exc.reason) from None


# Made absolute: the roles may not run where `castra up` was started.
_uplink_file = click.Path(dir_okay=False, resolve_path=True)
_UPLINK_SECURITY_OPTIONS = (
    click.option("--uplink-creds", type=_uplink_file, metavar="FILE",
                 help="NATS credentials: a .creds file (user JWT and seed) or a user nkey seed (SU...). "
                      "Needs the nkeys package (pip install 'nats-py[nkeys]')."),
    click.option("--uplink-user", metavar="NAME",
                 help=f"NATS user name; its password is read from {PASSWORD_ENV}, never from the command "
                      "line (which every local user can read)."),
    click.option("--uplink-tls-ca", type=_uplink_file, metavar="FILE",
                 help="PEM CA certificates the NATS servers' certificates must chain to [default: the "
                      "system's]."),
    click.option("--uplink-tls-cert", type=_uplink_file, metavar="FILE",
                 help="PEM client certificate for NATS servers that verify clients (with --uplink-tls-key)."),
    click.option("--uplink-tls-key", type=_uplink_file, metavar="FILE", help="The key of --uplink-tls-cert (PEM)."),
    click.option("--uplink-tls-first", is_flag=True, flag_value=True, default=None,
                 help="TLS from the first byte, so that nothing (a password included) is ever sent in plain "
                      "text; the NATS servers need `tls { handshake_first: true }` (nats-server 2.10.4+)."),
)


def uplink_security_options(command):
    """The NATS credential and TLS options (``uplinkconnect``), named as ``Settings``' fields."""
    for option in reversed(_UPLINK_SECURITY_OPTIONS):
        command = option(command)
    return command
