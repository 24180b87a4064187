"""The line-mode handshake of PROTOCOL.md section 1, as pure functions.

``parse_hello`` turns one hello line into a ``Hello`` or raises ``HandshakeError``
whose reason goes back to the guest verbatim as ``error: <reason>``.

Runs in: the bridge (hello lines); its names and limits also in the journal, status
and host tools.
"""

from __future__ import annotations

import unicodedata

import msgspec

from . import __version__
from .errors import HandshakeError

MAX_LINE = 512
MAX_NAME = 128
HOST_SENDER = "host"
# Unicode categories no VM name may have a character of: controls, format
# characters, surrogates, private use, unassigned, line and paragraph separators.
FORBIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
VM_TOPIC_PREFIX = "vm:"  # a topic addressed to one VM: vm:<name>
# Bus protocol versions this broker speaks, oldest first (as the greeting lists
# them: "capabilities=bus-v1" stays a substring of it). A hello gets the newest it names.
BUS_V1, BUS_V2 = "bus-v1", "bus-v2"
BUS_PROTOCOLS = (BUS_V1, BUS_V2)

GREETING = f"castra-broker {__version__} ready capabilities={','.join(BUS_PROTOCOLS)}\n".encode()
OK_HANDSHAKE_ONLY = b"ok\n"


class Hello(msgspec.Struct, frozen=True):
    vm: str
    capabilities: tuple[str, ...]
    bus_protocol: str | None
    token: str | None = None  # shared secret, for deployments with an identities file


def sender_of(vm: str) -> str:
    """A message's sender as the bus shows it: ``vm:<name>``, or ``host``."""
    return HOST_SENDER if vm == HOST_SENDER else VM_TOPIC_PREFIX + vm


def ok_session_line(token: str, protocol: str, log_id: str | None = None) -> bytes:
    """The answer that opens a session: bus-v1's bytes as they always were; a later
    protocol is named, so that its guest knows it was chosen (PROTOCOL.md 9), with
    the name of the log its seqs belong to (``log_id``, if known)."""
    if protocol == BUS_V1:
        return f"ok session={token}\n".encode()
    log = f" log={log_id}" if log_id else ""
    return f"ok session={token} protocol={protocol}{log}\n".encode()


def error_line(reason: str) -> bytes:
    return f"error: {reason}\n".encode()


def take_line(buffer: bytes) -> tuple[bytes, bytes] | None:
    """Split ``buffer`` at the first newline: ``(line, rest)``, or None if incomplete.

    Raises ``HandshakeError`` once the line can no longer fit in ``MAX_LINE`` bytes.
    A trailing ``\\r`` is not part of the line.
    """
    end = buffer.find(b"\n", 0, MAX_LINE + 2)
    if end < 0:
        if len(buffer) > MAX_LINE + 1:  # room is left for a final "\r"
            raise HandshakeError("line too long")
        return None
    line = buffer[:end]
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > MAX_LINE:
        raise HandshakeError("line too long")
    return line, buffer[end + 1 :]


def is_vm_name(name: str) -> bool:
    """Whether ``name`` passes ``validate_vm_name``."""
    try:
        validate_vm_name(name)
    except HandshakeError:
        return False
    return True


def validate_vm_name(name: str) -> str:
    """Check an identity: 1..128 printable characters, not the reserved ``host``."""
    if not name:
        raise HandshakeError("missing vm name")
    if len(name) > MAX_NAME:
        raise HandshakeError("vm name too long")
    if name.isascii():  # ASCII's only forbidden category is Cc: what isprintable() refuses there
        forbidden = not name.isprintable()
    else:
        forbidden = any(unicodedata.category(ch) in FORBIDDEN_CATEGORIES for ch in name)
    if forbidden:
        raise HandshakeError("invalid vm name")
    if name.lower() == HOST_SENDER:
        raise HandshakeError("reserved vm name")
    return name


def parse_hello(line: bytes) -> Hello:
    """Parse ``hello vm:<name> [capabilities=a,b] [key=value ...]``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise HandshakeError("invalid utf-8") from None
    tokens = text.split()
    if not tokens or tokens[0].lower() != "hello":
        raise HandshakeError("expected hello")
    if len(tokens) < 2 or "=" in tokens[1]:
        raise HandshakeError("missing vm name")
    name = tokens[1]
    if name[:3].lower() == "vm:":
        name = name[3:]
    vm = validate_vm_name(name)
    capabilities: list[str] = []
    secret = None
    for token in tokens[2:]:
        key, sep, value = token.partition("=")
        key = key.lower()
        if not sep:
            continue
        if key == "token":
            secret = value
        elif key == "capabilities":
            for cap in value.split(","):
                cap = cap.strip().lower()
                if cap and cap not in capabilities:
                    capabilities.append(cap)
        # other key=value tokens are room for future fields
    bus_protocol = next((p for p in reversed(BUS_PROTOCOLS) if p in capabilities), None)
    return Hello(vm=vm, capabilities=tuple(capabilities), bus_protocol=bus_protocol, token=secret)
