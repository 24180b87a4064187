"""Who may connect, and what each VM may read and write on the bus.

Connecting: without an identities file every valid name is accepted (only
``host`` is reserved), and a ``token=`` in the hello is ignored. With one, only
listed names are accepted (``error: unknown vm``); a name listed with a token must
present it (``error: invalid token``), compared in constant time. Handshake-only
guests are checked the same way.

Reading and writing (``Policy``), with or without a file: a guest may read its
own ``vm:<name>`` topic and every topic not starting with ``vm:``. A subscription
to another VM's ``vm:`` topic is refused (error ack ``forbidden topic``); one to a
pattern (``*``, ``vm:*``, ``metrics.*``: see ``subscriptions``) is always taken, and
delivers only the topics the guest may read. Publishing is open. A line of the file
may grant a VM more topics to read (``subscribe=``) and restrict it to some topics
to publish to (``publish=``). A pattern is an exact topic, or a prefix when it ends
in ``*`` (``vm:*`` is every VM's topic, ``*`` every topic); patterns are separated
by commas, so a topic with a comma or a space cannot be named.

File format, one VM per line; ``#`` starts a comment at the start of a line or
after whitespace (a ``#`` inside a secret is part of it); each option at most once:

```
alpha                                   # allowed, no secret
beta token=Zq8#kP3vLx9!mW2              # allowed with this secret
monitor subscribe=vm:* publish=alerts   # reads every VM's topic, publishes only to alerts
```

Runs in: the bridge (who may connect, read, publish) and the supervisor (checks the
file at start).
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from pathlib import Path

import msgspec
from loguru import logger

from .errors import ConfigError, HandshakeError
from .handshake import VM_TOPIC_PREFIX, Hello, validate_vm_name
from .subscriptions import TopicPatterns, pattern_prefix, topic_patterns
from .wire import MAX_TOPIC

FORBIDDEN_TOPIC = "forbidden topic"  # the error ack's reason for a refused subscribe or publish
_COMMENT = re.compile(r"(?:^|\s)#")


class Policy(msgspec.Struct, frozen=True):
    """Which topics each VM may read and publish to; ``Policy()`` is the default."""

    reads: dict[str, TopicPatterns] = {}  # vm -> topics it may read besides the default ones
    publishes: dict[str, TopicPatterns] = {}  # vm -> the only topics it may publish to

    def may_read(self, vm: str, topic: str) -> bool:
        """Whether a message on ``topic`` may reach ``vm``: any but another VM's
        ``vm:`` topic, unless granted."""
        if not topic.startswith(VM_TOPIC_PREFIX) or topic[len(VM_TOPIC_PREFIX):] == vm:
            return True
        granted = self.reads.get(vm)
        return granted is not None and granted.match(topic)

    def may_subscribe(self, vm: str, topic: str) -> bool:
        """A pattern (``*``, ``vm:*``) is always allowed: it delivers only the topics
        ``vm`` may read (see ``Bridge.deliver``)."""
        return pattern_prefix(topic) is not None or self.may_read(vm, topic)

    def may_publish(self, vm: str, topic: str) -> bool:
        allowed = self.publishes.get(vm)
        return allowed is None or allowed.match(topic)


DEFAULT_POLICY = Policy()


class Identities(msgspec.Struct, frozen=True):
    tokens: dict[str, str | None]  # vm -> its secret, or None
    policy: Policy = DEFAULT_POLICY

    def check(self, hello: Hello) -> None:
        """Raise ``HandshakeError`` unless ``hello`` may connect."""
        if hello.vm not in self.tokens:
            raise HandshakeError("unknown vm")
        expected = self.tokens[hello.vm]
        if expected is not None and not hmac.compare_digest(
            (hello.token or "").encode(), expected.encode()
        ):
            raise HandshakeError("invalid token")


_OPTION_SYNTAX = {
    "token": "token=<secret>",
    "subscribe": "subscribe=<pattern>[,<pattern>...]",
    "publish": "publish=<pattern>[,<pattern>...]",
}


def parse_topic_patterns(text: str) -> TopicPatterns:
    """``a,b*``: the exact topic ``a`` and every topic starting with ``b``."""
    patterns = text.split(",")
    for pattern in patterns:
        if not pattern or len(pattern) > MAX_TOPIC or "*" in pattern[:-1]:
            raise ConfigError(f"invalid topic pattern {pattern!r}: a topic of 1..{MAX_TOPIC} "
                              "characters, with '*' only at its end")
    return topic_patterns(patterns)


def parse_identities(text: str, source: str = "identities file") -> Identities:
    tokens: dict[str, str | None] = {}
    reads: dict[str, TopicPatterns] = {}
    publishes: dict[str, TopicPatterns] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.split(raw, maxsplit=1)[0].split()
        if not line:
            continue
        name, options = line[0], line[1:]
        if name[:3].lower() == "vm:":
            name = name[3:]
        try:
            validate_vm_name(name)
        except HandshakeError as exc:
            raise ConfigError(f"{source}:{number}: {exc.reason}: {name!r}") from None
        given: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if key not in _OPTION_SYNTAX or key in given:
                raise ConfigError(f"{source}:{number}: expected {', '.join(_OPTION_SYNTAX.values())}"
                                  f" (each at most once), got {option!r}")
            if not sep or not value:
                raise ConfigError(f"{source}:{number}: expected {_OPTION_SYNTAX[key]}, got {option!r}")
            given[key] = value
        tokens[name] = given.get("token")
        for key, grants in (("subscribe", reads), ("publish", publishes)):
            grants.pop(name, None)  # a name listed again is described by its last line
            if key in given:
                try:
                    grants[name] = parse_topic_patterns(given[key])
                except ConfigError as exc:
                    raise ConfigError(f"{source}:{number}: {exc.reason}") from None
    return Identities(tokens=tokens, policy=Policy(reads=reads, publishes=publishes))


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
