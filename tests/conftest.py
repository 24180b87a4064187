"""Fixtures: a real router (``castra up`` as a subprocess) on a temp state root.

State roots live in short ``/tmp`` paths because ipc socket paths are limited to
107 bytes. The router binds port 0 on 127.0.0.1 and its ready line tells the port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import settings

from castra_zmq.client import Publisher
from castra_zmq.supervisor import exits_within, process_runs

from .zygote import castra_command

READY = re.compile(r"castra router ready on 127\.0\.0\.1:(\d+)")

# Property tests run hypothesis's default 100 examples each; HYPOTHESIS_PROFILE=thorough
# runs 20 times as many (before a release, or after a change to the codec).
settings.register_profile("thorough", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` starts three workers a core: most tests spend about half their time
    waiting on a router, whose roles run in processes of their own, or on a NATS
    cluster's timers. On 2 cores (py311, a quiet machine) four workers left the cores
    idle 20 % of the run (35 of 166 core-seconds, 75 s); six, 10-15 % (64-68 s)."""
    return 3 * len(os.sched_getaffinity(0))


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, the longest files first (``tests/schedule.py`` says why)."""
    if config.getvalue("dist") == "loadfile":
        from .schedule import LongestFirst

        return LongestFirst(config, log)
    return None


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Router:
    """One ``castra up`` process; ``port`` is known once it is ready."""

    def __init__(self, state_root: Path, *args: str):
        self.state_root = state_root
        self.args = args
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = state_root.parent / (state_root.name + ".router.log")

    @property
    def logs(self) -> Path:
        return self.state_root / "logs" / "bus"

    def start(self, timeout: float = 20.0) -> Router:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - the router's stderr until stop()
        self.process = castra_command(
            ["up", "--state-root", str(self.state_root), "--port", "0", *self.args],
            stdout=subprocess.PIPE,
            stderr=self.log,  # INFO unless CASTRA_LOG_LEVEL is set: DEBUG has a line per publish
        )
        line = self.process.stdout.readline().decode()
        match = READY.search(line)
        if not match:
            self.process.kill()
            raise AssertionError(f"router did not start: {line!r}\n{self.log_path.read_text()[-3000:]}")
        self.port = int(match.group(1))
        return self

    def role_pid(self, role: str) -> int:
        info = json.loads((self.state_root / "run" / "router.json").read_text())
        return info["processes"][role]["pid"]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def read_log(self, name: str = "bus.log") -> list[dict]:
        """The log's complete lines: one being written (no newline yet) is left out."""
        path = self.logs / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().split("\n")[:-1]]

    def wait_filed(self, timeout: float = 5.0) -> None:
        """Wait until the journal has filed every line of ``bus.log`` in the per-VM
        logs, which it does after the ack: its checkpoint, written on each health
        tick, says how far it is."""
        lines = self.read_log()
        last = lines[-1]["seq"] if lines else 0
        checkpoint = self.state_root / "state" / "journal.json"

        def filed() -> bool:
            try:
                return json.loads(checkpoint.read_text())["vm_logs_synced_seq"] >= last
            except (OSError, ValueError):
                return False

        wait_for(filed, timeout=timeout, what=f"the per-VM logs filed up to seq {last}")

    def kill_9(self) -> None:
        """Kill the router at once (SIGKILL to ``castra up``) and wait for its roles
        to die with it."""
        pids = [self.role_pid(role) for role in ("bridge", "journal", "proxy", "status")]
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()
        for pid in pids:
            wait_for(lambda pid=pid: not process_runs(pid), what=f"role {pid} gone")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            # Not Popen.wait: its sleeps (up to 50 ms) would add to every test's teardown.
            if not exits_within(self.process, timeout):
                self.process.kill()
                self.process.wait()
                raise AssertionError("router did not stop in time")
            return self.process.returncode
        finally:
            self.log.close()


class Lines:
    """A child's output pipe, read line by line on a thread, so tests wait with
    deadlines. ``next``, ``until`` and ``remaining`` take the lines in order (with
    their time of arrival); ``count``, ``wait`` and ``json`` look at all so far."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.arrivals: list[float] = []
        self.closed = False
        self.taken = 0  # lines handed out by next/until/remaining
        self._changed = threading.Condition()
        threading.Thread(target=self._collect, args=(pipe,), daemon=True).start()

    def _collect(self, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            with self._changed:
                self.arrivals.append(time.monotonic())
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def next(self, timeout: float = 5.0) -> tuple[float, str]:
        """The next line and when it arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.lines) > self.taken or self.closed, timeout):
                raise AssertionError(f"no line within {timeout}s (seen: {self.lines[:self.taken]})")
            if len(self.lines) == self.taken:
                raise AssertionError(f"stream closed (seen: {self.lines})")
            self.taken += 1
            return self.arrivals[self.taken - 1], self.lines[self.taken - 1]

    def until(self, predicate, timeout: float = 5.0) -> str:
        """The next line ``predicate`` accepts (the lines before it are taken too)."""
        deadline = time.monotonic() + timeout
        while True:
            _, line = self.next(max(0.0, deadline - time.monotonic()))
            if predicate(line):
                return line

    def remaining(self, timeout: float = 5.0) -> list[str]:
        """Every line still to come, up to the end of the stream."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.closed, timeout):
                raise AssertionError(f"stream still open after {timeout}s (seen: {self.lines})")
            rest, self.taken = self.lines[self.taken:], len(self.lines)
            return rest

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.lines)

    def wait(self, text: str, times: int = 1, timeout: float = 10.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: sum(text in line for line in self.lines) >= times, timeout):
                raise AssertionError(f"no {text!r} (x{times}) in {self.lines}")

    def json(self) -> list[dict]:
        with self._changed:
            return [json.loads(line) for line in self.lines]


def restarted(router: Router, role: str, old_pid: int) -> bool:
    """Whether ``castra status`` shows ``role`` running again, under another pid."""
    from castra_zmq.statusview import collect_status

    state = collect_status(router.state_root).router.processes[role]
    return state.pid != old_pid and state.state == "running"


def host_publish(router: Router, topic: str, count: int, start: int = 0) -> list[int]:
    """``count`` host publishes of ``{"n": start..}`` to ``topic``, 1,000 a batch; their seqs."""
    seqs: list[int] = []
    with Publisher(state_root=router.state_root) as publisher:
        for first in range(start, start + count, 1000):
            batch = [(topic, {"n": n}) for n in range(first, min(start + count, first + 1000))]
            results = publisher.publish_batch(batch, timeout=20)
            assert all(result.reason is None for result in results), results[:3]
            seqs += [result.seq for result in results]
    return seqs


def identities_file(directory: Path, text: str) -> Path:
    """An identities file for ``castra up --identities``: owner-only, as one that
    holds secrets must be."""
    path = directory / "identities"
    path.write_text(text)
    path.chmod(0o600)
    return path


def shared_router(*args: str, identities: str | None = None):
    """A router for a whole module (``yield from`` it in a module fixture), on a state
    root of its own, removed afterwards; ``identities``: the text of its identities file."""
    path = Path(tempfile.mkdtemp(prefix="cz", dir="/tmp"))
    try:
        if identities is not None:
            args = (*args, "--identities", str(identities_file(path, identities)))
        router = Router(path / "root", *args).start()
        try:
            yield router
        finally:
            router.stop()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_root():
    path = Path(tempfile.mkdtemp(prefix="cz", dir="/tmp"))
    yield path / "root"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def router_factory(state_root):
    """Start routers with extra ``castra up`` arguments; all are stopped afterwards."""
    routers: list[Router] = []

    def start(*args: str, root: Path | None = None) -> Router:
        router = Router(root or state_root, *args).start()
        routers.append(router)
        return router

    yield start
    for router in routers:
        if router.process and router.process.poll() is None:
            router.stop()


@pytest.fixture
def router(router_factory) -> Router:
    return router_factory()


@pytest.fixture
def follow():
    """Start ``castra bus tail -f`` processes (``test_cli.Follow``); any left running
    is killed afterwards."""
    from .test_cli import Follow

    started: list[Follow] = []

    def start(state_root: Path, *args: str, ignore_sigint: bool = False) -> Follow:
        started.append(Follow(state_root, *args, ignore_sigint=ignore_sigint))
        return started[-1]

    yield start
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
            each.process.wait()
