"""The guest side of the bus (PROTOCOL.md): a client library and the ``castra-guest`` command.

Guests are small, old VM images, so this module uses the standard library only,
runs on Python 3.8+, and imports nothing else from ``castra_zmq`` (those modules
need pyzmq and msgspec)::

    from castra_zmq.guest import GuestSession

    with GuestSession("10.0.2.2", 7070, "alpha", subscribe=["vm:alpha"]) as bus:
        bus.publish("broadcast", {"event": "booted"})      # the ack, once it is in the bus log
        for message in bus.messages():
            print(message["topic"], message["payload"])

Resume (bus-v2, PROTOCOL.md 4.3.1): the session remembers, per subscription, the
seq of the last message it handed to the application, and after a reconnect
subscribes again with ``since`` that seq, so the host replays what was published
meanwhile; repeats are dropped by seq. With ``state_file`` the positions outlive
the process (an agent restart, a reboot)::

    with GuestSession("10.0.2.2", 7070, "alpha", subscribe=["vm:alpha"],
                      state_file="/var/lib/castra-guest/alpha.json") as bus:
        for message in bus.messages():   # each message once, in seq order, across reconnects
            handle(message)

Threads of a session: one reader owns the socket (it connects, hand-shakes,
re-subscribes, reads every frame and routes it to whoever waits for it, and
reconnects with back-off), one heartbeat thread, with a state file one thread that
writes it, and any number of caller threads. Every write takes one lock, so frames
from several threads never interleave.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import logging
import os
import re
import shlex
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import unicodedata
from concurrent import futures
from typing import NamedTuple

# The guest's own defaults (it cannot import castra_zmq.config): the host as QEMU
# user networking shows it, and the file existing guest images already write.
DEFAULT_HOST = "10.0.2.2"
DEFAULT_PORT = 7070
HANDSHAKE_CONF = "/etc/conf.d/castra-handshake"
CAPABILITY = "bus-v1"
BUS_V2 = "bus-v2"  # bus-v1 plus resume: subscribe with "since" (PROTOCOL.md 4.3.1)
CAPABILITIES = f"{CAPABILITY},{BUS_V2}"  # what a session offers; the host picks the best it speaks
HEARTBEAT_INTERVAL = 25.0
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
DEFAULT_TIMEOUT = 10.0
MAX_QUEUED = 1000

# Limits of PROTOCOL.md, checked here so a bad call fails in the caller instead of
# earning an error ack (or, for a frame length, the end of the session).
MAX_LINE = 512
MAX_FRAME = 65536
MAX_TOPIC = 256
MAX_NAME = 128
MAX_SINCE = 2**63 - 1
# The since of a subscription with no position yet: the router takes one ahead of its
# log as its last seq and says so in the ack's since, which gives the subscription a
# position at once (PROTOCOL.md 4.3.1). Messages published before its first
# delivery, say while the guest reboots, are then resumed too.
FROM_NOW = MAX_SINCE
RESERVED_NAME = "host"
SINCE_EXPIRED = "since expired"  # the error ack of a subscribe whose since is rotated away
INVALID_SINCE = "invalid since"
# Subscribes in a row for one topic after "since expired" before it is taken live
# (the oldest seq left moves on only if the host rotates its log meanwhile).
SINCE_RETRIES = 3

# The state file: resume positions across restarts of the process.
STATE_DIR = "/var/lib/castra-guest"  # the agent's default, used only if it is a writable directory
STATE_FORMAT = "castra-guest-positions"
STATE_VERSION = 1
STATE_MAX_BYTES = 1 << 20
SAVE_INTERVAL = 1.0  # seconds between writes of the state file while messages flow
# Unicode categories a VM name must not contain (handshake.validate_vm_name).
FORBIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
# A heartbeat ack slower than this means the connection is dead (a host that went
# away without a FIN): short intervals in tests must not make a busy host look dead.
HEARTBEAT_ACK_FLOOR = 5.0

_LENGTH = struct.Struct(">I")
log = logging.getLogger("castra_zmq.guest")


# -- errors ---------------------------------------------------------------------------


class GuestError(Exception):
    """Root of the errors this module raises; ``reason`` is short and printable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ConnectFailed(GuestError):
    """The host could not be reached, or the handshake did not open a session."""


class CannotConnect(ConnectFailed):
    """No TCP connection to the host's port (refused, unreachable, timed out)."""


class HandshakeRefused(ConnectFailed):
    """The host answered ``error: <reason>`` to the hello line."""


class AckError(GuestError):
    """The host answered with an error ack; ``ack`` is the whole reply."""

    def __init__(self, ack: dict):
        super().__init__(str(ack.get("reason", "error ack")))
        self.ack = ack


class GuestTimeout(GuestError, TimeoutError):
    """No connection or no reply within the timeout."""


class ConnectionLost(GuestError, ConnectionError):
    """The session ended before the reply came: a publish may or may not be in the log."""


class SessionClosed(GuestError):
    """The session was closed by ``close()``."""


# -- wire format (pure) -----------------------------------------------------------------


def vm_name(name: str) -> str:
    """``name`` without a ``vm:`` prefix, checked as the router checks it
    (``handshake.validate_vm_name``: 1..128 printable characters, not ``host``) and
    without whitespace, since the router splits the hello line on it. The messages
    are those of ``guest/castra-bus-agent.sh``, word for word."""
    if name.startswith("vm:"):
        name = name[3:]
    if not name:
        raise ValueError("missing vm name")
    if len(name) > MAX_NAME:
        raise ValueError(f"vm name too long ({len(name)} characters, max {MAX_NAME})")
    if any(ch.isspace() or unicodedata.category(ch) in FORBIDDEN_CATEGORIES for ch in name):
        raise ValueError(f"invalid vm name '{name}': no whitespace or control characters")
    if name.lower() == RESERVED_NAME:
        raise ValueError(f"reserved vm name '{name}'")
    return name


def hello_line(vm: str, capability: str | None = CAPABILITY, token: str | None = None) -> bytes:
    """``hello vm:<name> [capabilities=<cap>] [token=<secret>]`` (the token is for hosts
    with an identities file)."""
    line = f"hello vm:{vm_name(vm)}" + (f" capabilities={capability}" if capability else "")
    if token:
        if any(ch.isspace() for ch in token):
            raise ValueError("a token has no spaces")
        line += f" token={token}"
    return line.encode() + b"\n"


def check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not 1 <= len(topic) <= MAX_TOPIC or "\x00" in topic:
        raise ValueError(f"invalid topic {topic!r}: 1..{MAX_TOPIC} characters, no NUL")
    return topic


def check_since(since) -> int:
    if type(since) is not int or not 0 <= since <= MAX_SINCE:
        raise ValueError(f"invalid since {since!r}: an integer from 0 to 2^63-1")
    return since


def parse_session_reply(reply: str) -> tuple[str, str] | None:
    """``(token, protocol)`` of the answer that opens a bus session (PROTOCOL.md 2.4):
    ``ok session=<token>`` (``protocol`` is then ``bus-v1``) or ``ok session=<token>
    protocol=bus-v2 [log=<id>]``. Further ``key=value`` words are ignored (room for
    later versions). None for any other answer (``ok`` alone: no protocol in common)."""
    fields = reply_fields(reply)
    if not fields.get("session"):
        return None
    return fields["session"], fields.get("protocol") or CAPABILITY


def reply_fields(reply: str) -> dict:
    """The ``key=value`` words of an ``ok`` answer (none for any other answer)."""
    words = reply.split()
    if not words or words[0] != "ok":
        return {}
    fields: dict = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
    return fields


def topic_matches(subscription: str, topic: str) -> bool:
    """Whether ``subscription`` covers ``topic``: the same string, or a pattern ending
    in ``*`` and ``topic`` starts with what comes before that ``*`` (``*``: all)."""
    if subscription.endswith("*"):
        return topic.startswith(subscription[:-1])
    return subscription == topic


class Positions:
    """Resume bookkeeping, pure (the session holds the lock): per subscription (topic
    or pattern), ``last[subscription]`` is the seq of the last message handed to the
    application; a subscription without one has no entry. ``version`` counts changes."""

    def __init__(self, known: dict | None = None, log: str | None = None):
        self.last: dict = dict(known or {})
        self.log = log  # the router log the seqs belong to (its ``log=``); None: not told
        self.version = 0
        # A subscription made on this log with no position (``start``), while nothing
        # past its start came: [the start, the last seq at or below it taken]. Only a
        # handover (PROTOCOL.md 8.2.1: the VM moved here) sends such seqs, in order
        # and before anything later; not kept in the state file.
        self.started: dict = {}

    def move_to(self, log: str | None) -> bool:
        """The router's log is ``log`` (None: it does not say). Positions taken on
        another log (another host, a state root made again) mean nothing on this
        one: they are dropped, and True returned."""
        if log is None or log == self.log:
            return False
        dropped = bool(self.last) and self.log is not None
        if dropped:
            self.last.clear()
            self.started.clear()
        self.log = log
        self.version += 1
        return dropped

    def set(self, subscription: str, seq: int) -> None:
        if self.last.get(subscription) != seq:
            self.last[subscription] = seq
            self.version += 1

    def start(self, subscription: str, seq: int) -> None:
        """``subscription`` was made with no position, when this log ended at ``seq``:
        its position, unless messages after it came first."""
        held = self.last.get(subscription)
        if held is None or held <= seq:
            self.set(subscription, seq)
            self.started[subscription] = [seq, -1 if held is None else held]

    def forget(self, subscription: str) -> None:
        self.started.pop(subscription, None)
        if self.last.pop(subscription, None) is not None:
            self.version += 1

    def take(self, topic: str, seq: int, subscriptions, dedupe: bool = True) -> bool:
        """Whether the message ``(topic, seq)`` goes to the application; if so, record it.

        With ``dedupe`` (a bus-v2 session, whose replays can repeat messages) it goes
        only if one of the ``subscriptions`` matching ``topic`` has no position or
        one below ``seq``; each matching subscription's position then becomes
        max(position, seq); one at or below them goes if it is a handover's (one of
        them was ``started`` above it, and it is past the last taken there). Without
        (bus-v1: nothing is replayed, and a host whose log started again must not
        have its messages dropped) it always goes, and the matching positions become
        ``seq``. A message that no subscription matches (one in flight when its
        topic was unsubscribed) goes, and changes nothing.
        """
        matching = [s for s in subscriptions if topic_matches(s, topic)]
        if dedupe:
            if matching and all(self.last.get(s, -1) >= seq for s in matching):
                return self._handed_over(matching, seq)
            for s in matching:
                self.set(s, max(self.last.get(s, seq), seq))
                if seq > self.started.get(s, (seq,))[0]:
                    self.started.pop(s)  # live now: no handover's line comes after
        else:
            for s in matching:
                self.set(s, seq)
        return True

    def _handed_over(self, matching: list, seq: int) -> bool:
        taken = False
        for s in matching:
            started = self.started.get(s)
            if started is not None and started[1] < seq <= started[0]:
                started[1] = seq
                taken = True
        return taken


# -- the state file (pure but for the file itself) ---------------------------------------------

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\Z")


def state_file_name(vm: str) -> str:
    """``<vm>.json`` for a plain name, else the name percent-encoded as the router
    names per-VM logs (PROTOCOL.md 7.3): never a path, never hidden, two names never
    share a file."""
    if _PLAIN_NAME.match(vm) and len(vm) <= 200:
        return vm + ".json"
    raw = vm.encode()
    name = "".join(chr(byte) if index and (chr(byte).isascii() and chr(byte).isalnum() or chr(byte) in "_-")
                   else f"%{byte:02X}" for index, byte in enumerate(raw))
    if len(name) > 200:
        name = "%%" + hashlib.sha256(raw).hexdigest()
    return name + ".json"


def default_state_file(vm: str, directory: str | None = None) -> str | None:
    """``<directory>/<vm>.json`` (``STATE_DIR`` by default) if ``directory`` is a
    directory this process may write in, else None (the agent then keeps positions
    in memory only)."""
    directory = STATE_DIR if directory is None else directory
    if os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
        return os.path.join(directory, state_file_name(vm))
    return None


def encode_state(vm: str, host: str, port: int, positions: dict, log: str | None = None) -> bytes:
    document = {"format": STATE_FORMAT, "version": STATE_VERSION, "vm": vm, "host": host, "port": port,
                "positions": dict(sorted(positions.items()))}
    if log is not None:
        document["log"] = log
    return json.dumps(document, ensure_ascii=False, indent=1).encode() + b"\n"


def decode_state(data: bytes, vm: str, host: str, port: int) -> tuple[dict, str | None]:
    """The positions of a state file written by ``encode_state`` for this ``vm`` and
    ``host:port``, and the router log they belong to (None: not told); ``ValueError``
    (with a printable reason) for anything else: a file for another VM or host
    would resume from seqs that mean nothing here."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError("not a castra-guest state file")
    if document.get("version") != STATE_VERSION:
        raise ValueError(f"version {document.get('version')!r}, not {STATE_VERSION}")
    if document.get("vm") != vm:
        raise ValueError(f"written for vm:{document.get('vm')}, not vm:{vm}")
    if (document.get("host"), document.get("port")) != (host, port):
        raise ValueError(f"written for {document.get('host')}:{document.get('port')}, not {host}:{port}")
    positions = document.get("positions")
    if not isinstance(positions, dict):
        raise ValueError("no positions")  # noqa: TRY004 - file content: callers take ValueError
    for topic, seq in positions.items():
        try:
            check_topic(topic)
            check_since(seq)
        except ValueError as exc:
            raise ValueError(f"bad position: {exc}") from None
    log_id = document.get("log")
    if log_id is not None and not isinstance(log_id, str):
        raise ValueError("bad log")
    return positions, log_id


def load_state(path: str, vm: str, host: str, port: int) -> tuple[dict, str | None]:
    """The positions kept in ``path`` and their log: none if it does not exist;
    none and a warning if it cannot be read or is not a state file for this VM and
    host (it is then replaced at the next write)."""
    try:
        with open(path, "rb") as file:
            data = file.read(STATE_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        log.warning("state file %s not read (%s): starting without positions", path, exc.strerror or exc)
        return {}, None
    try:
        if len(data) > STATE_MAX_BYTES:
            raise ValueError(f"over {STATE_MAX_BYTES} bytes")
        return decode_state(data, vm, host, port)
    except ValueError as exc:
        log.warning("state file %s not used (%s): starting without positions; it will be replaced", path, exc)
        return {}, None


def save_state(path: str, vm: str, host: str, port: int, positions: dict, log_id: str | None = None) -> None:
    """Replace ``path`` atomically: a temporary file in the same directory, fsynced,
    renamed over it, then the directory fsynced. Raises ``OSError``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(encode_state(vm, host, port, positions, log_id))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # the rename is done; only its durability is up to the OS
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(dir_fd)


def encode_frame(frame: dict) -> bytes:
    """One frame: 4-byte big-endian length, then compact UTF-8 JSON."""
    body = json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame too large: {len(body)} bytes (max {MAX_FRAME})")
    return _LENGTH.pack(len(body)) + body


def read_frame(stream) -> dict:
    """The next frame from a buffered binary ``stream``; ``ConnectionLost`` at its end
    or on a frame that breaks the contract (the stream can no longer be trusted)."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise ConnectionLost("closed by the host")
    (length,) = _LENGTH.unpack(header)
    if not 1 <= length <= MAX_FRAME:
        raise ConnectionLost(f"bad frame length {length} from the host")
    body = stream.read(length)
    if len(body) < length:
        raise ConnectionLost("closed by the host inside a frame")
    try:
        frame = json.loads(body)
    except (ValueError, RecursionError):
        raise ConnectionLost("frame from the host is not UTF-8 JSON") from None
    if not isinstance(frame, dict):
        raise ConnectionLost("frame from the host is not a JSON object")
    return frame


def _read_line(stream) -> str:
    line = stream.readline(MAX_LINE + 2)
    if not line.endswith(b"\n"):
        raise ConnectFailed("line too long from the host" if line else "closed by the host during the handshake")
    return line.decode("utf-8", "replace").rstrip("\r\n")


def handshake(host: str, port: int, hello: bytes, timeout: float):
    """Connect, read the greeting, say ``hello``: ``(socket, stream, reply line)``.

    Raises ``CannotConnect`` without a TCP connection, ``HandshakeRefused`` on
    ``error: <reason>`` (in place of the greeting too: connection limits),
    ``ConnectFailed`` otherwise.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise CannotConnect(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    stream = sock.makefile("rb")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = _read_line(stream)  # the greeting: its content is not part of the contract
        if not reply.startswith("error:"):
            sock.sendall(hello)
            reply = _read_line(stream)
    except (OSError, ConnectFailed) as exc:
        _close(sock, stream)
        reason = exc.reason if isinstance(exc, ConnectFailed) else str(exc)
        raise ConnectFailed(f"handshake with {host}:{port} failed: {reason}") from None
    if reply.startswith("error:"):
        _close(sock, stream)
        raise HandshakeRefused(reply[len("error:"):].strip())
    return sock, stream, reply


def _close(sock: socket.socket, stream) -> None:
    stream.close()
    sock.close()


def _shutdown(sock: socket.socket) -> None:
    """Wake the reader blocked on ``sock`` (it sees the end of the stream)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already disconnected


def ping(host: str, port: int, vm: str, timeout: float = DEFAULT_TIMEOUT, token: str | None = None) -> bool:
    """Handshake-only hello (no bus capability): True when the host answers ``ok``.

    This is all a reachability-only guest does; the host records the handshake and
    closes the connection. Raises ``ConnectFailed``/``HandshakeRefused`` otherwise.
    """
    sock, stream, reply = handshake(host, port, hello_line(vm, None, token), timeout)
    _close(sock, stream)
    if reply != "ok":
        raise ConnectFailed(f"unexpected handshake reply {reply!r}")
    return True


# -- the session ------------------------------------------------------------------------


class GuestSession:
    """A long-lived bus session that reconnects by itself.

    ``wait=True`` connects before returning and raises ``ConnectFailed`` (or
    ``HandshakeRefused``) if that first attempt fails; ``wait=False`` returns at once
    and keeps trying in the background, for an agent that may start before the host.
    After a lost connection it reconnects after ``backoff_initial`` seconds, doubling
    up to ``backoff_max`` while attempts fail, and subscribes again to every topic of
    ``subscribe``/``subscribe()``.

    Delivered messages queue up to ``max_queued``; past that the reader stops reading,
    so replies wait too and the host eventually drops the session as a slow consumer.

    **Resume.** The hello offers ``bus-v1,bus-v2`` (``resume=False``: ``bus-v1`` only).
    Per subscription (topic or pattern) the session keeps the seq of the last message
    ``receive()`` handed to the application (``positions``):

    * A message goes to the application only if one of the subscriptions matching its
      topic has no position yet or one below the message's seq; every matching
      subscription's position then becomes that seq (if higher). So nothing is
      handed twice, even when a replay repeats what was already queued.
    * After a reconnect to a bus-v2 host, each subscription that has a position is
      subscribed with ``"since": <position>``: the host replays what it missed, in
      seq order, then goes on live. One without a position (subscribed in this
      process, no message yet) is subscribed live, as is every subscription on a
      host that speaks bus-v1 only: there the session behaves as a bus-v1 guest,
      nothing is replayed and nothing is dropped.
    * ``subscribe(topic, since=N)`` starts ``topic`` at position ``N`` (bus-v2: the
      host replays from ``N + 1``).
    * When the host's log is behind the position (the ack's ``since`` is lower than
      the one sent: a new state root), the position becomes the ack's ``since``.
    * When the host no longer has the messages after the position (the ack
      ``since expired`` with ``oldest`` N), the gap is accepted: a warning names the
      seqs lost, the position becomes N - 1 and the topic is subscribed again from
      there. The application sees the gap in the log only; it never waits for
      messages that cannot come. After ``SINCE_RETRIES`` such answers in a row the
      topic is subscribed live.

    ``state_file`` keeps the positions across restarts: read when the session starts
    (a file that is corrupt, or written for another VM or ``host:port``, is ignored
    with a warning and replaced), written atomically at most every ``SAVE_INTERVAL``
    seconds while positions change, and at ``close()``. Positions of messages handed
    after ``close()`` are written when the queue runs empty.
    """

    def __init__(
        self,
        host: str,
        port: int,
        vm: str,
        *,
        subscribe=(),
        token: str | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        connect_timeout: float = DEFAULT_TIMEOUT,
        max_queued: int = MAX_QUEUED,
        wait: bool = True,
        state_file: str | os.PathLike | None = None,
        resume: bool = True,
    ):
        if not (heartbeat_interval > 0 and 0 < backoff_initial <= backoff_max):
            raise ValueError("heartbeat_interval and backoff_initial must be > 0, and backoff_max >= backoff_initial")
        self.host, self.port = host, int(port)
        self.vm = vm_name(vm)
        self.heartbeat_interval = heartbeat_interval
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.connect_timeout = connect_timeout
        self.max_queued = max_queued
        self.session_token: str | None = None  # the host's token of the current connection
        self.bus_protocol: str | None = None  # what the current connection speaks: "bus-v1" or "bus-v2"
        self.state_file = os.fspath(state_file) if state_file is not None else None
        self._hello = hello_line(self.vm, CAPABILITIES if resume else CAPABILITY, token)
        # Lock order: _send_lock, then _state. _state guards everything below it and
        # is also the condition for "connected", "reply/message arrived", "closed".
        # _send_lock is reentrant: _connect holds it while it subscribes again, so that
        # those subscribes are the first frames of a connection.
        self._send_lock = threading.RLock()
        self._state = threading.Condition()
        self._sock: socket.socket | None = None
        topics = [subscribe] if isinstance(subscribe, str) else subscribe
        self._topics = dict.fromkeys(check_topic(t) for t in topics)  # an ordered set
        self._publishes: dict = {}  # publish id -> Future of its ack (acks come in any order)
        # Other replies come back in the order of their requests, one queue per kind.
        self._replies = {kind: collections.deque() for kind in ("subscribe", "unsubscribe", "heartbeat")}
        self._inbox: collections.deque = collections.deque()  # (message, came on a bus-v2 connection)
        self._resumable = False  # the current connection speaks bus-v2
        known, log_id = load_state(self.state_file, self.vm, self.host, self.port) if self.state_file else ({}, None)
        self._positions = Positions(known, log_id)
        self._duplicates = 0
        self._saved_version = 0  # positions.version in the state file
        self._save_lock = threading.Lock()  # one writer of the state file at a time
        self._last_save = time.monotonic() - SAVE_INTERVAL
        self._save_error: str | None = None  # the last write's failure, logged once
        self._dirty = threading.Event()  # positions changed (or closing): wakes the saver
        self._ids = itertools.count(1)  # next() on it is atomic: ids are unique across threads
        self._closed = threading.Event()
        self._first_attempt = threading.Event()
        self._fail_fast = wait
        self._last_error: GuestError | None = None
        self._reader = threading.Thread(target=self._run_reader, name=f"castra-guest-reader-{self.vm}", daemon=True)
        self._heartbeat = threading.Thread(target=self._run_heartbeat, name=f"castra-guest-heartbeat-{self.vm}",
                                           daemon=True)
        self._saver = (threading.Thread(target=self._run_saver, name=f"castra-guest-saver-{self.vm}", daemon=True)
                       if self.state_file else None)
        self._reader.start()
        self._heartbeat.start()
        if self._saver is not None:
            self._saver.start()
        if wait:
            self._first_attempt.wait()  # bounded: every step of an attempt has connect_timeout
            error = self._last_error  # set by a failed attempt, cleared by a successful one
            if error is not None:
                self.close()
                raise error

    # -- public API ---------------------------------------------------------------------

    def publish(self, topic: str = "broadcast", payload=None, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Publish and return the ack ``{"type":"ack","ack":"publish","status":"ok","seq":N,...}``
        once the message is in the host's bus log.

        Raises ``AckError`` (with the host's ``reason``) on an error ack,
        ``GuestTimeout`` without a connection or an ack in time, ``ConnectionLost``
        if the connection dropped before the ack (the message may be in the log).
        """
        frame = {"type": "publish", "topic": check_topic(topic), "payload": payload, "id": next(self._ids)}
        return self._request(frame, timeout)

    def subscribe(self, topic: str, timeout: float = DEFAULT_TIMEOUT, *, since: int | None = None) -> dict:
        """Receive messages on ``topic`` from now on, across reconnects: ``p*`` is every
        topic starting with ``p`` (``metrics.*``), ``*`` all (both only what this VM may read).

        The topic is kept even if this call times out (it is subscribed on the next
        connection); an error ack (say, past 16 topics) raises ``AckError`` and drops it.

        ``since=N``: this application has every message on ``topic`` up to seq ``N``;
        a bus-v2 host replays the later ones first (a bus-v1 host cannot: live only).
        Without it, a topic not held yet whose position is known (from the state
        file) resumes from there; otherwise it starts live. ``since expired`` is
        handled as the class says (a warning, then from the oldest seq left).
        """
        check_topic(topic)
        if since is not None:
            check_since(since)
        deadline = time.monotonic() + timeout
        with self._state:
            held = topic in self._topics
            self._topics[topic] = None
            if since is not None:
                self._set_position(topic, since)
            elif not held:
                since = self._positions.last.get(topic, FROM_NOW)
        attempt = 0
        while True:  # bounded: after SINCE_RETRIES refusals of since, a live subscribe
            frame = {"type": "subscribe", "topic": topic}
            if since is not None:
                frame["since"] = since
            try:
                ack = self._request(frame, max(0.0, deadline - time.monotonic()))
            except AckError as refused:
                retry, since = self._retry_since(topic, since, refused.ack, attempt)
                if retry:
                    attempt += 1
                    continue
                self._forget_topic(topic)
                raise
            self._subscribed(topic, since, ack)
            return ack

    def unsubscribe(self, topic: str, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Stop receiving ``topic``, now and after reconnects (its position is dropped)."""
        self._forget_topic(topic, position=True)
        return self._request({"type": "unsubscribe", "topic": check_topic(topic)}, timeout)

    def heartbeat(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Send a heartbeat now (the session also sends one every ``heartbeat_interval``)."""
        return self._request({"type": "heartbeat"}, timeout)

    def receive(self, timeout: float | None = None) -> dict:
        """The next delivered message ``{"type":"message","topic":T,"from":...,"seq":N,"payload":...}``.

        Raises ``GuestTimeout`` if none arrives in ``timeout`` seconds (None: wait),
        ``SessionClosed`` once the session is closed and every message was taken.
        A message already handed (a replay repeats it) is dropped here, and counted
        in ``duplicates``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._state.wait_for(lambda: self._inbox or self._closed.is_set(), left):
                    raise GuestTimeout(f"no message within {timeout:g}s")
                if not self._inbox:
                    raise SessionClosed("session closed")
                self._state.notify_all()  # the reader may wait for room in the inbox
                message, resumable = self._inbox.popleft()
                if self._hand_over(message, resumable):
                    break
            # After close() no saver runs: write the last positions once the queue is empty.
            save = (self._saver is not None and self._closed.is_set()
                    and (not self._inbox or time.monotonic() - self._last_save >= SAVE_INTERVAL))
        if save:
            self._save()
        return message

    def messages(self, timeout: float | None = None):
        """Yield delivered messages until the session is closed, or until none came
        for ``timeout`` seconds."""
        while True:
            try:
                yield self.receive(timeout)
            except (GuestTimeout, SessionClosed):
                return

    __iter__ = messages

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def positions(self) -> dict:
        """A copy of ``{subscription: seq of the last message handed to the application}``
        for the subscriptions held; those without a position yet are left out."""
        with self._state:
            return {topic: self._positions.last[topic] for topic in self._topics if topic in self._positions.last}

    @property
    def duplicates(self) -> int:
        """How many delivered messages were dropped as already handed (replays)."""
        return self._duplicates

    def close(self, timeout: float | None = None) -> None:
        """End the session; waiting calls raise ``SessionClosed`` (or ``ConnectionLost``).

        Waits up to ``timeout`` seconds (default: the connect timeout plus one) for
        the session's threads, which may be inside a connection attempt.
        """
        self._closed.set()
        self._dirty.set()  # wakes the saver, which then ends
        with self._state:
            sock = self._sock
            self._state.notify_all()
        if sock is not None:
            _shutdown(sock)
        deadline = time.monotonic() + (self.connect_timeout + 1 if timeout is None else timeout)
        for thread in (self._reader, self._heartbeat, self._saver):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self.state_file is not None:
            self._save()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- requests and their replies -------------------------------------------------------

    def _request(self, frame: dict, timeout: float) -> dict:
        """Send ``frame`` once connected and wait for its ok ack, all within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._state:
            if not self._state.wait_for(lambda: self._sock is not None or self._closed.is_set(), timeout):
                raise GuestTimeout(f"not connected to {self.host}:{self.port} within {timeout:g}s"
                                   + (f" ({self._last_error.reason})" if self._last_error else ""))
        future = self._submit(frame)
        try:
            reply = future.result(max(0.0, deadline - time.monotonic()))
        except futures.TimeoutError:
            if frame["type"] == "publish":
                with self._state:
                    self._publishes.pop(frame["id"], None)  # a late ack is then dropped
            # Other kinds stay queued: their late reply must not be taken by a later request.
            raise GuestTimeout(f"no {frame['type']} ack within {timeout:g}s") from None
        if reply.get("status") != "ok":
            raise AckError(reply)
        return reply

    def _submit(self, frame: dict, on: socket.socket | None = None) -> futures.Future:
        """Write ``frame`` and return the future of its reply, registered before the
        write so that the reader always finds it, and in wire order. With ``on``, only
        on that connection (``ConnectionLost`` once it is gone)."""
        data = encode_frame(frame)
        # A bus-v1 host would ignore "since", but it is not sent: bus-v1 bytes exactly.
        plain = encode_frame({k: v for k, v in frame.items() if k != "since"}) if "since" in frame else data
        future: futures.Future = futures.Future()
        with self._send_lock:
            with self._state:
                sock = self._sock
                if self._closed.is_set():
                    raise SessionClosed("session closed")
                if sock is None or (on is not None and sock is not on):
                    raise ConnectionLost("not connected")
                if not self._resumable:
                    data = plain
                if frame["type"] == "publish":
                    self._publishes[frame["id"]] = future
                else:
                    self._replies[frame["type"]].append(future)
            try:
                sock.sendall(data)
            except OSError as exc:
                # Part of the frame may be out: the stream is broken, so end it; the
                # reader then fails every waiting future, this one included.
                _shutdown(sock)
                raise ConnectionLost(f"send failed: {exc}") from None
        return future

    def _handle_ack(self, ack: dict) -> None:
        kind = ack.get("ack")
        with self._state:
            if kind == "publish":
                future = self._publishes.pop(ack.get("id"), None)
                if future is None and "id" not in ack and self._publishes:
                    # The host answers a publish it could not parse without our id:
                    # such refusals come before later acks, so it is the oldest.
                    future = self._publishes.pop(next(iter(self._publishes)))
            else:
                waiting = self._replies.get(kind)
                future = waiting.popleft() if waiting else None
        if future is None:
            log.debug("reply nobody waits for: %s", ack)
        else:
            future.set_result(ack)  # outside the lock: done callbacks may take it

    def _handle_message(self, message: dict) -> None:
        with self._state:
            # Waits for room (the reader stops reading: back-pressure to the host).
            self._state.wait_for(lambda: len(self._inbox) < self.max_queued or self._closed.is_set())
            if not self._closed.is_set():
                self._inbox.append((message, self._resumable))
                self._state.notify_all()

    def _dispatch(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "message":
            self._handle_message(frame)
        elif kind == "ack":
            self._handle_ack(frame)
        else:  # {"type":"error"}: a frame we sent was malformed, which encode_frame prevents
            log.warning("host reported an error: %s", frame)

    def _forget_topic(self, topic: str, position: bool = False) -> None:
        """Drop ``topic`` from the subscriptions; with ``position``, its position too
        (a refused topic keeps it: the next run may be allowed to read it)."""
        with self._state:
            self._topics.pop(topic, None)
            if position:
                self._positions.forget(topic)
                self._dirty.set()

    # -- resume -----------------------------------------------------------------------------

    def _set_position(self, topic: str, seq: int) -> None:
        """Under ``_state``."""
        self._positions.set(topic, seq)
        self._dirty.set()

    def _hand_over(self, message: dict, resumable: bool) -> bool:
        """Under ``_state``: whether ``message`` goes to the application (``Positions.take``)."""
        seq, topic = message.get("seq"), message.get("topic")
        if type(seq) is not int or not isinstance(topic, str):
            return True  # not a message the host sends: nothing to go by
        version = self._positions.version
        if not self._positions.take(topic, seq, self._topics, dedupe=resumable):
            self._duplicates += 1
            return False
        if self._positions.version != version:
            self._dirty.set()
        return True

    def _subscribed(self, topic: str, sent: int | None, ack: dict) -> None:
        """An ok ack of a subscribe sent with ``since`` = ``sent``: a host whose log is
        behind answers a lower ``since``, which becomes the position."""
        since = ack.get("since")
        if sent is None or type(since) is not int or since >= sent:
            return
        if sent == FROM_NOW:  # a subscription's first position: where the log ends now
            with self._state:
                self._positions.start(topic, since)
                self._dirty.set()
            return
        log.warning("%s: the host's log ends at seq %d, before this guest's position %d (a new log?): "
                    "resuming from seq %d", topic, since, sent, since)
        with self._state:
            self._set_position(topic, since)

    def _retry_since(self, topic: str, sent: int | None, ack: dict, attempt: int) -> tuple[bool, int | None]:
        """After an error ack of a subscribe sent with ``since`` = ``sent``: whether to
        subscribe again, and with which ``since`` (None: live).

        ``since expired``, ``oldest`` N: the messages between are gone; warn, take
        N - 1 as the position, and go on from there (live after ``SINCE_RETRIES`` in
        a row). ``invalid since``: drop the position, go on live.
        """
        reason = ack.get("reason")
        if sent is None or reason not in (SINCE_EXPIRED, INVALID_SINCE):
            return False, None
        oldest = ack.get("oldest")
        if reason == SINCE_EXPIRED and type(oldest) is int and sent + 1 < oldest <= MAX_SINCE + 1 \
                and attempt < SINCE_RETRIES:
            log.warning("%s: messages after seq %d up to seq %d are no longer in the host's logs and are lost; "
                        "resuming from seq %d", topic, sent, oldest - 1, oldest)
            with self._state:
                self._set_position(topic, oldest - 1)
            return True, oldest - 1
        log.warning("%s: subscribe with since %d refused (%s%s): subscribing from now on, messages before are lost",
                    topic, sent, reason, f", oldest {oldest}" if oldest is not None else "")
        with self._state:
            self._positions.forget(topic)
            self._dirty.set()
        return True, None

    def _save(self) -> None:
        """Write the positions to the state file if they changed since the last write;
        a failure is logged (once until a write succeeds) and the session goes on."""
        with self._save_lock:
            with self._state:
                version = self._positions.version
                positions = dict(self._positions.last)
                log_id = self._positions.log
            if version == self._saved_version:
                return
            self._last_save = time.monotonic()
            try:
                save_state(self.state_file, self.vm, self.host, self.port, positions, log_id)
            except OSError as exc:
                error = str(exc.strerror or exc)
                if error != self._save_error:
                    log.warning("cannot write the state file %s: %s", self.state_file, error)
                self._save_error = error
                return
            self._saved_version = version
            self._save_error = None

    def _run_saver(self) -> None:
        """Write the state file when positions change, at most every ``SAVE_INTERVAL``."""
        while True:
            self._dirty.wait()
            if self._closed.is_set():
                return  # close() writes the last positions
            if self._closed.wait(max(0.0, self._last_save + SAVE_INTERVAL - time.monotonic())):
                return
            self._dirty.clear()
            self._save()

    # -- the reader: connection life ------------------------------------------------------

    def _run_reader(self) -> None:
        delay = self.backoff_initial
        while not self._closed.is_set():
            try:
                sock, stream = self._connect()
            except ConnectFailed as exc:
                self._last_error = exc
                if self._fail_fast and not self._first_attempt.is_set():
                    self._first_attempt.set()
                    return  # the constructor raises it
                self._first_attempt.set()
                log.warning("%s; retrying in %gs", exc.reason, delay)
            else:
                delay = self.backoff_initial
                reason = self._serve(sock, stream)
                if self._closed.is_set():
                    return
                log.warning("connection to %s:%s lost: %s; reconnecting in %gs", self.host, self.port, reason, delay)
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, self.backoff_max)

    def _connect(self):
        sock, stream, reply = handshake(self.host, self.port, self._hello, self.connect_timeout)
        opened = parse_session_reply(reply)
        if opened is None:
            _close(sock, stream)
            raise ConnectFailed(f"{self.host}:{self.port} did not open a bus session (reply {reply!r})")
        sock.settimeout(None)  # from now on the reader blocks until a frame or the end
        # The subscribes go out before any caller's frame (an unsubscribe cannot come
        # before a stale subscribe). A few small frames on a new connection: the
        # kernel takes them at once, so the reader does not wait here while a replay
        # fills what the host sends.
        with self._send_lock:
            with self._state:
                if self._closed.is_set():
                    _close(sock, stream)
                    raise ConnectFailed("closed while connecting")
                self._sock = sock
                self.session_token, self.bus_protocol = opened
                self._resumable = self.bus_protocol == BUS_V2
                if self._resumable and self._positions.move_to(reply_fields(reply).get("log")):
                    log.warning("positions were taken on another router log (another host, or a state root made "
                                "again): dropped, subscriptions start live")
                    self._dirty.set()
                # Each subscription from its position (the since is dropped on a bus-v1 connection).
                subscriptions = [(topic, self._positions.last.get(topic, FROM_NOW)) for topic in self._topics]
            log.info("connected to %s:%s as vm:%s (session %s, %s)", self.host, self.port, self.vm,
                     self.session_token, self.bus_protocol)
            for topic, since in subscriptions:
                if not self._send_subscribe(sock, topic, since, 0):
                    break  # the read loop that follows sees the end and reconnects
        with self._state:
            self._last_error = None
            self._state.notify_all()
        self._first_attempt.set()
        return sock, stream

    def _subscribe_again(self, sock: socket.socket, topic: str, since: int | None, attempt: int) -> None:
        """Subscribe on the connection ``sock`` from a thread of its own, for the reader
        (an ack's callback): it must not wait for the send lock. A replay fills
        what the host sends us, and a reader waiting for a caller whose write waits
        for the host (which stops reading us while we do not read) would stall the
        session until the host drops it as a slow consumer."""
        threading.Thread(target=self._send_subscribe, args=(sock, topic, since, attempt),
                         name=f"castra-guest-subscribe-{self.vm}", daemon=True).start()

    def _send_subscribe(self, sock: socket.socket, topic: str, since: int | None, attempt: int) -> bool:
        frame = {"type": "subscribe", "topic": topic}
        if since is not None:
            frame["since"] = since
        try:
            future = self._submit(frame, on=sock)
        except (ConnectionLost, SessionClosed):
            return False
        # Nobody waits for these acks: the reader calls this back when one comes.
        future.add_done_callback(lambda done: self._handle_resubscribed(sock, topic, since, attempt, done))
        return True

    def _handle_resubscribed(self, sock: socket.socket, topic: str, since: int | None, attempt: int,
                             done: futures.Future) -> None:
        if done.exception() is not None:
            return  # the connection dropped; the next one subscribes again
        ack = done.result()
        if ack.get("status") == "ok":
            self._subscribed(topic, since, ack)
            replay = ack.get("since")
            log.info("subscribed to %s%s", topic, f" (replay after seq {replay})" if type(replay) is int else "")
            return
        retry, since = self._retry_since(topic, since, ack, attempt)
        if retry:
            self._subscribe_again(sock, topic, since, attempt + 1)
            return
        self._forget_topic(topic)
        log.warning("subscription to %s refused: %s", topic, ack.get("reason"))

    def _serve(self, sock: socket.socket, stream) -> str:
        """Read and dispatch frames until the connection ends; return why it ended."""
        try:
            while True:
                self._dispatch(read_frame(stream))
        except ConnectionLost as exc:
            reason = exc.reason
        except OSError as exc:
            reason = str(exc)
        _shutdown(sock)
        with self._send_lock:  # no writer is inside sendall on this socket when it closes
            with self._state:
                self._sock = None
                pending = list(self._publishes.values())
                self._publishes.clear()
                for waiting in self._replies.values():
                    pending.extend(waiting)
                    waiting.clear()
                self._state.notify_all()
            _close(sock, stream)
        error = SessionClosed("session closed") if self._closed.is_set() else ConnectionLost(reason)
        for future in pending:
            future.set_exception(error)
        return reason

    def _run_heartbeat(self) -> None:
        ack_timeout = max(self.heartbeat_interval, HEARTBEAT_ACK_FLOOR)
        while not self._closed.wait(self.heartbeat_interval):
            sock = self._sock
            if sock is None:
                continue  # the reader is reconnecting
            try:
                self.heartbeat(ack_timeout)
            except GuestTimeout:
                log.warning("no heartbeat ack within %gs: dropping the connection", ack_timeout)
                _shutdown(sock)
            except (ConnectionLost, SessionClosed):
                pass  # the reader already handles the end of this connection


# -- the castra-guest command -------------------------------------------------------------


def read_handshake_conf(path: str) -> dict:
    """The ``KEY=value`` lines of a shell-style conf file (``export``, quotes, comments)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as conf:
            text = conf.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("ignoring %s: %s", path, exc.strerror or exc)
        return {}
    values = {}
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue  # unbalanced quotes: not a line a shell would take either
        for token in tokens:
            key, sep, value = token.partition("=")
            if sep:
                values[key] = value
    return values


class Target(NamedTuple):
    host: str
    port: int
    vm: str
    token: str | None


def resolve_target(host=None, port=None, vm=None, token=None, environ=os.environ) -> Target:
    """Each setting from its option, else ``BUS_HOST``/``BUS_PORT``/``BUS_VM_NAME``/
    ``BUS_TOKEN`` in the environment, else in the handshake conf file, else the
    defaults (``10.0.2.2``, ``7070``, the short hostname, no token)."""
    conf = read_handshake_conf(environ.get("CASTRA_HANDSHAKE_CONF", HANDSHAKE_CONF))

    def pick(option, key):
        return option or environ.get(key) or conf.get(key)

    port_text = pick(port, "BUS_PORT") or DEFAULT_PORT
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port_text!r}")
    host = pick(host, "BUS_HOST") or DEFAULT_HOST
    vm = pick(vm, "BUS_VM_NAME") or socket.gethostname().split(".")[0]
    return Target(host, port, vm_name(vm), pick(token, "BUS_TOKEN"))


def forward_frame(session: GuestSession, frame, timeout: float) -> dict:
    """Send one frame from stdin through the session's own calls, so that it is acked
    and a subscription is kept across reconnects; returns the ack."""
    if not isinstance(frame, dict):
        raise TypeError("a frame is a JSON object")
    kind = frame.get("type")
    if kind == "publish":
        return session.publish(frame.get("topic", "broadcast"), frame.get("payload"), timeout)
    if kind == "subscribe":
        return session.subscribe(frame.get("topic"), timeout, since=frame.get("since"))
    if kind == "unsubscribe":
        return session.unsubscribe(frame.get("topic"), timeout)
    if kind == "heartbeat":
        return session.heartbeat(timeout)
    raise ValueError(f"unsupported frame type {kind!r}")


def forward_stdin(session: GuestSession, timeout: float) -> None:
    """Forward each JSON line of stdin until its end, then close the session (which
    ends the agent); a refused line is reported on stderr. Each line waits for its
    ack (at most ``timeout``), so at the end of stdin nothing sent is left unanswered."""
    # A stream of its own on a copy of fd 0: at exit the interpreter flushes
    # sys.stdin, whose lock this daemon thread would be holding.
    with open(os.dup(sys.stdin.fileno()), "rb") as stdin:
        while True:
            line = stdin.readline(MAX_FRAME + 1)  # a longer line could not be one frame
            if not line:
                break
            if not line.strip():
                continue
            try:
                forward_frame(session, json.loads(line), timeout)
            except (ValueError, TypeError, GuestError) as exc:
                reason = exc.reason if isinstance(exc, GuestError) else exc
                log.warning("stdin frame not forwarded (%s): %.200s", reason, line.decode("utf-8", "replace").strip())
    log.info("end of stdin: stopping")
    session.close()


def run_publish(args, target: Target) -> int:
    text = sys.stdin.read() if args.payload == "-" else args.payload
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--payload is not JSON: {exc}") from None
    with GuestSession(target.host, target.port, target.vm, token=target.token, connect_timeout=args.timeout) as session:
        ack = session.publish(args.topic, payload, args.timeout)
    print(json.dumps(ack, separators=(",", ":")))
    return EXIT_OK


def agent_state_file(args, target: Target) -> str | None:
    """``--state-file``, else none with ``--no-state-file``, else ``default_state_file``."""
    if args.no_state_file:
        return None
    return args.state_file or default_state_file(target.vm)


def run_agent(args, target: Target) -> int:
    state_file = agent_state_file(args, target)
    if state_file:
        log.info("resume positions in %s", state_file)
    session = GuestSession(
        target.host, target.port, target.vm,
        subscribe=args.subscribe,
        token=target.token,
        heartbeat_interval=args.heartbeat,
        backoff_initial=args.backoff,
        backoff_max=args.backoff_max,
        connect_timeout=args.timeout,
        wait=False,
        state_file=state_file,
    )
    try:
        if args.stdin_json:
            threading.Thread(target=forward_stdin, args=(session, args.timeout), name="castra-guest-stdin",
                             daemon=True).start()
        for message in session:  # until a stop signal, or the end of stdin closes the session
            print(json.dumps(message, separators=(",", ":"), ensure_ascii=False), flush=True)
    finally:
        session.close(SHUTDOWN_WAIT)  # further stop signals are ignored meanwhile (handle_stop_signal)
    return EXIT_OK


def run_ping(args, target: Target) -> int:
    ping(target.host, target.port, target.vm, args.timeout, target.token)
    print("ok")
    return EXIT_OK


# -- signals and exit statuses ------------------------------------------------------------

# One table for castra-guest and guest/castra-bus-agent.sh (README "Guests").
EXIT_OK = 0           # an ok ack (publish), "ok" (ping); the agent: stopped by a signal or by the end of stdin
EXIT_REFUSED = 1      # the host refused (handshake error line, error ack) or did not answer in time
EXIT_USAGE = 2        # bad options or input: unknown option, vm name, port, --payload not JSON, too large
EXIT_UNREACHABLE = 3  # no TCP connection to the host's port
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_WAIT = 2.0   # seconds the agent waits for its threads once told to stop


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the command. A BaseException, as KeyboardInterrupt
    is: no ``except Exception`` may take it for an error."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_stop_signalled = []  # the first stop signal's number, once it came


def handle_stop_signal(signum, frame) -> None:
    """Interrupt the main thread once. Later stop signals are ignored: ``timeout``
    sends its SIGTERM to the command and again to its process group, and a second
    Ctrl-C must not break into the shutdown the first one began (it is bounded).

    A second signal that arrived before SIG_IGN was set still runs this handler,
    wherever the main thread then is (a finaliser, the shutdown): hence the note
    of the first, so that it raises nothing there."""
    if _stop_signalled:
        return
    _stop_signalled.append(signum)
    for each in STOP_SIGNALS:
        signal.signal(each, signal.SIG_IGN)
    raise Interrupted(signum)


def end_by_signal(command: str, signum: int) -> int:
    """End the process by ``signum`` itself, with the default action: the shell then
    shows 128 + signum (130 for Ctrl-C, 143 for SIGTERM), as for any command a signal
    stops, and a script running this command stops at Ctrl-C too."""
    print(f"castra-guest: {command} interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # only if the signal is blocked


EXIT_STATUS = """\
exit status (the same for guest/castra-bus-agent.sh):
  0    ok: an ok ack (publish), "ok" (ping); agent: stopped by SIGTERM or
       SIGINT, or --stdin-json and stdin ended (after the acks of what it sent)
  1    the host refused (handshake error, error ack) or gave no ack within
       --timeout: not delivered, or (connection lost) not known
  2    usage or bad input: options, vm name, port, --payload not JSON, too large
  3    cannot connect: no TCP connection to the host's port
  130  publish or ping interrupted by Ctrl-C (SIGINT); 143 by SIGTERM
"""

SETTINGS = """\
The host, port, VM name and token come from --host/--port/--vm/--token, else
$BUS_HOST, $BUS_PORT, $BUS_VM_NAME and $BUS_TOKEN, else the same names in
/etc/conf.d/castra-handshake (another file: $CASTRA_HANDSHAKE_CONF), else
10.0.2.2, 7070, the short hostname and no token. A VM name has 1..128 printable
characters, no whitespace, and is not "host".
"""

PUBLISH_EXAMPLES = """\
examples:
  castra-guest publish --payload '{"event":"booted"}'
  castra-guest publish --topic vm:beta --payload - < event.json
"""

AGENT_EXAMPLES = """\
examples:
  castra-guest agent --subscribe broadcast --subscribe vm:alpha
  producer | castra-guest agent --stdin-json   # lines like {"type":"publish","topic":"t","payload":{}}
  castra-guest agent --subscribe vm:alpha --state-file /var/lib/castra-guest/alpha.json
"""

RESUME = f"""\
resume: with a host that speaks bus-v2, every message on the subscribed topics is
printed once, in seq order, also when the connection drops: after a reconnect the
agent asks for what it missed. The positions (per topic, the last seq printed)
outlive the agent in the state file: --state-file PATH, by default
{STATE_DIR}/<vm>.json if that directory exists and is writable
(mkdir -p {STATE_DIR} to have it), else none (--no-state-file: none).
Messages the host no longer has are skipped with a warning on stderr.
"""

PING_EXAMPLES = """\
examples:
  castra-guest ping && echo reachable
  castra-guest ping --host 10.0.2.2 --port 7070 --timeout 2
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", help="the host's address (default: $BUS_HOST or 10.0.2.2)")
    common.add_argument("--port", help="the host's port (default: $BUS_PORT or 7070)")
    common.add_argument("--vm", help="this guest's name (default: $BUS_VM_NAME or the short hostname)")
    common.add_argument("--token", help="secret for a host with an identities file (default: $BUS_TOKEN)")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help="seconds to wait for a connection or an ack (default: %(default)g)")

    def epilog(examples: str) -> str:
        return f"{examples}\n{SETTINGS}\n{EXIT_STATUS}"

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="castra-guest", description="Talk to the Castra bus from a guest VM.",
        epilog=epilog(PUBLISH_EXAMPLES + AGENT_EXAMPLES[len("examples:\n"):] + PING_EXAMPLES[len("examples:\n"):]),
        formatter_class=raw,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    publish = commands.add_parser("publish", parents=[common], help="publish one message; exit 0 on an ok ack",
                                  description="Publish one message and print the host's ack (a JSON line).",
                                  epilog=epilog(PUBLISH_EXAMPLES), formatter_class=raw)
    publish.add_argument("--topic", default="broadcast", help="broadcast (default), vm:<name> or any topic")
    publish.add_argument("--payload", required=True, metavar="JSON", help="the message, as JSON ('-': read stdin)")
    publish.set_defaults(run=run_publish)

    agent = commands.add_parser(
        "agent", parents=[common], help="stay connected; print delivered messages as JSON lines",
        description="Stay connected (heartbeats, reconnects forever), print every delivered message as one "
                    "JSON line on stdout, and with --stdin-json forward each stdin line (a publish, subscribe, "
                    "unsubscribe or heartbeat frame) until stdin ends, then exit once their acks are in. "
                    "Exits 0 on SIGTERM or Ctrl-C.",
        epilog=epilog(AGENT_EXAMPLES + "\n" + RESUME), formatter_class=raw,
    )
    agent.add_argument("--subscribe", action="append", default=[], metavar="TOPIC",
                       help="receive messages on TOPIC (repeatable); 'metrics.*': every topic "
                            "starting with 'metrics.', '*': everything this VM may read")
    agent.add_argument("--stdin-json", action="store_true",
                       help="forward newline-delimited JSON frames from stdin; exit at its end")
    agent.add_argument("--heartbeat", type=float, default=HEARTBEAT_INTERVAL, metavar="S",
                       help="seconds between heartbeats (default: %(default)g)")
    agent.add_argument("--backoff", type=float, default=BACKOFF_INITIAL, metavar="S",
                       help="first reconnect delay, doubled on each failure (default: %(default)g)")
    agent.add_argument("--backoff-max", type=float, default=BACKOFF_MAX, metavar="S",
                       help="longest reconnect delay (default: %(default)g)")
    state = agent.add_mutually_exclusive_group()
    state.add_argument("--state-file", metavar="PATH",
                       help=f"keep resume positions in PATH across restarts (default: {STATE_DIR}/<vm>.json "
                            "if that directory is writable, else none)")
    state.add_argument("--no-state-file", action="store_true", help="keep resume positions in memory only")
    agent.set_defaults(run=run_agent)

    ping_command = commands.add_parser("ping", parents=[common], help="handshake only: exit 0 if the host answers ok",
                                       description="Say hello without a bus capability, as reachability-only "
                                                   "guests do; print ok and exit 0 if the host answers ok.",
                                       epilog=epilog(PING_EXAMPLES), formatter_class=raw)
    ping_command.set_defaults(run=run_ping)
    return parser


def run_command(args) -> int:
    """The one place where errors become a message and an exit status."""
    target = None
    try:
        target = resolve_target(args.host, args.port, args.vm, args.token)
        return args.run(args, target)
    except ValueError as exc:
        print(f"castra-guest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CannotConnect as exc:
        print(f"castra-guest: {exc.reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except HandshakeRefused as exc:
        print(f"castra-guest: {target.host}:{target.port} refused vm:{target.vm}: {exc.reason}", file=sys.stderr)
        return EXIT_REFUSED
    except AckError as exc:
        print(f"castra-guest: {exc.ack.get('ack', args.command)} refused by {target.host}:{target.port}: "
              f"{exc.reason}", file=sys.stderr)
        return EXIT_REFUSED
    except ConnectionLost as exc:
        print(f"castra-guest: connection to {target.host}:{target.port} lost before the ack ({exc.reason}): "
              "the message may or may not be in the bus log", file=sys.stderr)
        return EXIT_REFUSED
    except GuestError as exc:
        print(f"castra-guest: {exc.reason}", file=sys.stderr)
        return EXIT_REFUSED


def main(argv=None) -> int:
    """The ``castra-guest`` command (it owns the process: a stop signal may end it)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # a background job of a script keeps ignoring SIGINT
            signal.signal(signum, handle_stop_signal)
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        logging.basicConfig(format="castra-guest: %(message)s",
                            level=logging.INFO if command == "agent" else logging.WARNING)
        return run_command(args)
    except Interrupted as stop:
        if command == "agent":
            return EXIT_OK  # how an agent is told to stop
        return end_by_signal(command or "castra-guest", stop.signum)


if __name__ == "__main__":
    sys.exit(main())
