"""Identity and connection limits: allow-list, per-VM secrets, caps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from castra_zmq.errors import ConfigError, HandshakeError
from castra_zmq.handshake import parse_hello
from castra_zmq.identity import parse_identities
from castra_zmq.supervisor import is_loopback

from ..conftest import identities_file, wait_for
from ..guest import Guest

IDENTITIES = """
# name      secret
alpha
beta token=s3cr3t   # bus guest with a secret
vm:legacy
delta token=Zq8#kP3vLx9!mW2	# a '#' inside a secret is part of it
  # epsilon: an indented comment line
#zeta
"""


def test_identities_file_parsing():
    identities = parse_identities(IDENTITIES)
    assert identities.tokens == {"alpha": None, "beta": "s3cr3t", "legacy": None, "delta": "Zq8#kP3vLx9!mW2"}
    identities.check(parse_hello(b"hello vm:delta capabilities=bus-v1 token=Zq8#kP3vLx9!mW2"))
    identities.check(parse_hello(b"hello vm:alpha"))
    identities.check(parse_hello(b"hello vm:beta capabilities=bus-v1 token=s3cr3t"))
    for line, reason in [
        (b"hello vm:gamma capabilities=bus-v1", "unknown vm"),
        (b"hello vm:beta capabilities=bus-v1", "invalid token"),
        (b"hello vm:beta capabilities=bus-v1 token=s3cr3T", "invalid token"),
        (b"hello vm:Alpha", "unknown vm"),  # names are exact, not case-folded
        (b"hello vm:delta capabilities=bus-v1 token=Zq8", "invalid token"),  # the secret is not cut at '#'
        (b"hello vm:zeta", "unknown vm"),
    ]:
        with pytest.raises(HandshakeError) as refused:
            identities.check(parse_hello(line))
        assert refused.value.reason == reason


@pytest.mark.parametrize("text, message", [
    ("host\n", "reserved vm name"),
    ("a/b ok\n", "expected token=<secret>"),
    ("beta token=\n", "expected token=<secret>"),
])
def test_bad_identities_file_is_refused_with_its_line(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_identities(text, "ids")


@pytest.fixture
def identities(tmp_path):
    return identities_file(tmp_path, IDENTITIES)


def test_router_with_identities_refuses_unknown_and_wrong_token(router_factory, identities):
    router = router_factory("--identities", str(identities))
    refusals = {
        "hello vm:gamma capabilities=bus-v1": "error: unknown vm",
        "hello vm:beta capabilities=bus-v1": "error: invalid token",
        "hello vm:beta capabilities=bus-v1 token=nope": "error: invalid token",
        "hello vm:delta capabilities=bus-v1 token=Zq8": "error: invalid token",
    }
    for hello, expected in refusals.items():
        with Guest(router.port) as guest:
            guest.send_raw(hello.encode() + b"\n")
            assert guest.read_line() == expected
            assert guest.is_closed()
    with Guest(router.port) as guest:
        assert guest.hello("beta", capabilities="bus-v1 token=s3cr3t").startswith("ok session=")
        assert guest.publish(1)["status"] == "ok"
    with Guest(router.port) as guest:
        assert guest.hello("delta", capabilities="bus-v1 token=Zq8#kP3vLx9!mW2").startswith("ok session=")
    with Guest(router.port) as guest:  # handshake-only guests keep working
        assert guest.hello("legacy", capabilities=None) == "ok"
    wait_for(lambda: "reason=unknown vm" in router.log_text(), what="refusal log line")


def test_token_is_ignored_without_identities_file(router):
    with Guest(router.port) as guest:
        assert guest.hello("free", capabilities="bus-v1 token=whatever").startswith("ok session=")


def test_up_refuses_a_bad_identities_file(state_root, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("host\n")
    result = subprocess.run(
        [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(state_root), "--port", "0",
         "--identities", str(bad)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1 and "reserved vm name" in result.stderr


def test_connection_caps_refuse_and_log(router_factory):
    router = router_factory("--max-per-address", "2")
    first, second = Guest(router.port), Guest(router.port)
    try:
        third = Guest(router.port, greeting=False)  # the refusal replaces the greeting
        assert third.read_line() == "error: too many connections from this address"
        assert third.is_closed()
        third.close()
    finally:
        first.close()
        second.close()
    wait_for(lambda: "reason=too many connections from this address" in router.log_text(), what="log line")
    # Closed connections give their slots back.
    def admitted():
        with Guest(router.port) as guest:
            return guest.hello("again", capabilities=None) == "ok"
    wait_for(admitted, what="a slot freed")


def test_only_loopback_addresses_count_as_loopback():
    # Tests never bind beyond loopback, so the warning's decision is tested alone.
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.0.2.2", "example.org"))
