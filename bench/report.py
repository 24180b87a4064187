"""From per-run figures to rows (median, min, max), castra/peer ratios, table and chart.

Every row says whether its system is durable (acks a publish only after an fsync).
Ratios compare like with like: each peer against the castra of its own durability
(``castra``, fsync batch, for the durable peers; ``castra-nofsync`` for the others),
and against the other castra only when that one is not in the run, which the ratio's
label then says."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .workloads import WORKLOADS

#: label and format of every figure the tables show (the JSON has them all)
FIGURES = {
    "sent_per_s": ("sent/s", "{:,.0f}"),
    "p50_ms": ("p50 ms", "{:.2f}"),
    "p99_ms": ("p99 ms", "{:.2f}"),
    "max_ms": ("max ms", "{:.1f}"),
    "delivered_ratio": ("delivered", "{:.4f}"),
    "acked_per_s": ("acked/s", "{:,.0f}"),
    "ack_p50_ms": ("ack p50 ms", "{:.2f}"),
    "ack_p99_ms": ("ack p99 ms", "{:.2f}"),
    "delivered_per_s": ("delivered/s", "{:,.0f}"),
    "sessions": ("sessions", "{:,.0f}"),
    "handshakes_per_s": ("handshakes/s", "{:,.0f}"),
    "rss_kib_per_session": ("RSS KiB/session", "{:.1f}"),
    "heartbeat_ratio": ("heartbeats ok", "{:.4f}"),
    "local_p50_ms": ("local p50 ms", "{:.2f}"),
    "local_p99_ms": ("local p99 ms", "{:.2f}"),
    "local_delivered_ratio": ("local delivered", "{:.4f}"),
    "cross_delivered_per_s": ("cross-host delivered/s", "{:,.0f}"),
    "cross_p50_ms": ("cross-host p50 ms", "{:.2f}"),
    "cross_p99_ms": ("cross-host p99 ms", "{:.2f}"),
    "cross_max_ms": ("cross-host max ms", "{:.1f}"),
    "cross_delivered_ratio": ("cross-host delivered", "{:.4f}"),
    "server_cpu_us_per_msg": ("server CPU us/msg", "{:.1f}"),
    "generator_cpu_pct": ("generator CPU %", "{:.0f}"),
}
#: appended to every workload's own columns
COMMON_COLUMNS = ("server_cpu_us_per_msg", "generator_cpu_pct")
#: the figures whose castra/peer ratio the table shows, per workload
RATIO_COLUMNS = {
    "nominal": ("p99_ms", "server_cpu_us_per_msg"),
    "acked": ("acked_per_s", "ack_p99_ms", "server_cpu_us_per_msg"),
    "pipelined": ("acked_per_s", "server_cpu_us_per_msg"),
    "saturation": ("delivered_per_s", "p99_ms", "server_cpu_us_per_msg"),
    "fanout": ("p99_ms", "server_cpu_us_per_msg"),
    "sessions": ("handshakes_per_s", "rss_kib_per_session", "server_cpu_us_per_msg"),
    "federation": ("local_p50_ms", "local_p99_ms"),  # the local path without the uplink / with it
}
#: a load generator this busy (% of its one core) is what limits the row's rates
GENERATOR_BOUND_PCT = 80.0
SYSTEM_COLORS = {"castra": "#d1495b", "castra-nofsync": "#f4a3ad", "castra-uplink": "#8c2f39", "mosquitto": "#00798c", "nats": "#edae49",
                 "nats-sync": "#a8701a", "redis": "#6a4c93", "zmq": "#66a182"}


def durability(durable: bool) -> str:
    return "durable" if durable else "not durable"


def spread(values: list[float]) -> dict[str, float]:
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict], durable: dict[str, bool], baselines: list[str]) -> list[dict]:
    """One row per (workload, system): its durability, every figure's median/min/max over
    its runs, and on the baselines' rows (castra's) the ratios baseline/peer computed per
    run pair, each peer paired with the baseline of its durability (see ``baseline_for``)."""
    rows = []
    for workload in WORKLOADS:
        systems = list(dict.fromkeys(run["system"] for run in runs if run["workload"] == workload))
        by_system = {
            system: {run["run"]: run["figures"] for run in runs
                     if run["workload"] == workload and run["system"] == system and "figures" in run}
            for system in systems
        }
        by_system = {system: figures_by_run for system, figures_by_run in by_system.items() if figures_by_run}
        present = [system for system in baselines if system in by_system]
        for system, figures_by_run in by_system.items():
            keys = next(iter(figures_by_run.values())).keys()
            row = {"workload": workload, "system": system, "durable": durable[system], "runs": len(figures_by_run),
                   "figures": {key: spread([f[key] for f in figures_by_run.values()]) for key in keys}}
            if system in present:
                row["ratios"] = {
                    peer: ratios(figures_by_run, peer_runs) for peer, peer_runs in by_system.items()
                    if peer not in baselines and baseline_for(durable[peer], present, durable) == system
                }
            rows.append(row)
    return rows


def baseline_for(peer_durable: bool, present: list[str], durable: dict[str, bool]) -> str | None:
    """The baseline a peer is compared with: the first present one of the peer's
    durability, else the first present one."""
    alike = [system for system in present if durable[system] == peer_durable]
    return (alike or present or [None])[0]


def ratios(ours: dict[int, dict], theirs: dict[int, dict]) -> dict[str, dict[str, float]]:
    pairs = [(ours[run], theirs[run]) for run in sorted(ours.keys() & theirs.keys())]
    keys = pairs[0][0].keys() & pairs[0][1].keys() if pairs else ()
    return {key: spread([a[key] / b[key] if b[key] else math.nan for a, b in pairs]) for key in sorted(keys)}


def generator_bound(rows: list[dict]) -> list[str]:
    """Notes for the rows whose rates are the load generator's limit, not the server's."""
    return [
        f"{row['workload']} on {row['system']}: the load generator used "
        f"{row['figures']['generator_cpu_pct']['median']:.0f}% CPU, so its rates are a lower bound for "
        "the server" for row in rows
        if row["figures"].get("generator_cpu_pct", {}).get("median", 0) >= GENERATOR_BOUND_PCT
    ]


def cell(figure: dict[str, float], key: str, runs: int) -> str:
    fmt = FIGURES[key][1]
    if math.isnan(figure["median"]):
        return "-"
    text = fmt.format(figure["median"])
    if runs > 1:
        text += f" [{fmt.format(figure['min'])}-{fmt.format(figure['max'])}]"
    return text


def ratio_cell(figure: dict[str, float]) -> str:
    if math.isnan(figure["median"]):
        return "-"
    return f"{figure['median']:.2f}x [{figure['min']:.2f}-{figure['max']:.2f}]"


def tables(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) per workload, then one for the ratios."""
    out = []
    for name, workload in WORKLOADS.items():
        workload_rows = [row for row in rows if row["workload"] == name]
        if not workload_rows:
            continue
        columns = workload.columns + COMMON_COLUMNS
        header = ["system", "durable", *(FIGURES[key][0] for key in columns)]
        body = [[row["system"], "yes" if row["durable"] else "no",
                 *(cell(row["figures"][key], key, row["runs"]) for key in columns)]
                for row in workload_rows]
        out.append((f"{name}: {workload.summary} (CPU per {workload.per_msg})", header, body))
    durable = {row["system"]: row["durable"] for row in rows}
    ratio_body = []
    for row in rows:
        for peer, figures in row.get("ratios", {}).items():
            shown = [f"{FIGURES[key][0]} {ratio_cell(figures[key])}"
                     for key in RATIO_COLUMNS[row["workload"]] if key in figures]
            kinds = (f"both {durability(row['durable'])}" if row["durable"] == durable[peer]
                     else f"unlike: {durability(row['durable'])} / {durability(durable[peer])}")
            ratio_body.append([row["workload"], f"{row['system']}/{peer} ({kinds})", "; ".join(shown)])
    if ratio_body:
        out.append(("ratios per run pair, median [min-max]", ["workload", "ratio", "figures"], ratio_body))
    return out


def render_text(rows: list[dict]) -> str:
    blocks = []
    for title, header, body in tables(rows):
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_markdown(rows: list[dict], notes: list[str]) -> str:
    blocks = []
    for title, header, body in tables(rows):
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(line) + " |" for line in body]
        blocks.append("\n".join(lines))
    blocks.append("Notes:\n\n" + "\n".join(f"- {note}" for note in notes))
    return "\n\n".join(blocks) + "\n"


def write_chart(rows: list[dict], path: Path, title: str) -> str | None:
    """The PNG chart; returns a note instead when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install '.[bench]')"
    matplotlib.use("Agg")
    from matplotlib import pyplot

    systems = list(dict.fromkeys(row["system"] for row in rows))
    durable = {row["system"]: row["durable"] for row in rows}
    panels = [
        ("latency p99 (dot: p50), ms", "log",
         [("nominal", "p99_ms", "p50_ms"), ("saturation", "p99_ms", "p50_ms"), ("fanout", "p99_ms", "p50_ms"),
          ("acked", "ack_p99_ms", "ack_p50_ms")]),
        ("throughput, msgs/s", "linear",
         [("acked", "acked_per_s", None), ("pipelined", "acked_per_s", None),
          ("saturation", "delivered_per_s", None)]),
        ("server CPU per message, us", "log",
         [(name, "server_cpu_us_per_msg", None) for name in WORKLOADS]),
        ("sessions: handshakes/s", "linear", [("sessions", "handshakes_per_s", None)]),
        ("sessions: server RSS per session, KiB", "linear", [("sessions", "rss_kib_per_session", None)]),
    ]
    figure, axes = pyplot.subplots(2, 3, figsize=(13, 7))
    lookup = {(row["workload"], row["system"]): row["figures"] for row in rows}
    width = 0.8 / max(1, len(systems))
    for axis, (panel_title, scale, groups) in zip(axes.flat, panels):
        for offset, system in enumerate(systems):
            xs, heights, lows, highs, dots = [], [], [], [], []
            for x, (workload, key, dot_key) in enumerate(groups):
                figures = lookup.get((workload, system))
                if not figures or key not in figures or math.isnan(figures[key]["median"]):
                    continue
                value = figures[key]
                xs.append(x + (offset - (len(systems) - 1) / 2) * width)
                heights.append(value["median"])
                lows.append(value["median"] - value["min"])
                highs.append(value["max"] - value["median"])
                dots.append(figures[dot_key]["median"] if dot_key else None)
            axis.bar(xs, heights, width, yerr=[lows, highs], color=SYSTEM_COLORS.get(system),
                     label=f"{system} ({durability(durable[system])})",
                     capsize=2, error_kw={"elinewidth": 0.8})
            marked = [(x, dot) for x, dot in zip(xs, dots) if dot is not None]
            if marked:
                axis.plot(*zip(*marked), "k.", markersize=4)
        axis.set_title(panel_title, fontsize=10)
        axis.set_yscale(scale)
        axis.set_xticks(range(len(groups)), [workload for workload, _, _ in groups], fontsize=8)
        axis.tick_params(axis="y", labelsize=8)
        axis.grid(axis="y", alpha=0.3)
    notes_panel = axes.flat[-1]
    notes_panel.axis("off")
    notes_panel.text(0, 1, title, va="top", fontsize=8, wrap=True)
    notes_panel.legend(*axes.flat[0].get_legend_handles_labels(), loc="center left", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=72)
    pyplot.close(figure)
    return None


def without_nan(value):
    """NaN (a figure with no samples) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return value
