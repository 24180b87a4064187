"""Text chosen by guests, made safe for the operator's terminal.

Guests choose topics and payloads (and, within ``validate_vm_name``, their names).
Printed raw, an ``ESC [2J`` would clear the screen, an OSC sequence retitle the
window, a ``\\r`` or ``\\n`` forge a line. So every human output (the ``castra
status`` table, ``castra bus tail``, the router's log lines) shows guest strings
through ``printable``, and the ``--json`` outputs go through ``json_for_terminal``.

Runs in: the roles' logging and the CLI.
"""

from __future__ import annotations

import json
import os
from typing import TextIO


def wants_color(stream: TextIO) -> bool:
    """Colour only on a terminal that shows it: never with NO_COLOR set
    (https://no-color.org) or TERM=dumb."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def printable(text: str) -> str:
    """``text`` with each character that is not printable written as a Python escape
    (``\\x1b``, ``\\r``, ``\\x9b``, ``\\u202e``); printable text is returned as it is."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def json_for_terminal(text: bytes) -> bytes:
    """The same JSON value with each character that is neither ASCII nor printable
    (C1 controls such as U+009B, a one-character CSI; bidi overrides) as a ``\\u`` escape.

    JSON encoders escape the ASCII controls but write these raw. Outside its strings
    JSON is ASCII, so every character replaced here is inside a string. Bytes that
    are not UTF-8 (no valid JSON holds them) become U+FFFD.
    """
    if text.isascii():
        return text
    decoded = text.decode("utf-8", "replace")
    if decoded.isprintable():
        return decoded.encode()
    return "".join(ch if ch < "\x7f" or ch.isprintable() else json.dumps(ch)[1:-1] for ch in decoded).encode()
