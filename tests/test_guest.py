"""The guest side (castra_zmq.guest, castra-guest, guest/castra-bus-agent.sh) against a
real router on loopback: library, command line, bash agent and Python 3.8.

One router serves the module (``router``), and a second one with a 1 s heartbeat
timeout (``hb_router``) the tests of heartbeats: each test uses its own VM names (a
parametrized test one per command) and looks only at its own lines of the log.
Tests that restart a router or need other ``castra up`` options start their own
(``router_factory``). ``castra-guest`` runs forked from the zygote (``GUEST_CLI``),
but for one agent test, a fresh interpreter (``FRESH_GUEST_CLI``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from castra_zmq import client, guest, handshake, wire
from castra_zmq.errors import HandshakeError
from castra_zmq.guest import (
    AckError,
    GuestError,
    GuestSession,
    GuestTimeout,
    SessionClosed,
    ping,
    resolve_target,
)

from .conftest import Lines, shared_router, wait_for
from .guest import connect_bus
from .zygote import GUEST_MODULE, guest_command, run_castra

REPO = Path(__file__).resolve().parent.parent
BASH_AGENT = REPO / "guest" / "castra-bus-agent.sh"
# ``castra-guest`` forked from the test process's zygote (tests/zygote.py), as ``run``
# and ``spawn`` start it: the same code, without 0.15 s of CPU for a fresh interpreter
# each time (this module starts about sixty). ``FRESH_GUEST_CLI``: as a fresh
# interpreter, which the agent test of a router restart still starts.
GUEST_CLI = [GUEST_MODULE]
FRESH_GUEST_CLI = [sys.executable, "-m", GUEST_MODULE]
NO_CONF = "/nonexistent/castra-handshake"  # so this machine's own conf file never leaks in


@pytest.fixture(scope="module")
def router():
    yield from shared_router()


@pytest.fixture(scope="module")
def hb_router():
    yield from shared_router("--heartbeat-timeout", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**extra: str) -> dict:
    """This environment without any BUS_* of the machine's own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    return {**env, "CASTRA_HANDSHAKE_CONF": NO_CONF, **extra}


def guest_env(port: int, vm: str, **extra: str) -> dict:
    return environment(BUS_HOST="127.0.0.1", BUS_PORT=str(port), BUS_VM_NAME=vm, **extra)


def logged(router, vm: str, payload) -> bool:
    return any(record["vm"] == vm and record["payload"] == payload for record in router.read_log())


def last_seq(router) -> int:
    """The seq of the last line of ``bus.log`` (0 if none): a test's own lines come after it."""
    lines = router.read_log()
    return lines[-1]["seq"] if lines else 0


def tag(command: list[str]) -> str:
    """``py`` or ``sh``: in the VM names of a test run once per agent, so that each run has its own."""
    return "sh" if command[0] == "bash" else "py"


def quiet_session_dropped(router) -> None:
    """Wait until the router drops a session that never heartbeats: proof that its
    idle timeout went by, without sleeping for a guessed time."""
    with connect_bus(router.port, "quiet") as quiet:
        assert quiet.is_closed(timeout=5)


class Child:
    def __init__(self, args: list[str], env: dict):
        # A session of its own: a test can signal its process group, as a terminal's Ctrl-C does.
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        if args[:1] == GUEST_CLI:
            self.process = guest_command(args[1:], env=env, cwd=REPO, new_session=True, **pipes)
        else:
            self.process = subprocess.Popen(args, env=env, cwd=REPO, start_new_session=True, **pipes)
        self.stdout = Lines(self.process.stdout)
        self.stderr = Lines(self.process.stderr)

    def send_line(self, obj) -> None:
        self.process.stdin.write(json.dumps(obj).encode() + b"\n")
        self.process.stdin.flush()

    def wait_message(self, payload, timeout: float = 10.0) -> None:
        what = f"delivery of {payload} (stderr: {self.stderr.lines})"
        wait_for(lambda: any(m["payload"] == payload for m in self.stdout.json()), timeout, what=what)

    def terminate(self, timeout: float = 10.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture
def spawn():
    """Start children (agents); any still running at the end is killed."""
    children: list[Child] = []

    def start(args: list[str], env: dict) -> Child:
        child = Child(args, env)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait(5)


def run(args: list[str], env: dict, stdin: bytes = b"") -> subprocess.CompletedProcess:
    if args[:1] == GUEST_CLI:
        return run_castra(args[1:], input=stdin, env=env, text=False, module=GUEST_MODULE, cwd=REPO)
    return subprocess.run(args, env=env, cwd=REPO, input=stdin, capture_output=True, timeout=30, check=False)


# -- library ------------------------------------------------------------------------------


def test_publish_returns_the_ok_ack_once_in_the_log(router):
    before = last_seq(router)
    with GuestSession("127.0.0.1", router.port, "acked") as bus:
        ack = bus.publish("vm:beta", {"n": 1})
        assert ping("127.0.0.1", router.port, "pinger") is True
    assert ack["type"] == "ack" and ack["ack"] == "publish" and ack["status"] == "ok" and ack["topic"] == "vm:beta"
    [record] = [record for record in router.read_log() if record["seq"] > before]
    assert (record["seq"], record["vm"], record["payload"]) == (ack["seq"], "acked", {"n": 1})


def test_subscriber_receives_another_guests_publish(router):
    with GuestSession("127.0.0.1", router.port, "receiver") as alpha, \
            GuestSession("127.0.0.1", router.port, "sender") as beta:
        assert alpha.subscribe("vm:receiver")["status"] == "ok"
        beta.publish("vm:receiver2", {"n": "not for receiver"})  # committed first: it would arrive first
        beta.publish("vm:receiver", {"n": "for receiver"})
        message = alpha.receive(timeout=5)
        assert (message["topic"], message["from"], message["payload"]) == \
            ("vm:receiver", "vm:sender", {"n": "for receiver"})
        with pytest.raises(GuestTimeout):
            alpha.receive(timeout=0.05)
    assert list(alpha.messages()) == []  # closed: iteration ends
    with pytest.raises(SessionClosed):
        alpha.publish("broadcast", {})


def test_error_ack_raises_ack_error_and_the_topic_is_dropped(router):
    with GuestSession("127.0.0.1", router.port, "greedy") as bus:
        for n in range(16):
            bus.subscribe(f"topic-{n}")
        with pytest.raises(AckError) as refused:
            # With a since, the topic has a position: ``positions`` would list it if it were still held.
            bus.subscribe("one-too-many", since=0)
        assert isinstance(refused.value, GuestError)
        assert "too many subscriptions" in refused.value.reason
        assert refused.value.ack["ack"] == "subscribe" and refused.value.ack["status"] == "error"
        assert "one-too-many" not in bus.positions
        with pytest.raises(ValueError):
            bus.publish("x" * 257, {})  # refused before it is sent: the session goes on
        assert bus.heartbeat()["status"] == "ok"


def test_heartbeats_keep_a_quiet_session_open(hb_router):
    router = hb_router  # --heartbeat-timeout 1
    with GuestSession("127.0.0.1", router.port, "steady", heartbeat_interval=0.2) as bus:
        token = bus.session_token
        quiet_session_dropped(router)
        assert bus.connected and bus.session_token == token  # never reconnected
        assert bus.publish("broadcast", {"still": "here"})["status"] == "ok"


def test_concurrent_publishes_and_heartbeats_never_interleave(router):
    pad = "x" * 60000  # near the 64 KiB frame limit

    with GuestSession("127.0.0.1", router.port, "busy", heartbeat_interval=0.05) as bus:
        token = bus.session_token
        # A small send buffer makes each write wait for room in the middle of its frame,
        # the very moment another thread's write would tear it without the send lock.
        bus._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        def work(worker: int) -> list[tuple[dict, dict]]:
            sent = []
            for i in range(50):
                payload = {"worker": worker, "i": i, "pad": pad}
                sent.append((payload, bus.publish("load", payload)))
                if i % 5 == 0:
                    assert bus.heartbeat()["status"] == "ok"
            return sent

        with ThreadPoolExecutor(4) as pool:
            results = [pair for sent in pool.map(work, range(4)) for pair in sent]
        assert bus.session_token == token  # one connection: no frame ever broke the stream
    records = {record["seq"]: record for record in router.read_log() if record["vm"] == "busy"}
    assert len(records) == len(results) == 200
    for payload, ack in results:  # every ack went to the thread whose publish it answers
        assert ack["status"] == "ok" and records[ack["seq"]]["payload"] == payload


# -- castra-guest -----------------------------------------------------------------------------


def test_agent_reconnects_and_resubscribes_after_a_router_restart(router_factory, state_root, spawn):
    port = free_port()  # the restarted router must listen where the agent reconnects
    first = router_factory("--port", str(port))
    agent = spawn([*FRESH_GUEST_CLI, "agent", "--subscribe", "vm:alpha", "--stdin-json", "--backoff", "0.1",
                   "--backoff-max", "0.2"], guest_env(port, "alpha"))
    agent.stderr.wait("subscribed to vm:alpha")
    client.publish("vm:alpha", {"before": "restart"}, state_root=state_root)
    agent.wait_message({"before": "restart"})

    first.stop()
    agent.stderr.wait("lost")
    second = router_factory("--port", str(port), root=state_root)
    agent.stderr.wait("subscribed to vm:alpha", times=2)
    client.publish("vm:alpha", {"after": "restart"}, state_root=state_root)
    agent.wait_message({"after": "restart"})

    agent.send_line({"type": "publish", "topic": "broadcast", "payload": {"from": "stdin"}})
    wait_for(lambda: logged(second, "alpha", {"from": "stdin"}), what="stdin frame in bus.log")
    assert agent.terminate() == 0


def test_cli_publish_and_ping_exit_codes(router):
    env = guest_env(router.port, "cli")
    ok = run([*GUEST_CLI, "publish", "--topic", "vm:beta", "--payload", '{"a": 1}'], env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok" and logged(router, "cli", {"a": 1})
    from_stdin = run([*GUEST_CLI, "publish", "--payload", "-"], env, stdin=b'{"b": 2}\n')
    assert from_stdin.returncode == 0 and logged(router, "cli", {"b": 2})

    assert run([*GUEST_CLI, "publish", "--payload", "{not json"], env).returncode == 2
    refused = run([*GUEST_CLI, "publish", "--vm", "host", "--payload", "{}"], env)
    assert refused.returncode == 2 and b"reserved vm name" in refused.stderr

    pong = run([*GUEST_CLI, "ping"], env)
    assert (pong.returncode, pong.stdout) == (0, b"ok\n")


def test_target_comes_from_options_env_conf_file_then_defaults(router, tmp_path):
    conf = tmp_path / "castra-handshake"
    conf.write_text(f'# written by the image\nexport BUS_HOST="127.0.0.1"\nBUS_PORT={router.port}  # bus\n'
                    "BUS_VM_NAME='conf-vm'\n")
    env = {"CASTRA_HANDSHAKE_CONF": str(conf)}
    assert resolve_target(environ=env) == ("127.0.0.1", router.port, "conf-vm", None)
    assert resolve_target(environ={**env, "BUS_VM_NAME": "env-vm"}).vm == "env-vm"
    assert resolve_target(vm="option-vm", environ={**env, "BUS_VM_NAME": "env-vm"}).vm == "option-vm"
    defaults = resolve_target(environ={"CASTRA_HANDSHAKE_CONF": NO_CONF})
    assert defaults == ("10.0.2.2", 7070, socket.gethostname().split(".")[0], None)

    conf_only = environment(CASTRA_HANDSHAKE_CONF=str(conf))
    assert run([*GUEST_CLI, "publish", "--payload", '{"via": "python"}'], conf_only).returncode == 0
    assert run(["bash", str(BASH_AGENT), "publish", "--payload", '{"via": "bash"}'], conf_only).returncode == 0
    assert logged(router, "conf-vm", {"via": "python"}) and logged(router, "conf-vm", {"via": "bash"})


def test_token_for_a_host_with_an_identities_file(router_factory, tmp_path):
    identities = tmp_path / "identities"
    identities.write_text("locked token=s3cr3t\n")
    router = router_factory("--identities", str(identities))
    for command in ([*GUEST_CLI, "publish"], ["bash", str(BASH_AGENT), "publish"]):
        assert run([*command, "--payload", '{"key": "right"}'], guest_env(router.port, "locked", BUS_TOKEN="s3cr3t"),
                   ).returncode == 0
        wrong = run([*command, "--token", "guess", "--payload", "{}"], guest_env(router.port, "locked"))
        assert wrong.returncode == 1 and b"invalid token" in wrong.stderr
    assert [r["payload"] for r in router.read_log()] == [{"key": "right"}] * 2


# -- the bash agent -----------------------------------------------------------------------------


def test_bash_agent_publish(router):
    env = guest_env(router.port, "bash-pub")
    ok = run(["bash", str(BASH_AGENT), "publish", "--topic", "vm:beta", "--payload", '{"n": "é"}'], env)
    assert ok.returncode == 0, ok.stderr
    assert b'"status":"ok"' in ok.stdout and logged(router, "bash-pub", {"n": "é"})
    refused = run(["bash", str(BASH_AGENT), "publish", "--payload", "{}"], guest_env(router.port, "host"))
    assert refused.returncode == 2 and b"reserved vm name" in refused.stderr


@pytest.fixture
def mute_host():
    """A host that opens bus sessions and then never answers a frame: the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"castra-broker 0.1.0 ready capabilities=bus-v1\n")
                conn.recv(4096)  # the hello
                conn.sendall(b"ok session=0123456789abcdef\n")
                while not stop.is_set() and conn.recv(65536):
                    pass  # frames, never answered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


@pytest.mark.parametrize("command", [GUEST_CLI, ["bash", str(BASH_AGENT)]], ids=["castra-guest", "bash-agent"])
def test_publish_without_an_ack_gives_up_after_timeout(mute_host, command):
    started = time.monotonic()
    result = run([*command, "publish", "--timeout", "1", "--payload", "{}"], guest_env(mute_host, "waiting"))
    assert result.returncode == 1 and b"no publish ack within 1s" in result.stderr, result.stderr
    assert time.monotonic() - started < 10  # bounded by --timeout, not by the test's 30 s


def test_bash_agent_subscribes_heartbeats_and_forwards_stdin(hb_router, spawn):
    router = hb_router  # --heartbeat-timeout 1
    agent = spawn(["bash", str(BASH_AGENT), "agent", "--subscribe", "vm:bash-sub", "--stdin-json",
                   "--heartbeat", "0.2"], guest_env(router.port, "bash-sub"))
    agent.stderr.wait("subscribed to vm:bash-sub")
    quiet_session_dropped(router)
    client.publish("vm:bash-sub", {"to": "bash"}, state_root=router.state_root)
    agent.wait_message({"to": "bash"})

    agent.send_line({"type": "publish", "topic": "broadcast", "payload": {"from": "bash stdin"}})
    wait_for(lambda: logged(router, "bash-sub", {"from": "bash stdin"}), what="stdin frame in bus.log")
    assert agent.stderr.count("lost") == 0 and agent.stderr.count("connected to") == 1  # the first session held
    assert agent.terminate() == 0


@pytest.mark.parametrize("command", [GUEST_CLI, ["bash", str(BASH_AGENT)]], ids=["castra-guest", "bash-agent"])
def test_a_guests_own_publish_leaves_its_agent_subscribed(router, spawn, command):
    """Issue 12: ``agent --subscribe vm:alpha`` running, then ``publish`` from the same
    guest: a host message to vm:alpha right after it reaches the agent, which never
    reconnected."""
    vm = f"own-{tag(command)}"
    env = guest_env(router.port, vm)
    agent = spawn([*command, "agent", "--subscribe", f"vm:{vm}"], env)
    agent.stderr.wait(f"subscribed to vm:{vm}")
    published = run([*command, "publish", "--topic", "broadcast", "--payload", '{"event": "booted"}'], env)
    assert published.returncode == 0, published.stderr
    client.publish(f"vm:{vm}", {"cmd": "reload"}, state_root=router.state_root)
    agent.wait_message({"cmd": "reload"}, timeout=5)
    assert agent.stderr.count("lost") == 0 and agent.stderr.count("connected to") == 1, agent.stderr.lines
    assert agent.terminate() == 0


# -- what guests run -----------------------------------------------------------------------------


def test_guest_module_imports_only_the_standard_library():
    probe = ("import sys, castra_zmq.guest; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'zmq', 'msgspec', 'loguru', 'click'}))")
    result = run([sys.executable, "-c", probe], environment())
    assert result.stdout == b"[]\n", result.stderr


def python38() -> tuple[str, dict] | None:
    """A working ``python3.8`` and the environment it needs (pyenv's shim may need
    the version named), or None."""
    exe = shutil.which("python3.8")
    if exe is None:
        return None
    for extra in ({}, {"PYENV_VERSION": "3.8.18"}):
        trial = run([exe, "-c", "import sys; print(sys.version_info[:2])"], {**os.environ, **extra})
        if trial.returncode == 0 and trial.stdout.strip() == b"(3, 8)":
            return exe, extra
    return None


def test_python38_imports_and_publishes(router, tmp_path):
    found = python38()
    if found is None:
        pytest.skip("no working python3.8 on this machine")
    exe, extra = found
    env = guest_env(router.port, "py38", PYTHONPATH=str(REPO), **extra)
    imported = run([exe, "-c", "import castra_zmq.guest"], env)
    assert imported.returncode == 0, imported.stderr
    result = run([exe, "-m", "castra_zmq.guest", "publish", "--payload", '{"python": "3.8"}'], env)
    assert result.returncode == 0, result.stderr
    # What a guest image carries: the one file, run as a script.
    single_file = tmp_path / "castra_guest.py"
    shutil.copy(REPO / "castra_zmq" / "guest.py", single_file)
    env = guest_env(router.port, "py38", **extra)
    result = run([exe, str(single_file), "publish", "--payload", '{"single": "file"}'], env)
    assert result.returncode == 0, result.stderr
    assert logged(router, "py38", {"python": "3.8"}) and logged(router, "py38", {"single": "file"})


# -- one contract for both agents: names, exit statuses, signals, limits ---------------------

COMMANDS = pytest.mark.parametrize("command", [GUEST_CLI, ["bash", str(BASH_AGENT)]], ids=["castra-guest", "bash-agent"])
PREFIXES = (b"castra-guest: ", b"castra-bus-agent: ")


def message(result: subprocess.CompletedProcess) -> bytes:
    """The last stderr line without the program's name: the same in both agents."""
    line = result.stderr.strip().splitlines()[-1]
    for prefix in PREFIXES:
        if line.startswith(prefix):
            return line[len(prefix):]
    raise AssertionError(result.stderr)


@pytest.fixture
def silent_host():
    """A port that accepts connections and never says a word: the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in accepted:
        conn.close()


BAD_NAMES = {
    "space": ("a b", b"invalid vm name 'a b': no whitespace or control characters"),
    "tab": ("a\tb", b"invalid vm name 'a\tb': no whitespace or control characters"),
    "nbsp": ("a\u00a0b", "invalid vm name 'a\u00a0b': no whitespace or control characters".encode()),
    "line-separator": ("a\u2028b", "invalid vm name 'a\u2028b': no whitespace or control characters".encode()),
    "zero-width-space": ("a\u200bb", "invalid vm name 'a\u200bb': no whitespace or control characters".encode()),
    "control": ("a\x01b", b"invalid vm name 'a\x01b': no whitespace or control characters"),
    "reserved": ("HoSt", b"reserved vm name 'HoSt'"),
    "too-long": ("\u00e9" * 129, b"vm name too long (129 characters, max 128)"),
    "only-prefix": ("vm:", b"missing vm name"),
}


@pytest.mark.parametrize("name", BAD_NAMES, ids=list(BAD_NAMES))
@pytest.mark.parametrize("command", [GUEST_CLI, ["bash", str(BASH_AGENT)]], ids=["castra-guest", "bash-agent"])
def test_both_agents_refuse_a_bad_vm_name_with_the_same_message(command, name):
    vm, expected = BAD_NAMES[name]
    result = run([*command, "ping", "--vm", vm], guest_env(free_port(), "unused"))
    assert (result.returncode, message(result)) == (2, expected)


@pytest.mark.parametrize("vm", ["\u00e9" * 128, "a/b", "\u00dcn\u00ef", "vm:x"])
@COMMANDS
def test_both_agents_accept_what_the_router_accepts(command, vm):
    closed = free_port()
    result = run([*command, "ping", "--vm", vm, "--port", str(closed)], guest_env(closed, "unused"))
    assert result.returncode == 3, result.stderr  # past the name check: then no host to talk to


@COMMANDS
def test_exit_statuses_are_one_table(router, command):
    vm = f"statuses-{tag(command)}"
    env = guest_env(router.port, vm)
    assert run([*command, "publish", "--payload", '{"ok": 1}'], env).returncode == 0
    bad_json = run([*command, "publish", "--payload", "{bad"], env)
    assert bad_json.returncode == 2 and message(bad_json).startswith(b"--payload is not JSON: "), bad_json.stderr
    assert run([*command, "publish", "--no-such-option"], env).returncode == 2
    refused = run([*command, "publish", "--topic", "*", "--payload", "{}"], env)
    assert (refused.returncode, message(refused)) == (
        1, f"publish refused by 127.0.0.1:{router.port}: topic * is only for subscribe".encode())
    assert not any(r["vm"] == vm and r["payload"] != {"ok": 1} for r in router.read_log())


@COMMANDS
def test_a_closed_port_is_reported_as_such_and_quickly(command):
    closed = free_port()
    started = time.monotonic()
    result = run([*command, "publish", "--payload", "{}"], guest_env(closed, "nobody"))
    assert result.returncode == 3
    assert message(result).startswith(f"cannot connect to 127.0.0.1:{closed}".encode()), result.stderr
    assert time.monotonic() - started < 3


def test_every_subcommand_help_has_an_example():
    for command in ("publish", "agent", "ping"):
        result = run([*GUEST_CLI, command, "--help"], environment())
        assert result.returncode == 0 and f"examples:\n  castra-guest {command} ".encode() in result.stdout
        assert b"exit status" in result.stdout


@pytest.mark.parametrize("signals", [("SIGTERM", "SIGTERM"), ("SIGINT",), ("SIGINT", "SIGINT")],
                         ids=["sigterm-twice", "sigint", "sigint-twice"])
@COMMANDS
def test_agent_stops_quietly_with_status_0(router, spawn, command, signals):
    for attempt in range(3):
        vm = f"stop{attempt}-{tag(command)}-{'-'.join(signals)}"
        agent = spawn([*command, "agent", "--subscribe", "broadcast"], guest_env(router.port, vm))
        agent.stderr.wait("subscribed to broadcast")
        for name in signals:  # back to back, as timeout(1) sends them to the command and its group
            agent.process.send_signal(getattr(signal, name))
        assert agent.process.wait(10) == 0, agent.stderr.lines
        assert not any("Traceback" in line or "Error" in line for line in agent.stderr.lines), agent.stderr.lines


@COMMANDS
def test_second_signal_while_the_agent_stops_is_quiet(silent_host, spawn, command):
    """Stopping inside a connection attempt takes a moment: a second SIGTERM lands in it."""
    agent = spawn([*command, "agent", "--timeout", "5"], guest_env(silent_host, "stopping"))
    time.sleep(0.5)  # no condition to wait for: the host says nothing, the agent waits for its greeting
    agent.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(10) == 0, agent.stderr.lines
    assert not any("Traceback" in line for line in agent.stderr.lines), agent.stderr.lines


@COMMANDS
def test_interrupted_publish_ends_by_its_signal_without_a_traceback(mute_host, spawn, command):
    publisher = spawn([*command, "publish", "--timeout", "20", "--payload", "{}"], guest_env(mute_host, "ctrl-c"))
    time.sleep(0.5)  # the mute host never acks: the publish is waiting for its ack
    os.killpg(publisher.process.pid, signal.SIGINT)  # Ctrl-C: to the whole foreground group
    assert publisher.process.wait(10) == -signal.SIGINT  # a shell shows 130
    wait_for(lambda: publisher.stderr.count("interrupted by SIGINT"), what="the interruption line")
    assert not any("Traceback" in line for line in publisher.stderr.lines), publisher.stderr.lines


@COMMANDS
def test_agent_exits_0_at_the_end_of_stdin_once_its_publishes_are_acked(router, spawn, command):
    vm = f"eof-{tag(command)}"
    agent = spawn([*command, "agent", "--subscribe", "broadcast", "--stdin-json"], guest_env(router.port, vm))
    for n in range(5):
        agent.send_line({"type": "publish", "topic": "broadcast", "payload": {"n": n}})
    agent.process.stdin.close()
    assert agent.process.wait(15) == 0, agent.stderr.lines
    assert [r["payload"] for r in router.read_log() if r["vm"] == vm] == [{"n": n} for n in range(5)]


@COMMANDS
def test_agent_at_the_end_of_stdin_waits_for_acks_at_most_timeout(mute_host, spawn, command):
    agent = spawn([*command, "agent", "--stdin-json", "--timeout", "1"], guest_env(mute_host, "eof"))
    agent.send_line({"type": "publish", "topic": "broadcast", "payload": {}})
    agent.process.stdin.close()
    started = time.monotonic()
    assert agent.process.wait(15) == 0, agent.stderr.lines
    assert time.monotonic() - started < 10  # bounded by --timeout, not by the test's wait


@COMMANDS
def test_a_forbidden_subscription_is_logged_and_the_agent_goes_on(router, spawn, command):
    agent = spawn([*command, "agent", "--subscribe", "vm:other", "--subscribe", "broadcast"],
                  guest_env(router.port, f"nosy-{tag(command)}"))
    agent.stderr.wait("subscription to vm:other refused: forbidden topic")
    agent.stderr.wait("subscribed to broadcast")
    client.publish("broadcast", {"still": "served"}, state_root=router.state_root)
    agent.wait_message({"still": "served"})
    assert agent.terminate() == 0


def test_copied_limits_equal_the_routers():
    assert (guest.MAX_FRAME, guest.MAX_TOPIC) == (wire.MAX_FRAME, wire.MAX_TOPIC)
    assert (guest.MAX_NAME, guest.MAX_LINE, guest.RESERVED_NAME) == (
        handshake.MAX_NAME, handshake.MAX_LINE, handshake.HOST_SENDER)
    assert guest.FORBIDDEN_CATEGORIES == {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
    # No MAX_ID: the guest's publish ids are integers (itertools.count), never strings.
    script = BASH_AGENT.read_text()
    assert f"\nMAX_FRAME={wire.MAX_FRAME}\n" in script and f"\nMAX_NAME={handshake.MAX_NAME}\n" in script


def test_vm_name_agrees_with_the_router():
    for name in ["alpha", "a/b", "..", "x:y", "\u00e9" * 128, "\u00e9" * 129, "", "host", "HOST", "a b", "a\tb",
                 "a\x00b", "a\u00adb", "a\ue000", "a\u0378", "a\u2029b"]:
        try:
            router_vm = handshake.validate_vm_name(name)
            router_ok = not any(ch.isspace() for ch in router_vm)
        except HandshakeError:
            router_ok = False
        try:
            guest_ok = guest.vm_name(name) == name
        except ValueError:
            guest_ok = False
        assert guest_ok == router_ok, name
