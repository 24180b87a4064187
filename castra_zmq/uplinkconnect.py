"""How the uplink proves who it is to NATS, and checks who NATS is: the credential
and TLS arguments of ``nats.connect`` from ``castra up``'s options (issue 14,
Security).

* ``--uplink-creds FILE``: a NATS ``.creds`` file (a user JWT and its nkey seed,
  decentralised auth) or a bare nkey seed file (``SU...``, for a server that lists
  the user's public nkey); both need the ``nkeys`` package (``nats-py[nkeys]``).
* ``--uplink-user NAME`` with the password in ``CASTRA_UPLINK_PASSWORD``. Not an
  option: any local user can read a process's arguments (``ps``,
  ``/proc/<pid>/cmdline``) and shells keep them in their history, while a process's
  environment is readable by its owner only. The supervisor hands the variable to
  the uplink process alone.
* ``--uplink-tls-ca FILE`` (the servers' CA, instead of the system's),
  ``--uplink-tls-cert FILE --uplink-tls-key FILE`` (a client certificate, for
  servers that verify clients), ``--uplink-tls-first`` (the TLS handshake before
  anything else: servers with ``tls { handshake_first: true }``; without it TLS
  starts only when the server's first line asks for it).

``connect_options`` reads and checks every file, so ``castra up`` refuses a
missing, unreadable or malformed one with the option's name, before any process
starts, instead of an uplink failing in its restart loop; the uplink calls it
again for its connection. Which combinations make sense is checked in
``Settings.validate``.

``quiet_tls_eof_warning`` keeps a bare asyncio warning that TLS connections to NATS
cause off stderr, where every line is the process's own. ``cancel_until_done`` stops
the tasks that wait on NATS, which one cancellation does not always do.

Runs in: the supervisor (``castra up``: the check), the uplink role and ``castra bus tail --fleet``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from loguru import logger

from .config import Settings
from .errors import ConfigError

PASSWORD_ENV = "CASTRA_UPLINK_PASSWORD"
_FILE_BYTES_MAX = 1024 * 1024  # a creds file is about 1 KiB, a CA bundle a few hundred
_CREDS_JWT = b"-----BEGIN NATS USER JWT-----"
_CREDS_SEED = b"-----BEGIN USER NKEY SEED-----"
_USER_SEED_PREFIX = b"SU"  # an nkey seed of a user: "S" (seed) then "U" (user)
_TLS_EOF_WARNING = "returning true from eof_received() has no effect when using ssl"
_CANCEL_AGAIN_S = 0.2  # how long a cancelled task has to end before it is cancelled again


def connect_options(settings: Settings, environ: Mapping[str, str] = os.environ) -> dict[str, object]:
    """The keyword arguments of ``nats.connect`` for the uplink's credentials and TLS."""
    options: dict[str, object] = {}
    if settings.uplink_creds is not None:
        options.update(credential_options(Path(settings.uplink_creds)))
    password = environ.get(PASSWORD_ENV)
    if settings.uplink_user is not None:
        if not password:
            raise ConfigError(f"--uplink-user {settings.uplink_user} needs its password in {PASSWORD_ENV}")
        options.update(user=settings.uplink_user, password=password)
    elif password:
        raise ConfigError(f"{PASSWORD_ENV} is set but --uplink-user is not: whose password is it?")
    if settings.uplink_tls_ca is not None or settings.uplink_tls_cert is not None or settings.uplink_tls_first:
        options["tls"] = tls_context(settings)
    if settings.uplink_tls_first:
        # nats-py otherwise starts TLS only once the server's INFO asks for it: a server
        # (or anyone between) that does not ask would get the CONNECT, and a password
        # in it, in plain text.
        options["tls_handshake_first"] = True
    return options


def credential_options(path: Path) -> dict[str, object]:
    content = read_file(path, "--uplink-creds", secret=True)
    if _CREDS_JWT in content:
        if _CREDS_SEED not in content:
            raise ConfigError(f"--uplink-creds {path}: a .creds file without its nkey seed")
        options: dict[str, object] = {"user_credentials": str(path)}
    elif content.strip().startswith(_USER_SEED_PREFIX):
        options = {"nkeys_seed": str(path)}
    else:
        raise ConfigError(f"--uplink-creds {path}: neither a NATS .creds file (a user JWT and its seed) "
                          "nor a user nkey seed (SU...)")
    if importlib.util.find_spec("nkeys") is None:
        raise ConfigError("--uplink-creds needs the nkeys package: pip install 'nats-py[nkeys]'")
    return options


def tls_context(settings: Settings):
    """A client TLS context: certificates verified against ``--uplink-tls-ca`` (or the
    system's CAs), host names checked, with the client certificate if one is given."""
    import ssl  # only with TLS options: not on every `castra up`

    context = ssl.create_default_context()
    if settings.uplink_tls_ca is not None:
        ca = read_file(Path(settings.uplink_tls_ca), "--uplink-tls-ca")
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise ConfigError(f"--uplink-tls-ca {settings.uplink_tls_ca}: no PEM certificate in it "
                              f"({exc.reason})") from None
    if settings.uplink_tls_cert is not None:
        read_file(Path(settings.uplink_tls_cert), "--uplink-tls-cert")
        read_file(Path(settings.uplink_tls_key), "--uplink-tls-key", secret=True)
        try:
            context.load_cert_chain(settings.uplink_tls_cert, settings.uplink_tls_key)
        except ssl.SSLError as exc:
            raise ConfigError(f"--uplink-tls-cert {settings.uplink_tls_cert} --uplink-tls-key "
                              f"{settings.uplink_tls_key}: not a PEM certificate and its key ({exc.reason})") from None
    return context


def read_file(path: Path, option: str, *, secret: bool = False) -> bytes:
    """The content of the regular file ``path`` given to ``option``; a secret one
    readable by other users is logged (as the identities file is)."""
    try:
        # O_NONBLOCK: a FIFO in its place does not hang `castra up` (it is then refused).
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{option} {path}: not a regular file")
            if info.st_size > _FILE_BYTES_MAX:
                raise ConfigError(f"{option} {path}: {info.st_size} bytes, over {_FILE_BYTES_MAX}")
            content = file.read(_FILE_BYTES_MAX)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: {exc.strerror}") from None
    if secret and stat.S_IMODE(info.st_mode) & 0o077:
        logger.warning("file with secrets is readable by other users", path=str(path), option=option)
    return content


def quiet_tls_eof_warning() -> None:
    """Keep asyncio's ``returning true from eof_received() has no effect when using
    ssl`` off stderr. nats-py reads through asyncio's streams, whose protocol answers
    a peer's end of the connection so, and over TLS asyncio writes that line, bare,
    each time a server ends a connection (a refused client: at every retry, twice a
    second), while the uplink logs the event itself, with its reason."""
    logging.getLogger("asyncio").addFilter(_not_tls_eof_warning)


def _not_tls_eof_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() != _TLS_EOF_WARNING


async def cancel_until_done(tasks: Iterable[asyncio.Task], interval: float = _CANCEL_AGAIN_S) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again each
    ``interval`` those still running: before Python 3.12, ``asyncio.wait_for`` (under
    nats-py's ``next_msg``, and the uplink's own timed waits) drops a cancellation that
    comes as what it waits for arrives, and returns that instead, so a task following
    a stream goes on waiting for the next message. Their outcomes are retrieved, not
    raised."""
    tasks = set(tasks)
    pending = {task for task in tasks if not task.done()}
    done = tasks - pending
    while pending:
        for task in pending:
            task.cancel()
        finished, pending = await asyncio.wait(pending, timeout=interval)
        done |= finished
    await asyncio.gather(*done, return_exceptions=True)
