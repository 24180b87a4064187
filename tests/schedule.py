"""The order in which pytest-xdist hands out test files (``--dist loadfile``): the
longest first.

xdist hands out the files with the most tests first. Here the files of many tests
are quick (property tests, the fuzz corpus) and some of few tests are the longest
(real NATS clusters, memory floods): those were handed out last and ran alone at the
end of the suite, on one core of two, about 20 s of every interpreter's run.

The scheduler knows only the test ids, not what a test does; so the long files are
named here, with their seconds (summed ``call``, ``setup`` and ``teardown`` of
``pytest --durations=0`` in tox's py311 environment, four workers on two cores, at
71793e8). A file missing here goes after them, in xdist's order. A stale figure only
moves a file in the queue.
"""

from __future__ import annotations

from collections import OrderedDict

from xdist.scheduler import LoadFileScheduling

LONG_FILES = {
    "tests/federation/test_handover.py": 41,
    "tests/hostile/test_memory.py": 30,
    "tests/federation/test_uplink.py": 25,
    "tests/test_guest.py": 18,
    "tests/test_cli.py": 16,
    "tests/federation/test_jetstream.py": 14,
    "tests/faults/test_bridge_stalls.py": 14,
    "tests/hostile/test_guest_bounds.py": 11,
    "tests/federation/test_security.py": 11,
    "tests/federation/test_fleet_tail.py": 10,
    "tests/federation/test_ownership.py": 10,
    "tests/test_guest_resume.py": 10,
    "tests/federation/test_tls_nkeys.py": 9,  # with the test extra (nats-py[nkeys]), as tox installs it
    "tests/faults/test_roles.py": 9,
    "tests/test_router.py": 9,
    "tests/faults/test_queues.py": 8,
    "tests/test_host_resume.py": 7,
    "tests/hostile/test_state_root.py": 6,
    "tests/faults/test_kill_under_load.py": 6,
}


class LongestFirst(LoadFileScheduling):
    """``--dist loadfile`` with the files of ``LONG_FILES`` handed out first, longest
    first."""

    def schedule(self) -> None:
        if self.collection is None:
            # The first call fills the queue (files in xdist's order), then hands
            # out work from its front: which the queue below makes the longest file.
            self.workqueue = _LongestFirstQueue()
        super().schedule()


class _LongestFirstQueue(OrderedDict):
    """The work queue: its front (``popitem(last=False)``, all the scheduler takes) is
    the longest file left in ``LONG_FILES``, then the others in the order queued."""

    def popitem(self, last: bool = True):
        if last:
            return super().popitem(last=True)
        scope = max(self, key=lambda scope: LONG_FILES.get(scope, 0))  # the first of equals
        return scope, self.pop(scope)
