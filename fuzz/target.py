"""One fuzz input through every parser a guest's bytes reach, as the bridge does.

The first byte picks the entry point, the rest is the input. Only the documented
refusals may come out (``HandshakeError``, ``FrameError``, ``FrameRejected``);
anything else is a bug. Used by ``python -m fuzz.run`` and, over the stored corpus,
by ``tests/hostile/test_fuzz_corpus.py``.
"""

from __future__ import annotations

from castra_zmq.errors import FrameError, HandshakeError
from castra_zmq.framing import FrameDecoder
from castra_zmq.handshake import parse_hello, take_line
from castra_zmq.wire import FrameRejected, decode_guest_frame


def check_one(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    if mode == 0:  # line mode: the bytes a guest sends before its hello is parsed
        try:
            split = take_line(body)
            if split is not None:
                hello = parse_hello(split[0])
                assert 1 <= len(hello.vm) <= 128 and hello.vm.lower() != "host"
        except HandshakeError:
            pass
    elif mode == 1:  # frame mode: a stream cut into frames, each decoded
        decoder = FrameDecoder()
        half = len(body) // 2
        for chunk in (body[:half], body[half:]):
            decoder.feed(chunk)
            try:
                while (frame := decoder.next_frame()) is not None:
                    _decode(frame)
            except FrameError as exc:
                assert exc.fatal
                return
    else:  # one frame body
        _decode(body)


def _decode(body: bytes) -> None:
    try:
        decode_guest_frame(body)
    except (FrameError, FrameRejected):
        pass
    else:
        body.decode("utf-8")  # an accepted frame is UTF-8 through and through
