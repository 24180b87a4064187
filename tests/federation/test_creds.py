"""``--uplink-creds FILE.creds`` (a user JWT and its nkey seed) against a real
3-node NATS cluster in operator mode: an operator, its system account and an
account ``castra`` with JetStream, made here (``natsjwt``) and preloaded in the
servers' memory resolver; host a's user allowed only
``federation.uplink_permissions("a")``, an admin user of the same account for the
test's own look-ups.

Real processes and sockets on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nats
import pytest

from castra_zmq.federation import HEADER_ORIGIN_SEQ, STREAM_NAME, origin_filter, uplink_permissions
from castra_zmq.statusview import collect_status

from ..conftest import Router, host_publish, wait_for
from .conftest import check_refused_uplink, each_log_says, routers_side_by_side, started_cluster
from .test_uplink import query

pytest.importorskip("nkeys", reason="pip install 'nats-py[nkeys]' (the test extra)")
from .natsjwt import Operator  # after the skip: it needs nkeys

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def operator():
    return Operator()


@pytest.fixture(scope="module")
def creds_dir():
    directory = Path(tempfile.mkdtemp(prefix="czcreds", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def account(operator):
    return operator.account("castra")


@pytest.fixture(scope="module")
def operator_cluster(operator, account, creds_dir):
    admin = account.user_creds(creds_dir / "admin.creds", "admin")
    yield from started_cluster("czncreds", authorization=operator.server_config(),
                               client_options={"user_credentials": str(admin)})


@pytest.fixture(scope="module")
def host_a(operator_cluster, account, creds_dir):
    creds = account.user_creds(creds_dir / "a.creds", "castra-a", uplink_permissions("a"))
    directory = Path(tempfile.mkdtemp(prefix="czcredr", dir="/tmp"))
    router = Router(directory / "a", "--uplink", operator_cluster.uplink_option, "--host-name", "a",
                    "--uplink-creds", str(creds))
    try:
        router.start()
        each_log_says("downloading consumer=")({"a": router})
        yield router
    finally:
        router.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_creds_user_uploads_with_its_own_permissions(host_a, operator_cluster):
    seqs = host_publish(host_a, "with-creds", 3)

    async def last_origin_seq(js):
        try:
            return (await js.get_last_msg(STREAM_NAME, origin_filter("a"))).headers[HEADER_ORIGIN_SEQ]
        except nats.js.errors.NotFoundError:
            return None

    wait_for(lambda: query(operator_cluster, last_origin_seq) == str(seqs[-1]), timeout=15, interval=0.1,
             what="a's last message in the stream")
    status = wait_for(lambda: (status := collect_status(host_a.state_root).uplink)
                      and status.state == "connected" and status.upload_lag_messages == 0 and status,
                      timeout=15, what="connected with nothing to upload")
    assert status.reason is None
    assert "permission" not in host_a.log_text().lower()


REFUSALS = {
    "a user of an operator the servers do not trust": "stranger",
    "a user JWT that has expired": "expired",
}


@pytest.fixture(scope="module")
def refused_routers(operator_cluster, account, creds_dir):
    """One router (host ``c``) for each case of ``REFUSALS``, started side by side."""
    creds = {"stranger": Operator().account("castra").user_creds(creds_dir / "stranger.creds", "castra-c"),
             "expired": account.user_creds(creds_dir / "expired.creds", "castra-c", expires_s=-60)}
    yield from routers_side_by_side("czcredf", {
        case: ["--uplink", operator_cluster.uplink_option, "--host-name", "c", "--uplink-creds", str(creds[name])]
        for case, name in REFUSALS.items()})


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_creds_say_why_local_bus_keeps_acking(refused_routers, case):
    check_refused_uplink(refused_routers[case], "NATS refused the uplink's credentials; retrying",
                         ("nats: 'Authorization Violation'",))  # the servers tell no more; their logs do
