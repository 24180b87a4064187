"""Clock jumps: ages are clamped at zero; deadlines use CLOCK_MONOTONIC.

Stepping the real clock would disturb every process on the machine, so the part
that reads the wall clock (status ages) is tested with timestamps from the future,
which is what a clock stepped backwards produces.
"""

from __future__ import annotations

from castra_zmq.events import now_ms
from castra_zmq.statustable import JournalHealth, StatusTable, VmRecord, view


def test_timestamps_from_the_future_give_zero_ages_not_negative_ones():
    now = now_ms()
    future = now + 3_600_000  # recorded before the clock was stepped back an hour
    table = StatusTable(
        vms={"alpha": VmRecord(name="alpha", last_handshake_ms=future, last_publish_ms=future,
                               last_heartbeat_ms=future, session="s", session_open=True)},
        journal=JournalHealth(state="ok", seen_ms=future),
        bridge_seen_ms=future,
    )
    [vm] = view(table, now).vms
    assert vm.last_handshake_age_ms == vm.last_publish_age_ms == vm.last_heartbeat_age_ms == 0
    assert vm.reachable and vm.bus_subscribed


def test_a_clock_stepped_forward_makes_records_stale_not_negative():
    now = now_ms()
    table = StatusTable(vms={"alpha": VmRecord(name="alpha", last_handshake_ms=now - 10_000)})
    [vm] = view(table, now + 3_600_000).vms
    assert vm.last_handshake_age_ms == 3_610_000 and not vm.reachable
