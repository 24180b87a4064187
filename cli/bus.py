"""``castra bus``: publish to and read the bus from the host. Each command's module
is imported only when it runs: ``publish`` need not load what ``tail`` reads logs with."""

from __future__ import annotations

import click

from .lazy import LazyGroup


@click.group(cls=LazyGroup, lazy_commands={"publish": "castra_zmq.cli.publish:publish",
                                           "tail": "castra_zmq.cli.tail:tail"})
def bus() -> None:
    """Publish to the bus and read its log.

    \b
    Examples:
      castra bus publish vm:alpha '{"cmd":"reload"}'
      castra bus tail -f --vm alpha
    """
