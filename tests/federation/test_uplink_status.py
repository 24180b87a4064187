"""The uplink's part of ``castra status``, pure: how its health events fold into
the status table, what the view and the table text say, and that the JSON has no
``uplink`` key without one."""

from __future__ import annotations

import msgspec

from castra_zmq.cli.status import uplink_text
from castra_zmq.events import (
    REMOTE_HOSTS_MAX,
    EventKind,
    RemoteHost,
    UplinkEvent,
    decode_event,
    event_message,
)
from castra_zmq.statustable import StatusTable, apply_event, view
from castra_zmq.wire import json_encode

NOW = 1_796_000_000_000


def health(ts_ms: int = NOW, **fields) -> UplinkEvent:
    return UplinkEvent(ts_ms=ts_ms, **{"host": "a", "server": "127.0.0.1:4222", "committed_seq": 10,
                                       "uploaded_seq": 10, **fields})


def test_event_round_trip_on_the_bus():
    fields = {"host": "a", "server": None, "reason": "connection lost", "committed_seq": 7, "uploaded_seq": 3,
              "oldest_pending_ms": NOW, "remote_hosts": [RemoteHost("b", 1, 42, NOW)]}
    topic, body = event_message(EventKind.UPLINK, **fields)
    assert topic == b"evt\x00uplink\x00"
    event = decode_event(body)
    assert isinstance(event, UplinkEvent) and event.remote_hosts == [RemoteHost("b", 1, 42, NOW)]


def test_connected_caught_up_then_disconnected_behind_then_down():
    table = StatusTable()
    assert msgspec.json.decode(json_encode(view(table, NOW))).keys() == {"vms", "router", "journal",
                                                                         "refused_handshakes"}
    apply_event(table, health(downloaded_stream_seq=99, download_pending=0))
    shown = view(table, NOW + 100).uplink
    assert (shown.state, shown.server, shown.upload_lag_messages, shown.upload_lag_ms) == (
        "connected", "127.0.0.1:4222", 0, 0)
    apply_event(table, health(NOW + 1000, server=None, reason="connection lost", committed_seq=25,
                              oldest_pending_ms=NOW + 200))
    shown = view(table, NOW + 1500).uplink
    assert (shown.state, shown.server, shown.reason, shown.upload_lag_messages, shown.upload_lag_ms) == (
        "disconnected", None, "connection lost", 15, 1300)
    assert view(table, NOW + 1000 + table.stale_after_ms + 1).uplink.state == "down"  # no word from the uplink


def test_remote_hosts_kept_across_uplink_restarts_newest_first_bounded():
    table = StatusTable()
    apply_event(table, health(remote_hosts=[RemoteHost("b", 1, 5, NOW), RemoteHost("c", 1, 9, NOW)]))
    apply_event(table, health(NOW + 10, remote_hosts=[RemoteHost("b", 1, 6, NOW + 10)]))  # a restarted uplink
    apply_event(table, health(NOW + 20))
    shown = view(table, NOW + 30).uplink.remote_hosts
    assert [(seen.host, seen.last_seq, seen.last_seen_age_ms) for seen in shown] == [("b", 6, 20), ("c", 9, 30)]
    many = [RemoteHost(f"h{n}", 1, n, NOW + n) for n in range(REMOTE_HOSTS_MAX + 5)]
    apply_event(table, health(NOW + 100, remote_hosts=many))
    assert len(table.uplink.remote_hosts) == REMOTE_HOSTS_MAX and table.uplink.remote_hosts[0].host == f"h{len(many) - 1}"


def test_table_text():
    table = StatusTable()
    apply_event(table, health(server=None, reason="nats: 'Authorization Violation'", committed_seq=12,
                              uploaded_seq=2, oldest_pending_ms=NOW - 3000, downloaded_stream_seq=40,
                              download_pending=3, remote_hosts=[RemoteHost("b", 1, 57, NOW - 800)]))
    assert uplink_text(view(table, NOW).uplink) == (
        "uplink a: disconnected (nats: 'Authorization Violation'); upload lag 10 messages, oldest 3.0s; "
        "download at stream seq 40, 3 pending\n"
        "remote hosts: b (seq 57, 800ms ago)")
