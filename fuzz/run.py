"""Fuzz the guest-facing parsers with atheris (coverage-guided).

    pip install atheris
    python -m fuzz.run -max_total_time=60 fuzz/corpus

New crashing inputs are written as ``crash-*`` files; move them into
``fuzz/corpus/`` so the test suite replays them from then on.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fuzz.target import check_one


def main() -> None:
    atheris.Setup(sys.argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
