"""The status table stays small whatever guests do: refused names leave no record,
and records of VMs long gone are dropped. Pure table tests first, then a flood of
refused handshakes against a real router."""

from __future__ import annotations

import json
import secrets

from castra_zmq.events import EVENT_TYPES, Event, EventKind, SessionInfo, split_sessions
from castra_zmq.statustable import (
    IDLE_RECORD_TTL_MS,
    MAX_IDLE_RECORDS,
    StatusTable,
    VmRecord,
    apply_event,
    view,
)
from castra_zmq.wire import json_encode

from ..conftest import wait_for
from ..guest import Guest
from ..zygote import run_castra

NOW = 1_800_000_000_000


def event(kind: EventKind, ts_ms: int = NOW, **fields) -> Event:
    return EVENT_TYPES[kind](ts_ms=ts_ms, **fields)


def sync(table: StatusTable, *open_vms: str, ts_ms: int = NOW) -> None:
    """The bridge's periodic list of open sessions."""
    apply_event(table, event(EventKind.SESSIONS, ts_ms, sessions=[
        SessionInfo(vm, f"s-{vm}", "bus-v1", [], ts_ms) for vm in open_vms]))


# -- pure ------------------------------------------------------------------------------


def test_refused_and_unknown_names_make_no_record():
    table = StatusTable()
    for n in range(100):
        apply_event(table, event(EventKind.HANDSHAKE, vm=f"random{n}", outcome="error", reason="unknown vm"))
    apply_event(table, event(EventKind.HANDSHAKE, outcome="error", reason="expected hello"))
    for late in (event(EventKind.HEARTBEAT, vm="never-seen", session="s"),
                 event(EventKind.SUBSCRIBE, vm="never-seen", session="s", topics=["t"]),
                 event(EventKind.SESSION_CLOSE, vm="never-seen", session="s", reason="r"),
                 event(EventKind.BACKPRESSURE, vm="never-seen", session="s", action="disconnect", reason="r")):
        apply_event(table, late)
    apply_event(table, event(EventKind.PUBLISH, counts={"host": 3, "never-seen": 1}))
    assert table.vms == {} and table.refused_handshakes == 101


def test_a_refused_handshake_of_a_known_vm_keeps_only_its_reason():
    table = StatusTable()
    apply_event(table, event(EventKind.HANDSHAKE, vm="beta", outcome="ok", capabilities=[]))
    apply_event(table, event(EventKind.HANDSHAKE, NOW + 5, vm="beta", outcome="error", reason="invalid token"))
    record = table.vms["beta"]
    assert record.last_reason == "invalid token" and record.last_handshake_ms == NOW
    assert table.refused_handshakes == 1


def test_idle_records_are_capped_keeping_the_most_recently_seen_and_every_open_session():
    table = StatusTable()
    total = MAX_IDLE_RECORDS + 50
    for n in range(total):  # vm0 was seen first, vm<total-1> last
        apply_event(table, event(EventKind.HANDSHAKE, NOW - total + n, vm=f"vm{n}", outcome="ok", capabilities=[]))
    apply_event(table, event(EventKind.SESSION_OPEN, NOW - 2 * total, vm="old-but-open", session="s-old-but-open",
                             bus_protocol="bus-v1"))
    sync(table, "old-but-open", ts_ms=NOW)
    assert len(table.vms) == MAX_IDLE_RECORDS + 1
    assert "old-but-open" in table.vms and "vm49" not in table.vms and "vm50" in table.vms


def test_records_of_vms_not_seen_for_the_ttl_are_dropped():
    table = StatusTable()
    apply_event(table, event(EventKind.HANDSHAKE, NOW, vm="gone", outcome="ok", capabilities=[]))
    apply_event(table, event(EventKind.HANDSHAKE, NOW, vm="back", outcome="ok", capabilities=[]))
    apply_event(table, event(EventKind.SESSION_OPEN, NOW, vm="open", session="s-open", bus_protocol="bus-v1"))
    later = NOW + IDLE_RECORD_TTL_MS + 1
    apply_event(table, event(EventKind.HANDSHAKE, later, vm="back", outcome="ok", capabilities=[]))
    sync(table, "open", ts_ms=NOW + IDLE_RECORD_TTL_MS)
    assert set(table.vms) == {"gone", "back", "open"}  # not older than the TTL yet
    sync(table, "open", ts_ms=later)
    assert set(table.vms) == {"back", "open"}


def test_sessions_of_one_vm_make_one_record_open_while_any_is():
    table = StatusTable()
    for session, topics in (("s1", ["vm:alpha"]), ("s2", ["news", "vm:alpha"])):
        apply_event(table, event(EventKind.SESSION_OPEN, vm="alpha", session=session, bus_protocol="bus-v1"))
        apply_event(table, event(EventKind.SUBSCRIBE, vm="alpha", session=session, topics=topics))
    [record] = table.vms.values()
    assert (record.session, record.session_open, record.topics) == ("s1", True, ["news", "vm:alpha"])
    [row] = view(table, NOW).vms  # no bridge sync yet: not shown open
    assert (row.sessions, row.bus_subscribed) == (0, False)

    apply_event(table, event(EventKind.SESSION_CLOSE, vm="alpha", session="s1", reason="disconnect"))
    assert (record.session, record.session_open, record.topics) == ("s2", True, ["news", "vm:alpha"])
    apply_event(table, event(EventKind.SUBSCRIBE, vm="alpha", session="s1", topics=["late"]))  # closed: ignored
    assert record.topics == ["news", "vm:alpha"] and record.last_reason == "disconnect"

    # A sync lists each session; one VM's sessions may be split over its parts.
    infos = [SessionInfo("alpha", "s2", "bus-v1", ["news"], NOW), SessionInfo("alpha", "s3", "bus-v1", ["x"], NOW)]
    for info in infos:
        apply_event(table, event(EventKind.SESSIONS, NOW + 10, sessions=[info], sync_round=NOW + 10, sync_parts=2))
    assert list(record.sessions) == ["s2", "s3"] and record.topics == ["news", "x"]
    [row] = view(table, NOW + 20).vms
    assert (row.sessions, row.session, row.subscribed_topics, row.bus_subscribed) == (2, "s2", ["news", "x"], True)

    apply_event(table, event(EventKind.SESSIONS, NOW + 500, sync_round=NOW + 500, sync_parts=1,
                             sessions=[SessionInfo("alpha", "s3", "bus-v1", ["x"], NOW)]))
    assert (record.session, record.topics) == ("s3", ["x"])  # s2 was not listed: closed
    sync(table, ts_ms=NOW + 1000)
    assert not record.session_open and record.topics == [] and record.sessions == {}
    [row] = view(table, NOW + 1000).vms
    assert (row.sessions, row.session, row.bus_subscribed) == (0, None, False)


def test_sessions_stay_open_between_syncs_while_the_bridge_reports_its_health():
    """With thousands of guests the bridge syncs every few seconds, but its health
    event comes every tick: sessions are shown open until the bridge goes quiet."""
    table = StatusTable(stale_after_ms=2000)
    apply_event(table, event(EventKind.SESSION_OPEN, vm="alpha", session="s-alpha", bus_protocol="bus-v1"))
    sync(table, "alpha")
    for tick in range(1, 11):  # 5 s of health events, no sync
        apply_event(table, event(EventKind.JOURNAL, NOW + 500 * tick, outcome="ok", seq=0))
    assert view(table, NOW + 5000).vms[0].bus_subscribed
    assert not view(table, NOW + 7001).vms[0].bus_subscribed  # the bridge went quiet


def test_a_snapshot_of_an_older_router_is_mended_by_the_first_sync():
    old = VmRecord(name="old", session="s1", session_open=True, topics=["t"], last_handshake_ms=NOW)
    table = StatusTable(vms={"old": old}, bridge_seen_ms=NOW)
    assert view(table, NOW).vms[0].sessions == 1
    sync(table, ts_ms=NOW + 500)
    assert not table.vms["old"].session_open and table.vms["old"].last_reason == "session lost"


# -- real router -------------------------------------------------------------------------

MALFORMED_HELLOS = [b"hello\n", b"helo vm:x\n", b"hello vm:\xff\xfe\n", b"hello vm:host\n",
                    b"hello vm:" + b"n" * 600 + b"\n", b"hello vm:a\x1bb\n"]


def status_json(state_root) -> dict:
    result = run_castra(["status", "--json", "--state-root", str(state_root)])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_flood_of_refused_names_leaves_the_status_small(router_factory, tmp_path):
    identities = tmp_path / "identities"
    identities.write_text("alpha\n")
    router = router_factory("--identities", str(identities))
    refused = 0
    # A record each (a 16-character name, its quotes and fields) would be over 10 KB of status.json.
    for hello in [f"hello vm:{secrets.token_hex(8)} capabilities=bus-v1\n".encode() for _ in range(600)] \
            + MALFORMED_HELLOS:
        with Guest(router.port) as guest:
            guest.send_raw(hello)
            assert guest.read_line().startswith("error: ")
            refused += 1
    # Events reach the status role in order: once alpha shows, every refusal has.
    with Guest(router.port) as alpha:
        assert alpha.hello("alpha", capabilities=None) == "ok"
    snapshot = router.state_root / "state" / "status.json"
    wait_for(lambda: snapshot.exists() and b'"alpha"' in snapshot.read_bytes(), timeout=10,
             what="alpha in the snapshot")
    status = status_json(router.state_root)
    assert [vm["name"] for vm in status["vms"]] == ["alpha"]
    assert snapshot.stat().st_size < 2000
    assert status["refused_handshakes"] == refused


def test_a_session_sync_is_split_under_the_frame_limit_and_closes_only_when_complete():
    """20,000 sessions with 16 long topics each would be one event of hundreds of
    MB: the bridge sends it in parts, each under its byte budget, and status closes
    a session missing from a sync only once every part of that sync came."""
    long_topics = [f"t{n}-" + "\x1b" * 250 for n in range(16)]  # escaped 6x in JSON
    sessions = [SessionInfo(f"vm{n}", f"s-vm{n}", "bus-v1", long_topics, NOW) for n in range(300)]
    budget = 256 * 1024
    parts = split_sessions(sessions, budget)
    assert len(parts) > 1
    assert [info for part in parts for info in part] == sessions
    for part in parts:
        assert len(json_encode(event(EventKind.SESSIONS, sessions=part, sync_round=NOW, sync_parts=len(parts)))) <= budget
    assert split_sessions([], budget) == [[]]  # an empty sync still says "none open"

    table = StatusTable()
    sync(table, "gone", *(f"vm{n}" for n in range(300)), ts_ms=NOW - 500)
    later = NOW
    for number, part in enumerate(parts, 1):
        apply_event(table, event(EventKind.SESSIONS, later, sessions=part, sync_round=later, sync_parts=len(parts)))
        assert table.vms["gone"].session_open is (number < len(parts))
    assert all(table.vms[f"vm{n}"].session_open for n in range(300))

    # A sync whose first part was lost closes nothing; the next complete one does.
    apply_event(table, event(EventKind.SESSIONS, NOW + 500, sessions=[], sync_round=NOW + 500, sync_parts=2))
    assert table.vms["vm0"].session_open
    apply_event(table, event(EventKind.SESSIONS, NOW + 1000, sessions=[], sync_round=NOW + 1000, sync_parts=1))
    assert not table.vms["vm0"].session_open
