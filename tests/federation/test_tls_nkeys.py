"""The uplink's TLS and nkey options against a real 3-node NATS cluster that
requires both: every node serves TLS with a certificate for 127.0.0.1 from a CA
made here (``trustme``), node n1 also requires a client certificate from that CA,
and its users are known by their public nkeys (made here with ``nkeys``), each
host's allowed only ``federation.uplink_permissions``, plus a password admin for
the test's own look-ups.

A ``.creds`` file (a user JWT and its seed) needs servers in operator mode, which
take no ``authorization`` block: ``test_creds.py``.

Real processes and sockets on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import tempfile
from pathlib import Path

import pytest

from bench.natscluster import NatsCluster, authorization, tls_block
from castra_zmq.federation import HEADER_ORIGIN_SEQ, STREAM_NAME, origin_filter, uplink_permissions
from castra_zmq.statusview import collect_status

from ..conftest import Router, host_publish, wait_for
from ..guest import connect_bus
from ..zygote import run_castra
from .conftest import check_refused_uplink, each_log_says, routers_side_by_side, started_cluster
from .test_uplink import query

nkeys = pytest.importorskip("nkeys", reason="pip install 'nats-py[nkeys]' (the test extra)")
trustme = pytest.importorskip("trustme", reason="pip install trustme (the test extra)")

pytestmark = pytest.mark.timeout(120)
ADMIN = {"user": "admin", "password": "admin-pass"}
VERIFYING_NODE, TLS_NODE = 0, 1  # n1 requires a client certificate, n2 (and n3) do not


class Files:
    """The PEM and seed files of the module, in a temporary directory, secrets owner-only."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_pem = self.write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1")
        self.server_pem = self.write("server.pem", b"".join(pem.bytes() for pem in server.cert_chain_pems))
        self.server_key = self.write("server.key", server.private_key_pem.bytes(), secret=True)
        self.client = self.ca.issue_cert("castra-b")
        self.client_pem = self.write("client.pem", b"".join(pem.bytes() for pem in self.client.cert_chain_pems))
        self.client_key = self.write("client.key", self.client.private_key_pem.bytes(), secret=True)

    def write(self, name: str, content: bytes, secret: bool = False) -> Path:
        path = self.directory / name
        path.write_bytes(content)
        if secret:
            path.chmod(0o600)
        return path

    def user_seed(self, name: str) -> tuple[Path, str]:
        """A new user nkey: its seed file and its public key."""
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        public = nkeys.from_seed(bytearray(seed)).public_key.decode()
        return self.write(name, seed + b"\n", secret=True), public

    def admin_tls(self) -> ssl.SSLContext:
        """The test's own client context: trusts the CA, shows the client certificate."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        self.client.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def files():
    directory = Path(tempfile.mkdtemp(prefix="czpki", dir="/tmp"))
    try:
        yield Files(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def seeds(files):
    """Hosts a and b's seed files, by host, and their public keys, which the servers know."""
    return {host: files.user_seed(f"{host}.nk") for host in ("a", "b")}


@pytest.fixture(scope="module")
def secure_cluster(files, seeds):
    users = {ADMIN["user"]: (ADMIN["password"], None)}
    nkey_users = {public: uplink_permissions(host) for host, (_, public) in seeds.items()}
    tls = [tls_block(files.server_pem, files.server_key)] * 3
    tls[VERIFYING_NODE] = tls_block(files.server_pem, files.server_key, client_ca_file=files.ca_pem)
    yield from started_cluster("czntls", authorization=authorization(users, nkey_users), tls=tls,
                               client_options={**ADMIN, "tls": files.admin_tls()})


def node_url(cluster: NatsCluster, index: int) -> str:
    return cluster.nodes[index].url


@pytest.fixture(scope="module")
def hosts(secure_cluster, files, seeds):
    """Router ``a`` on the TLS node n2 with its seed and the CA (``a`` first: it makes
    the stream), then ``b`` on n1 with its seed, the CA and the client certificate."""
    directory = Path(tempfile.mkdtemp(prefix="cztlsr", dir="/tmp"))
    routers: dict[str, Router] = {}
    options = {
        "a": [node_url(secure_cluster, TLS_NODE), "--uplink-tls-ca", str(files.ca_pem)],
        "b": [node_url(secure_cluster, VERIFYING_NODE), "--uplink-tls-ca", str(files.ca_pem),
              "--uplink-tls-cert", str(files.client_pem), "--uplink-tls-key", str(files.client_key)],
    }
    try:
        for host, (url, *tls) in options.items():
            routers[host] = Router(directory / host, "--uplink", url, "--host-name", host,
                                   "--uplink-creds", str(seeds[host][0]), *tls).start()
        each_log_says("downloading consumer=")(routers)
        yield routers
    finally:
        for router in routers.values():
            router.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_nkey_users_over_tls_and_mutual_tls_share_messages(hosts, secure_cluster):
    """a (server certificate checked against the CA) and b (also showing its client
    certificate to the node that requires one), each signing in with its nkey seed:
    each host's messages land in the stream under its subjects and reach the other;
    status shows both connected, nothing left to upload."""
    for host, node in (("a", TLS_NODE), ("b", VERIFYING_NODE)):
        assert f"connected to NATS server=127.0.0.1:{secure_cluster.nodes[node].client_port}" in hosts[host].log_text()
    seqs = {"a": host_publish(hosts["a"], "over-tls", 3), "b": host_publish(hosts["b"], "over-mtls", 3)}
    for here, there in (("b", "a"), ("a", "b")):
        def arrived(here=here, there=there):
            return [line["origin"]["seq"] for line in hosts[here].read_log()
                    if line.get("origin", {}).get("host") == there]
        wait_for(lambda arrived=arrived, there=there: arrived() == seqs[there], timeout=15,
                 what=f"{there}'s messages in {here}'s bus.log")
        # Waited for, not asserted once: on a loaded machine ``castra status`` may fall
        # back on the status role's snapshot, which can be from before the connection.
        status = wait_for(lambda here=here: (status := collect_status(hosts[here].state_root).uplink)
                          and status.state == "connected" and status.upload_lag_messages == 0 and status,
                          timeout=15, what=f"{here} connected with nothing to upload")
        assert status.reason is None
    for host in seqs:
        async def last(js, host=host):
            return await js.get_last_msg(STREAM_NAME, origin_filter(host))
        assert query(secure_cluster, last).headers[HEADER_ORIGIN_SEQ] == str(seqs[host][-1])
    text = (hosts["a"].log_text() + hosts["b"].log_text()).lower()
    assert "permission" not in text
    # The fleet tail on b reaches NATS as b's uplink does: its seed, the CA, its certificate.
    done = run_castra(["bus", "tail", "--fleet", "--json", "--state-root", str(hosts["b"].state_root),
                       "--topic", "over-*"])
    assert done.returncode == 0, done.stderr
    assert sorted((line["host"], line["seq"]) for line in map(json.loads, done.stdout.splitlines())) == [
        (host, seq) for host in ("a", "b") for seq in seqs[host]]


# A server that wants a client certificate and gets none ends the connection after the
# TLS 1.3 handshake, which the client had completed: the uplink sees the connection
# end (which of these depends on timing), the server's log says why.
CONNECTION_ENDED = ("connection lost", "broken pipe", "connection reset", "certificate required")
# Routers the servers refuse, by case: the node, the options beside --uplink and
# --host-name, the line the uplink logs, the reasons it may give, and what the
# node's log says (when the uplink cannot know).
REFUSALS = {
    "no CA option: the system's CAs do not know the servers'": (
        TLS_NODE, [], "NATS unreachable; retrying", ("certificate verify failed",), None),
    "no client certificate for the node that requires one": (
        VERIFYING_NODE, ["--uplink-tls-ca", "{ca}"], "NATS unreachable; retrying", CONNECTION_ENDED,
        "TLS handshake error: tls: client didn't provide a certificate"),
    "an nkey the servers do not know": (
        TLS_NODE, ["--uplink-tls-ca", "{ca}", "--uplink-creds", "{stranger}"],
        "NATS refused the uplink's credentials; retrying", ("nats: 'Authorization Violation'",), None),
}


@pytest.fixture(scope="module")
def refused_routers(secure_cluster, files):
    """One router (host ``c``) for each case of ``REFUSALS``, started side by side."""
    stranger, _ = files.user_seed("stranger.nk")  # its public key is in no server's config
    yield from routers_side_by_side("cztlsf", {
        case: ["--uplink", node_url(secure_cluster, node), "--host-name", "c",
               *(arg.format(ca=files.ca_pem, stranger=stranger) for arg in args)]
        for case, (node, args, *_) in REFUSALS.items()})


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_connection_says_why_local_bus_keeps_acking(refused_routers, secure_cluster, case):
    node, _, log_line, reasons, server_log = REFUSALS[case]
    check_refused_uplink(refused_routers[case], log_line, reasons)
    if server_log is not None:
        assert server_log in secure_cluster.nodes[node].log_path.read_text()


# -- TLS from the first byte ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_first_routers(files):
    """A cluster whose nodes take TLS first (``handshake_first``: they say nothing
    before the handshake), and a router with ``--uplink-tls-first`` and one without."""
    tls = [tls_block(files.server_pem, files.server_key, handshake_first=True)] * 3
    clusters = started_cluster("czntlsfirst", tls=tls,
                               client_options={"tls": files.admin_tls(), "tls_handshake_first": True})
    cluster = next(clusters)
    options = ["--uplink", node_url(cluster, TLS_NODE), "--uplink-tls-ca", str(files.ca_pem)]
    routers = routers_side_by_side("cztlsfirstr", {"first": [*options, "--host-name", "a", "--uplink-tls-first"],
                                                   "after INFO": [*options, "--host-name", "c"]})
    try:
        yield next(routers)
    finally:
        routers.close()
        clusters.close()


def test_tls_first_uploads_and_a_router_waiting_for_info_is_not_let_in(tls_first_routers):
    """With --uplink-tls-first the uplink opens with the TLS handshake and uploads;
    without it, it waits for the server's INFO line (to start TLS when that asks),
    which a TLS-first server never sends in plain text: no byte of it, credentials
    included, leaves unencrypted, and the local bus acks all the same."""
    first = tls_first_routers["first"]
    with connect_bus(first.port, "alpha") as alpha:
        assert alpha.publish({"n": 1})["status"] == "ok"
    status = wait_for(lambda: (status := collect_status(first.state_root).uplink)
                      and status.state == "connected" and status.upload_lag_messages == 0 and status,
                      timeout=20, what="the TLS-first uplink connected with nothing left to upload")
    assert status.server is not None
    # It waits for an INFO line until its connect timeout.
    check_refused_uplink(tls_first_routers["after INFO"], "NATS unreachable; retrying", ("timeout",))
