"""Replay the fuzz corpus (seeds and every input atheris kept) as regression cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.target import check_one

CORPUS = sorted((Path(__file__).parents[2] / "fuzz" / "corpus").iterdir())


@pytest.mark.parametrize("path", CORPUS, ids=[path.name[:40] for path in CORPUS])
def test_corpus_input_is_refused_or_accepted_cleanly(path):
    check_one(path.read_bytes())
