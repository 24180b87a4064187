"""The uplink's credentials and per-host permissions against a real 3-node NATS
cluster with an ``authorization`` block: hosts ``a`` and ``b`` each allowed only
``federation.uplink_permissions`` (their own subjects, their own consumer), an
admin for the test's own look-ups. ``castra up``'s checks of the credential and
TLS options, without NATS.

Real processes and sockets on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import nats
import pytest

from bench.natscluster import authorization
from castra_zmq.config import Settings
from castra_zmq.errors import ConfigError
from castra_zmq.federation import STREAM_NAME, uplink_permissions
from castra_zmq.statusview import collect_status
from castra_zmq.uplinkconnect import PASSWORD_ENV, connect_options

from ..conftest import host_publish, wait_for
from ..guest import connect_bus
from ..zygote import run_castra
from .conftest import each_log_says, started_cluster, uplinked_routers
from .test_uplink import query

pytestmark = pytest.mark.timeout(120)
PASSWORDS = {"a": "pass-a", "b": "pass-b"}
ADMIN = {"user": "admin", "password": "admin-pass"}


@pytest.fixture(scope="module")
def guarded_cluster():
    users = {f"castra-{host}": (password, uplink_permissions(host)) for host, password in PASSWORDS.items()}
    users[ADMIN["user"]] = (ADMIN["password"], None)
    yield from started_cluster("cznauth", authorization=authorization(users), client_options=ADMIN)


@pytest.fixture(scope="module")
def hosts(guarded_cluster):
    """Routers ``a`` and ``b``, each as its own NATS user, ``a`` first: it makes the stream."""
    yield from uplinked_routers(guarded_cluster, PASSWORDS, "czsec", each_log_says("downloading consumer="),
                                user=lambda host: (f"castra-{host}", PASSWORDS[host]))


def test_hosts_with_their_own_permissions_share_messages(hosts, guarded_cluster):
    """Each host may publish under its own subjects only, and that is enough: a's
    messages reach b and b's reach a; status shows each as the other's remote host;
    a VM connected to a then b is owned by one, then the other."""
    with connect_bus(hosts["a"].port, "sec-vm"):
        wait_for(lambda: "VM claimed vm=sec-vm" in hosts["a"].log_text(), timeout=15, what="a's claim")
        with connect_bus(hosts["b"].port, "sec-vm"):
            wait_for(lambda: "owned by a" in hosts["b"].log_text(), timeout=15, what="b waiting")
    wait_for(lambda: "VM released vm=sec-vm" in hosts["b"].log_text() + hosts["a"].log_text(), timeout=15,
             what="a release")
    a_seqs = host_publish(hosts["a"], "from-a", 5)
    b_seqs = host_publish(hosts["b"], "from-b", 5)
    for here, there, seqs in (("b", "a", a_seqs), ("a", "b", b_seqs)):
        def arrived(here=here, there=there):
            return [line["origin"]["seq"] for line in hosts[here].read_log()
                    if line.get("origin", {}).get("host") == there]
        wait_for(lambda arrived=arrived, seqs=seqs: arrived() == seqs, timeout=15,
                 what=f"{there}'s messages in {here}'s bus.log")
        # Caught up: the other host's last message seen, and (a health tick later, at
        # most) the lines it added passed over by this host's upload.
        status = wait_for(lambda here=here, seqs=seqs: (status := collect_status(hosts[here].state_root).uplink)
                          and [seen.last_seq for seen in status.remote_hosts] == seqs[-1:]
                          and status.upload_lag_messages == 0 and status,
                          what=f"{here}'s status showing {there}'s last message, nothing left to upload")
        assert [seen.host for seen in status.remote_hosts] == [there]
        assert (status.state, status.download_pending) == ("connected", 0)
    text = (hosts["a"].log_text() + hosts["b"].log_text()).lower()
    assert "uplink" in text and "permission" not in text  # the uplink needs no more than uplink_permissions


def test_a_host_cannot_write_under_another_hosts_subjects(hosts, guarded_cluster):
    """What castra does not do, the server refuses: a's user publishing as b, or
    deleting the stream."""

    async def as_host_a():
        errors: list[str] = []

        async def record(error):
            errors.append(str(error))

        connection = await nats.connect(servers=guarded_cluster.urls, user="castra-a", password=PASSWORDS["a"],
                                        connect_timeout=2, max_reconnect_attempts=3, error_cb=record)
        try:
            js = connection.jetstream(timeout=1)
            # Refused: the server drops it (no ack comes) and says why in an -ERR.
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish("castra.v1.b.forged", b"{}", timeout=1)
            with pytest.raises(nats.errors.TimeoutError):
                await js.delete_stream(STREAM_NAME)
            await connection.flush()
            return errors
        finally:
            await connection.close()

    errors = asyncio.run(asyncio.wait_for(as_host_a(), 15))
    assert 'nats: permissions violation for publish to "castra.v1.b.forged"' in errors
    assert query(guarded_cluster, lambda js: js.stream_info(STREAM_NAME)).config.name == STREAM_NAME


def test_wrong_password_logged_local_bus_keeps_working(guarded_cluster, router_factory, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    router = router_factory("--uplink", guarded_cluster.uplink_option, "--host-name", "a",
                            "--uplink-user", "castra-a")
    monkeypatch.delenv(PASSWORD_ENV)
    with connect_bus(router.port, "alpha") as alpha:
        for n in range(5):
            assert alpha.publish({"n": n})["status"] == "ok"
    wait_for(lambda: "NATS refused the uplink's credentials; retrying" in router.log_text(), timeout=10,
             what="the refusal in the log")
    line = next(line for line in router.log_text().splitlines() if "refused the uplink's credentials" in line)
    assert "ERROR" in line and "user=castra-a" in line and "Authorization" in line
    status = wait_for(lambda: (status := collect_status(router.state_root).uplink)
                      and status.upload_lag_messages == 5 and status, what="status with 5 not uploaded")
    assert status.state == "disconnected" and "Authorization" in status.reason


# -- castra up refuses bad credential and TLS options, before starting anything ----------


def castra_up(state_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_castra(["up", "--state-root", str(state_root), "--port", "0", *args],
                      env={**{k: v for k, v in os.environ.items() if k != PASSWORD_ENV}, **(env or {})})


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--uplink-user", "castra-a"], {}, f"--uplink-user castra-a needs its password in {PASSWORD_ENV}"),
    ([], {PASSWORD_ENV: "x"}, f"{PASSWORD_ENV} is set but --uplink-user is not"),
    (["--uplink-creds", "{dir}/nowhere.creds"], {}, "--uplink-creds {dir}/nowhere.creds: No such file or directory"),
    (["--uplink-creds", "{dir}/junk"], {}, "--uplink-creds {dir}/junk: neither a NATS .creds file"),
    (["--uplink-creds", "{dir}/junk", "--uplink-user", "u"], {PASSWORD_ENV: "x"},
     "--uplink-creds and --uplink-user exclude each other"),
    (["--uplink-tls-cert", "{dir}/junk"], {}, "--uplink-tls-cert and --uplink-tls-key go together"),
    (["--uplink-tls-ca", "{dir}/junk"], {}, "--uplink-tls-ca {dir}/junk: no PEM certificate in it"),
])
def test_castra_up_refuses_bad_uplink_options(state_root, args, env, message):
    directory = state_root.parent
    (directory / "junk").write_text("not a credential\n")
    (directory / "junk").chmod(0o600)
    args = [arg.format(dir=directory) for arg in args]
    result = castra_up(state_root, "--uplink", "nats://127.0.0.1:4222", "--host-name", "a", *args, env=env)
    assert result.returncode == 1
    assert f"Error: {message.format(dir=directory)}" in result.stderr
    assert not (state_root / "run").exists()  # refused before the state root was touched


def test_uplink_options_without_uplink_refused(state_root):
    result = castra_up(state_root, "--uplink-user", "castra-a")
    assert result.returncode == 1 and "--uplink-user without --uplink" in result.stderr


def test_connect_options_pass_credentials_through(tmp_path):
    seed = tmp_path / "a.nk"
    seed.write_text("SUAB" + "C" * 54 + "\n")
    settings = Settings(state_root=str(tmp_path), uplink_servers=["nats://127.0.0.1:4222"], host_name="a",
                        uplink_user="castra-a")
    assert connect_options(settings, {PASSWORD_ENV: "pw"}) == {"user": "castra-a", "password": "pw"}
    settings.uplink_user, settings.uplink_creds = None, str(seed)
    try:
        assert connect_options(settings, {}) == {"nkeys_seed": str(seed)}
    except ConfigError as exc:  # the nkeys package is an extra
        assert "pip install 'nats-py[nkeys]'" in exc.reason


def test_a_hosts_own_credentials_let_it_tail_the_fleet(hosts):
    """``castra bus tail --fleet`` on a host reaches NATS as its router's uplink does
    (``run/router.json``, the password from the environment), and its ephemeral
    consumer needs no more than ``uplink_permissions``."""
    a_seqs = host_publish(hosts["a"], "tail-a", 2)
    b_seqs = host_publish(hosts["b"], "tail-b", 2)
    for there, topic, seqs in (("b", "tail-a", a_seqs), ("a", "tail-b", b_seqs)):
        def arrived(there=there, topic=topic):
            return [line["origin"]["seq"] for line in hosts[there].read_log() if line["topic"] == topic]
        wait_for(lambda arrived=arrived, seqs=seqs: arrived() == seqs, timeout=15, what=f"{topic} in the stream")
    done = run_castra(["bus", "tail", "--fleet", "--json", "--state-root", str(hosts["a"].state_root),
                       "--topic", "tail-*"], env=dict(os.environ, **{PASSWORD_ENV: PASSWORDS["a"]}))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted((line["host"], line["seq"]) for line in lines) == sorted(
        [("a", seq) for seq in a_seqs] + [("b", seq) for seq in b_seqs])
    refused = run_castra(["bus", "tail", "--fleet", "--state-root", str(hosts["a"].state_root)],
                         env=dict(os.environ, **{PASSWORD_ENV: "wrong"}))
    assert refused.returncode == 4 and "authorization violation" in refused.stderr.lower(), refused.stderr
