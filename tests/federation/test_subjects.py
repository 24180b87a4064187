"""Federation's pure part (``castra_zmq.federation``): subjects, tokens, ids, headers.

No sockets, no server.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from castra_zmq.errors import ConfigError
from castra_zmq.federation import (
    FederationError,
    Origin,
    escape_token,
    message_subject,
    origin_filter,
    origin_of,
    parse_subject,
    resume_after,
    unescape_token,
    upload_headers,
)
from castra_zmq.wire import MAX_TOPIC, check_host_name

FORBIDDEN_IN_TOKEN = set(".*> \t\r\n\x0b\x0c") | set(map(chr, range(0x20))) | {"\x7f"}


@pytest.mark.parametrize(("name", "token"), [
    ("broadcast", "broadcast"),
    ("vm:beta", "vm:beta"),
    ("a b", "a%20b"),
    ("host.example", "host%2Eexample"),
    ("50%", "50%25"),
    ("*", "%2A"),
    (">", "%3E"),
    ("tab\there", "tab%09here"),
    ("é", "%C3%A9"),
    ("", "%"),
])
def test_escape_token_examples(name, token):
    assert escape_token(name) == token
    assert unescape_token(token) == name


@given(st.text(max_size=300))
def test_token_round_trip_and_alphabet(name):
    token = escape_token(name)
    assert token and not FORBIDDEN_IN_TOKEN & set(token)
    assert token.isascii()
    assert unescape_token(token) == name


@pytest.mark.parametrize("token", ["%41", "%c3%a9", "50%", "%2", "a%zz", "%C3", "é", "a.b", "%%"])
def test_unescape_refuses_what_escape_never_makes(token):
    """Each name has one token: other spellings are refused, not read as that name."""
    with pytest.raises(FederationError):
        unescape_token(token)


def test_subjects_of_common_topics():
    assert message_subject("hosta", "vm:beta") == "castra.v1.hosta.vm:beta"
    assert message_subject("hosta", "broadcast") == "castra.v1.hosta.broadcast"
    assert message_subject("a.example", "metrics.cpu") == "castra.v1.a%2Eexample.metrics.cpu"
    assert message_subject("h", "a..b.") == "castra.v1.h.a.%.b.%"
    assert origin_filter("a.example") == "castra.v1.a%2Eexample.>"


topics = st.text(min_size=1, max_size=MAX_TOPIC).filter(lambda topic: "\x00" not in topic)
hosts = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)


@given(hosts, topics)
def test_subject_round_trip(host, topic):
    subject = message_subject(host, topic)
    tokens = subject.split(".")
    assert all(tokens) and not any(FORBIDDEN_IN_TOKEN & set(token) for token in tokens)
    assert subject.startswith(origin_filter(host)[:-1])
    assert parse_subject(subject) == (parse_subject(subject).__class__(host, topic))


def test_longest_subject_fits_a_nats_control_line():
    """nats-server's default max_control_line is 4096 bytes: the publish line
    (``HPUB <subject> <reply inbox> <header bytes> <total bytes>``) holds the
    subject and about 100 bytes more. The widest subject: a host name with a dot
    in every other place, a topic of 4-byte characters."""
    subject = message_subject("a" + ".a" * 126, "\U0010ffff" * MAX_TOPIC)
    assert len(subject) + 100 <= 4096


@pytest.mark.parametrize("subject", ["castra.v1.h", "castra.v2.h.t", "other.v1.h.t", "castra.v1.h.%41"])
def test_parse_subject_refuses_foreign_subjects(subject):
    with pytest.raises(FederationError):
        parse_subject(subject)


def test_upload_headers_and_origin_round_trip():
    origin = Origin("hosta", 1700000000000, 42)
    headers = upload_headers(origin, 17)
    assert headers["Nats-Msg-Id"] == "hosta:1700000000000:42"
    assert headers["Nats-Expected-Last-Subject-Sequence"] == "17"
    assert headers["Nats-Expected-Last-Subject-Sequence-Subject"] == "castra.v1.hosta.>"
    assert origin_of(headers) == origin


@pytest.mark.parametrize("headers", [
    None,
    {},
    {"Nats-Msg-Id": "h:1:2", "Castra-Origin": "h", "Castra-Origin-Epoch": "1"},
    {"Nats-Msg-Id": "h:1:3", "Castra-Origin": "h", "Castra-Origin-Epoch": "1", "Castra-Origin-Seq": "2"},
    {"Nats-Msg-Id": "h:1:x", "Castra-Origin": "h", "Castra-Origin-Epoch": "1", "Castra-Origin-Seq": "x"},
])
def test_origin_of_refuses_incomplete_or_inconsistent_headers(headers):
    with pytest.raises(FederationError):
        origin_of(headers)


@pytest.mark.parametrize("name", ["hosta", "a.example.com", "h-1_b", "9"])
def test_host_names_accepted(name):
    assert check_host_name(name) == name


@pytest.mark.parametrize("name", ["", ".a", "-a", "a b", "a:b", "a*", "a>", "é", "h" * 254, "a\n"])
def test_host_names_refused(name):
    with pytest.raises(ConfigError):
        check_host_name(name)


@pytest.mark.parametrize(("last", "committed", "after"), [
    (None, 10, 0),  # nothing uploaded yet: the whole log
    (Origin("h", 5, 7), 10, 7),  # this epoch: after its last seq
    (Origin("h", 5, 10), 10, 10),  # all of it uploaded
    (Origin("h", 4, 99), 10, 0),  # an earlier seq space of this host: the whole log
    (Origin("h", 5, 11), 10, None),  # past the log's end: the log started again, a new epoch
])
def test_resume_after(last, committed, after):
    assert resume_after(last, 5, committed) == after
