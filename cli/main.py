"""``castra``: run the bus router and drive it from the shell."""

from __future__ import annotations

import click

from castra_zmq import __version__

from .lazy import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy_commands={"up": "castra_zmq.cli.up:up", "status": "castra_zmq.cli.status:status",
                   "bus": "castra_zmq.cli.bus:bus"},
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="castra")
def cli() -> None:
    """Host side of the Castra guest bus.

    \b
    Start the router, then watch and drive it:
      castra up                              # 127.0.0.1:7070, Ctrl-C stops it
      castra status                          # per-VM table
      castra bus publish vm:alpha '{"cmd":"reload"}'
      castra bus tail -f                     # follow the shared bus log
    """


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
