"""Topic patterns, and the index the bridge finds a message's subscribers with.

A pattern is an exact topic, or a prefix when it ends in ``*``: ``vm:*`` is every
topic starting with ``vm:``, and ``*`` alone (the empty prefix) every topic. Only
the last ``*`` is special: ``a*b*`` is every topic starting with ``a*b``. The same
syntax serves the identities file's grants (``identity``), guest subscriptions
(PROTOCOL.md 4.3), host tools' subscriptions (``topics.bus_subscription``) and
``castra bus tail --topic``.

This module imports nothing heavy: host tools and the CLI use it.

Runs in: the bridge (guests' subscriptions), host tools and ``castra bus tail``
(patterns).
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

import msgspec

Session = TypeVar("Session", bound=Hashable)
_NO_SESSIONS: frozenset = frozenset()


def pattern_prefix(pattern: str) -> str | None:
    """The prefix a pattern ``p*`` stands for (``*``: ""), or None for an exact topic."""
    return pattern[:-1] if pattern.endswith("*") else None


class TopicPatterns(msgspec.Struct, frozen=True):
    """Exact topics and topic prefixes (a pattern ``p*`` is the prefix ``p``)."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def match(self, topic: str) -> bool:
        return topic in self.exact or topic.startswith(self.prefixes)


def topic_patterns(patterns: Iterable[str]) -> TopicPatterns:
    """The topics and prefixes ``patterns`` name, each taken as ``pattern_prefix`` does."""
    exact, prefixes = set(), []
    for pattern in patterns:
        prefix = pattern_prefix(pattern)
        if prefix is None:
            exact.add(pattern)
        else:
            prefixes.append(prefix)
    return TopicPatterns(exact=frozenset(exact), prefixes=tuple(prefixes))


class SubscriberIndex(Generic[Session]):
    """Which sessions subscribe to which exact topics and prefixes.

    Finding a message's subscribers costs one lookup for its topic, plus, only while
    some pattern is held, one per distinct prefix length up to the topic's own (at
    most 257: a topic has at most 256 characters). However many sessions hold however
    many patterns, no message is matched against each of them.
    """

    def __init__(self) -> None:
        self.exact: dict[str, set[Session]] = {}  # topic -> sessions
        self.prefixes: dict[str, set[Session]] = {}  # prefix -> sessions
        self.prefix_lengths: collections.Counter[int] = collections.Counter()  # length -> prefixes held
        self.sorted_lengths: list[int] = []  # those of prefix_lengths, shortest first

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def add(self, session: Session, pattern: str) -> None:
        prefix = pattern_prefix(pattern)
        if prefix is None:
            self.exact.setdefault(pattern, set()).add(session)
            return
        sessions = self.prefixes.get(prefix)
        if sessions is None:
            sessions = self.prefixes[prefix] = set()
            self.count_length(len(prefix), 1)
        sessions.add(session)

    def discard(self, session: Session, pattern: str) -> None:
        prefix = pattern_prefix(pattern)
        index, key = (self.exact, pattern) if prefix is None else (self.prefixes, prefix)
        sessions = index.get(key)
        if sessions is None:
            return
        sessions.discard(session)
        if sessions:
            return
        del index[key]
        if prefix is not None:
            self.count_length(len(prefix), -1)

    def count_length(self, length: int, change: int) -> None:
        """One prefix of ``length`` more or less; the sorted lengths follow when a
        length comes or goes (at most 257 of them: sorting is cheap)."""
        self.prefix_lengths[length] += change
        if not self.prefix_lengths[length]:
            del self.prefix_lengths[length]
        if len(self.prefix_lengths) != len(self.sorted_lengths):
            self.sorted_lengths = sorted(self.prefix_lengths)

    def exact_subscribers(self, topic: str) -> set[Session] | frozenset:
        return self.exact.get(topic, _NO_SESSIONS)

    def prefix_subscribers(self, topic: str) -> list[set[Session]]:
        """The sessions of each held prefix that ``topic`` starts with; a list, so
        that the index may change while the caller goes through it."""
        lengths = self.sorted_lengths[:bisect.bisect_right(self.sorted_lengths, len(topic))]
        return [sessions for length in lengths if (sessions := self.prefixes.get(topic[:length])) is not None]
