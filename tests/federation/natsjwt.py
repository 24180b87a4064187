"""NATS JWTs made here, for a cluster in operator mode (decentralised auth): an
operator, its accounts, their users' ``.creds`` files, and the servers' config
lines that trust them (a memory resolver with the accounts preloaded).

Encoded as nats-server reads them (nats-io/jwt v2): base64url (no padding) of the
header and of the claims, signed by the issuer's nkey (ed25519); ``jti`` is the
base32 SHA-512/256 of the claims without it. Needs the ``nkeys`` package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import nkeys

_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
              "conn": -1, "leaf": -1}
_JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _key(prefix: int) -> tuple[bytes, nkeys.KeyPair]:
    """A new nkey of the role ``prefix`` (``nkeys.PREFIX_BYTE_*``): its seed and key pair."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _public(key: nkeys.KeyPair) -> str:
    return key.public_key.decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, kind: str, claims: dict, expires_s: float | None = None) -> str:
    now = int(time.time())
    body = {"iat": now, "iss": _public(issuer), "name": name, "sub": subject,
            "nats": {**claims, "type": kind, "version": 2}}
    if expires_s is not None:
        body["exp"] = now + int(expires_s)
    body["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(body).encode()).digest()).rstrip(b"=").decode()
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{_b64(json.dumps(body).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


class Operator:
    """An operator with its system account; ``server_config`` is what makes servers trust it."""

    def __init__(self, name: str = "castra-test"):
        _, self.key = _key(nkeys.PREFIX_BYTE_OPERATOR)
        self.name = name
        self.accounts: list[Account] = []
        self.system = self.account("SYS", jetstream=False)

    def account(self, name: str, jetstream: bool = True) -> Account:
        account = Account(self, name, jetstream)
        self.accounts.append(account)
        return account

    def server_config(self) -> str:
        operator = _jwt(self.key, _public(self.key), self.name, "operator", {"system_account": self.system.public})
        preload = ", ".join(f'{account.public}: "{account.jwt}"' for account in self.accounts)
        return (f'operator: "{operator}"\nsystem_account: "{self.system.public}"\n'
                f"resolver: MEMORY\nresolver_preload: {{ {preload} }}")


class Account:
    def __init__(self, operator: Operator, name: str, jetstream: bool):
        _, self.key = _key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.public = _public(self.key)
        limits = {**_UNLIMITED, **(_JETSTREAM_UNLIMITED if jetstream else {})}
        self.jwt = _jwt(operator.key, self.public, name, "account", {"limits": limits})

    def user_creds(self, path: Path, name: str, permissions: dict | None = None,
                   expires_s: float | None = None) -> Path:
        """A ``.creds`` file (owner-only) of a new user of this account: ``permissions``
        as for ``federation.uplink_permissions`` (None: all); ``expires_s`` from now
        (negative: already expired)."""
        seed, key = _key(nkeys.PREFIX_BYTE_USER)
        claims = {"subs": -1, "data": -1, "payload": -1, "pub": {}, "sub": {}}
        if permissions is not None:
            claims.update(pub={"allow": permissions["publish"]}, sub={"allow": permissions["subscribe"]})
        user = _jwt(self.key, _public(key), name, "user", claims, expires_s)
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{user}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")
        path.chmod(0o600)
        return path
