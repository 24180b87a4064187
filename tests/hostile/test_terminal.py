"""Guest-chosen text never drives the operator's terminal: every human output
escapes it, and the JSON outputs carry no raw control character."""

from __future__ import annotations

import json
import unicodedata

from castra_zmq.terminal import json_for_terminal, printable

from ..conftest import wait_for
from ..guest import connect_bus
from ..zygote import run_castra

# Clears the screen, retitles the window (OSC ... BEL), returns the carriage to forge
# the start of a line, a one-character CSI (C1) and a right-to-left override.
HOSTILE = "x\x1b[2J\x1b]0;pwned\x07\rforged\x9b\u202ey"
ESCAPED = "x\\x1b[2J\\x1b]0;pwned\\x07\\rforged\\x9b\\u202ey"


def controls(text: str) -> list[str]:
    """The characters of ``text`` a terminal could act on, but line ends."""
    return [ch for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf")]


def castra(*args: str) -> str:
    result = run_castra(list(args))
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- pure ------------------------------------------------------------------------------


def test_printable_escapes_every_control_and_format_character():
    assert printable(HOSTILE) == ESCAPED
    assert printable("vm:alpha ünïcode ✓") == "vm:alpha ünïcode ✓"
    assert not controls(printable("".join(map(chr, range(0x20))) + "\x7f" + "".join(map(chr, range(0x80, 0xa0)))))


def test_json_for_terminal_escapes_c1_and_keeps_the_json_value():
    text = json.dumps({"topic": HOSTILE, "ok": "é\u00a0"}, ensure_ascii=False).encode()
    safe = json_for_terminal(text)
    assert not controls(safe.decode()) and json.loads(safe) == json.loads(text)
    assert json_for_terminal(b'{"a":"plain"}') == b'{"a":"plain"}'


# -- real router -------------------------------------------------------------------------


def test_guest_topics_are_escaped_in_status_tail_and_the_router_log(router):
    root = str(router.state_root)
    with connect_bus(router.port, "alpha") as guest:
        assert guest.subscribe(HOSTILE)["status"] == "ok"
        assert guest.publish({"t": HOSTILE}, topic=HOSTILE)["status"] == "ok"
        wait_for(lambda: HOSTILE in json.loads(castra("status", "--json", "--state-root", root))["vms"][0]
                 ["subscribed_topics"], what="the topic in the status")
        outputs = {
            "status": castra("status", "--state-root", root),
            "status --json": castra("status", "--json", "--state-root", root),
            "tail": castra("bus", "tail", "--state-root", root),
            "tail --json": castra("bus", "tail", "--json", "--state-root", root),
        }
        refusal = guest.subscribe("vm:beta" + HOSTILE)  # its log line holds the topic
    for name, text in outputs.items():
        assert not controls(text), (name, text)
    assert ESCAPED in outputs["status"] and ESCAPED in outputs["tail"]
    assert json.loads(outputs["tail --json"])["topic"] == HOSTILE
    assert refusal["reason"] == "forbidden topic"
    wait_for(lambda: f"topic=vm:beta{ESCAPED}" in router.log_text(), what="the refusal's log line")
    assert not controls(router.log_text())
