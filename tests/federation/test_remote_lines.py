"""Messages of other hosts, without sockets: their log lines, reading them by
prefix, the per-origin marks that keep each one committed once and their rebuild,
and what the download makes of a stream message."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from castra_zmq.buslog import BusLog, encode_lines
from castra_zmq.federation import (
    FederationError,
    RemoteMessage,
    consumer_config,
    consumer_name,
    message_subject,
    remote_message,
    upload_headers,
)
from castra_zmq.origins import OriginMarks, read_origin_checkpoint, rebuild
from castra_zmq.replay import ORIGIN_KEY, records_with
from castra_zmq.wire import Origin, PublishRequest, decode_log_record, json_encode

TS_MS = 1796149291016
RAW = msgspec.Raw


# -- log lines ---------------------------------------------------------------------------


def test_a_local_line_is_as_it_was_and_a_remote_one_ends_with_its_origin():
    local, remote = encode_lines(TS_MS, 15, [("alpha", "vm:beta", RAW(b'{"k": 1}'))] * 2,
                                 [None, Origin("a.example", 1796149200000, 7)])
    assert local == (b'{"timestamp":1796149291.016,"ts_ms":1796149291016,"seq":15,"vm":"alpha",'
                     b'"topic":"vm:beta","payload":{"k": 1}}\n')
    assert remote == (b'{"timestamp":1796149291.016,"ts_ms":1796149291016,"seq":16,"vm":"alpha",'
                      b'"topic":"vm:beta","payload":{"k": 1},'
                      b'"origin":{"host":"a.example","epoch":1796149200000,"seq":7}}\n')
    assert decode_log_record(remote).origin == Origin("a.example", 1796149200000, 7)
    assert decode_log_record(local).origin is None


def test_a_host_publish_without_origin_encodes_as_before():
    request = PublishRequest(corr=1, vm="host", topic="t", deadline=1.5, payload=RAW(b"null"))
    assert json_encode(request) == b'{"corr":1,"vm":"host","topic":"t","deadline":1.5,"payload":null}'


@pytest.mark.parametrize("payload", [
    b'{"x":{"y":1},"origin":{"host":"h","epoch":1,"seq":2}}',  # a payload that looks like an origin
    b'"},\\"origin\\":{\\"host\\":\\"h\\",\\"epoch\\":1,\\"seq\\":2}}"',
    b'[{"origin":{"host":"h","epoch":1,"seq":2}}]',
    b'{"k": 1}',
])
def test_reading_remote_lines_by_origin_key_finds_each_payload_and_origin(payload):
    lines = encode_lines(TS_MS, 3, [("alpha", "t", RAW(payload))] * 2, [None, Origin("b", 9, 4)])
    records, bad = records_with(b"".join(lines), (ORIGIN_KEY,))
    assert bad == [] and [bytes(record.payload) for record in records] == [payload] * len(records)
    assert records[-1].origin == Origin("b", 9, 4)
    assert all(record.origin is None for record in records[:-1])  # the local line, if its payload held the key


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12)
    | st.sampled_from(["origin", ',"origin":{"host":"h"', '"epoch":1,"seq":2}}']),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["origin", "host", "epoch", "seq", "k"]), children, max_size=4),
    max_leaves=12)


@given(json_values, st.booleans())
def test_a_remote_lines_payload_reads_back_exactly(value, remote):
    payload = json_encode(value)
    lines = encode_lines(TS_MS, 1, [("alpha", "t", RAW(payload))], [Origin("h", 1, 2) if remote else None])
    [record] = records_with(b"".join(lines), None)[0]
    assert bytes(record.payload) == payload and (record.origin is not None) == remote


# -- marks -------------------------------------------------------------------------------


def test_marks_keep_each_origin_once_and_in_order():
    marks = OriginMarks({"a": (5, 10)})
    keep, moved = marks.select([None, Origin("a", 5, 10), Origin("a", 5, 11), Origin("a", 5, 11),
                                Origin("a", 4, 99), Origin("b", 1, 1), Origin("a", 6, 1), None])
    assert keep == [True, False, True, False, False, True, True, True]
    assert moved == {"a": (6, 1), "b": (1, 1)}
    assert marks.marks == {"a": (5, 10)}  # until the commit is written
    marks.advance(moved)
    assert marks.select([Origin("a", 6, 1), Origin("b", 1, 2)]) == ([False, True], {"b": (1, 2)})


def remote(host: str, epoch: int, seq: int) -> tuple:
    return ("vm", "t", RAW(b"1")), Origin(host, epoch, seq)


def commit(log: BusLog, items: list) -> None:
    log.commit(TS_MS, [message for message, _ in items], [origin for _, origin in items])


def test_rebuild_reads_the_log_after_the_checkpoint_only(tmp_path):
    logs, checkpoint = tmp_path / "logs", tmp_path / "origins.json"
    logs.mkdir()
    log = BusLog(logs / "bus.log", sync=False)
    commit(log, [remote("a", 1, 1), (("host", "t", RAW(b"2")), None), remote("b", 3, 8)])
    marks, read = rebuild(checkpoint, logs, log.seq)
    assert (marks.marks, read) == ({"a": (1, 1), "b": (3, 8)}, 3)
    marks.save(checkpoint, log.seq, sync=False)
    assert read_origin_checkpoint(checkpoint).seq == 3
    commit(log, [remote("a", 1, 2), (("alpha", "t", RAW(b'{"origin":{"host":"z"}}')), None)])
    marks, read = rebuild(checkpoint, logs, log.seq)
    assert (marks.marks, read) == ({"a": (1, 2), "b": (3, 8)}, 2)  # only the two lines after seq 3


def test_rebuild_without_checkpoint_reads_rotated_copies_too(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    log = BusLog(logs / "bus.log", sync=False)
    commit(log, [remote("a", 1, 1)])
    log.close()
    (logs / "bus.log").rename(logs / "bus.log.1")
    log = BusLog(logs / "bus.log", sync=False, seq_floor=1)
    commit(log, [remote("b", 2, 2)])
    marks, read = rebuild(tmp_path / "none.json", logs, log.seq)
    assert (marks.marks, read) == ({"a": (1, 1), "b": (2, 2)}, 2)


# -- the download ------------------------------------------------------------------------


def stream_message(origin: Origin, topic: str = "vm:beta", line_origin: Origin | None = None):
    [line] = encode_lines(TS_MS, origin.seq, [("alpha", topic, RAW(b'{"n":1}'))], [line_origin])
    return message_subject(origin.host, topic), upload_headers(origin, 0), line[:-1]


def test_remote_message_is_what_the_origin_committed():
    origin = Origin("a", 17, 42)
    assert remote_message(*stream_message(origin)) == RemoteMessage(origin, "alpha", "vm:beta", RAW(b'{"n":1}'))


def test_remote_message_refuses_what_castra_did_not_make():
    origin = Origin("a", 17, 42)
    subject, headers, data = stream_message(origin)
    cases = [
        (subject, {}, data),  # no origin headers
        (message_subject("b", "vm:beta"), headers, data),  # another host's subject
        (message_subject("a", "vm:gamma"), headers, data),  # another topic
        (subject, upload_headers(Origin("a", 17, 43), 0), data),  # another seq than the line's
        (subject, headers, b"not json"),
        stream_message(origin, line_origin=Origin("c", 1, 1)),  # a line of c's, uploaded again by a
        (subject, {**headers, "Castra-Origin": "a b", "Nats-Msg-Id": "a b:17:42"}, data),  # not a host name
    ]
    for case in cases:
        with pytest.raises(FederationError):
            remote_message(*case)


def test_consumer_per_host_starts_at_its_epoch_then_after_its_ack_floor():
    assert consumer_name("a.example") == "castra-a%2Eexample"
    first = consumer_config("a", start_ms=1796149200500).as_dict()
    again = consumer_config("a", after_stream_seq=41).as_dict()
    assert (first["durable_name"], first["filter_subject"], first["ack_policy"].value) == ("castra-a", "castra.v1.>", "all")
    assert (first["deliver_policy"].value, first["opt_start_time"]) == ("by_start_time", "2026-12-01T18:20:00.500000Z")
    assert (again["deliver_policy"].value, again["opt_start_seq"]) == ("by_start_sequence", 42)
