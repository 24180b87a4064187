"""A state root another local user could control (issue 10, item 13).

The attacker is a local user who can write somewhere on the path of a state root
(``/tmp`` without care, a directory of theirs) or who left a symbolic link or a
file of theirs in it, hoping that root's ``castra up`` writes through their links
and that root's ``castra bus publish`` talks to their socket. Everything runs as
real ``castra`` subprocesses on real files; "another user" is ``nobody`` (uid
65534), made with ``os.chown``, so those tests need root and skip without it.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from castra_zmq import client
from castra_zmq.endpoints import Endpoints

from ..conftest import wait_for
from ..guest import connect_bus
from ..test_cli import castra
from ..zygote import castra_command

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's files needs root")
VICTIM = b"root's file: must never change\n"


def up_refusal(state_root: Path) -> str:
    """Run ``castra up``, which must refuse ``state_root``; returns its stderr."""
    process = castra_command(["up", "--state-root", str(state_root), "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready = process.stdout.readline().decode()
    if ready:
        process.terminate()
        process.communicate(timeout=15)
        pytest.fail(f"castra up started on {state_root}: {ready!r}")
    stderr = process.communicate(timeout=15)[1].decode()
    assert process.returncode == 1, stderr
    assert stderr.startswith("Error: ") and "Traceback" not in stderr, stderr
    return stderr


def make_tree(state_root: Path) -> Endpoints:
    """The state root's directories as ``castra up`` leaves them, made by hand."""
    endpoints = Endpoints(state_root)
    for directory in (state_root, endpoints.run_dir, endpoints.logs_dir.parent, endpoints.logs_dir,
                      endpoints.state_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return endpoints


def victim_file(path: Path) -> Path:
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def json_of(path: Path):
    """The JSON in ``path``, or None while it does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def assert_victim_intact(path: Path) -> None:
    assert path.read_bytes() == VICTIM and oct(path.stat().st_mode & 0o777) == "0o644"


# -- castra up ------------------------------------------------------------------------


@needs_root
def test_up_refuses_a_state_root_of_another_user(state_root):
    state_root.mkdir(mode=0o700)
    os.chown(state_root, NOBODY, NOBODY)
    error = up_refusal(state_root)
    assert f"refusing {state_root}: it belongs to uid {NOBODY}, not to uid 0" in error
    assert list(state_root.iterdir()) == []  # nothing made in it


@pytest.mark.parametrize("linked", [".", "run", "logs", "logs/bus", "state"])
def test_up_refuses_a_symbolic_link_in_place_of_a_directory(state_root, linked):
    elsewhere = state_root.parent / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = state_root if linked == "." else state_root / linked
    link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    link.symlink_to(elsewhere)
    error = up_refusal(state_root)
    assert f"refusing {link}: it is a symbolic link" in error
    assert list(elsewhere.iterdir()) == []


PLANTED = [
    "run/router.lock", "run/router.json", "run/router.json.tmp",
    "state/journal.json", "state/journal.json.tmp", "state/status.json", "state/status.json.tmp",
    "logs/bus/bus.log", "logs/bus/alpha.log",
]


@pytest.mark.parametrize("planted", PLANTED)
def test_up_refuses_a_symbolic_link_planted_in_the_state_root(state_root, planted):
    make_tree(state_root)
    victim = victim_file(state_root.parent / "victim")
    (state_root / planted).symlink_to(victim)
    error = up_refusal(state_root)
    assert f"refusing {state_root / planted}: it is a symbolic link" in error
    assert_victim_intact(victim)


@needs_root
@pytest.mark.parametrize("planted", ["run/router.lock", "state/status.json", "logs/bus/alpha.log"])
def test_up_refuses_a_file_of_another_user_in_the_state_root(state_root, planted):
    make_tree(state_root)
    theirs = victim_file(state_root / planted)
    os.chown(theirs, NOBODY, NOBODY)
    error = up_refusal(state_root)
    assert f"refusing {theirs}: it belongs to uid {NOBODY}" in error
    assert_victim_intact(theirs)


def test_up_refuses_a_state_root_others_could_move_unless_the_parent_is_sticky(router_factory, state_root):
    """A directory above that others may write lets them rename the state root
    away and put their own in its place; a sticky one (like /tmp) does not."""
    parent = state_root.parent
    parent.chmod(0o777)
    error = up_refusal(state_root)
    assert f"{parent} above it may be written by group or others and is not sticky" in error
    assert not state_root.exists()  # nothing made under a directory not trusted
    parent.chmod(0o1777)
    router = router_factory()
    assert client.publish("broadcast", {"n": 1}, state_root=router.state_root) == 1
    for directory in (state_root, state_root / "run", state_root / "logs" / "bus", state_root / "state"):
        assert oct(directory.lstat().st_mode & 0o7777) == "0o700"


@needs_root
def test_up_refuses_a_state_root_in_a_directory_of_another_user(state_root):
    os.chown(state_root.parent, NOBODY, NOBODY)
    error = up_refusal(state_root)
    assert f"{state_root.parent} above it belongs to uid {NOBODY}, who could move the state root" in error
    assert not state_root.exists()


def test_a_symbolic_link_above_the_state_root_is_followed_and_checked(router_factory, state_root):
    base = state_root.parent
    (base / "real").mkdir(mode=0o755)
    (base / "link").symlink_to("real")
    router = router_factory(root=base / "link" / "root")
    assert client.publish("broadcast", "via a link", state_root=router.state_root) == 1
    assert (base / "real" / "root" / "logs" / "bus" / "bus.log").exists()
    # A link that leads through a directory others may write is no better than that directory.
    (base / "open").mkdir()
    (base / "open").chmod(0o777)
    (base / "open" / "inner").mkdir(mode=0o755)
    (base / "to-open").symlink_to(base / "open" / "inner")
    error = up_refusal(base / "to-open" / "root")
    assert f"{base / 'open'} above it may be written by group or others and is not sticky" in error


# -- while the router runs: files are opened without following links -----------------


def test_links_planted_while_the_router_runs_are_never_written_through(router):
    """Only our own uid (or root) can still plant them, the directories being 0700:
    the files are opened with O_NOFOLLOW anyway, temp files with O_EXCL."""
    endpoints = Endpoints(router.state_root)
    base = router.state_root.parent
    victims = {name: victim_file(base / f"victim-{name}") for name in ("beta", "gamma", "status", "journal")}
    (endpoints.logs_dir / "beta.log").symlink_to(victims["beta"])
    os.link(victims["gamma"], endpoints.logs_dir / "gamma.log")  # a hard link: O_NOFOLLOW alone would miss it
    (endpoints.state_dir / "status.json.tmp").symlink_to(victims["status"])
    (endpoints.state_dir / "journal.json.tmp").symlink_to(victims["journal"])
    planted_ms = time.time() * 1000

    for vm in ("beta", "gamma"):
        with connect_bus(router.port, vm) as guest:
            ack = guest.publish(1)
        assert ack["status"] == "ok", ack  # in bus.log: the per-VM logs are the journal's, after the ack
    seq = client.publish("broadcast", "fine", state_root=router.state_root)
    wait_for(lambda: "symbolic link refused" in router.log_text() and "has other hard links" in router.log_text(),
             what="the journal refusing both logs")
    # The snapshot (every 0.25 s) and the checkpoint (health tick after a commit) are
    # both rewritten past the planted temp files.
    wait_for(lambda: (json_of(endpoints.snapshot) or {}).get("written_ms", 0) > planted_ms,
             what="a snapshot written after the links were planted")
    wait_for(lambda: json_of(endpoints.journal_checkpoint) == {"vm_logs_synced_seq": seq},
             what="a checkpoint of the last commit")
    for victim in victims.values():
        assert_victim_intact(victim)
    for path in (endpoints.snapshot, endpoints.journal_checkpoint):
        assert path.is_file() and not path.is_symlink() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert [line["seq"] for line in router.read_log()] == [1, 2, seq]


# -- host tools: run/ must be ours before anything is sent to a socket in it ----------


def make_run_dir_of(state_root: Path, how: str) -> Path:
    """A state root whose run/ someone else could control, ``how``; returns the
    directory the (fake) router's sockets and lock really are in."""
    endpoints = make_tree(state_root)
    if how == "run/ belongs to another user":
        os.chown(endpoints.run_dir, NOBODY, NOBODY)
    elif how == "the state root belongs to another user":
        os.chown(state_root, NOBODY, NOBODY)
    elif how == "run/ is a symbolic link":
        endpoints.run_dir.rmdir()
        elsewhere = state_root.parent / "their-run"
        elsewhere.mkdir(mode=0o700)
        endpoints.run_dir.symlink_to(elsewhere)
        return elsewhere
    elif how == "others may write to run/":
        endpoints.run_dir.chmod(0o777)
    elif how == "others may write to a directory above":
        state_root.parent.chmod(0o777)
    return endpoints.run_dir


@pytest.mark.parametrize("how", [
    pytest.param("run/ belongs to another user", marks=needs_root),
    pytest.param("the state root belongs to another user", marks=needs_root),
    "run/ is a symbolic link",
    "others may write to run/",
    "others may write to a directory above",
])
def test_host_tools_refuse_a_run_dir_someone_else_could_control(state_root, how):
    """Someone else's journal.sock would take root's payload and answer with a seq."""
    their_run = make_run_dir_of(state_root, how)
    lock = os.open(their_run / "router.lock", os.O_RDWR | os.O_CREAT, 0o600)
    with zmq.Context() as context, context.socket(zmq.ROUTER) as their_journal:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "a router runs"
        os.write(lock, f"{os.getpid()}\n".encode())
        their_journal.linger = 0
        their_journal.bind(f"ipc://{their_run}/journal.sock")
        publish = subprocess.Popen(
            [sys.executable, "-m", "castra_zmq.cli.main", "bus", "publish", "--state-root", str(state_root),
             "--payload", '{"secret":1}', "--timeout", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        received = []
        while publish.poll() is None:
            if their_journal.poll(20):
                identity, _, request = their_journal.recv_multipart()
                received.append(request)
                reply = {"results": [[json.loads(request)["corr"], 99, None]]}
                their_journal.send_multipart([identity, b"", json.dumps(reply).encode()])
        stdout, stderr = publish.communicate()
        status = castra("status", "--state-root", str(state_root))
    os.close(lock)
    assert received == [] and stdout == ""
    assert publish.returncode == 1 and stderr.startswith("Error: refusing "), stderr
    assert "Traceback" not in stderr
    assert status.returncode == 1 and status.stderr.startswith("Error: refusing "), status.stderr


def test_status_on_a_missing_state_root_says_not_running_unless_others_could_make_it(state_root):
    """Under a directory of ours (or the default, which does not exist yet) a
    missing state root just means no router; where others could make it first,
    host tools refuse it."""
    missing = castra("status", "--state-root", str(state_root))
    assert missing.returncode == 0 and "not running" in missing.stdout, missing.stderr
    home = state_root.parent / "home"  # the default state root: ~/.local/state/castra, not made yet
    env = {key: value for key, value in os.environ.items()
           if key not in ("CASTRA_STATE_ROOT", "XDG_STATE_HOME")}
    default = subprocess.run([sys.executable, "-m", "castra_zmq.cli.main", "status"], env=dict(env, HOME=str(home)),
                             capture_output=True, text=True, timeout=30, check=False)
    assert default.returncode == 0 and "not running" in default.stdout, default.stderr
    state_root.parent.chmod(0o777)
    open_to_all = castra("status", "--state-root", str(state_root))
    assert open_to_all.returncode == 1 and "is not sticky" in open_to_all.stderr, open_to_all.stderr
