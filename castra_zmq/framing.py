"""Length-prefixed frames (PROTOCOL.md section 2): a 4-byte big-endian length, then
that many bytes. The length is checked before a single body byte is buffered for it.
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
    frames (its publish window is full) resumes exactly where it stopped.
    """

    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0

    def feed(self, data: bytes) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """Return the next complete body, None if more bytes are needed.

        Raises ``FrameError(fatal=True)`` on a length of 0 or over ``MAX_FRAME``.
        """
        start = self._offset
        if len(self._buffer) - start < 4:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer, start)
        if length == 0 or length > MAX_FRAME:
            raise FrameError(f"invalid frame length {length}", fatal=True)
        end = start + 4 + length
        if len(self._buffer) < end:
            return None
        self._offset = end
        return bytes(self._buffer[start + 4 : end])

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._offset
