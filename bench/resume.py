"""Resume (bus-v2) of a guest that was away, under the nominal load of the others.

    python -m bench.resume [--lines 1000000] [--missed 10000] [--runs 3] [--baseline 3] [--out DIR]

Issue target: "resume of 10,000 missed messages from a log of 1,000,000 lines;
first replayed message within 50 ms, replay at >= 50,000 messages/s, while other
guests' nominal p99 stays <= 2 ms".

Prefill (once): ``castra up`` on a fresh temp state root makes its layout and is
stopped (SIGINT); then ``--lines`` lines are appended to ``logs/bus/bus.log`` in
the log's own format (``buslog.encode_lines``), going on from its last seq. The
last ``--missed`` x 10 of them hold the ``--missed`` messages on ``vm:target``
(every 10th line, from ``host``), every other line is on an ordinary topic
(``fill.*``, from ``feeder0``..``feeder7``); payloads ~100 bytes.

Each run copies that state root, starts ``castra up --fsync batch`` on it (the
start is timed: the bridge goes on from the last seq, the journal files what its
checkpoint lacks), then puts on the nominal load of ``bench.workloads`` (32 bus-v1
guests x 200 msg/s on ``bench``, a subscribed guest measuring end-to-end latency)
and measures, while it runs:

* baseline: the load's p50/p99 and the router's CPU over a window before any resume;
* sparse: a bus-v2 guest ``target`` subscribes ``vm:target`` with ``since`` the seq
  before the window of its messages: the router scans that window (and the live
  lines committed since the prefill) and replays the ``--missed`` messages;
* dense: a new bus-v2 session of ``target`` subscribes ``*`` with ``since`` =
  head - ``--missed``: every line of the stretch is its to get (its own
  ``vm:target``, ordinary topics), so nothing is scanned for nothing: what this
  costs is delivery; sparse minus dense is the cost of scanning.

The resuming guest runs in a process of its own (as a VM would), on uvloop, and
times the subscribe, the ack, the first and the last replayed message (seq <= the
ack's ``seq``) with the clock the load generator uses (CLOCK_MONOTONIC, shared
by processes). It checks that every message it should get came once, in seq
order; a failed check is reported, and the exit status is 1. The load's latency
"during" a case is that of the messages published between the subscribe and the
last replayed message. Server CPU is utime + stime from ``/proc`` of the router's
processes (supervisor and roles) over that same span, per replayed message, as
measured ("raw": the load's share included) and with the baseline's CPU rate over
the span taken off ("net"); ``/proc`` counts in clock ticks (10 ms a process).

Loopback only; every wait is bounded; temp directories and processes are removed
at the end. Writes results.json and results.md to --out (default: a new temp
directory) and prints where.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from pathlib import Path

import msgspec
import uvloop

from castra_zmq import __version__ as castra_version
from castra_zmq.buslog import encode_lines, last_seq, write_checkpoint

from .clients import CastraV2Client, ProtocolError, open_tcp
from .report import without_nan
from .systems import STOP_TIMEOUT, Castra, ProcessTree, read_ready_line
from .workloads import (
    NOMINAL_GUESTS,
    NOMINAL_RATE,
    Receiver,
    Recorder,
    Run,
    Settings,
    now_ns,
    paced,
    percentile,
)

TARGET = "target"
SPARSE_TOPIC, DENSE_TOPIC = b"vm:" + TARGET.encode(), b"*"
FEEDERS = 8  # senders of the fill lines: feeder0..feeder7
FILL_TOPICS = ("fill.metrics", "fill.logs", "fill.events", "fill.state")
EVERY = 10  # one line in EVERY of the last missed * EVERY is the target's
PREFILL_BATCH = 20_000  # lines per encode_lines call and per write

START_TIMEOUT = 120.0  # seconds for `castra up` to print its ready line (it files what the journal lacks)
COMMAND_TIMEOUT = 30.0  # seconds for the guest process to connect, and to answer anything but a resume
REPLAY_TIMEOUT_MIN = 30.0  # seconds for a resume at least; more for a bigger one (REPLAY_RATE_FLOOR)
REPLAY_RATE_FLOOR = 1_000.0  # messages a second below which a resume is called stuck
LINGER_S = 0.3  # after the last replayed message: what else comes (a duplicate, one too many)
SETTLE_S = 1.0  # between the cases: the load's latency back to its baseline
WARMUP_S = 1.0
DRAIN_S = 3.0

TARGETS = {"first_ms": 50.0, "rate_per_s": 50_000.0, "p99_during_ms": 2.0}


# -- prefill ----------------------------------------------------------------------------


def fill_payload(seq: int) -> msgspec.Raw:
    return msgspec.Raw(b'{"n":%d,"kind":"fill","values":[1.5,2.25,3.125],"note":"%s"}' % (seq, b"f" * 40))


def target_payload(seq: int) -> msgspec.Raw:
    return msgspec.Raw(b'{"n":%d,"kind":"missed","values":[1.5,2.25,3.125],"note":"%s"}' % (seq, b"m" * 38))


class Layout(msgspec.Struct):
    """Where the prefill put what: seqs ``first``..``head``; the target's messages
    are every ``EVERY``-th line of the last ``missed * EVERY``, the last line one of them."""

    first: int
    head: int
    missed: int

    @property
    def window_since(self) -> int:
        """The seq just before the target's window (the sparse case's ``since``)."""
        return self.head - self.missed * EVERY

    def target_seqs(self) -> range:
        return range(self.window_since + EVERY, self.head + 1, EVERY)


def prefill(path: Path, lines: int, missed: int) -> Layout:
    """Append ``lines`` lines to the bus log at ``path``, going on from its last seq."""
    first = last_seq(path) + 1
    window_start = lines - missed * EVERY  # index of the window's first line
    ts_ms = int(time.time() * 1000) - 1000 * math.ceil(lines / PREFILL_BATCH)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for start in range(0, lines, PREFILL_BATCH):
            messages = []
            for index in range(start, min(lines, start + PREFILL_BATCH)):
                seq = first + index
                if index >= window_start and (index - window_start) % EVERY == EVERY - 1:
                    messages.append(("host", "vm:" + TARGET, target_payload(seq)))
                else:
                    messages.append((f"feeder{index % FEEDERS}", FILL_TOPICS[index % len(FILL_TOPICS)],
                                     fill_payload(seq)))
            data = b"".join(encode_lines(ts_ms, first + start, messages))
            while data:
                data = data[os.write(fd, data):]
            ts_ms += 1000
        os.fsync(fd)
    finally:
        os.close(fd)
    layout = Layout(first, first + lines - 1, missed)
    if last_seq(path) != layout.head:
        raise RuntimeError(f"prefill: the log ends at seq {last_seq(path)}, not {layout.head}")
    if os.stat(path).st_mode & 0o777 != 0o600:
        raise RuntimeError(f"prefill: {path} is not mode 0600")
    return layout


def start_and_stop(state_root: Path, log_path: Path) -> float:
    """``castra up`` on ``state_root`` (made if new), stopped with SIGINT once ready;
    seconds to its ready line. RuntimeError with castra's error lines if it does not start."""
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "castra_zmq.cli.main", "up", "--state-root", str(state_root), "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd=_REPO,
        )
        try:
            try:
                line = read_ready_line(process, START_TIMEOUT)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; {error_lines(log_path)}") from None
            ready = time.perf_counter() - started
            if "ready on 127.0.0.1:" not in line:
                raise RuntimeError(f"castra up printed {line.strip()!r}; {error_lines(log_path)}")
            process.send_signal(signal.SIGINT)
            code = process.wait(STOP_TIMEOUT)
            if code != 0:
                raise RuntimeError(f"castra up exited with {code} on SIGINT")
            return ready
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(STOP_TIMEOUT)
            process.stdout.close()


def error_lines(log_path: Path) -> str:
    """castra's ERROR lines and last line, for a start that failed."""
    lines = log_path.read_bytes().decode(errors="replace").splitlines()
    errors = [line[24:] for line in lines if " ERROR " in line]
    return " / ".join(errors[-3:] + lines[-1:])


def backlog_start(template: Path, workdir: Path) -> tuple[float | None, str]:
    """Start ``castra up`` on a copy of the prefilled state root as it is, its
    journal's checkpoint at the seq before the prefill: the journal files every
    prefilled line into the per-VM logs before it is ready. (Seconds, "") or (None, why)."""
    copy = workdir / "backlog"
    try:
        shutil.copytree(template, copy / "s", symlinks=True)
        os.sync()
        return start_and_stop(copy / "s", workdir / "backlog.log"), ""
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


_REPO = Path(__file__).resolve().parent.parent


# -- the resuming guest: a process of its own -------------------------------------------


class Pids(ProcessTree):
    """The router's processes as found once (no /proc walk at each reading): roles
    are not started or stopped while a case runs."""

    def pids(self) -> list[int]:
        return list(self.roots)


def seq_of(body: bytes | bytearray) -> int:
    start = body.find(b'"seq":') + 6
    return int(body[start : body.find(b",", start)])


async def resume(client: CastraV2Client, topic: bytes, since: int, until: int | None, pids: list[int],
                 timeout: float) -> dict:
    """Subscribe ``topic`` with ``since``; wait for the message with seq ``until``
    (None: the ack's ``seq``), then ``LINGER_S`` for anything after it."""
    loop = asyncio.get_running_loop()
    tree = Pids(*pids)
    done = loop.create_future()
    seqs = array("q")
    result: dict = {"until": until, "first_ns": None, "last_ns": None, "ack_ns": None, "ack": None,
                    "cpu_after": None, "timed_out": False}

    def on_ack(body: bytes) -> None:
        result["ack_ns"] = now_ns()
        result["ack"] = ack = json.loads(body)
        if ack.get("status") != "ok":
            done.done() or done.set_result(None)
        elif result["until"] is None:
            result["until"] = ack["seq"]

    def on_delivery(body: bytes | bytearray) -> None:
        received = now_ns()
        seq = seq_of(body)
        seqs.append(seq)
        if result["first_ns"] is None:
            result["first_ns"] = received
        if result["last_ns"] is None and result["until"] is not None and seq >= result["until"]:
            result["last_ns"] = received
            result["cpu_after"] = tree.cpu_seconds()
            done.done() or done.set_result(None)

    client.on_subscribe_ack = on_ack
    client.on_delivery = on_delivery
    watch = loop.create_task(watch_connection(client, done))
    result["cpu_before"] = tree.cpu_seconds()
    result["subscribe_ns"] = now_ns()
    client.subscribe_since(topic, since)
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
    except asyncio.TimeoutError:
        result["timed_out"] = True
    watch.cancel()
    await asyncio.sleep(LINGER_S)
    result.update(seqs=seqs, lost=client.lost, errors=[error.decode(errors="replace") for error in client.errors])
    return result


async def watch_connection(client: CastraV2Client, done: asyncio.Future) -> None:
    """End the wait when the router drops the session (a slow consumer, a replay error)."""
    while not client.lost:
        await asyncio.sleep(0.01)
    done.done() or done.set_result(None)


def recv_within(connection, timeout: float):
    if not connection.poll(timeout):
        raise TimeoutError(f"no answer within {timeout:g}s")
    return connection.recv()


def guest_process(connection, port: int) -> None:
    """Serve the parent's commands: ("connect", vm), ("resume", ...), ("quit",)."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(guest_commands(connection, port))
    except (TimeoutError, EOFError):
        pass  # the parent is gone or stuck: stop by ourselves
    finally:
        loop.close()
        connection.close()


async def guest_commands(connection, port: int) -> None:
    loop = asyncio.get_running_loop()
    client: CastraV2Client | None = None
    try:
        while True:
            command = await loop.run_in_executor(None, recv_within, connection, 4 * COMMAND_TIMEOUT + 600)
            try:
                if command[0] == "quit":
                    return
                if command[0] == "connect":
                    if client is not None:
                        client.close()
                    client = await open_tcp(CastraV2Client, port, command[1])
                    if not client.bus_v2:
                        raise ProtocolError(f"not a bus-v2 session: {client.answer!r}")
                    connection.send(("ok", client.answer.decode()))
                elif command[0] == "resume":
                    result = await resume(client, *command[1:])
                    client.close()
                    client = None
                    connection.send(("ok", result))
            except Exception as exc:  # noqa: BLE001 - told to the parent, which reports it
                connection.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if client is not None:
            client.close()


class Guest:
    """The parent's end of the guest process."""

    def __init__(self, port: int):
        context = multiprocessing.get_context("spawn")  # not fork: this process runs a loop and threads
        self.connection, child = context.Pipe()
        self.process = context.Process(target=guest_process, args=(child, port), name="resuming-guest", daemon=True)
        self.process.start()
        child.close()

    async def command(self, *command, timeout: float = COMMAND_TIMEOUT):
        """Send one command; its answer, within ``timeout`` (the load goes on meanwhile)."""
        self.connection.send(command)
        status, answer = await asyncio.get_running_loop().run_in_executor(
            None, recv_within, self.connection, timeout)
        if status != "ok":
            raise RuntimeError(f"resuming guest: {answer}")
        return answer

    def close(self) -> None:
        try:
            self.connection.send(("quit",))
        except OSError:
            pass
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(STOP_TIMEOUT)
        self.connection.close()


# -- the load ---------------------------------------------------------------------------


class Samples(Recorder):
    """The load's ``Recorder``, its window open from the start, that also keeps when
    each message was sent: the figures of any window are found afterwards."""

    def __init__(self):
        super().__init__()
        self.sends = array("q")
        self.sample_sent = array("q")  # the send time of each of ``latencies``
        self.open()

    def stamped(self, publisher: int, n: int) -> tuple[int, bytes]:
        sent, message = super().stamped(publisher, n)
        self.sends.append(sent)
        return sent, message

    def record(self, sent: int, received: int) -> None:
        before = len(self.latencies)
        super().record(sent, received)
        if len(self.latencies) > before:
            self.sample_sent.append(sent)

    def window(self, start: int, end: int) -> dict[str, float]:
        """p50/p99/max of the messages sent in [start, end], and the share of them received."""
        ordered = sorted(latency for sent, latency in zip(self.sample_sent, self.latencies) if start <= sent <= end)
        sent = sum(1 for sent in self.sends if start <= sent <= end)
        return {"p50_ms": percentile(ordered, 0.50), "p99_ms": percentile(ordered, 0.99),
                "max_ms": percentile(ordered, 1.0), "samples": len(ordered),
                "delivered_ratio": len(ordered) / sent if sent else math.nan}


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


# -- one run ----------------------------------------------------------------------------


def check(case: str, result: dict, expected: list[int], until: int) -> dict:
    """Every expected seq once, in seq order; what else came."""
    replayed = [seq for seq in result["seqs"] if seq <= until]
    got = set(replayed)
    wanted = set(expected)
    report = {
        "expected": len(expected),
        "received": len(replayed),
        "missing": len(wanted - got),
        "duplicates": len(replayed) - len(got),
        "unexpected": len(got - wanted),
        "in_order": all(a < b for a, b in zip(result["seqs"], result["seqs"][1:])),
        "after_until": len(result["seqs"]) - len(replayed),
    }
    report["complete"] = replayed == expected
    problems = []
    if result["ack"] is None or result["ack"].get("status") != "ok":
        problems.append(f"subscribe ack {result['ack']!r}")
    if result["timed_out"]:
        problems.append("timed out before the last message")
    if result["lost"]:
        problems.append("the router closed the session")
    if result["errors"]:
        problems.append(f"unexpected frames {result['errors'][:2]}")
    if case == "sparse" and report["after_until"]:
        problems.append(f"{report['after_until']} messages after the last one")
    for key in ("missing", "duplicates", "unexpected"):
        if report[key]:
            problems.append(f"{report[key]} {key}")
    if not report["in_order"]:
        problems.append("not in seq order")
    if not report["complete"] and not problems:
        problems.append("not the expected seqs")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def case_figures(case: str, result: dict, expected: list[int], samples: Samples, baseline: dict,
                 names: dict[int, str]) -> dict:
    ack = result["ack"] or {}
    until = result["until"] if result["until"] is not None else ack.get("seq", 0)
    checked = check(case, result, expected, until)
    figures: dict = {"topic": (SPARSE_TOPIC if case == "sparse" else DENSE_TOPIC).decode(),
                     "since": ack.get("since"), "ack_seq": ack.get("seq"), "check": checked}
    if ack.get("seq") is not None and ack.get("since") is not None:
        figures["scanned_lines"] = ack["seq"] - ack["since"]
    start, first, last = result["subscribe_ns"], result["first_ns"], result["last_ns"]
    replayed = checked["received"]
    if result["ack_ns"] is not None:
        figures["ack_ms"] = (result["ack_ns"] - start) / 1e6
    if first is not None:
        figures["first_ms"] = (first - start) / 1e6
    if last is not None and replayed:
        seconds = (last - start) / 1e9
        figures["last_ms"] = seconds * 1000
        figures["rate_per_s"] = replayed / seconds
        if replayed > 1 and last > first:
            figures["rate_first_to_last_per_s"] = (replayed - 1) / ((last - first) / 1e9)
        cpu = {pid: result["cpu_after"].get(pid, 0.0) - seconds_before
               for pid, seconds_before in result["cpu_before"].items()}
        raw = sum(cpu.values())
        figures["server_cpu_s_by_process"] = {names.get(pid, str(pid)): round(value, 3) for pid, value in cpu.items()}
        figures["server_cpu_us_per_msg"] = raw / replayed * 1e6
        figures["server_cpu_net_us_per_msg"] = (raw - baseline["server_cpu_rate"] * seconds) / replayed * 1e6
        during = samples.window(start, last)
        figures.update({f"during_{key}": value for key, value in during.items()})
        # Like for like: a window as long, just before (the baseline's longer window
        # is likelier to hold one of the load's own stalls).
        before = samples.window(start - (last - start), start)
        figures.update({f"before_{key}": value for key, value in before.items()})
    return figures


async def one_run(number: int, template: Path, layout: Layout, args: argparse.Namespace, notes: list[str]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="czres", dir="/tmp"))  # short: ipc paths are limited to 107 bytes
    system = Castra("castra")
    guest: Guest | None = None
    run: Run | None = None
    figures: dict = {"run": number}
    try:
        copied = time.perf_counter()
        shutil.copytree(template, workdir / "s", symlinks=True)
        os.sync()  # the copy on disk now: its writeback would stall the router's fdatasyncs
        figures["copy_s"] = time.perf_counter() - copied
        started = time.perf_counter()
        system.start(workdir)
        figures["start_s"] = time.perf_counter() - started
        names = system.process_names()
        pids = system.tree.pids()
        bus_log = workdir / "s" / "logs" / "bus" / "bus.log"
        guest = Guest(system.port)
        await guest.command("connect", TARGET)

        samples = Samples()
        run = Run(system, Settings(duration=args.baseline, sessions=0))
        await run.subscriber("subscriber", Receiver(samples))
        publishers = await run.guests("publisher", NOMINAL_GUESTS)
        run.tasks = [asyncio.ensure_future(paced(publishers, NOMINAL_RATE, samples, run.stop))]
        await run.sleep_watching(min(WARMUP_S, args.baseline))

        tree = Pids(*pids)
        cpu_before, generator_before, window_start = tree.cpu_seconds(), own_cpu(), now_ns()
        await run.sleep_watching(args.baseline)
        window_end, generator_after, cpu_after = now_ns(), own_cpu(), tree.cpu_seconds()
        seconds = (window_end - window_start) / 1e9
        baseline = {"seconds": seconds,
                    "server_cpu_rate": sum(cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after) / seconds,
                    "generator_cpu_pct": (generator_after - generator_before) / seconds * 100}
        figures["baseline"] = baseline
        timeout = max(REPLAY_TIMEOUT_MIN, layout.missed / REPLAY_RATE_FLOOR)

        # sparse: the target's messages, one line in EVERY of its window
        result = await guest.command("resume", SPARSE_TOPIC, layout.window_since, layout.head, pids, timeout,
                                     timeout=timeout + LINGER_S + COMMAND_TIMEOUT)
        head = (result["ack"] or {}).get("seq", layout.head)
        expected = [seq for seq in layout.target_seqs() if seq <= head]
        sparse = {"result": result, "expected": expected}
        await run.sleep_watching(SETTLE_S)

        # dense: every line after since is the guest's to get
        await guest.command("connect", TARGET)
        since = last_seq(bus_log) - layout.missed
        result = await guest.command("resume", DENSE_TOPIC, since, None, pids, timeout,
                                     timeout=timeout + LINGER_S + COMMAND_TIMEOUT)
        ack = result["ack"] or {}
        dense = {"result": result, "expected": list(range(ack.get("since", since) + 1, ack.get("seq", since) + 1))}

        run.stop.set()
        await asyncio.wait_for(asyncio.gather(*run.tasks), DRAIN_S)
        await run.drain((samples,), lambda: samples.received >= samples.sent)
        baseline.update(samples.window(window_start, window_end))
        figures["sparse"] = case_figures("sparse", sparse["result"], sparse["expected"], samples, baseline, names)
        figures["dense"] = case_figures("dense", dense["result"], dense["expected"], samples, baseline, names)
        figures["load_delivered_ratio"] = samples.received / samples.sent if samples.sent else math.nan
        if head <= layout.head:
            figures["error"] = f"the router's seq {head} did not go on from the prefill's {layout.head}"
        errors = [error for client in run.clients for error in getattr(client, "errors", [])]
        if errors:
            figures["load_unexpected_replies"] = [error.decode(errors="replace") for error in errors[:5]]
    except Exception as exc:  # noqa: BLE001 - a failed run is reported, never hidden; the others go on
        figures["error"] = f"{type(exc).__name__}: {exc}"
        notes.append(f"run {number} failed: {figures['error']}")
        log(f"run {number} FAILED\n{traceback.format_exc()}{system.log_tail() if system.workdir else ''}")
    finally:
        if run is not None:
            run.close()
            await asyncio.sleep(0)
        if guest is not None:
            guest.close()
        system.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


# -- report -----------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    values = [value for value in values if value is not None and not math.isnan(value)]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cell(figure: dict[str, float], fmt: str) -> str:
    if not figure["n"]:
        return "-"
    if figure["n"] == 1 or figure["min"] == figure["max"]:
        return fmt.format(figure["median"])
    return f"{fmt.format(figure['median'])} [{fmt.format(figure['min'])}-{fmt.format(figure['max'])}]"


COLUMNS = (  # (key in a case's figures, label, format)
    ("first_ms", "first msg ms", "{:.1f}"),
    ("last_ms", "last msg ms", "{:.0f}"),
    ("rate_per_s", "replay msgs/s", "{:,.0f}"),
    ("baseline_p99_ms", "load p99 ms baseline", "{:.2f}"),
    ("before_p99_ms", "just before", "{:.2f}"),
    ("during_p99_ms", "during", "{:.2f}"),
    ("server_cpu_us_per_msg", "server CPU us/msg", "{:.1f}"),
    ("server_cpu_net_us_per_msg", "net of load", "{:.1f}"),
)
CASES = {"sparse": "sparse: 1 line in 10 is the target's", "dense": "dense: consecutive (`*`)"}


def summarize(runs: list[dict]) -> dict:
    good = [run for run in runs if "error" not in run]
    summary: dict = {"start_s": spread([run.get("start_s") for run in runs])}
    for case in CASES:
        rows = [dict(run[case], baseline_p99_ms=run["baseline"]["p99_ms"]) for run in good if case in run]
        summary[case] = {key: spread([row.get(key) for row in rows])
                         for key in [column[0] for column in COLUMNS] + [
                             "during_samples", "during_p50_ms", "before_p50_ms", "during_delivered_ratio", "ack_ms",
                             "scanned_lines", "rate_first_to_last_per_s"]}
        summary[case]["checks_ok"] = sum(row["check"]["ok"] for row in rows)
        summary[case]["runs"] = len(rows)
    summary["baseline"] = {key: spread([run["baseline"].get(key) for run in good])
                           for key in ("p50_ms", "p99_ms", "server_cpu_rate", "generator_cpu_pct", "samples")}
    return summary


def targets_line(summary: dict) -> list[str]:
    lines = []
    for case in CASES:
        figures = summary[case]
        verdicts = []
        for key, label, limit, better in (("first_ms", "first message <= 50 ms", TARGETS["first_ms"], min),
                                          ("rate_per_s", "replay >= 50,000 msgs/s", TARGETS["rate_per_s"], max),
                                          ("during_p99_ms", "load p99 <= 2 ms during", TARGETS["p99_during_ms"], min)):
            median = figures[key]["median"]
            if math.isnan(median):
                verdicts.append(f"{label}: no figure")
            else:
                met = median <= limit if better is min else median >= limit
                verdicts.append(f"{label}: {'met' if met else 'MISSED'}")
        lines.append(f"{case}: " + "; ".join(verdicts) + " (medians)")
    return lines


def checks_lines(runs: list[dict]) -> list[str]:
    lines = []
    for run in runs:
        if "error" in run:
            lines.append(f"run {run['run']}: FAILED: {run['error']}")
            continue
        for case in CASES:
            checked = run[case]["check"]
            if checked["ok"]:
                state = "complete, once each, in seq order"
            else:
                state = "FAILED: " + "; ".join(checked["problems"])
            lines.append(f"run {run['run']} {case}: {checked['received']}/{checked['expected']} replayed, {state}")
    return lines


def figure_lines(summary: dict, meta: dict) -> list[str]:
    sparse, dense, baseline = summary["sparse"], summary["dense"], summary["baseline"]
    if meta["backlog_start_s"] is not None:
        backlog = f"{meta['backlog_start_s']:.2f} s"
    else:
        backlog = "did not start, see notes"
    return [
        (f"castra up start -> ready line: {cell(summary['start_s'], '{:.2f}')} s with the prefilled log "
         f"(empty state root: {meta['empty_start_s']:.2f} s; journal {meta['lines']:,} lines behind: {backlog})"),
        (f"scanned: sparse {cell(sparse['scanned_lines'], '{:,.0f}')} lines for {meta['missed']:,} messages; "
         f"dense {cell(dense['scanned_lines'], '{:,.0f}')} lines, all replayed"),
        (f"load p50 ms: baseline {cell(baseline['p50_ms'], '{:.2f}')}; sparse just before "
         f"{cell(sparse['before_p50_ms'], '{:.2f}')}, during {cell(sparse['during_p50_ms'], '{:.2f}')}; "
         f"dense just before {cell(dense['before_p50_ms'], '{:.2f}')}, during "
         f"{cell(dense['during_p50_ms'], '{:.2f}')}"),
        (f"load latency samples: baseline {cell(baseline['samples'], '{:.0f}')}, during sparse "
         f"{cell(sparse['during_samples'], '{:.0f}')}, during dense {cell(dense['during_samples'], '{:.0f}')} "
         "(as many just before each)"),
    ]


def render(summary: dict, runs: list[dict], meta: dict, markdown: bool) -> str:
    header = ["case", *[label for _, label, _ in COLUMNS]]
    rows = [[title, *[cell(summary[case][key], fmt) for key, _, fmt in COLUMNS]] for case, title in CASES.items()]
    out = []
    if markdown:
        out += [f"# castra-zmq resume bench, {meta['date']}", "", f"`{meta['command']}`", "",
                f"Machine: {meta['machine']}", "", f"Log: {meta['log']}", "",
                "median [min-max] over runs", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        out += [f"command: {meta['command']}", f"machine: {meta['machine']}", f"log: {meta['log']}",
                "median [min-max] over runs", ""]
        widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
        for row in [header, *rows]:
            out.append("  ".join(value.ljust(widths[index]) if index == 0 else value.rjust(widths[index])
                                 for index, value in enumerate(row)))
    out.append("")
    extra = figure_lines(summary, meta) + targets_line(summary) + checks_lines(runs)
    out += [("- " if markdown else "") + line for line in extra]
    out += ["", "Notes:", ""] if markdown else ["", "notes:"]
    out += [f"- {note}" for note in meta["notes"]]
    return "\n".join(out) + "\n"


def describe(args: argparse.Namespace, layout: Layout, size: int, prefill_s: float, runs: list[dict],
             empty_start: float, backlog_s: float | None, backlog_failure: str) -> list[str]:
    """How the figures were made, for the notes."""
    backlog = f"{backlog_s:.2f} s" if backlog_s is not None else f"did not start: {backlog_failure}"
    measured = [run for run in runs if "baseline" in run]
    generator = cell(spread([run["baseline"]["generator_cpu_pct"] for run in measured]), "{:.0f}")
    router = cell(spread([run["baseline"]["server_cpu_rate"] * 100 for run in measured]), "{:.0f}")
    starts = cell(spread([run.get("start_s") for run in runs]), "{:.2f}")
    return [
        (f"castra up start -> ready line: empty state root {empty_start:.2f} s; with the {args.lines:,}-line "
         f"log and the journal's checkpoint at its head (each run): {starts} s; with the journal's checkpoint "
         f"at 0, so that it files all {args.lines:,} lines into the per-VM logs before it is ready (once, on a "
         f"copy): {backlog}"),
        (f"bus.log prefilled with {args.lines:,} lines ({size / 2**20:.0f} MiB, ~{size // args.lines} bytes a "
         f"line, payloads ~100 bytes) in {prefill_s:.1f} s; the last {args.missed * EVERY:,} hold the "
         f"{args.missed:,} messages on vm:{TARGET} (from host, every {EVERY}th line), the rest fill.* from "
         f"feeder0..{FEEDERS - 1}; each run starts on a fresh copy; the log is in the page cache (a cold read "
         "is not measured)"),
        (f"router: `castra up --fsync batch` (durable), started on the copy (synced to disk first); its seq "
         f"goes on from the prefill's {layout.head:,}; the template's journal checkpoint is set to that head "
         "(the per-VM logs do not have the prefilled lines: resume reads bus.log only)"),
        (f"load: {NOMINAL_GUESTS} bus-v1 guests x {NOMINAL_RATE:g} msg/s on `bench` (bench.workloads.paced), "
         f"one subscribed guest measuring end-to-end latency, in one uvloop process; {WARMUP_S:g} s warm-up, "
         f"baseline window {args.baseline:g} s; 'during' = the messages published from the subscribe to the "
         "last replayed message, 'just before' = those of a window as long before the subscribe"),
        ("resuming guest: bus-v2 (bench.clients.CastraV2Client) in a process of its own on uvloop; times from "
         "writing the subscribe; msgs/s = replayed / time to the last; 'replayed' = the messages with seq <= "
         "the ack's seq (in dense, live messages committed during the replay come through it, and count)"),
        (f"sparse since = {layout.window_since:,} (the seq before the target's window): the replay also scans "
         "the live lines committed between the prefill and the subscribe; dense: since = head - missed, "
         "subscribed `*`"),
        ("server CPU: utime+stime of the supervisor and its roles from /proc over the replay (10 ms ticks per "
         "process), per replayed message; 'net of load' takes off the baseline's CPU rate over the same span: "
         "a rough figure, below zero when the load cost less during the span than at baseline"),
        f"baseline: load generator CPU {generator} % of one core; router CPU {router} % of one core",
    ]


# -- main -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(case: str, figures: dict) -> str:
    """One case of a run, for the progress lines."""
    case_figures = figures[case]
    return (f"{case}: first {case_figures.get('first_ms', math.nan):.1f} ms, "
            f"last {case_figures.get('last_ms', math.nan):.0f} ms, {case_figures.get('rate_per_s', math.nan):,.0f}/s, "
            f"load p99 {figures['baseline']['p99_ms']:.2f} -> {case_figures.get('during_p99_ms', math.nan):.2f} ms, "
            + ("ok" if case_figures["check"]["ok"] else "CHECK FAILED"))


def machine_facts() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()} {model}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, uvloop {uvloop.__version__}, castra-zmq {castra_version}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines prefilled into bus.log (default 1000000)")
    parser.add_argument("--missed", type=int, default=10_000, help="messages the guest missed (default 10000)")
    parser.add_argument("--runs", type=int, default=3, help="runs; each figure is their median (default 3)")
    parser.add_argument("--baseline", type=float, default=3.0,
                        help="seconds of the load's baseline window before the resumes (default 3)")
    parser.add_argument("--out", type=Path, help="output directory (default: a new one under the temp directory)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.missed < 1 or args.baseline <= 0:
        parser.error("--runs, --missed and --baseline must be positive")
    if args.lines < args.missed * EVERY:
        parser.error(f"--lines must be at least --missed x {EVERY}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="castra-bench-resume-"))
    out.mkdir(parents=True, exist_ok=True)
    log(f"results will be written to {out}")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    command = " ".join(["python -m bench.resume", *(sys.argv[1:] if argv is None else argv)])
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="czres", dir="/tmp"))
    runs: list[dict] = []
    try:
        template = workdir / "s"
        empty_start = start_and_stop(template, workdir / "layout.log")
        prefilled = time.perf_counter()
        bus_log = template / "logs" / "bus" / "bus.log"
        layout = prefill(bus_log, args.lines, args.missed)
        prefill_s = time.perf_counter() - prefilled
        size = bus_log.stat().st_size
        log(f"prefilled {args.lines:,} lines (seqs {layout.first}..{layout.head}, {size / 2**20:.0f} MiB) "
            f"in {prefill_s:.1f} s")
        backlog_s, backlog_failure = backlog_start(template, workdir)
        log(f"start with the journal {args.lines:,} lines behind: "
            + (f"{backlog_s:.2f} s" if backlog_s is not None else f"FAILED: {backlog_failure}"))
        # As if the journal had filed the prefill as it was committed: the runs'
        # starts are those of a router with a long log, not with a long backlog.
        write_checkpoint(template / "state" / "journal.json", layout.head, sync=True)
        loop = uvloop.new_event_loop()
        try:
            for number in range(1, args.runs + 1):
                log(f"run {number}/{args.runs}")
                figures = loop.run_until_complete(one_run(number, template, layout, args, notes))
                runs.append(figures)
                if "error" not in figures:
                    log(f"  start {figures['start_s']:.2f} s; " + "; ".join(map(progress, CASES, [figures] * 2)))
        finally:
            loop.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    notes += describe(args, layout, size, prefill_s, runs, empty_start, backlog_s, backlog_failure)
    load_after = os.getloadavg()
    notes.append(f"machine load average (1 min) {load_before[0]:.1f} before the bench, {load_after[0]:.1f} after "
                 f"({os.cpu_count()} CPUs): other work on the machine shares the CPUs with the router and the clients")
    meta = {"date": date, "command": command, "machine": machine_facts(), "notes": notes,
            "load_average_start": load_before,
            "lines": args.lines, "missed": args.missed, "runs": args.runs, "baseline_s": args.baseline,
            "empty_start_s": empty_start, "backlog_start_s": backlog_s, "backlog_start_failure": backlog_failure,
            "prefill_s": prefill_s, "log_bytes": size, "load_average_end": os.getloadavg(),
            "log": f"{args.lines:,} lines, {args.missed:,} missed", "layout": msgspec.to_builtins(layout),
            "targets": TARGETS}
    summary = summarize(runs)
    document = {"meta": meta, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(without_nan(document), indent=1) + "\n")
    (out / "results.md").write_text(render(summary, runs, meta, markdown=True))
    print(render(summary, runs, meta, markdown=False))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")
    ok = runs and all("error" not in run and all(run[case]["check"]["ok"] for case in CASES) for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
