"""The benchmark runs end to end: tiny settings, castra and the bare ZeroMQ floor.

Only a check that ``python -m bench`` works and writes what the README promises;
the figures themselves are not judged here (it is a benchmark, not a timed test).
Neither the peers' servers nor the ``bench`` extra (matplotlib) are needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPECTED_ROWS = {
    ("nominal", "castra"), ("acked", "castra"), ("pipelined", "castra"), ("saturation", "castra"),
    ("fanout", "castra"), ("sessions", "castra"),
    ("nominal", "zmq"), ("saturation", "zmq"), ("fanout", "zmq"),
}


def test_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--runs", "1", "--duration", "0.5", "--systems", "castra,zmq",
         "--sessions", "50", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=90, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    document = json.loads((out / "results.json").read_text())
    rows = {(row["workload"], row["system"]): row for row in document["rows"]}
    assert set(rows) == EXPECTED_ROWS
    assert all("error" not in run for run in document["runs"])

    nominal = rows["nominal", "castra"]["figures"]
    assert nominal["delivered_ratio"]["median"] > 0.99
    assert nominal["p99_ms"]["median"] > 0
    assert rows["acked", "castra"]["figures"]["acked_per_s"]["median"] > 0
    assert rows["sessions", "castra"]["figures"]["sessions"]["median"] == 50
    for figures in (row["figures"] for row in rows.values()):
        assert figures["server_cpu_us_per_msg"]["median"] > 0
    assert set(rows["saturation", "castra"]["ratios"]) == {"zmq"}

    assert "| castra |" in (out / "results.md").read_text()
    chart_skipped = any(note.startswith("chart skipped") for note in document["meta"]["notes"])
    assert chart_skipped or (out / "bench.png").stat().st_size > 0
