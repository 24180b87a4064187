"""Pure codec tests: bytes in, Structs or errors out. No sockets, no processes.

Covers the hello line (PROTOCOL.md section 1), frames and frame bodies (section 2),
bus log file names (section 4) and the internal topic frames.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from castra_zmq import topics
from castra_zmq.errors import FrameError, HandshakeError
from castra_zmq.framing import FrameDecoder, encode_frame
from castra_zmq.handshake import (
    FORBIDDEN_CATEGORIES,
    MAX_LINE,
    MAX_NAME,
    is_vm_name,
    parse_hello,
    take_line,
    validate_vm_name,
)
from castra_zmq.logfiles import log_file_name, vm_from_file_name
from castra_zmq.wire import (
    MAX_FRAME,
    MAX_TOPIC,
    PAYLOAD_ALWAYS_FITS,
    Acknowledge,
    FrameRejected,
    Heartbeat,
    Publish,
    Subscribe,
    Unsubscribe,
    decode_guest_frame,
    delivery_bytes,
    json_encode,
)

FAST = settings(deadline=None)  # examples: the profile's (conftest.py)


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def body(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def refusal(line: bytes) -> str:
    with pytest.raises(HandshakeError) as info:
        parse_hello(line)
    return info.value.reason


# -- handshake: parse_hello ---------------------------------------------------------


def test_hello_with_bus_capability_asks_for_a_session():
    hello = parse_hello(b"hello vm:alpha capabilities=bus-v1")
    assert (hello.vm, hello.capabilities, hello.bus_protocol) == ("alpha", ("bus-v1",), "bus-v1")


@pytest.mark.parametrize("keyword", [b"hello", b"HELLO", b"Hello", b"hElLo"])
def test_hello_keyword_is_case_insensitive(keyword):
    assert parse_hello(keyword + b" vm:alpha").vm == "alpha"


@pytest.mark.parametrize("token", [b"vm:alpha", b"alpha", b"VM:alpha", b"Vm:alpha"])
def test_vm_prefix_is_optional(token):
    assert parse_hello(b"hello " + token).vm == "alpha"


def test_vm_prefix_is_stripped_only_once():
    assert parse_hello(b"hello vm:vm:alpha").vm == "vm:alpha"


def test_hello_without_capabilities_is_handshake_only():
    hello = parse_hello(b"hello vm:legacy")
    assert hello.capabilities == () and hello.bus_protocol is None


def test_capabilities_are_deduplicated_case_insensitively():
    hello = parse_hello(b"hello vm:a capabilities=bus-v1,BUS-V1,Bus-V1,x,X,,x")
    assert hello.capabilities == ("bus-v1", "x") and hello.bus_protocol == "bus-v1"


def test_capabilities_keyword_is_case_insensitive_and_tokens_merge():
    hello = parse_hello(b"hello vm:a CAPABILITIES=foo capabilities=bus-v1,foo")
    assert hello.capabilities == ("foo", "bus-v1") and hello.bus_protocol == "bus-v1"


def test_unknown_capabilities_are_ignored_for_the_protocol_choice():
    hello = parse_hello(b"hello vm:a capabilities=bus-v9,shell,bus-v1")
    assert hello.bus_protocol == "bus-v1"
    assert parse_hello(b"hello vm:a capabilities=bus-v9,shell").bus_protocol is None


def test_other_key_value_tokens_are_ignored():
    hello = parse_hello(b"hello vm:a agent=0.3 os=linux capabilities=bus-v1 future=x=y bare")
    assert hello.vm == "a" and hello.capabilities == ("bus-v1",)


def test_hello_tolerates_extra_whitespace_and_tabs():
    assert parse_hello(b"  hello\t vm:alpha   capabilities=bus-v1  ").bus_protocol == "bus-v1"


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"", "expected hello"),
        (b"   ", "expected hello"),
        (b"GET / HTTP/1.1", "expected hello"),
        (b"helo vm:alpha", "expected hello"),
        (b"hello", "missing vm name"),
        (b"hello capabilities=bus-v1", "missing vm name"),
        (b"hello vm:", "missing vm name"),
        (b"hello VM:", "missing vm name"),
    ],
)
def test_hello_without_keyword_or_name_is_refused(line, reason):
    assert refusal(line) == reason


def test_name_of_128_characters_is_accepted_129_refused():
    assert parse_hello(b"hello vm:" + b"n" * MAX_NAME).vm == "n" * MAX_NAME
    assert refusal(b"hello vm:" + b"n" * (MAX_NAME + 1)) == "vm name too long"


def test_name_length_counts_characters_not_bytes():
    name = "\u00e9" * MAX_NAME  # 256 bytes of UTF-8
    assert parse_hello(f"hello vm:{name}".encode()).vm == name
    assert refusal(f"hello vm:{name}\u00e9".encode()) == "vm name too long"


@pytest.mark.parametrize(
    "name",
    ["a\x00b", "\x00", "a\x01", "a\x7f", "a\x1bb", "a\u200bb", "a\ufeff", "a\u202eb", "\ue000"],
    ids=["nul-inside", "nul", "soh", "del", "escape", "zero-width-space", "bom", "rtl-override",
         "private-use"],
)
def test_names_with_control_or_invisible_characters_are_refused(name):
    assert refusal(f"hello vm:{name}".encode()) == "invalid vm name"


@pytest.mark.parametrize("name", ["host", "HOST", "Host", "vm:host"])
def test_reserved_name_host_is_refused(name):
    assert refusal(f"hello {name}".encode()) == "reserved vm name"


def test_invalid_utf8_hello_is_refused():
    assert refusal(b"hello vm:\xff\xfe") == "invalid utf-8"
    assert refusal(b"hello vm:\xed\xa0\x80") == "invalid utf-8"  # an encoded surrogate


def test_validate_vm_name_accepts_paths_and_look_alikes_as_opaque_identities():
    for name in ("../x", "a/b", "..", ".", "\u0430lpha", "Alpha", "caf\u00e9"):
        assert validate_vm_name(name) == name


# -- handshake: take_line -----------------------------------------------------------


def test_take_line_waits_for_a_newline():
    assert take_line(b"") is None
    assert take_line(b"hello vm:a") is None


def test_take_line_splits_at_the_first_newline_and_keeps_the_rest():
    assert take_line(b"hello vm:a\n\x00\x00\x00\x05rest") == (b"hello vm:a", b"\x00\x00\x00\x05rest")


def test_take_line_drops_a_trailing_carriage_return():
    assert take_line(b"hello vm:a\r\nrest") == (b"hello vm:a", b"rest")


def test_line_of_512_bytes_is_accepted_with_lf_and_crlf():
    line = b"x" * MAX_LINE
    assert take_line(line + b"\n") == (line, b"")
    assert take_line(line + b"\r\n") == (line, b"")


def test_line_of_513_bytes_is_refused_with_lf_and_crlf():
    line = b"x" * (MAX_LINE + 1)
    for ending in (b"\n", b"\r\n"):
        with pytest.raises(HandshakeError, match="line too long"):
            take_line(line + ending)


def test_line_too_long_is_refused_before_any_newline_arrives():
    assert take_line(b"x" * (MAX_LINE + 1)) is None  # could still be 512 bytes + "\r"
    with pytest.raises(HandshakeError, match="line too long"):
        take_line(b"x" * (MAX_LINE + 2))
    with pytest.raises(HandshakeError, match="line too long"):
        take_line(b"x" * 100_000)


def test_bare_carriage_return_is_not_a_line_end():
    assert take_line(b"hello vm:a\r") is None


# -- framing ------------------------------------------------------------------------


def test_encode_frame_is_big_endian_length_then_body():
    assert encode_frame(b"{}") == b"\x00\x00\x00\x02{}"


def test_decoder_returns_none_until_the_frame_is_complete():
    decoder = FrameDecoder()
    assert decoder.next_frame() is None
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is None
    decoder.feed(b"\x00\x03ab")
    assert decoder.next_frame() is None
    decoder.feed(b"c")
    assert decoder.next_frame() == b"abc"
    assert decoder.next_frame() is None and decoder.buffered == 0


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 2**32 - 1])
def test_bad_length_is_fatal_as_soon_as_the_header_is_in(length):
    decoder = FrameDecoder()
    raw = header(length)
    decoder.feed(raw[:3])
    assert decoder.next_frame() is None  # three bytes are not a header yet
    decoder.feed(raw[3:])  # no body byte at all
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.fatal and str(length) in info.value.reason


def test_bad_length_after_a_good_frame_still_yields_the_good_one():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"ok") + header(MAX_FRAME + 1))
    assert decoder.next_frame() == b"ok"
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_max_length_frame_is_accepted():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"x" * MAX_FRAME))
    assert decoder.next_frame() == b"x" * MAX_FRAME


def test_frame_split_across_many_feeds():
    frame = encode_frame(b'{"type":"heartbeat"}')
    decoder = FrameDecoder()
    for byte in frame[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == b'{"type":"heartbeat"}'


def test_several_frames_in_one_feed():
    bodies = [b"a", b"bb", b"c" * 1000, b"{}"]
    decoder = FrameDecoder()
    decoder.feed(b"".join(map(encode_frame, bodies)) + b"\x00\x00")
    assert [decoder.next_frame() for _ in bodies] == bodies
    assert decoder.next_frame() is None and decoder.buffered == 2


def test_frames_left_untaken_stay_buffered_across_feeds():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"one") + encode_frame(b"two"))
    assert decoder.next_frame() == b"one"
    decoder.feed(encode_frame(b"three"))  # the caller paused: "two" must not be lost
    assert [decoder.next_frame(), decoder.next_frame(), decoder.next_frame()] == [b"two", b"three", None]


@st.composite
def chunked(draw, data: bytes):
    """``data`` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@FAST
@given(st.data(), st.lists(st.binary(min_size=1, max_size=300), max_size=8))
def test_frames_round_trip_under_arbitrary_chunking(data, bodies):
    stream = b"".join(map(encode_frame, bodies))
    decoder = FrameDecoder()
    out = []
    for chunk in data.draw(chunked(stream)):
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == bodies and decoder.buffered == 0


@FAST
@given(st.lists(st.binary(max_size=80), max_size=10))
@example([b"\x00\x00\x00\x00"])
@example([b"\xff\xff\xff\xff", b"x" * 10])
@example([b"\x00\x01\x00\x00", b"\x00" * 70])
def test_decoder_only_raises_frame_error_and_never_invents_bytes(chunks):
    decoder = FrameDecoder()
    fed = returned = 0
    for chunk in chunks:
        decoder.feed(chunk)
        fed += len(chunk)
        try:
            while (frame := decoder.next_frame()) is not None:
                assert 1 <= len(frame) <= MAX_FRAME
                returned += 4 + len(frame)
        except FrameError as exc:
            assert exc.fatal
            return
        assert returned + decoder.buffered == fed


# -- frame bodies: decode_guest_frame -----------------------------------------------


def frame_error(raw: bytes) -> str:
    with pytest.raises(FrameError) as info:
        decode_guest_frame(raw)
    assert not info.value.fatal  # a bad body leaves the stream in sync
    return info.value.reason


def rejection(raw: bytes) -> FrameRejected:
    with pytest.raises(FrameRejected) as info:
        decode_guest_frame(raw)
    return info.value


def test_each_known_type_decodes_to_its_struct():
    assert decode_guest_frame(b'{"type":"publish"}') == Publish()
    assert decode_guest_frame(b'{"type":"subscribe","topic":"t"}') == Subscribe(topic="t")
    assert decode_guest_frame(b'{"type":"unsubscribe","topic":"t"}') == Unsubscribe(topic="t")
    assert decode_guest_frame(b'{"type":"heartbeat"}') == Heartbeat()
    assert decode_guest_frame(b'{"type":"ack","seq":7}') == Acknowledge(seq=7)


def test_publish_payload_passes_through_as_raw_json():
    frame = decode_guest_frame(b'{"type":"publish","topic":"t","payload":{"a": [1, 2]},"id":"m1"}')
    assert frame.topic == "t" and bytes(frame.payload) == b'{"a": [1, 2]}' and frame.id == "m1"


def test_unknown_fields_are_ignored():
    assert decode_guest_frame(b'{"type":"heartbeat","agent":"0.3","n":[1]}') == Heartbeat()


@pytest.mark.parametrize("raw", [b"{", b"not json", b"", b"{}}", b'{"type":"heartbeat"} x', b"\x00"])
def test_invalid_json_is_a_frame_error(raw):
    assert "invalid JSON" in frame_error(raw)


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b'{"type":"publish","payload":"\xff"}', b'{"type":"heartbeat","x":"\xc3"}',
     b'{"type":"publish","payload":"\xed\xa0\x80"}'],
    ids=["lone-ff", "in-payload", "truncated-sequence", "encoded-surrogate"],
)
def test_invalid_utf8_is_a_frame_error(raw):
    assert "invalid JSON" in frame_error(raw)


@pytest.mark.parametrize("raw", [b"[]", b"[1,2]", b"1", b'"publish"', b"null", b"true"])
def test_json_that_is_not_an_object_is_a_frame_error(raw):
    assert frame_error(raw) == "frame is not a JSON object"


@pytest.mark.parametrize("raw", [b"{}", b'{"topic":"t"}', b'{"type":null}'])
def test_missing_type_is_a_frame_error(raw):
    assert frame_error(raw) == "missing type"


@pytest.mark.parametrize("raw", [b'{"type":1}', b'{"type":["publish"]}', b'{"type":{}}', b'{"type":true}'])
def test_non_string_type_is_a_frame_error(raw):
    assert frame_error(raw) == "type must be a string"


@pytest.mark.parametrize("frame_type", ["frobnicate", "PUBLISH", "", "message", "error"])
def test_unknown_type_is_rejected_with_its_type(frame_type):
    exc = rejection(body({"type": frame_type, "topic": "t"}))
    assert exc.frame_type == frame_type and exc.reason == "unknown type"


def test_unknown_type_echo_is_bounded():
    exc = rejection(body({"type": "x" * 10_000}))
    assert exc.frame_type == "x" * 256


@pytest.mark.parametrize(
    "obj, frame_type",
    [
        ({"type": "publish", "topic": 1}, "publish"),
        ({"type": "publish", "topic": ""}, "publish"),
        ({"type": "publish", "topic": "a\x00b"}, "publish"),
        ({"type": "publish", "topic": "t" * 257}, "publish"),
        ({"type": "publish", "id": [1]}, "publish"),
        ({"type": "subscribe"}, "subscribe"),
        ({"type": "subscribe", "topic": None}, "subscribe"),
        ({"type": "unsubscribe", "topic": 5}, "unsubscribe"),
        ({"type": "ack", "seq": "1"}, "ack"),
        ({"type": "ack", "seq": 1.5}, "ack"),
    ],
)
def test_bad_field_types_are_rejected_for_that_type(obj, frame_type):
    exc = rejection(body(obj))
    assert exc.frame_type == frame_type and exc.reason


def test_topic_of_256_characters_is_accepted():
    assert decode_guest_frame(body({"type": "publish", "topic": "t" * 256})).topic == "t" * 256


# A bad field is found before the end of the body; the rest may still be broken JSON.
@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"publish","topic":1,',
        b'{"type":"publish","topic":1}garbage',
        b'{"type":"publish","topic":1,"x":"\xff"}',
        b'{"type":"frobnicate",',
        b'{"type":"subscribe","topic":null,"x":[}',
    ],
    ids=["truncated", "trailing-garbage", "bad-utf8-later", "unknown-type-truncated", "broken-later"],
)
def test_bad_field_followed_by_broken_json_is_a_frame_error(raw):
    assert "invalid JSON" in frame_error(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"publish","payload":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b'{"type":"publish","topic":1,"p":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"type":"frobnicate","p":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"type":"publish","payload":' + b"[" * 30_000,
    ],
    ids=["in-payload", "bare-array", "objects", "after-bad-field", "unknown-type", "unclosed"],
)
def test_10000_deep_nesting_is_a_frame_error_not_a_recursion_error(raw):
    frame_error(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
frame_objects = st.dictionaries(
    st.sampled_from(["topic", "payload", "id", "seq", "x"]) | st.text(max_size=5), json_values, max_size=4
).flatmap(
    lambda fields: st.sampled_from(["publish", "subscribe", "unsubscribe", "heartbeat", "ack", "zz"])
    .map(lambda t: body({"type": t, **fields}))
)


@st.composite
def mangled_frames(draw):
    """A frame-like object, then maybe truncated, extended or with a byte replaced."""
    raw = draw(frame_objects)
    action = draw(st.sampled_from(["keep", "truncate", "append", "replace"]))
    if action == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif action == "append":
        raw += draw(st.binary(min_size=1, max_size=8))
    elif action == "replace" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=1)) + raw[at + 1 :]
    return raw


@FAST
@given(st.binary(max_size=300) | mangled_frames())
@example(b'{"type":"publish","topic":1,')
@example(b'{"type":"publish","topic":1}garbage')
@example(b'{"type":"publish","topic":1,"x":"\xff"}')
@example(b'{"type":"zz",')
@example(b'{"type":"publish","payload":"\xff"}')
@example(b'{"type":"heartbeat","x":"\xc3"}')
def test_decode_guest_frame_only_raises_frame_errors(raw):
    try:
        frame = decode_guest_frame(raw)
    except FrameError as exc:
        assert not exc.fatal and exc.reason
    except FrameRejected as exc:
        assert isinstance(exc.frame_type, str) and exc.reason
    else:
        assert isinstance(frame, (Publish, Subscribe, Unsubscribe, Heartbeat, Acknowledge))
        raw.decode("utf-8")  # an accepted frame never carries invalid UTF-8 into the logs


# -- handshake properties -----------------------------------------------------------

hello_lines = st.builds(
    lambda keyword, prefix, name, extra: f"{keyword} {prefix}{name}{extra}".encode(),
    st.sampled_from(["hello", "HELLO", "Hello", "helo"]),
    st.sampled_from(["", "vm:", "VM:"]),
    st.text(min_size=0, max_size=140),
    st.sampled_from(["", " capabilities=bus-v1", " capabilities=BUS-V1,x,x", " k=v"]),
)


@FAST
@given(st.binary(max_size=600) | hello_lines)
@example(b"hello vm:a\x1cb")  # \x1c..\x1f split tokens in str.split()
@example(b"hello vm:\xc2\x85x")  # U+0085 NEL is whitespace
@example("hello vm:a\u2028b".encode())
@example(b"hello vm:host")
def test_parse_hello_only_raises_handshake_error_and_accepts_only_valid_names(line):
    try:
        hello = parse_hello(line)
    except HandshakeError as exc:
        assert exc.reason and "\n" not in exc.reason
        return
    assert 1 <= len(hello.vm) <= MAX_NAME
    assert not any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in hello.vm)
    assert hello.vm.lower() != "host"
    assert len(set(hello.capabilities)) == len(hello.capabilities)
    assert all(cap == cap.lower() for cap in hello.capabilities)


@FAST
@given(st.binary(max_size=1200))
@example(b"x" * MAX_LINE + b"\r\n")
@example(b"x" * (MAX_LINE + 1) + b"\r\n")
def test_take_line_never_returns_a_line_over_512_bytes(buffer):
    try:
        split = take_line(buffer)
    except HandshakeError as exc:
        assert exc.reason == "line too long"
        return
    if split is not None:
        line, rest = split
        assert len(line) <= MAX_LINE and b"\n" not in line
        assert buffer.startswith(line) and buffer.endswith(rest)


# -- bus log file names -------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpha", "web-01", "a_b", "x.y.z", "A", "0", "n" * MAX_NAME])
def test_plain_name_is_its_own_file_name(name):
    assert log_file_name(name) == name + ".log"


@pytest.mark.parametrize(
    "name, file_name",
    [
        ("bus", "%62us.log"),
        ("../x", "%2E%2E%2Fx.log"),
        ("a/b", "%61%2Fb.log"),
        ("..", "%2E%2E.log"),
        (".", "%2E.log"),
        (".hidden", "%2Ehidden.log"),
        ("a\x00b", "%61%00b.log"),
        ("a\nb", "%61%0Ab.log"),
        ("%41", "%2541.log"),
        ("a b", "%61%20b.log"),
        ("\u0430lpha", "%D0%B0lpha.log"),
    ],
    ids=["bus", "dotdot-slash", "slash", "dotdot", "dot", "hidden", "nul", "newline", "percent",
         "space", "cyrillic-a"],
)
def test_unsafe_name_is_encoded(name, file_name):
    assert log_file_name(name) == file_name
    assert vm_from_file_name(file_name) == name


def test_bus_log_is_never_a_vm_file():
    assert log_file_name("bus") != "bus.log"
    assert vm_from_file_name("bus.log") is None


def test_names_differing_by_case_or_look_alikes_get_different_files():
    names = ["alpha", "Alpha", "ALPHA", "\u0430lpha", "\u0391lpha", "alpha\u200b", "alph\u0251"]
    files = [log_file_name(name) for name in names]
    assert len(set(files)) == len(names)
    assert len({f.lower() for f in files[:3]}) == 1  # only case tells them apart


@pytest.mark.parametrize(
    "name",
    ["a" * 10_240, "\u00e9" * 10_240, "/" * 10_240, "a" * 252, "/" * 70],
    ids=["10k-plain", "10k-accented", "10k-slashes", "252-plain", "70-slashes"],
)
def test_very_long_names_get_short_hashed_file_names(name):
    file_name = log_file_name(name)
    assert file_name == "%%" + hashlib.sha256(name.encode()).hexdigest() + ".log"
    assert vm_from_file_name(file_name) is None  # the name is in each line's "vm" field


@pytest.mark.parametrize("file_name", ["%zz.log", "%C3.log", "%4.log", "a%41.log", "x.txt", "%%", ".log.log",
                                       "%61b%2F.log"])
def test_other_file_names_are_not_vm_files(file_name):
    vm = vm_from_file_name(file_name)
    assert vm is None or log_file_name(vm) == file_name


look_alike_names = st.text(alphabet="aA.-_%/\x00 \u0430\u00e9", max_size=6)


@FAST
@given(st.lists(st.text(max_size=300) | look_alike_names, min_size=2, max_size=6, unique=True))
@example(["bus", "%62us"])
@example(["a" * 252, "a" * 253])
@example(["alpha", "Alpha"])
def test_log_file_names_are_injective_safe_and_short(names):
    files = [log_file_name(name) for name in names]
    assert len(set(files)) == len(names)
    for name, file_name in zip(names, files):
        assert "/" not in file_name and "\x00" not in file_name
        assert len(file_name.encode()) <= 255
        assert file_name not in (".", "..", "bus.log")
        if file_name.startswith("%%"):  # hashed: the name is in each line's "vm" field
            assert vm_from_file_name(file_name) is None
        else:
            assert vm_from_file_name(file_name) == name


# -- internal topic frames ----------------------------------------------------------


def test_vm_alpha_frame_is_not_a_prefix_of_vm_alpha2_frame():
    assert not topics.bus("vm:alpha2").startswith(topics.bus("vm:alpha"))
    assert not topics.event("sessions").startswith(topics.event("session"))
    assert topics.bus("vm:alpha").startswith(topics.BUS_ALL)


@FAST
@given(st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t),
       st.text(min_size=1, max_size=5).filter(lambda t: "\x00" not in t))
def test_topic_frames_never_prefix_another_topic(topic, suffix):
    assert not topics.bus(topic + suffix).startswith(topics.bus(topic))


def test_no_character_is_wider_in_json_than_the_one_payload_always_fits_assumes():
    """PAYLOAD_ALWAYS_FITS counts 6 bytes a character (``\\u0001``): every code
    point that may be in a topic or a VM name encodes to at most that: all of the
    first 4,096 (where JSON's escapes are), then one in 13 (every encoded width)."""
    codes = itertools.chain(range(0x1000), range(0x1000, 0x110000, 13))
    assert max(len(json_encode(chr(code))) - 2 for code in codes if not 0xD800 <= code < 0xE000) <= 6


@FAST
@given(st.text(min_size=1, max_size=MAX_TOPIC), st.text(min_size=1, max_size=MAX_NAME),
       st.integers(0, 2**63 - 1))
def test_a_payload_that_always_fits_fits_any_delivery(topic, name, seq):
    assert delivery_bytes(topic, "vm:" + name, PAYLOAD_ALWAYS_FITS, seq) <= MAX_FRAME


@pytest.mark.parametrize("code", range(128))
def test_an_ascii_character_is_refused_in_a_vm_name_exactly_when_its_category_is_forbidden(code):
    """validate_vm_name checks ASCII names with isprintable(), others by category."""
    name = f"a{chr(code)}b"
    forbidden = unicodedata.category(chr(code)) in FORBIDDEN_CATEGORIES
    assert is_vm_name(name) == (not forbidden)
