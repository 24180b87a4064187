"""Frames over the protocol limit (issue 10): a publish whose delivery would be a
guest frame of more than 65,536 bytes is refused (``message too large``), from a
guest or a host tool, and never committed; one of exactly 65,536 bytes goes through.

The sizes are computed here from PROTOCOL.md, not with ``castra_zmq``'s codec.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from castra_zmq import client
from castra_zmq.errors import PublishFailed

from ..guest import connect_bus

MAX_FRAME = 65536
LONG_NAME = "n" * 128  # the longest name: the widest "from" of a delivery
TS_MS_DIGITS = 13  # unix ms until the year 2286


def delivery_bytes(topic: str, sender: str, payload: str, seq: int) -> int:
    """The body of the guest frame that delivers ``payload`` (a JSON string here)."""
    head = (f'{{"type":"message","topic":{json.dumps(topic)},"from":{json.dumps(sender)},'
            f'"ts_ms":{"1" * TS_MS_DIGITS},"seq":{seq},"payload":')
    return len(head.encode()) + len(json.dumps(payload).encode()) + len("}")


def padding_for(size: int, topic: str, sender: str, seq: int) -> str:
    """A string payload whose delivery is exactly ``size`` bytes."""
    return "x" * (size - delivery_bytes(topic, sender, "", seq))


def test_guest_publish_whose_delivery_would_exceed_the_frame_limit_is_refused(router):
    with connect_bus(router.port, LONG_NAME) as guest, connect_bus(router.port, "reader") as reader:
        assert reader.subscribe("big")["status"] == "ok"
        seq = guest.publish("first", topic="big")["seq"]
        assert reader.recv()["payload"] == "first"
        sender = f"vm:{LONG_NAME}"

        over = padding_for(MAX_FRAME + 1, "big", sender, seq + 1)
        ack = guest.publish(over, topic="big", id="over")
        assert ack == {"type": "ack", "ack": "publish", "status": "error", "topic": "big", "id": "over",
                       "reason": "message too large"}

        exact = padding_for(MAX_FRAME, "big", sender, seq + 1)
        ack = guest.publish(exact, topic="big", id="exact")
        assert ack["status"] == "ok" and ack["seq"] == seq + 1  # the refused one took no seq
        assert len(reader.recv_raw()) == MAX_FRAME
    assert [line["payload"] for line in router.read_log()] == ["first", exact]


def test_host_publish_over_the_frame_limit_is_refused_by_the_journal_and_the_cli(router):
    first = client.publish("big", "first", state_root=router.state_root)
    # Just over: only the journal, which knows the seq, can tell.
    over = padding_for(MAX_FRAME + 1, "big", "host", first + 1)
    with pytest.raises(PublishFailed, match="^message too large$"):
        client.publish("big", over, state_root=router.state_root)
    with pytest.raises(PublishFailed, match="^message too large$"):
        client.publish("big", "x" * 200_000, state_root=router.state_root)
    result = subprocess.run(
        [sys.executable, "-m", "castra_zmq.cli.main", "bus", "publish", "--state-root", str(router.state_root),
         "--topic", "big", "--payload", "-"],
        input=json.dumps("x" * 200_000), capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "Error: message too large\n"
    exact = padding_for(MAX_FRAME, "big", "host", first + 1)
    assert client.publish("big", exact, state_root=router.state_root) == first + 1
    assert [line["payload"] for line in router.read_log()] == ["first", exact]
