"""castra-zmq against mosquitto, NATS, Redis and a bare ZeroMQ proxy, side by side,
and castra across hosts.

    python -m bench [--runs 3] [--duration 10] [--only nominal,acked,...,federation]
                    [--systems castra,castra-nofsync,castra-uplink,mosquitto,nats,nats-sync,redis,zmq]
                    [--sessions 10000] [--out DIR]

``--only federation``: a guest on host a publishing to a guest on host b, through
``castra-uplink`` (two routers with ``--uplink`` and a 3-node NATS cluster, all on
this machine), beside the same load on one router without the uplink.

castra runs twice: ``castra`` with ``--fsync batch`` (durable) and ``castra-nofsync``
with ``--fsync never``; each peer is compared with the castra of its kind (durable:
nats-sync, JetStream with sync_interval always, and redis, XADD with appendfsync
always; not durable: mosquitto, nats with JetStream's default, and zmq).
Each round starts every system afresh (127.0.0.1, temp directories), runs the
workloads against it one after another and stops it; rounds repeat --runs times.
Load comes from this one asyncio process on uvloop. A system whose
server is not installed is skipped with a note. Writes results.json (every figure of
every run), results.md (the tables) and bench.png (the chart) to --out, by default a
new temporary directory (the committed figures are refreshed with --out bench/results),
and prints where. Runs from any directory with the repository on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import traceback
from pathlib import Path

import uvloop

from . import report
from .systems import FACTORIES, Castra, System, make_systems
from .workloads import WORKLOADS, Run, Settings

_FD_HEADROOM = 1024  # beyond one descriptor per session (each process holds its own end)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="rounds; each figure is their median (default 3)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of each measurement window (default 10)")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads (default all: {','.join(WORKLOADS)})")
    parser.add_argument("--systems", default=",".join(FACTORIES),
                        help=f"comma-separated systems (default all: {','.join(FACTORIES)})")
    parser.add_argument("--sessions", type=int, default=10_000,
                        help="concurrent sessions in the sessions workload (default 10000)")
    parser.add_argument("--out", type=Path,
                        help="output directory (default: a new one under the temp directory; "
                             "bench/results holds the committed figures)")
    args = parser.parse_args(argv)
    chosen = [name for name in args.only.split(",") if name]
    unknown = [name for name in chosen if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    args.only = [name for name in WORKLOADS if name in chosen]  # sessions last: it leaves the most behind
    if args.runs < 1 or args.duration <= 0 or args.sessions < 1:
        parser.error("--runs, --duration and --sessions must be positive")
    return args


def raise_fd_limit(sessions: int) -> str | None:
    """Lift the soft descriptor limit (servers inherit it); a note if still too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sessions + _FD_HEADROOM
    target = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, max(needed, soft)))
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target != resource.RLIM_INFINITY and target < needed:
        return f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors {sessions} sessions need"
    return None




def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_round(system: System, run_number: int, args: argparse.Namespace, settings: Settings,
                    notes: list[str]) -> list[dict]:
    """Start ``system``, run every selected workload on it once, stop it."""
    results = []
    with tempfile.TemporaryDirectory(prefix="czb", dir="/tmp") as workdir:  # short: ipc path limit
        try:
            system.start(Path(workdir))
        except (OSError, RuntimeError) as exc:
            notes.append(f"round {run_number}: {system.name} did not start: {exc}")
            log(f"  {system.name} did not start: {exc}\n{system.log_tail()}")
            system.stop()
            return results
        try:
            for name in args.only:
                if name in system.unsupported:
                    continue
                results.append(await run_workload(system, name, run_number, settings, notes))
        finally:
            system.stop()
    return results


async def run_workload(system: System, name: str, run_number: int, settings: Settings,
                       notes: list[str]) -> dict:
    run = Run(system, settings)
    result = {"workload": name, "system": system.name, "run": run_number}
    try:
        result["figures"] = await WORKLOADS[name].run(run)
        summary = ", ".join(f"{key}={value:.4g}" for key, value in result["figures"].items())
        log(f"  {name:<10} {system.name:<9} {summary}")
    except Exception as exc:  # noqa: BLE001 - one failed run is reported, never faked; the rest go on
        result["error"] = f"{type(exc).__name__}: {exc}"
        notes.append(f"round {run_number}: {name} on {system.name} failed: {result['error']}")
        log(f"  {name:<10} {system.name:<9} FAILED\n{traceback.format_exc()}{system.log_tail()}")
    finally:
        run.close()
        await asyncio.sleep(0)  # let aborted transports finish closing
    errors = [error for client in run.clients for error in getattr(client, "errors", [])]
    if errors:
        run.details["unexpected_replies"] = [error.decode(errors="replace") for error in errors[:5]]
    if run.details:
        result["details"] = run.details
    return result


async def run_all(args: argparse.Namespace, systems: list[System], notes: list[str]) -> list[dict]:
    settings = Settings(duration=args.duration, sessions=args.sessions)
    results = []
    for run_number in range(1, args.runs + 1):
        for system in systems:
            log(f"round {run_number}/{args.runs}: {system.name}")
            results += await run_round(system, run_number, args, settings, notes)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = output_directory(args.out)
    log(f"results will be written to {out}")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    notes = []
    if "sessions" in args.only:
        fd_note = raise_fd_limit(args.sessions)
        if fd_note:
            notes.append(fd_note)
    systems = []
    for system in make_systems(args.systems.split(",")):
        reason = system.missing()
        if reason:
            notes.append(f"{system.name} skipped: {reason}")
            log(f"{system.name} skipped: {reason}")
        else:
            systems.append(system)
            notes.append(system.describe())
            for workload, why in system.unsupported.items():
                if workload in args.only:
                    notes.append(f"{workload} has no {system.name} row: {why}")
    loop = uvloop.new_event_loop()
    notes.append(f"load generator: one uvloop {uvloop.__version__} process on 127.0.0.1, TCP_NODELAY on every socket; "
                 "each peer's wire protocol is spoken directly by the bench (no client libraries), "
                 "ZeroMQ through pyzmq")
    try:
        runs = loop.run_until_complete(run_all(args, systems, notes))
    finally:
        loop.close()
    write_outputs(args, out, started, systems, runs, notes)
    return 0 if runs and all("figures" in run for run in runs) else 1


def output_directory(out: Path | None) -> Path:
    """--out, created; without it a new temp directory, so that a run never overwrites
    the committed bench/results unless asked to. Made before the run: a bad --out
    fails at once, not after it."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="castra-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_outputs(args: argparse.Namespace, out: Path, started: str, systems: list[System],
                  runs: list[dict], notes: list[str]) -> None:
    """results.json, results.md and bench.png in ``out``; the tables on stdout."""
    rows = report.summarize(runs, {system.name: system.durable for system in systems},
                            [system.name for system in systems if isinstance(system, Castra)])
    notes += report.generator_bound(rows)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
               f"Python {platform.python_version()}")
    title = (f"castra-zmq bench, {started}\n{machine}\n{args.runs} runs x {args.duration:g} s; "
             "bars: median, whiskers: min-max")
    chart_note = report.write_chart(rows, out / "bench.png", title) if rows else "chart skipped: no rows"
    if chart_note:
        notes.append(chart_note)
    document = {
        "meta": {
            "date": started,
            "machine": machine,
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "runs": args.runs, "duration_s": args.duration, "sessions": args.sessions,
            "versions": {system.name: system.version() for system in systems},
            "durable": {system.name: system.durable for system in systems},
            "workloads": {name: {"summary": w.summary, "server_cpu_per": w.per_msg}
                          for name, w in WORKLOADS.items() if name in args.only},
            "notes": notes,
        },
        "rows": rows,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(report.without_nan(document), indent=1) + "\n")
    (out / "results.md").write_text(report.render_markdown(rows, notes))
    print(report.render_text(rows))
    print("\nnotes:\n" + "\n".join(f"- {note}" for note in notes))
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}"
          + ("" if chart_note else f", {out / 'bench.png'}"))


if __name__ == "__main__":
    sys.exit(main())
