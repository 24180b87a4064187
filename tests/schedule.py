"""The order in which pytest-xdist hands out test files (``--dist loadfile``): the
longest first.

xdist hands out the files with the most tests first. Here the files of many tests
are quick (property tests, the fuzz corpus) and some of few tests are the longest
(real NATS clusters, memory floods): those were handed out last and ran alone at the
end of the suite, on one core of two, about 20 s of every interpreter's run.

The scheduler knows only the test ids, not what a test does; so the files are named
here, with their seconds (summed ``call``, ``setup`` and ``teardown`` of
``pytest --durations=0`` in tox's py311 environment, six workers on two cores, at
d325090). A file missing here goes after them, in xdist's order. A stale figure only
moves a file in the queue.
"""

from __future__ import annotations

from collections import OrderedDict

from xdist.scheduler import LoadFileScheduling

FILE_SECONDS = {
    "tests/hostile/test_memory.py": 40,
    "tests/federation/test_handover.py": 36,
    "tests/federation/test_uplink.py": 26,
    "tests/test_guest.py": 22,
    "tests/hostile/test_guest_bounds.py": 19,
    "tests/federation/test_jetstream.py": 16,
    "tests/test_cli.py": 16,
    "tests/faults/test_bridge_stalls.py": 15,
    "tests/test_guest_resume.py": 14,
    "tests/faults/test_roles.py": 13,
    "tests/federation/test_tls_nkeys.py": 12,  # with the test extra (nats-py[nkeys]), as tox installs it
    "tests/federation/test_ownership.py": 11,
    "tests/test_host_resume.py": 11,
    "tests/federation/test_security.py": 11,
    "tests/faults/test_queues.py": 11,
    "tests/test_router.py": 11,
    "tests/hostile/test_state_root.py": 10,
    "tests/federation/test_fleet_tail.py": 10,
    "tests/faults/test_kill_under_load.py": 8,
    "tests/federation/test_delivery.py": 7,
    "tests/test_resume.py": 7,
    "tests/hostile/test_status_records.py": 7,
    "tests/test_logs.py": 6,
    "tests/hostile/test_bad_input.py": 6,
    "tests/test_codec.py": 6,
    "tests/federation/test_creds.py": 5,  # with the test extra (nats-py[nkeys]), as tox installs it
    "tests/hostile/test_vm_logs.py": 5,
    "tests/test_buslog.py": 4,
    "tests/hostile/test_policy.py": 3,
    "tests/federation/test_subjects.py": 3,
    "tests/federation/test_ownership_records.py": 3,
    "tests/hostile/test_security.py": 3,
    "tests/test_wildcards.py": 2,
    "tests/hostile/test_message_size.py": 2,
    "tests/federation/test_remote_lines.py": 1,
    "tests/hostile/test_terminal.py": 1,
}


class LongestFirst(LoadFileScheduling):
    """``--dist loadfile`` with the files handed out longest first (by
    ``FILE_SECONDS``)."""

    def schedule(self) -> None:
        if self.collection is None:
            # The first call fills the queue (files in xdist's order), then hands
            # out work from its front: which the queue below makes the longest file.
            self.workqueue = _LongestFirstQueue()
        super().schedule()


class _LongestFirstQueue(OrderedDict):
    """The work queue: its front (``popitem(last=False)``, all the scheduler takes) is
    the longest file left by ``FILE_SECONDS``, then the others in the order queued."""

    def popitem(self, last: bool = True):
        if last:
            return super().popitem(last=True)
        scope = max(self, key=lambda scope: FILE_SECONDS.get(scope, 0))  # the first of equals
        return scope, self.pop(scope)
