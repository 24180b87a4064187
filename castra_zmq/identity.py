"""Who may connect: an optional identities file (allow-list and per-VM secrets).

Without a file every valid name is accepted (only ``host`` is reserved), and a
``token=`` in the hello is ignored. With one, only listed names are accepted
(``error: unknown vm``); a name listed with a token must present it
(``error: invalid token``), compared in constant time. Handshake-only guests are
checked the same way. File format, one VM per line, ``#`` starts a comment:

```
alpha                 # allowed, no secret
beta token=s3cr3t     # allowed with this secret
```
"""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

import msgspec
from loguru import logger

from .errors import ConfigError, HandshakeError
from .handshake import Hello, validate_vm_name


class Identities(msgspec.Struct, frozen=True):
    tokens: dict[str, str | None]  # vm -> its secret, or None

    def check(self, hello: Hello) -> None:
        """Raise ``HandshakeError`` unless ``hello`` may connect."""
        if hello.vm not in self.tokens:
            raise HandshakeError("unknown vm")
        expected = self.tokens[hello.vm]
        if expected is not None and not hmac.compare_digest(
            (hello.token or "").encode(), expected.encode()
        ):
            raise HandshakeError("invalid token")


def parse_identities(text: str, source: str = "identities file") -> Identities:
    tokens: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        name, options = line[0], line[1:]
        if name[:3].lower() == "vm:":
            name = name[3:]
        try:
            validate_vm_name(name)
        except HandshakeError as exc:
            raise ConfigError(f"{source}:{number}: {exc.reason}: {name!r}") from None
        secret = None
        for option in options:
            key, sep, value = option.partition("=")
            if key != "token" or not sep or not value:
                raise ConfigError(f"{source}:{number}: expected token=<secret>, got {option!r}")
            secret = value
        tokens[name] = secret
    return Identities(tokens=tokens)


def load_identities(path: str | None) -> Identities | None:
    if path is None:
        return None
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read identities file {file}: {exc.strerror}") from None
    identities = parse_identities(text, str(file))
    if any(identities.tokens.values()) and stat.S_IMODE(os.stat(file).st_mode) & 0o077:
        logger.warning("identities file with secrets is readable by other users", path=str(file))
    return identities
