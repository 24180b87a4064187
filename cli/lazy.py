"""A click group whose commands are imported only when they run."""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs (click's documented
    lazy-loading pattern): ``castra bus publish`` need not load the router's roles."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands  # name -> "module:attribute"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return super().get_command(ctx, name)
        module, attribute = self.lazy_commands[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        """Run the command; a reader that stopped reading (``castra bus tail | head -1``)
        is a normal end, status 0, as for ``tail`` and ``cat``."""
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            # Nothing more can be written: what is still buffered goes nowhere, so
            # the flush at exit does not fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            ctx.exit(0)
