"""Length-prefixed frames (PROTOCOL.md section 2): a 4-byte big-endian length, then
that many bytes. The length is checked before a single body byte is buffered for it.

Runs in: the bridge (guest frames); the guest side has its own copy in ``guest.py``.
"""

from __future__ import annotations

import struct

from .errors import FrameError
from .wire import MAX_FRAME

_LENGTH = struct.Struct(">I")


def encode_frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, ``next_frame`` pops bodies.

    Bytes of frames not yet taken stay buffered, so a caller that stops taking
    frames (its publish window is full) resumes exactly where it stopped. Taken
    frames are let go as soon as ``next_frame`` runs out of whole ones: an idle
    session keeps at most the start of one frame, not the last 64 KiB it sent.
    """

    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        # Whole reads are kept as the immutable bytes they came in (a frame is then one
        # slice: a third of the cost of a small frame); the start of a frame waiting
        # for the rest goes into a bytearray, so a guest that trickles a frame byte
        # by byte does not cost a copy of it per byte.
        self._buffer: bytes | bytearray = b""
        self._offset = 0

    def feed(self, data: bytes) -> None:
        if not self._buffer:
            self._buffer = bytes(data)  # no copy for bytes: the common case
            return
        if isinstance(self._buffer, bytes):
            self._buffer = bytearray(self._buffer[self._offset :])
            self._offset = 0
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """Return the next complete body, None if more bytes are needed.

        Raises ``FrameError(fatal=True)`` on a length of 0 or over ``MAX_FRAME``.
        """
        buffer, start = self._buffer, self._offset
        if len(buffer) - start < 4:
            self._trim()
            return None
        (length,) = _LENGTH.unpack_from(buffer, start)
        if length == 0 or length > MAX_FRAME:
            raise FrameError(f"invalid frame length {length}", fatal=True)
        end = start + 4 + length
        if len(buffer) < end:
            self._trim()
            return None
        self._offset = end
        body = buffer[start + 4 : end]
        return body if isinstance(body, bytes) else bytes(body)

    def _trim(self) -> None:
        """Let go of the frames taken so far, keeping only the start of the next."""
        if self._offset:
            self._buffer = self._buffer[self._offset :]
            self._offset = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._offset
