"""What a guest may read and publish: the default policy and the identities file's
grants, first as pure code, then against a real router."""

from __future__ import annotations

import pytest

from castra_zmq import client
from castra_zmq.errors import ConfigError
from castra_zmq.identity import DEFAULT_POLICY, parse_identities
from castra_zmq.session import FRAME_LOG_BURST

from ..conftest import identities_file, wait_for
from ..guest import Guest, connect_bus

FORBIDDEN_BETA = b'{"type":"ack","ack":"subscribe","status":"error","topic":"vm:beta","reason":"forbidden topic"}'

IDENTITIES = """
alpha
beta token=s3cr3t
gamma
monitor subscribe=vm:*,metrics
reporter subscribe=vm:beta publish=alerts*,vm:beta
"""

# -- pure ------------------------------------------------------------------------------


def test_default_policy_keeps_other_vms_topics_from_a_guest():
    policy = DEFAULT_POLICY
    assert policy.may_subscribe("gamma", "vm:gamma") and policy.may_subscribe("gamma", "broadcast")
    assert policy.may_subscribe("gamma", "*") and policy.may_subscribe("gamma", "metrics")
    for topic in ("vm:beta", "vm:gamma2", "vm:"):
        assert not policy.may_subscribe("gamma", topic), topic
    # A pattern is taken, and delivers only what gamma may read (tests/test_wildcards.py).
    assert policy.may_subscribe("gamma", "vm:*") and not policy.may_read("gamma", "vm:*")
    assert not policy.may_read("gamma", "vm:beta") and policy.may_read("gamma", "VM:beta")  # exact prefix
    assert policy.may_publish("gamma", "vm:beta") and policy.may_publish("gamma", "anything")


def test_identities_file_grants_reads_and_restricts_publishes():
    policy = parse_identities(IDENTITIES).policy
    assert policy.may_subscribe("monitor", "vm:beta") and policy.may_read("monitor", "vm:alpha")
    assert not policy.may_subscribe("gamma", "vm:beta")  # grants are per VM
    assert policy.may_subscribe("reporter", "vm:beta") and not policy.may_subscribe("reporter", "vm:alpha")
    assert policy.may_publish("reporter", "alerts") and policy.may_publish("reporter", "alerts/disk")
    assert policy.may_publish("reporter", "vm:beta")
    assert not policy.may_publish("reporter", "broadcast") and not policy.may_publish("reporter", "vm:beta2")
    assert policy.may_publish("monitor", "broadcast")  # no publish= list: open, as by default


@pytest.mark.parametrize("line, message", [
    ("a subscribe=", "expected subscribe=<pattern>"),
    ("a publish=x,,y", "invalid topic pattern ''"),
    ("a subscribe=vm:*:x", "invalid topic pattern 'vm:*:x'"),
    ("a subscribe=" + "t" * 257, "invalid topic pattern"),
    ("a subscribe=x subscribe=y", "each at most once"),
    ("a token=x token=y", "each at most once"),
    ("a read=x", "expected token=<secret>, subscribe="),
])
def test_bad_grants_are_refused_with_their_line(line, message):
    with pytest.raises(ConfigError) as refused:
        parse_identities("ok\n" + line, "ids")
    assert refused.value.reason.startswith("ids:2: ") and message in refused.value.reason


# -- real router -------------------------------------------------------------------------


@pytest.fixture
def identities(tmp_path):
    return identities_file(tmp_path, IDENTITIES)


def connect_as(port: int, vm: str, token: str | None = None) -> Guest:
    guest = Guest(port)
    reply = guest.hello(vm, capabilities="bus-v1" + (f" token={token}" if token else ""))
    assert reply.startswith("ok session="), reply
    return guest


def test_a_guest_cannot_read_another_vms_messages(router_factory, identities):
    router = router_factory("--identities", str(identities))
    with connect_as(router.port, "beta", "s3cr3t") as beta, connect_as(router.port, "gamma") as gamma, \
            connect_as(router.port, "monitor") as monitor:
        gamma.send({"type": "subscribe", "topic": "vm:beta"})
        assert gamma.recv_raw() == FORBIDDEN_BETA
        for guest, topic in ((gamma, "*"), (beta, "vm:beta"), (monitor, "vm:beta"), (monitor, "*")):
            assert guest.subscribe(topic)["status"] == "ok", (guest, topic)
        command = client.publish("vm:beta", {"cmd": "secret"}, state_root=router.state_root)
        news = client.publish("broadcast", {"n": 1}, state_root=router.state_root)
        # gamma's "*" skips beta's command; the next thing it gets is the broadcast.
        assert gamma.recv()["seq"] == news
        assert beta.recv()["seq"] == command
        # monitor is granted vm:*: it gets the command (once, though two of its
        # subscriptions match it) and the broadcast.
        assert [monitor.recv()["seq"], monitor.recv()["seq"]] == [command, news]
    wait_for(lambda: "subscribe refused" in router.log_text() and "reason=forbidden topic" in router.log_text(),
             what="the refusal's log line")


def test_publish_restricted_by_the_identities_file_gets_an_error_ack(router_factory, identities):
    router = router_factory("--identities", str(identities))
    with connect_as(router.port, "reporter") as reporter:
        assert reporter.publish({"disk": "full"}, topic="alerts/disk")["status"] == "ok"
        refused = reporter.publish({"n": 1}, topic="broadcast", id=7)
        assert refused == {"type": "ack", "ack": "publish", "status": "error", "topic": "broadcast", "id": 7,
                           "reason": "forbidden topic"}
    assert [record["topic"] for record in router.read_log()] == ["alerts/disk"]


def test_default_policy_applies_without_an_identities_file(router):
    with connect_bus(router.port, "gamma") as gamma, connect_bus(router.port, "beta") as beta:
        gamma.send({"type": "subscribe", "topic": "vm:beta"})
        assert gamma.recv_raw() == FORBIDDEN_BETA
        assert gamma.subscribe("*")["status"] == "ok"
        assert beta.publish({"n": 1}, topic="vm:beta")["status"] == "ok"
        ack = beta.publish({"n": 2}, topic="vm:gamma")
        assert gamma.recv()["seq"] == ack["seq"]  # its own topic, and not beta's before it


def test_each_session_of_a_vm_presents_its_token(router_factory, identities):
    router = router_factory("--identities", str(identities))
    with connect_as(router.port, "beta", "s3cr3t") as agent, connect_as(router.port, "beta", "s3cr3t") as second:
        for token in (None, "guess"):
            with Guest(router.port) as intruder:
                hello = "bus-v1" + (f" token={token}" if token else "")
                assert intruder.hello("beta", capabilities=hello) == "error: invalid token"
        assert agent.subscribe("vm:beta")["status"] == "ok"
        assert second.publish({"n": 1}, topic="metrics")["status"] == "ok"
        command = client.publish("vm:beta", {"cmd": "reload"}, state_root=router.state_root)
        assert agent.recv()["seq"] == command  # the refusals closed none of beta's sessions


def test_refused_frames_in_a_loop_cannot_flood_the_router_log(router):
    """Each refusal is answered, but a session logs at most a burst of such lines
    (``FRAME_LOG_BURST``), then about one a second; the rest are counted."""
    refusals = 2_000
    with connect_bus(router.port, "gamma") as gamma:
        for _ in range(refusals):
            gamma.send({"type": "subscribe", "topic": "vm:beta"})
        for _ in range(refusals):
            assert gamma.recv_raw() == FORBIDDEN_BETA
    closed = wait_for(lambda: [line for line in router.log_text().splitlines()
                               if "session closed" in line and "vm=gamma" in line], what="gamma's session closed")
    logged = router.log_text().count("subscribe refused")
    assert FRAME_LOG_BURST <= logged <= FRAME_LOG_BURST + 10, logged  # one a second while the test ran
    unlogged = sum(int(part.split("=")[1]) for line in router.log_text().splitlines()
                   for part in line.split() if part.startswith("unlogged="))
    assert logged + unlogged == refusals, (logged, unlogged, closed)
