"""The router's own log on stderr, as ``castra up`` writes it: level, JSON, colour.

Real routers (``conftest.Router``: stderr to a file, so not a terminal), and one on
a pseudo-terminal for colour. The tests of a router at INFO share one (the module's
``router``), each with its own VM.
"""

from __future__ import annotations

import datetime
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import unicodedata

import pytest

from castra_zmq import client

from .conftest import READY, shared_router, wait_for
from .guest import connect_bus

ESC = "\x1b"
ROLES = {"supervisor", "proxy", "journal", "status", "bridge"}


@pytest.fixture(scope="module")
def router():
    """A router at INFO (whatever ``CASTRA_LOG_LEVEL`` says) for the tests that need
    no options of their own."""
    yield from shared_router("--log-level", "INFO")


def logged(router, message: str, vm: str) -> list[str]:
    """The lines of ``router``'s log (text or JSON) with ``message`` about ``vm``."""
    return [line for line in router.log_text().splitlines()
            if message in line and (f" vm={vm} " in line + " " or f'"vm":"{vm}"' in line)]


def subscribe_and_publish(router, vm: str = "alpha") -> None:
    """One guest subscribes and publishes; the host publishes: each one logged."""
    with connect_bus(router.port, vm) as guest:
        assert guest.subscribe("builds")["status"] == "ok"
        assert guest.publish({"n": 1}, topic="builds")["status"] == "ok"
    client.publish("builds", b'{"n":2}', state_root=router.state_root)
    wait_for(lambda: logged(router, "session closed", vm), what="the session's close")


def test_log_json_writes_one_object_a_line_with_the_bound_fields(router_factory):
    router = router_factory("--log-json")
    subscribe_and_publish(router)
    assert router.stop() == 0
    lines = [json.loads(line) for line in router.log_text().splitlines()]

    assert {line["role"] for line in lines} == ROLES
    for line in lines:
        assert {"time", "level", "role", "message"} <= line.keys()
        assert datetime.datetime.fromisoformat(line["time"]).utcoffset() is not None
        assert line["level"] in {"INFO", "WARNING"}
    (subscribed,) = [line for line in lines if line["message"] == "subscribed"]
    assert subscribed["vm"] == "alpha" and subscribed["topic"] == "builds" and subscribed["session"]
    assert subscribed["role"] == "bridge" and subscribed["level"] == "INFO"


def test_log_json_keeps_guest_text_inert(router_factory):
    """A refused topic with controls and a one-character CSI (U+009B) is escaped, and
    the line still parses to the text the guest sent."""
    topic = "vm:beta\x1b[2J\r\n\x9b31m"
    router = router_factory("--log-json")
    with connect_bus(router.port, "alpha") as guest:
        assert guest.subscribe(topic)["status"] == "error"
    wait_for(lambda: "subscribe refused" in router.log_text(), what="the refusal")
    text = router.log_text()
    assert not [ch for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf")]
    (refused,) = [line for line in map(json.loads, text.splitlines()) if line["message"] == "subscribe refused"]
    assert refused["topic"] == topic and refused["reason"] == "forbidden topic"


@pytest.mark.parametrize("level, debug", [("DEBUG", True), ("INFO", False)])
def test_a_publish_is_logged_at_debug_only(request, router_factory, level, debug):
    # At INFO the module's router (no publish of any test is logged there); at DEBUG one of its own.
    router = router_factory("--log-level", level) if debug else request.getfixturevalue("router")
    vm = "alpha" if debug else "at-info"
    subscribe_and_publish(router, vm)
    text = router.log_text()
    assert logged(router, "subscribed", vm)  # INFO
    published = [line for line in text.splitlines() if " published " in line]
    if debug:
        assert any("sender=vm:alpha topic=builds seq=1" in line for line in published), text
        assert any("sender=host topic=builds seq=2" in line for line in published), text
        assert all(" DEBUG " in line for line in published)
    else:
        assert not published and " DEBUG " not in text


def test_log_level_comes_from_castra_log_level_unless_given(router_factory, monkeypatch):
    monkeypatch.setenv("CASTRA_LOG_LEVEL", "warning")
    quiet = router_factory()
    assert "ready" not in quiet.log_text()  # the ready lines are INFO
    loud = router_factory("--log-level", "INFO", root=quiet.state_root.parent / "loud")
    assert "bridge ready" in loud.log_text()


def test_a_log_that_is_not_a_terminal_has_no_colour(router):
    subscribe_and_publish(router)
    assert ESC not in router.log_text()


def run_on_a_terminal(state_root, **env: str) -> str:
    """Start ``castra up`` with stderr on a pseudo-terminal, stop it once ready, and
    return everything written there."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(state_root), "--port", "0"],
        stdout=subprocess.PIPE, stderr=terminal, env=dict(os.environ, **env),
    )
    os.close(terminal)
    output = bytearray()
    try:
        assert READY.search(process.stdout.readline().decode())
        deadline = time.monotonic() + 10
        while b"bridge ready" not in output and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.1)[0]:
                output += os.read(controller, 65536)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        while select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return output.decode(errors="replace")


@pytest.mark.parametrize("env, coloured", [
    ({"TERM": "xterm-256color", "NO_COLOR": ""}, True),
    ({"TERM": "xterm-256color", "NO_COLOR": "1"}, False),
    ({"TERM": "dumb", "NO_COLOR": ""}, False),
])
def test_levels_are_coloured_on_a_terminal_unless_no_color_or_term_dumb(state_root, env, coloured):
    output = run_on_a_terminal(state_root, **env)
    assert "bridge ready" in output and "router stopped" in output
    assert (ESC in output) == coloured
    if coloured:  # the level only: the rest of the line stays plain
        assert all(line.count(ESC) == 2 for line in output.splitlines() if "ready" in line)
