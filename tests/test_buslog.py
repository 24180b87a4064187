"""The storage engine (``castra_zmq.buslog``) in-process: no sockets, no router.

Real files under ``tmp_path``; faults (ENOSPC, EIO, torn writes, a process killed
between two steps) are injected through the engine's ``Disk`` or by stopping
after a step, and recovery is checked byte for byte against a run without them.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castra_zmq import buslog
from castra_zmq.buslog import BusLog, KnownVms, VmLogs, encode_lines, read_checkpoint
from castra_zmq.errors import LogWriteFailed
from castra_zmq.logfiles import Disk
from castra_zmq.wire import decode_log_record, json_encode

FAST = settings(max_examples=60, deadline=None)
TS_MS = 1_796_149_291_016


class ProcessKilled(BaseException):
    """The process dies here: nothing after this point runs, no cleanup either."""


class FaultyDisk(Disk):
    """The real disk, except for the calls set up with ``fail``."""

    def __init__(self):
        self.faults: dict[str, tuple[BaseException, int, int]] = {}

    def fail(self, call: str, error: int | BaseException, torn: int = 0, after: int = 0) -> None:
        """The ``call`` after the next ``after`` ones raises ``error`` (an errno or
        an exception), once; a failing ``write`` first writes ``torn`` bytes of its
        data, as a disk filling up does."""
        exc = OSError(error, os.strerror(error)) if isinstance(error, int) else error
        self.faults[call] = (exc, torn, after)

    def _fault(self, call: str) -> tuple[BaseException, int] | None:
        fault = self.faults.get(call)
        if fault is None:
            return None
        exc, torn, after = fault
        if after:
            self.faults[call] = (exc, torn, after - 1)
            return None
        del self.faults[call]
        return exc, torn

    def write(self, fd, data):
        fault = self._fault("write")
        if fault is None:
            return super().write(fd, data)
        exc, torn = fault
        if torn:
            os.write(fd, bytes(data[:torn]))
        raise exc

    def fdatasync(self, fd):
        """Syncs nothing (fast): the only crash these tests make is a process's,
        which the page cache survives."""
        fault = self._fault("fdatasync")
        if fault is not None:
            raise fault[0]

    def ftruncate(self, fd, size):
        fault = self._fault("ftruncate")
        if fault is not None:
            raise fault[0]
        super().ftruncate(fd, size)


def message(vm: str, topic: str, payload=None) -> tuple[str, str, msgspec.Raw]:
    return vm, topic, msgspec.Raw(json_encode(payload))


def seqs(path: Path) -> list[int]:
    return [decode_log_record(line).seq for line in path.read_bytes().splitlines()]


def vm_logs_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.log")) if path.name != "bus.log"}


def vm_logs(root: Path, known=("alpha", "beta"), vm_logs_max: int = 100, **options) -> VmLogs:
    return VmLogs(root / "logs" / "bus.log", root / "journal.json", sync=False,
                  known=KnownVms(frozenset(known), 100), vm_logs_max=vm_logs_max, lag_max=64, **options)


def bus_log(root: Path, **options) -> BusLog:
    options.setdefault("sync", False)
    return BusLog(root / "logs" / "bus.log", **options)


# -- lines ------------------------------------------------------------------------------

def test_a_line_is_the_protocols_log_record_byte_for_byte():
    """PROTOCOL.md 7.2's example: keys in order, compact, the payload as sent."""
    [line] = encode_lines(TS_MS, 15, [("alpha", "vm:beta", msgspec.Raw(b'{"k": "v" , "n":[1, 2]}'))])
    assert line == (b'{"timestamp":1796149291.016,"ts_ms":1796149291016,"seq":15,"vm":"alpha",'
                    b'"topic":"vm:beta","payload":{"k": "v" , "n":[1, 2]}}\n')


# -- bus.log ----------------------------------------------------------------------------


def test_commits_get_consecutive_seqs_that_go_on_after_reopening(tmp_path):
    log = bus_log(tmp_path, sync=True)
    first = log.commit(TS_MS, [message("alpha", "t", n) for n in range(3)])
    second = log.commit(TS_MS + 1, [message("host", "vm:alpha", "x")])
    assert (first.first_seq, second.first_seq, log.seq) == (1, 4, 4)
    assert log.path.read_bytes() == b"".join(first.lines + second.lines)
    log.close()
    again = bus_log(tmp_path)
    assert again.seq == 4
    assert again.commit(TS_MS, [message("alpha", "t")]).first_seq == 5
    assert seqs(again.path) == [1, 2, 3, 4, 5]


def test_reopening_cuts_a_torn_last_line_and_goes_on_from_the_last_whole_one(tmp_path):
    log = bus_log(tmp_path)
    log.commit(TS_MS, [message("alpha", "t", 1), message("alpha", "t", 2)])
    log.close()
    whole = log.path.read_bytes()
    with open(log.path, "ab") as file:  # a process killed mid-write
        file.write(b'{"timestamp":1796149291.016,"ts_ms":1796149291016,"seq":3,"vm":"al')
    again = bus_log(tmp_path)
    assert again.seq == 2
    batch = again.commit(TS_MS, [message("alpha", "t", 3)])
    assert batch.first_seq == 3
    assert again.path.read_bytes() == whole + batch.lines[0]


def test_a_new_bus_log_goes_on_from_the_seq_floor(tmp_path):
    """After a rotation the new bus.log has no line: the checkpoint says where seq is."""
    log = bus_log(tmp_path, seq_floor=41)
    assert log.commit(TS_MS, [message("alpha", "t")]).first_seq == 42


@pytest.mark.parametrize(("call", "error", "torn"), [
    ("write", errno.ENOSPC, 0),
    ("write", errno.ENOSPC, 70),  # the disk filled up in the middle of a line
    ("write", errno.EIO, 0),
    ("fdatasync", errno.EIO, 0),
])
def test_a_failed_commit_is_cut_back_whole_and_the_next_one_works(tmp_path, call, error, torn):
    disk = FaultyDisk()
    log = bus_log(tmp_path, sync=True, disk=disk)
    log.commit(TS_MS, [message("alpha", "t", 1)])
    before = log.path.read_bytes()
    disk.fail(call, error, torn)
    with pytest.raises(LogWriteFailed) as failed:
        log.commit(TS_MS, [message("alpha", "t", n) for n in range(2, 5)])
    assert failed.value.reason == f"log_write_failed: {os.strerror(error)}"
    assert log.path.read_bytes() == before and log.seq == 1
    assert log.commit(TS_MS, [message("alpha", "t", 5)]).first_seq == 2
    assert seqs(log.path) == [1, 2]


def test_a_commit_that_cannot_be_cut_back_never_gives_its_seqs_again(tmp_path):
    """fdatasync and then ftruncate fail: the lines stay; the file is let go, and
    reopening goes on after them (their publishes got an error, not an ack)."""
    disk = FaultyDisk()
    log = bus_log(tmp_path, sync=True, disk=disk)
    disk.fail("fdatasync", errno.EIO)
    disk.fail("ftruncate", errno.EIO)
    with pytest.raises(LogWriteFailed):
        log.commit(TS_MS, [message("alpha", "t", 1), message("alpha", "t", 2)])
    assert log.file is None
    assert log.commit(TS_MS, [message("alpha", "t", 3)]).first_seq == 3
    assert seqs(log.path) == [1, 2, 3]


def test_a_process_killed_between_write_and_fdatasync_leaves_whole_lines(tmp_path):
    disk = FaultyDisk()
    log = bus_log(tmp_path, sync=True, disk=disk)
    log.commit(TS_MS, [message("alpha", "t", 1)])
    disk.fail("fdatasync", ProcessKilled())
    with pytest.raises(ProcessKilled):
        log.commit(TS_MS, [message("alpha", "t", 2), message("alpha", "t", 3)])
    # Never acked, but in the page cache: the restarted process goes on after them.
    assert bus_log(tmp_path).commit(TS_MS, [message("alpha", "t", 4)]).first_seq == 4
    assert seqs(log.path) == [1, 2, 3, 4]


def test_a_payload_with_a_newline_is_refused_before_anything_is_written(tmp_path):
    log = bus_log(tmp_path)
    with pytest.raises(ValueError, match="newline"):
        log.commit(TS_MS, [("alpha", "t", msgspec.Raw(b'{"a":\n1}'))])
    assert log.seq == 0 and log.path.read_bytes() == b""


def test_rotation_by_rename_starts_a_new_file_and_loses_no_line(tmp_path):
    log = bus_log(tmp_path)
    written = [log.commit(TS_MS, [message("alpha", "t", n)]) for n in range(3)]
    rotated = log.path.with_name("bus.log.1")
    log.path.rename(rotated)
    assert log.follow_rotation() is True
    assert log.follow_rotation() is False  # nothing open until the next commit
    written.append(log.commit(TS_MS, [message("alpha", "t", 3), message("alpha", "t", 4)]))
    assert seqs(rotated) == [1, 2, 3] and seqs(log.path) == [4, 5]
    assert rotated.read_bytes() + log.path.read_bytes() == b"".join(line for b in written for line in b.lines)


def test_commits_go_into_a_moved_bus_log_until_rotation_is_followed(tmp_path):
    """So a reader following the path (``castra bus tail``) reads the old file to
    its end before the new one starts."""
    log = bus_log(tmp_path)
    log.commit(TS_MS, [message("alpha", "t", 1)])
    rotated = log.path.with_name("bus.log.1")
    log.path.rename(rotated)
    log.path.touch(mode=0o600)  # logrotate's `create`
    log.commit(TS_MS, [message("alpha", "t", 2)])
    assert log.follow_rotation() is True
    log.commit(TS_MS, [message("alpha", "t", 3)])
    assert seqs(rotated) == [1, 2] and seqs(log.path) == [3]


@FAST
@given(st.lists(st.tuples(st.integers(1, 4), st.sampled_from([None, "write", "torn", "fdatasync"])), max_size=12))
def test_whatever_fails_bus_log_holds_exactly_the_commits_that_returned(commits):
    with tempfile.TemporaryDirectory() as directory:
        disk = FaultyDisk()
        log = bus_log(Path(directory), sync=True, disk=disk)
        expected = b""
        for count, fault in commits:
            if fault is not None:
                disk.fail("write" if fault == "torn" else fault, errno.ENOSPC, torn=25 if fault == "torn" else 0)
            try:
                batch = log.commit(TS_MS, [message("alpha", "t", n) for n in range(count)])
            except LogWriteFailed:
                assert fault is not None
                continue
            assert fault is None
            expected += b"".join(batch.lines)
        log.close()  # each example's: a run of them took about 60 of the worker's descriptors
        assert (log.path.read_bytes() if log.path.exists() else b"") == expected
        assert seqs(log.path) == list(range(1, log.seq + 1)) if expected else log.seq == 0


# -- per-VM logs ------------------------------------------------------------------------


def commit_both(log: BusLog, vms: VmLogs, messages) -> None:
    """What the journal does: bus.log first, then the same lines in the per-VM logs."""
    batch = log.commit(TS_MS, messages)
    vms.append(batch.first_seq, messages, batch.lines)


def test_each_line_goes_to_its_senders_and_targets_log_byte_for_byte(tmp_path):
    log, vms = bus_log(tmp_path), vm_logs(tmp_path)
    commit_both(log, vms, [message("alpha", "vm:beta", 1), message("beta", "broadcast", 2),
                           message("alpha", "vm:ghost", 3), message("host", "vm:alpha", 4),
                           message("alpha", "vm:alpha", 5), message("host", "vm:", 6)])
    lines = log.path.read_bytes().splitlines(keepends=True)
    assert vm_logs_of(log.path.parent) == {
        "alpha.log": lines[0] + lines[2] + lines[3] + lines[4],
        "beta.log": lines[0] + lines[1],
        "host.log": lines[3] + lines[5],
    }  # ghost connected nowhere and has no log
    assert vms.seq == 6


def test_a_vm_gets_the_lines_to_it_from_its_first_publish_on_in_the_same_commit(tmp_path):
    """Found by the crash test below: lines to ghost after its first publish, in the
    commit of that publish, went nowhere live (the commit's route to vm:ghost was
    looked up before ghost had a log) but to ghost.log in a rebuild."""
    log, vms = bus_log(tmp_path), vm_logs(tmp_path)
    commit_both(log, vms, [message("alpha", "t", 0)])  # the first append files from bus.log (rebuild)
    commit_both(log, vms, [message("alpha", "vm:ghost", 1), message("ghost", "broadcast", 2),
                           message("alpha", "vm:ghost", 3)])
    lines = log.path.read_bytes().splitlines(keepends=True)
    assert vm_logs_of(log.path.parent)["ghost.log"] == lines[2] + lines[3]


def rebuilt_after_crash(directory: Path, commits, vm_appends: int, torn: bool, checkpoint_at: int | None):
    """Commit everything to bus.log but only the first ``vm_appends`` commits to
    the per-VM logs: the process dies there, ``torn`` in the middle of the next
    one's first line. Optionally an OS crash takes what the per-VM logs got after
    the checkpoint. Then reopen and rebuild; returns the per-VM logs."""
    log, vms = bus_log(directory), vm_logs(directory)
    try:
        synced: dict[str, bytes] | None = None
        for index, messages in enumerate(commits):
            if index == checkpoint_at:
                vms.checkpoint_now()
                synced = vm_logs_of(log.path.parent)
            batch = log.commit(TS_MS, messages)
            if index < vm_appends:
                vms.append(batch.first_seq, messages, batch.lines)
            elif index == vm_appends and torn and messages[0][0] != "ghost":  # ghost has no log to tear
                with open(log.path.parent / f"{messages[0][0]}.log", "ab") as file:
                    file.write(batch.lines[0][:30])
        if synced is not None:  # the OS crash: unsynced per-VM lines never reached the disk
            for path in log.path.parent.glob("*.log"):
                if path.name != "bus.log":
                    path.write_bytes(synced.get(path.name, b""))
        again = vm_logs(directory)
        again.rebuild()
        again.close()
        return vm_logs_of(log.path.parent)
    finally:
        # What the kernel does for a process that died: its descriptors closed (after
        # the result is read, so nothing the close writes is in it). Left open, the
        # examples of one run took about 400 of the test worker's descriptors.
        log.close()
        vms.close()


senders = st.sampled_from(["alpha", "beta", "host", "ghost"])
topics = st.sampled_from(["broadcast", "vm:alpha", "vm:beta", "vm:ghost", "vm:host", "vm:"])
commit_lists = st.lists(st.lists(st.tuples(senders, topics), min_size=1, max_size=4), min_size=1, max_size=8)


@FAST
@given(commit_lists, st.data())
def test_per_vm_logs_are_rebuilt_exactly_after_a_crash_at_any_point(commits, data):
    commits = [[message(vm, topic, n) for n, (vm, topic) in enumerate(messages)] for messages in commits]
    vm_appends = data.draw(st.integers(0, len(commits)), "per-VM appends before the crash")
    checkpoint_at = data.draw(st.none() | st.integers(0, vm_appends), "checkpoint before commit")
    torn = data.draw(st.booleans(), "torn per-VM line")
    with tempfile.TemporaryDirectory() as reference, tempfile.TemporaryDirectory() as crashed:
        expected = rebuilt_after_crash(Path(reference), commits, len(commits), False, None)
        assert rebuilt_after_crash(Path(crashed), commits, vm_appends, torn, checkpoint_at) == expected


def test_a_gap_in_the_seqs_is_filled_from_bus_log(tmp_path):
    """A commit the per-VM logs never got (a lost batch): the next append fills it."""
    log, vms = bus_log(tmp_path), vm_logs(tmp_path)
    commit_both(log, vms, [message("alpha", "t", 1)])
    log.commit(TS_MS, [message("alpha", "t", 2), message("beta", "vm:alpha", 3)])
    commit_both(log, vms, [message("alpha", "t", 4)])
    commit_both(log, vms, [message("alpha", "t", 5)])
    lines = log.path.read_bytes().splitlines(keepends=True)
    assert vm_logs_of(tmp_path / "logs") == {"alpha.log": b"".join(lines), "beta.log": lines[2]}
    assert vms.seq == 5


def test_lines_already_filed_are_skipped(tmp_path):
    log, vms = bus_log(tmp_path), vm_logs(tmp_path)
    messages = [message("alpha", "t", 1)]
    batch = log.commit(TS_MS, messages)
    vms.append(batch.first_seq, messages, batch.lines)
    vms.append(batch.first_seq, messages, batch.lines)  # delivered twice
    assert (tmp_path / "logs" / "alpha.log").read_bytes() == batch.lines[0]


def test_a_failed_per_vm_write_cuts_every_file_back_and_the_next_one_fills_the_gap(tmp_path):
    disk = FaultyDisk()
    log, vms = bus_log(tmp_path), vm_logs(tmp_path, disk=disk)
    commit_both(log, vms, [message("alpha", "vm:beta", 1)])
    before = vm_logs_of(tmp_path / "logs")
    batch = log.commit(TS_MS, [message("alpha", "vm:beta", 2)])
    disk.fail("write", errno.ENOSPC, torn=10, after=1)  # alpha.log is written, then beta.log tears
    with pytest.raises(LogWriteFailed, match="No space left"):
        vms.append(batch.first_seq, [message("alpha", "vm:beta", 2)], batch.lines)
    assert vm_logs_of(tmp_path / "logs") == before and vms.seq == 1
    # bus.log keeps seq 2 (it was acked): the next append fills the gap from it first.
    commit_both(log, vms, [message("alpha", "vm:beta", 3)])
    lines = log.path.read_bytes()
    assert vm_logs_of(tmp_path / "logs") == {"alpha.log": lines, "beta.log": lines}


def test_a_symbolic_link_in_place_of_a_log_is_never_written_through(tmp_path):
    log, vms = bus_log(tmp_path), vm_logs(tmp_path)
    commit_both(log, vms, [message("host", "t", 0)])
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (tmp_path / "logs" / "beta.log").symlink_to(victim)
    batch = log.commit(TS_MS, [message("alpha", "vm:beta", 1)])
    with pytest.raises(LogWriteFailed, match="symbolic link refused"):
        vms.append(batch.first_seq, [message("alpha", "vm:beta", 1)], batch.lines)
    assert victim.read_bytes() == b"precious\n" and (tmp_path / "logs" / "alpha.log").read_bytes() == b""


def test_only_known_vms_get_a_log_and_no_more_than_vm_logs_max(tmp_path):
    log = bus_log(tmp_path)
    vms = vm_logs(tmp_path, known=("a", "b", "c"), vm_logs_max=3, rescan_interval=0)
    commit_both(log, vms, [message(vm, "t") for vm in ("host", "a", "b", "c", "stranger")])
    assert set(vm_logs_of(tmp_path / "logs")) == {"host.log", "a.log", "b.log"}
    assert vms.full
    (tmp_path / "logs" / "a.log").unlink()  # an operator prunes a log: its place is free
    vms.follow_rotation()
    commit_both(log, vms, [message("c", "t")])
    assert set(vm_logs_of(tmp_path / "logs")) == {"host.log", "b.log", "c.log"}


def test_a_commit_to_more_logs_than_stay_open_writes_every_one(tmp_path, monkeypatch):
    """The least recently used log is closed to open another, but never one the
    commit being filed has lines for: they are written after all are opened."""
    monkeypatch.setattr(buslog, "_MAX_OPEN_FILES", 2)
    log, vms = bus_log(tmp_path), vm_logs(tmp_path, known=("a", "b", "c", "d"))
    commit_both(log, vms, [message(vm, "t", vm) for vm in ("a", "b", "c", "d")])
    commit_both(log, vms, [message("a", "t", "again")])
    assert {name: seqs(tmp_path / "logs" / name) for name in vm_logs_of(tmp_path / "logs")} == {
        "a.log": [1, 5], "b.log": [2], "c.log": [3], "d.log": [4]}


def test_a_log_already_there_is_written_past_the_cap_and_for_a_vm_not_known(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "old.log").touch(mode=0o600)
    log, vms = bus_log(tmp_path), vm_logs(tmp_path, known=(), vm_logs_max=1)
    commit_both(log, vms, [message("host", "vm:old", 1), message("stranger", "t", 2)])
    assert set(vm_logs_of(tmp_path / "logs")) == {"old.log"} and vms.full


def test_the_checkpoint_records_how_far_the_per_vm_logs_are_synced(tmp_path):
    log, vms = bus_log(tmp_path), VmLogs(tmp_path / "logs" / "bus.log", tmp_path / "journal.json", sync=True,
                                         known=KnownVms(frozenset(), 1), vm_logs_max=10, lag_max=64)
    commit_both(log, vms, [message("host", "t", n) for n in range(3)])
    assert read_checkpoint(tmp_path / "journal.json") is None
    vms.checkpoint()  # in the background
    vms.close()  # waits for it, then writes the last one
    assert read_checkpoint(tmp_path / "journal.json") == 3
    assert oct((tmp_path / "journal.json").stat().st_mode & 0o777) == "0o600"
    again = vm_logs(tmp_path)
    assert again.synced_seq == again.seq == 3
    log.path.rename(tmp_path / "logs" / "bus.log.1")  # a rotated bus.log with no line yet
    assert bus_log(tmp_path, seq_floor=again.synced_seq).seq == 3


def test_rotated_per_vm_logs_start_new_files(tmp_path):
    log, vms = bus_log(tmp_path), vm_logs(tmp_path)
    commit_both(log, vms, [message("alpha", "t", 1)])
    (tmp_path / "logs" / "alpha.log").rename(tmp_path / "logs" / "alpha.log.1")
    vms.follow_rotation()
    commit_both(log, vms, [message("alpha", "t", 2)])
    assert seqs(tmp_path / "logs" / "alpha.log.1") == [1] and seqs(tmp_path / "logs" / "alpha.log") == [2]
