"""
The figures, their targets, statistics over repetitions, and the table.

A figure is one number per repetition and per daemon.  Its summary is the
median with the spread (min-max) over the repetitions; the ratio is
median(ours) / median(theirs).  A target is checked on the medians.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable

import attrs


@attrs.frozen
class Goal:
    """C{ratio_le}: ours <= value x theirs; C{le}: ours <= value; C{ge}: ours >= value."""

    kind: str
    value: float

    def describe(self, unit: str) -> str:
        if self.kind == "ratio_le":
            return f"<= {self.value:g}x theirs"
        sign = "<=" if self.kind == "le" else ">="
        return f"{sign} {self.value:g} {unit}".rstrip()

    def check(self, ours: float | None, theirs: float | None) -> bool | None:
        """Whether the target is met; C{None} when it cannot be told."""
        if ours is None:
            return None
        if self.kind == "ratio_le":
            if theirs is None:
                return None
            return ours <= self.value * theirs
        if self.kind == "le":
            return ours <= self.value
        return ours >= self.value


@attrs.frozen
class Figure:
    key: str
    measure: int
    label: str
    unit: str
    goal: Goal | None = None
    #: Whether it is measured for the upstream daemon too.
    peer: bool = True
    #: Whether it compares ours with theirs (and so exists only beside a peer).
    against_peer: bool = False


def figures(sizes: dict[str, Any]) -> list[Figure]:
    """Every figure, labelled with this run's sizes."""
    s = sizes
    return [
        Figure("ping_p50_ms", 1, f"PING, fresh connection, p50 (n={s['pings']})", "ms",
               Goal("ratio_le", 0.05)),
        Figure("ping_p99_ms", 1, f"PING, fresh connection, p99 (n={s['pings']})", "ms",
               Goal("ratio_le", 0.05)),
        Figure("cold_ping_s", 2, "daemon cold start -> PING answers", "s"),
        Figure("cold_query_s", 2, "daemon cold start -> libpq SELECT 1", "s"),
        Figure("client_cold_s", 3, "client lib: cold auto-spawn -> first query", "s",
               peer=False),
        Figure("client_warm_s", 3, "client lib: warm -> first query", "s", peer=False),
        Figure("mcp_cold_s", 3, "MCP server: cold auto-spawn -> query result", "s",
               Goal("ratio_le", 3.0)),
        Figure("mcp_warm_s", 3, "MCP server: warm -> query result", "s",
               Goal("ratio_le", 1.0)),
        Figure("recovery_s", 4, "hyperd SIGKILL -> query works again", "s", Goal("le", 0.5)),
        Figure("stop_s", 5, "STOP -> exited and daemon.json gone", "s", Goal("le", 0.5)),
        Figure("idle_cpu_s", 6, f"idle CPU over {s['idle_s']:g} s (daemon only)", "s",
               Goal("ratio_le", 0.1)),
        Figure("idle_rss_mb", 6, "idle RSS (daemon only, no hyperd)", "MB", Goal("le", 40)),
        Figure("mem_shared_mb", 7, f"{s['sessions']} client-lib sessions, daemon: RSS sum", "MB",
               peer=False),
        Figure("mem_private_mb", 7, f"{s['sessions']} client-lib sessions, private: RSS sum",
               "MB", peer=False),
        Figure("mem_ratio", 7, "client lib: private / shared memory", "x", peer=False),
        Figure("mem_ratio_pss", 7, "client lib: private / shared, by PSS", "x", peer=False),
        Figure("mem_ratio_server", 7, "client lib: private hyperds / (daemon + its hyperd)",
               "x", Goal("ge", 6), peer=False),
        Figure("mcp_mem_shared_mb", 7, f"{s['sessions']} MCP servers, daemon: RSS sum", "MB"),
        Figure("mcp_mem_shared_pss_mb", 7, f"{s['sessions']} MCP servers, daemon: PSS sum",
               "MB", Goal("ratio_le", 1.5)),
        Figure("mcp_assistant_private_mb", 7,
               "per assistant: private memory (its server + its session in the host)", "MB",
               Goal("ratio_le", 1.0)),
        Figure("mcp_assistant_pss_mb", 7,
               "per assistant: PSS (its server + its session in the host)", "MB",
               Goal("ratio_le", 1.0)),
        Figure("mcp_assistant_amortized_private_mb", 7,
               f"per assistant, host's base shared by {s['sessions']}: private memory", "MB"),
        Figure("mcp_crossover_n", 7, "assistants from which ours takes less PSS in all", "n",
               peer=False, against_peer=True),
        Figure("mcp_mem_private_mb", 7, f"{s['sessions']} MCP servers, private: RSS sum", "MB"),
        Figure("mcp_mem_ratio", 7, "MCP servers: private / shared memory", "x"),
        Figure("mcp_mem_ratio_pss", 7, "MCP servers: private / shared, by PSS", "x"),
        Figure("mcp_mem_ratio_server", 7, "MCP: private hyperds / (daemon + its hyperd)", "x",
               Goal("ge", 6)),
        Figure("load_attach_s", 8, f"open {s['load']} sessions (theirs: connections)", "s"),
        Figure("load_ping_p50_ms", 8, f"PING p50 under {s['load']} heartbeating", "ms"),
        Figure("load_ping_p99_ms", 8, f"PING p99 under {s['load']} heartbeating", "ms",
               Goal("le", 5)),
        Figure("load_heartbeat_p99_ms", 8, "HEARTBEAT reply p99 under load", "ms"),
        Figure("load_cpu_pct", 8, "daemon CPU under load (% of a core)", "%"),
        Figure("load_rss_mb", 8, f"daemon RSS with {s['load']} connections", "MB"),
        Figure("load_failures", 8, "failed connections, heartbeats, PINGs", "n"),
        Figure("load_csv_s", 9, f"load_data, {s['load_csv_rows']:,} inline CSV rows", "s",
               Goal("ratio_le", 1.0)),
        Figure("load_json_s", 9, f"load_data, {s['load_json_rows']:,} inline JSON rows", "s",
               Goal("ratio_le", 1.0)),
        Figure("load_peak_rss_mb", 9, "MCP server's peak RSS after both loads", "MB"),
        Figure("inspect_file_s", 9, f"inspect_file, {s['file_rows']:,}-row CSV file", "s"),
        Figure("load_files_s", 9, f"load_files, {s['file_rows']:,} CSV rows in 4 files", "s"),
    ]


def percentile(samples: Iterable[float], p: float) -> float:
    """The nearest-rank C{p}th percentile."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(values: list[float | None]) -> dict[str, Any] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got),
            "values": values, "n": len(got)}


def _num(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def cell(summary: dict[str, Any] | None, repeats: int) -> str:
    if summary is None:
        return "error"
    text = _num(summary["median"])
    if summary["n"] > 1:
        text += f" [{_num(summary['min'])}-{_num(summary['max'])}]"
    if summary["n"] < repeats:
        text += f" ({summary['n']}/{repeats} ok)"
    return text


def table(rows: list[dict[str, Any]], with_peer: bool, repeats: int) -> str:
    """The results as aligned text: one line per figure."""
    header = ["#", "figure", "unit", "ours"]
    if with_peer:
        header += ["theirs", "ours/theirs"]
    header += ["target", "pass"]
    lines = [header]
    for row in rows:
        line = [str(row["measure"]), row["label"], row["unit"], cell(row["ours"], repeats)]
        if with_peer:
            if not row["peer"]:
                line += ["n/a", ""]
            else:
                line.append(cell(row["theirs"], repeats))
                line.append("" if row["ratio"] is None else f"{row['ratio']:.3g}x")
        line.append(row["target"] or "")
        line.append({True: "PASS", False: "FAIL", None: "n/a" if row["target"] else ""}
                    [row["pass"]])
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)
