"""Resume for host tools: ``castra bus tail --since`` and ``client.follow`` give
every message after a seq (or a time), in seq order, exactly once, from bus.log and
its rotated copies, then live; a gap (copies compressed or deleted) is told.

Pure parts first (parsing --since, reading hand-made logs by seq), then real
routers: the CLI as a subprocess, the client in this process.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import json
import os
import queue
import threading
import time
from pathlib import Path

import msgspec
import pytest

from castra_zmq import client, tail
from castra_zmq.buslog import encode_lines
from castra_zmq.replay import Expired, segments

from .conftest import wait_for
from .guest import Guest
from .test_cli import castra

NOW_MS = 1_796_149_291_016
MINUTE = 60_000


# -- pure: --since ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ms"), [
    ("90s", 90_000), ("15m", 15 * MINUTE), ("2h", 120 * MINUTE), ("1d", 86_400_000), ("1h30m", 90 * MINUTE),
    ("0s", 0),
])
def test_parse_duration(text, ms):
    assert tail.parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "-1s", "1.5h", "1 h", "h1", "1h-", "١s"])
def test_parse_duration_refuses_what_is_not_one(text):
    with pytest.raises(ValueError, match="not a duration"):
        tail.parse_duration(text)


def test_parse_since_takes_a_seq_a_duration_or_an_iso_time():
    assert tail.parse_since("0", NOW_MS) == tail.Since(seq=0)
    assert tail.parse_since("1200", NOW_MS) == tail.Since(seq=1200)
    assert tail.parse_since("15m", NOW_MS) == tail.Since(ts_ms=NOW_MS - 15 * MINUTE)
    assert tail.parse_since("0s", NOW_MS) == tail.Since(ts_ms=NOW_MS)
    assert tail.parse_since("2026-12-01T09:30:00.250+01:00", NOW_MS) == tail.Since(ts_ms=1_796_113_800_250)
    assert tail.parse_since("2026-12-01T08:30:00.250Z", NOW_MS) == tail.Since(ts_ms=1_796_113_800_250)
    local = datetime.datetime(2026, 12, 1, 9, 30).astimezone()  # no offset: local time, as tail prints
    assert tail.parse_since("2026-12-01T09:30", NOW_MS) == tail.Since(ts_ms=int(local.timestamp()) * 1000)


@pytest.mark.parametrize("text", ["-1", "1.5", "seq 3", "yesterday", "12:00:00x", str(2**63)])
def test_parse_since_refuses_anything_else(text):
    with pytest.raises(ValueError):
        tail.parse_since(text, NOW_MS)


# -- pure: reading hand-made logs by seq ------------------------------------------------


def write_lines(path: Path, seqs, vm: str = "alpha", ts_ms=lambda seq: 1_000 * seq) -> None:
    """Log lines with ``seqs`` (not necessarily consecutive: a VM's log), appended."""
    with open(path, "ab") as file:
        file.writelines(line for seq in seqs for line in encode_lines(ts_ms(seq), seq, [(vm, "t", msgspec.Raw(b"%d" % seq))]))


def read_all(path: Path, after: int, on_gap=None, notes=None) -> list[int]:
    reader = tail.SeqFollower(path, after, (notes if notes is not None else []).append, on_gap)
    seqs = []
    try:
        while lines := reader.read():
            seqs += [json.loads(line)["seq"] for line in lines]
    finally:
        reader.close()
    return seqs


def test_seq_follower_reads_rotated_copies_then_the_log_from_any_seq(tmp_path):
    write_lines(tmp_path / "bus.log.2", range(1, 11))
    write_lines(tmp_path / "bus.log-20261201", range(11, 21))
    write_lines(tmp_path / "bus.log", range(21, 31))
    with open(tmp_path / "bus.log", "ab") as log:
        log.write(b'{"timestamp":31.0,"ts_ms":31000,"se')  # a line being written: not yet
    write_lines(tmp_path / "bus.log.log", [7, 15], vm="bus.log")  # a VM named bus.log: not a copy
    for after in (0, 1, 9, 10, 11, 20, 29, 30):
        assert read_all(tmp_path / "bus.log", after) == list(range(after + 1, 31)), after
    notes = []
    assert read_all(tmp_path / "bus.log", 45, notes=notes) == []  # beyond the log: nothing, and said
    assert "ends at seq 30, before seq 45" in notes[0]


def test_reading_from_a_seq_or_a_time_reads_little_of_a_large_log(tmp_path, monkeypatch):
    """Bisection, not a scan: the last lines of a 60,000-line log (~6 MB) cost
    some 50 reads, a few 4 KiB probes and the 64 KiB chunks that find the last
    whole line, whether found by seq or by time."""
    with open(tmp_path / "bus.log.1", "wb") as old:
        old.write(b"".join(encode_lines(1_000, 1, [("alpha", "t", msgspec.Raw(b"0"))] * 10)))
        old.write(b"not a log line: reading it would be noted\n" * 1000)
    for first in range(11, 60_011, 10_000):
        with open(tmp_path / "bus.log", "ab") as log:
            log.write(b"".join(encode_lines(first * 1_000, first, [("alpha", "t", msgspec.Raw(b"\"%s\"" % (b"x" * 40)))] * 10_000)))
    read = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: read.append(size) or real_pread(fd, size, offset))
    assert read_all(tmp_path / "bus.log", 60_005, on_gap=pytest.fail, notes=[]) == list(range(60_006, 60_011))
    assert sum(read) < 512 * 1024 and len(read) < 150, (len(read), sum(read))
    read.clear()
    assert tail.seq_at_time(tmp_path, "bus.log", 50_011_000) == 50_010
    assert sum(read) < 512 * 1024 and len(read) < 150, (len(read), sum(read))


def test_seq_follower_reads_a_deleted_log_to_its_end_once_the_writer_moved_on(tmp_path, monkeypatch):
    """``rm bus.log`` (or compression without delaycompress) while the writer still
    appends to it: what it appended before moving to a new file is read, through
    the descriptor, even when it lands just before the new file is seen."""
    log = tmp_path / "bus.log"
    write_lines(log, range(1, 6))
    writer = os.open(log, os.O_WRONLY | os.O_APPEND)
    reader = tail.SeqFollower(log, 0, pytest.fail)
    try:
        assert [json.loads(line)["seq"] for line in reader.read()] == [1, 2, 3, 4, 5]
        log.unlink()
        write_lines(log, [8, 9])  # the new file; 6 and 7 go to the old one just before the reader looks
        real_segments = tail.segments

        def late_writes(directory, name):  # the reader's first look for a newer file
            os.write(writer, b"".join(encode_lines(6_000, 6, [("alpha", "t", msgspec.Raw(b"6"))] * 2)))
            os.close(writer)
            monkeypatch.setattr(tail, "segments", real_segments)
            return real_segments(directory, name)

        monkeypatch.setattr(tail, "segments", late_writes)
        seen = []
        while lines := reader.read():
            seen += [json.loads(line)["seq"] for line in lines]
        assert seen == [6, 7, 8, 9]
    finally:
        reader.close()


def test_seq_follower_after_a_cut_back_gives_the_seqs_cut_off_again(tmp_path):
    """A commit whose fsync failed is cut back after readers may have seen it, and
    its seqs go to the next commit: those are given (again), with a note. A log
    truncated by hand to nothing goes on with higher seqs."""
    log = tmp_path / "bus.log"
    write_lines(log, range(1, 6))
    notes = []
    reader = tail.SeqFollower(log, 0, notes.append)
    try:
        assert [json.loads(line)["seq"] for line in reader.read()] == [1, 2, 3, 4, 5]
        with open(log, "r+b") as file:
            file.truncate(sum(len(line) + 1 for line in log.read_bytes().splitlines()[:3]))
        write_lines(log, [4, 5], ts_ms=lambda seq: 99_000)  # other messages under seqs 4 and 5
        assert [json.loads(line)["ts_ms"] for line in reader.read()] == [99_000, 99_000]
        assert "cut back below what was read of it (a failed commit?); reading on after seq 3" in notes[-1]
        # That commit cut back too, and one written again, shorter: its line is read.
        with open(log, "r+b") as file:
            file.truncate(sum(len(line) + 1 for line in log.read_bytes().splitlines()[:3]))
        write_lines(log, [4], ts_ms=lambda seq: 99_001)
        assert [json.loads(line)["ts_ms"] for line in reader.read()] == [99_001]
        os.truncate(log, 0)  # by hand
        write_lines(log, [6, 7])
        assert [json.loads(line)["seq"] for line in reader.read()] == [6, 7]
        assert "cut back" in notes[-1]
    finally:
        reader.close()


def test_seq_follower_tells_messages_rotated_away(tmp_path):
    write_lines(tmp_path / "bus.log.1", range(1, 11))
    write_lines(tmp_path / "bus.log", range(11, 21))
    (tmp_path / "bus.log.1").rename(tmp_path / "bus.log.1.gz")
    with pytest.raises(Expired) as gone:
        read_all(tmp_path / "bus.log", 3)
    assert (gone.value.since, gone.value.oldest) == (3, 11)
    gaps = []
    assert read_all(tmp_path / "bus.log", 3, on_gap=gaps.append) == list(range(11, 21))
    assert [(gap.since, gap.oldest) for gap in gaps] == [(3, 11)]
    assert read_all(tmp_path / "bus.log", 10) == list(range(11, 21))  # nothing after 10 is gone


def test_seq_follower_on_a_vm_log_reads_across_its_holes(tmp_path):
    """A VM's log holds only its messages: its seqs have holes, which are no gap."""
    write_lines(tmp_path / "bus.log", range(1, 31), vm="host")
    write_lines(tmp_path / "alpha.log.1", [3, 12])
    write_lines(tmp_path / "alpha.log", [25, 28])
    alpha = tmp_path / "alpha.log"
    assert read_all(alpha, 0, on_gap=pytest.fail) == [3, 12, 25, 28]
    assert read_all(alpha, 12, on_gap=pytest.fail) == [25, 28]
    assert read_all(alpha, 13, on_gap=pytest.fail) == [25, 28]
    assert read_all(alpha, 28, on_gap=pytest.fail) == []
    (tmp_path / "alpha.log.1").rename(tmp_path / "alpha.log.1.gz")  # now lines may be gone
    gaps = []
    assert read_all(alpha, 0, on_gap=gaps.append) == [25, 28]
    assert [(gap.since, gap.oldest) for gap in gaps] == [(0, 25)]


def test_seq_at_time_bisects_to_the_first_line_of_that_time(tmp_path):
    write_lines(tmp_path / "bus.log.1", range(1, 11))  # seq n committed at n seconds
    write_lines(tmp_path / "bus.log", range(11, 21))
    for second, after in ((0, 0), (1, 0), (5, 4), (10, 9), (10.5, 10), (11, 10), (20, 19), (21, 20)):
        assert tail.seq_at_time(tmp_path, "bus.log", int(second * 1000)) == after, second
    (tmp_path / "bus.log.1").unlink()
    assert tail.seq_at_time(tmp_path, "bus.log", 5_000) == 0  # the oldest line left is later
    assert tail.seq_at_time(tmp_path / "none", "bus.log", 5_000) == 0


# -- castra bus tail --since, on a real router --------------------------------------------


def publish(router, count: int, topic: str = "t", start: int = 0) -> list[int]:
    """``count`` host publishes, payload ``{"n": i}``; their seqs."""
    with client.Publisher(state_root=router.state_root) as publisher:
        results = publisher.publish_batch([(topic, {"n": n}) for n in range(start, start + count)])
    assert all(result.reason is None for result in results), results
    return [result.seq for result in results]


def tail_seqs(router, *args: str, status: int = 0) -> list[int]:
    result = castra("bus", "tail", "--state-root", str(router.state_root), "--json", *args)
    assert result.returncode == status, result
    return [json.loads(line)["seq"] for line in result.stdout.splitlines()]


def test_tail_since_seq_prints_exactly_the_messages_after_it(router):
    sent = publish(router, 12, "t") + publish(router, 8, "other")
    assert sent == list(range(1, 21))
    for since in (0, 1, 7, 12, 19, 20, 25):
        assert tail_seqs(router, "--since", str(since)) == sent[since:], since
    assert tail_seqs(router, "--since", "5", "--topic", "other") == list(range(13, 21))
    lines = castra("bus", "tail", "--state-root", str(router.state_root), "--since", "18", "--utc").stdout
    assert [line.split()[1:] for line in lines.splitlines()] == [
        ["host", "other", '{"n":6}'], ["host", "other", '{"n":7}']]
    assert lines.split()[0].endswith("+00:00")
    refused = castra("bus", "tail", "--state-root", str(router.state_root), "--since", "3", "-n", "5")
    assert refused.returncode == 2 and "use one of -n and --since" in refused.stderr
    refused = castra("bus", "tail", "--state-root", str(router.state_root), "--since", "3 days")
    assert refused.returncode == 2 and "is not a seq" in refused.stderr


def test_tail_since_a_duration_or_a_time(router):
    sent = publish(router, 5)
    assert tail_seqs(router, "--since", "1h") == sent
    assert tail_seqs(router, "--since", "0s") == []  # nothing was committed from now on
    later = publish(router, 2, start=5)
    committed = {record["seq"]: record["ts_ms"] for record in router.read_log()}
    for seq in (1, later[0]):  # from the time of seq's commit: seq and everything after it
        when = datetime.datetime.fromtimestamp(committed[seq] / 1000, datetime.timezone.utc)
        assert tail_seqs(router, "--since", when.isoformat(timespec="milliseconds")) == [
            each for each, ts_ms in committed.items() if ts_ms >= committed[seq]]


def test_tail_since_a_duration_on_a_log_of_hours(state_root):
    """Times far apart, on a log written by hand: only the lines of the last DURATION."""
    now = time.time_ns() // 1_000_000
    ages = {1: 180, 2: 90, 3: 30, 4: 1}  # seq -> minutes before now
    logs = state_root / "logs" / "bus"
    logs.mkdir(parents=True)
    write_lines(logs / "bus.log", ages, vm="host", ts_ms=lambda seq: now - ages[seq] * MINUTE)
    root = ("--state-root", str(state_root))
    for since, seqs in (("2h", [2, 3, 4]), ("45m", [3, 4]), ("1d", [1, 2, 3, 4]), ("30s", []), ("1h30m", [3, 4])):
        result = castra("bus", "tail", *root, "--json", "--since", since)
        assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == seqs, since


def rotate(router, rename: dict[str, str]) -> None:
    """Rename log files (logrotate's way), then publish until the bridge writes a new bus.log."""
    for old, new in rename.items():
        (router.logs / old).rename(router.logs / new)
    wait_for(lambda: publish(router, 1, "filler") and (router.logs / "bus.log").exists(),
             what="a new bus.log after the rename")


def test_tail_since_reads_rotated_copies_and_tells_what_is_gone(router):
    publish(router, 10)
    rotate(router, {"bus.log": "bus.log.1"})
    publish(router, 10, start=10)
    rotate(router, {"bus.log.1": "bus.log.2", "bus.log": "bus.log.1"})
    publish(router, 10, start=20)
    last = router.read_log()[-1]["seq"]
    assert len(segments(router.logs)) == 3
    assert tail_seqs(router, "--since", "3") == list(range(4, last + 1))
    assert tail_seqs(router, "--since", "3", "--topic", "t") == [
        seq for seq in range(4, last + 1) if seq_topic(router, seq) == "t"]

    # Compressed, then deleted: what is gone is said, the rest printed, status 3.
    oldest = segments(router.logs)[1][0]
    with open(router.logs / "bus.log.2", "rb") as plain, gzip.open(router.logs / "bus.log.2.gz", "wb") as packed:
        packed.write(plain.read())
    (router.logs / "bus.log.2").unlink()
    for _ in ("gzipped", "deleted"):
        result = castra("bus", "tail", "--state-root", str(router.state_root), "--json", "--since", "3")
        assert result.returncode == 3, result
        assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == list(range(oldest, last + 1))
        assert (f"messages after seq 3 are no longer all in the logs (rotated away): the oldest left is seq {oldest}"
                in result.stderr)
        (router.logs / "bus.log.2.gz").unlink(missing_ok=True)
    assert tail_seqs(router, "--since", str(oldest - 1)) == list(range(oldest, last + 1))  # no gap: status 0


def seq_topic(router, seq: int) -> str:
    for name in ("bus.log.2", "bus.log.1", "bus.log"):
        path = router.logs / name
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record["seq"] == seq:
                    return record["topic"]
    raise AssertionError(f"seq {seq} is in no log")


def test_tail_since_follow_after_the_backlog_through_a_rotation(router, follow):
    sent = publish(router, 6)
    following = follow(router.state_root, "--since", "2", "--json")
    seen = [following.next_record()["seq"] for _ in range(4)]
    assert seen == sent[2:]
    rotate(router, {"bus.log": "bus.log.1"})
    more = publish(router, 5, start=6)
    last = more[-1]
    while seen[-1] < last:
        seen.append(following.next_record()["seq"])
    assert seen == list(range(3, last + 1))  # the fillers included, each once
    assert following.stop() == 0


def test_tail_since_with_vm_reads_that_vms_log(router):
    with Guest(router.port) as alpha:  # a VM that connected gets a log
        assert alpha.hello("alpha", capabilities=None) == "ok"
    sent = {n: client.publish("vm:alpha" if n % 2 else "broadcast", {"n": n}, state_root=router.state_root)
            for n in range(10)}
    router.wait_filed()
    to_alpha = [seq for n, seq in sent.items() if n % 2]
    assert tail_seqs(router, "--vm", "alpha", "--since", "0") == to_alpha
    assert tail_seqs(router, "--vm", "alpha", "--since", str(to_alpha[2] - 1)) == to_alpha[2:]
    assert tail_seqs(router, "--vm", "alpha", "--since", "1h") == to_alpha


# -- client.follow ---------------------------------------------------------------------


class Following:
    """``client.follow`` on a thread; its messages through a queue. Stopped by a
    message on the topic ``stop`` (the generator is then closed)."""

    def __init__(self, state_root: Path, topic_names, since: int):
        self.queue: queue.Queue = queue.Queue()
        self.state_root = state_root
        self.thread = threading.Thread(target=self._run, args=(list(topic_names) + ["stop"], since), daemon=True)
        self.thread.start()

    def _run(self, topic_names, since) -> None:
        try:
            for message in client.follow(topic_names, since=since, state_root=self.state_root):
                if message.topic == "stop":
                    break
                self.queue.put(message)
        except Exception as exc:  # noqa: BLE001 - handed to the test, which raises it
            self.queue.put(exc)

    def take(self, count: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        taken = []
        while len(taken) < count:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{len(taken)} of {count} messages within {timeout}s") from None
            if isinstance(item, BaseException):
                raise item
            taken.append(item)
        return taken

    def stop(self) -> None:
        client.publish("stop", None, state_root=self.state_root)
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.queue.empty(), "a message came twice, or one not asked for"


def test_follow_gets_each_message_after_since_once_in_order_across_a_router_restart(router_factory, state_root):
    router = router_factory()
    before = publish(router, 5) + publish(router, 3, "other")
    following = Following(state_root, ["t"], since=2)
    got = following.take(3)
    assert [m.seq for m in got] == before[2:5]
    assert (got[0].topic, got[0].sender, bytes(got[0].payload)) == ("t", "host", b'{"n":2}')
    during = publish(router, 5, start=5)
    assert [m.seq for m in following.take(5)] == during

    router.kill_9()
    router = router_factory()
    after = publish(router, 5, start=10)
    assert after[0] == during[-1] + 1
    assert [m.seq for m in following.take(5)] == after
    following.stop()


def test_follow_reads_through_rotations_exactly_once(router):
    following = Following(router.state_root, ["t", "filler"], since=0)
    sent = publish(router, 20)
    for rotation in range(1, 4):
        rotate(router, {"bus.log": f"bus.log.{rotation}"})
        sent += publish(router, 20, start=20 * rotation)
    last = sent[-1]
    assert [m.seq for m in following.take(last)] == list(range(1, last + 1))
    following.stop()


def test_follow_raises_expired_for_messages_rotated_away(router):
    publish(router, 5)
    rotate(router, {"bus.log": "bus.log.1"})
    oldest = segments(router.logs)[1][0]
    (router.logs / "bus.log.1").unlink()
    with pytest.raises(client.Expired) as gone:
        next(client.follow(since=2, state_root=router.state_root))
    assert (gone.value.since, gone.value.oldest) == (2, oldest)
    resumed = client.follow(since=gone.value.oldest - 1, state_root=router.state_root)
    assert next(resumed).seq == oldest  # accepting the gap
    resumed.close()


def test_follow_async_does_not_block_the_loop(router):
    sent = publish(router, 3)

    async def main() -> tuple[list[int], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        messages = client.follow_async(["t"], since=1, state_root=router.state_root)
        def publish_later() -> None:
            time.sleep(0.3)  # while follow_async waits for it
            publish(router, 1, start=3)

        try:
            seqs = [(await asyncio.wait_for(anext(messages), 5)).seq for _ in range(2)]
            publisher = asyncio.get_running_loop().run_in_executor(None, publish_later)
            waited_from = ticks
            seqs.append((await asyncio.wait_for(anext(messages), 5)).seq)
            await publisher
            return seqs, ticks - waited_from
        finally:
            ticker.cancel()
            await messages.aclose()

    seqs, ticks_while_waiting = asyncio.run(main())
    assert seqs == [*sent[1:], sent[-1] + 1]
    assert ticks_while_waiting >= 5  # the loop ran (10 ms ticks) while follow_async waited 0.3 s


def test_follow_refuses_a_since_that_is_not_a_seq(state_root):
    for since in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="since is a seq"):
            next(client.follow(since=since, state_root=state_root))
    assert not os.path.exists(state_root)  # and created nothing
