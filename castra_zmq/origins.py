"""Messages from other hosts in ``bus.log``: each one committed once.

With ``--uplink``, the uplink hands the bridge the messages other hosts committed
(issue 14, delivery into each host), each with its ``Origin`` (host, epoch, seq).
The same message can come twice: JetStream delivers it again when the uplink died
between the local commit and its ack to NATS, and the stream can hold a second
copy (an origin's resend after the stream's duplicate window). The bridge, the
single writer of ``bus.log``, drops those in the commit itself, against
``OriginMarks``: per origin host, the highest (epoch, seq) the log holds. A
message at or below its host's mark is a duplicate. That is exact because each
host's messages are in the stream in (epoch, seq) order (the upload's order check;
a new epoch is always higher) and the uplink hands them over in stream order. The
marks move only once the commit is written (``select``, then ``advance``): a
commit cut back leaves them as they were.

When the bridge starts, ``rebuild`` finds the marks again: the checkpoint
(``state/origins.json``: the marks and the seq of ``bus.log`` they cover, written
on the bridge's health tick when the log moved on), then the lines after that seq
(found by bisecting, ``replay.Cursor``), of which only those holding an origin key
are decoded. So a start reads about one health interval of the log, not all of it;
without a checkpoint (the first start with an uplink, or the file lost) it reads
the whole of ``bus.log`` and its rotated copies.

No sockets: the bridge drives it.

Runs in: the bridge.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
from loguru import logger

from .replay import ORIGIN_KEY, READ_CHUNK, Cursor, Expired, records_with
from .statefs import read_regular, replace_file
from .wire import Origin, json_encode

Mark = tuple[int, int]  # (epoch, seq) of an origin host


class OriginCheckpoint(msgspec.Struct):
    """``state/origins.json``: every origin's mark in ``bus.log`` up to ``seq``."""

    seq: int
    marks: dict[str, Mark]


class OriginMarks:
    """Per origin host, the (epoch, seq) of the last of its messages in ``bus.log``."""

    def __init__(self, marks: dict[str, Mark] | None = None, saved_seq: int = 0):
        self.marks: dict[str, Mark] = marks or {}
        self.saved_seq = saved_seq  # the log seq the checkpoint on disk covers

    def select(self, origins: Sequence[Origin | None]) -> tuple[list[bool], dict[str, Mark]]:
        """Which messages of a commit to write: all local ones (None), and those
        from other hosts above their host's mark and above an earlier one of the
        same commit. Returns that, and the marks they move to once written."""
        keep: list[bool] = []
        moved: dict[str, Mark] = {}
        for origin in origins:
            if origin is None:
                keep.append(True)
                continue
            position = (origin.epoch, origin.seq)
            mark = moved.get(origin.host) or self.marks.get(origin.host)
            fresh = mark is None or position > mark
            keep.append(fresh)
            if fresh:
                moved[origin.host] = position
        return keep, moved

    def advance(self, moved: dict[str, Mark]) -> None:
        """The commit ``select`` was asked about is in the log: its marks hold."""
        self.marks.update(moved)

    def note(self, origin: Origin) -> None:
        """A line of the log holds ``origin`` (a rebuild, in seq order)."""
        position = (origin.epoch, origin.seq)
        if position > self.marks.get(origin.host, (-1, -1)):
            self.marks[origin.host] = position

    def save(self, path: Path, seq: int, sync: bool) -> None:
        """Write the checkpoint if the log moved on since the last one; ``seq``:
        the log's last, which the marks cover (a commit moves both at once)."""
        if seq != self.saved_seq:
            replace_file(path, json_encode(OriginCheckpoint(seq, self.marks)), sync=sync)
            self.saved_seq = seq


def read_origin_checkpoint(path: Path) -> OriginCheckpoint | None:
    try:
        return msgspec.json.decode(read_regular(path), type=OriginCheckpoint)
    except (OSError, msgspec.DecodeError):
        return None


def rebuild(checkpoint: Path, logs_dir: Path, last_seq: int) -> tuple[OriginMarks, int]:
    """The marks of ``bus.log`` up to ``last_seq`` (its last committed line): the
    checkpoint's, moved on by the lines after the seq it covers. Returns them and
    how many lines were read."""
    saved = read_origin_checkpoint(checkpoint) or OriginCheckpoint(0, {})
    marks = OriginMarks(saved.marks, saved.seq)
    cursor = Cursor(logs_dir, saved.seq)
    return marks, follow(marks, cursor, last_seq)


def follow(marks: OriginMarks, cursor: Cursor, last_seq: int) -> int:
    """Move ``marks`` on by the lines after ``cursor`` up to ``last_seq`` (read with
    it); how many lines were read. The uplink keeps a pair of them to know where
    ``bus.log`` stood at a seq (``claims``)."""
    read = 0
    while cursor.after < last_seq:
        try:
            block = cursor.read_block(last_seq, READ_CHUNK)
        except Expired as gone:  # rotated away: their origins are only in the checkpoint, if anywhere
            logger.bind(reason=str(gone)).warning("origins of rotated lines not known",
                                                  first=gone.since + 1, last=gone.oldest - 1)
            cursor.after, cursor.place = gone.oldest - 1, None
            continue
        if not block:
            break
        read += block.count(b"\n")
        # A payload may hold the key too: the decode tells. A line that is not a
        # record is not ours to judge here: BusLog reports a bad last line.
        for record in records_with(block, (ORIGIN_KEY,))[0]:
            if record.origin is not None:
                marks.note(record.origin)
    return read
