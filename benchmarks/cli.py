"""
C{python -m benchmarks}: run the measures, print the table, write the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from . import filetools, measures
from .load import raise_fd_limit
from .procs import Reaper
from .report import figures, summarize, table
from .targets import Ours, Target, Theirs

DEFAULT_PEER = "HYPERDB_PEER_DIR"
FULL = {"pings": 200, "idle_s": 10.0, "sessions": 8, "load": 1000, "load_pings": 200,
        "load_csv_rows": 150_000, "load_json_rows": 20_000, "file_rows": 1_500_000}
QUICK = {"pings": 20, "idle_s": 2.0, "sessions": 2, "load": 50, "load_pings": 20,
         "load_csv_rows": 10_000, "load_json_rows": 1_000, "file_rows": 20_000}
ALL_MEASURES = set(range(1, 10))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure our daemon, side by side with the upstream one if it is given.",
    )
    parser.add_argument("--peer", metavar="DIR",
                        help=f"the upstream package folder (hyperdb-mcp and hyperd); "
                             f"default: ${DEFAULT_PEER}. Without it: ours alone.")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="repetitions of every measure (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="every measure once, tiny sizes (under a minute for ours alone)")
    parser.add_argument("--json", metavar="PATH", default="benchmark-results.json",
                        help="where to write the results (default: benchmark-results.json)")
    parser.add_argument("--only", metavar="LIST",
                        help="run only these measures, e.g. 1,6 (default: all nine)")
    parser.add_argument("--load-sessions", type=int, metavar="N",
                        help="sessions for measure 8 (default 1000; --quick: 50)")
    parser.add_argument("--keep-temp", action="store_true",
                        help="keep the temporary state folders and logs")
    return parser


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def machine() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory": _mem_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def _peer(option: str | None) -> tuple[Path | None, str | None]:
    """The peer package folder if given and present; else why not."""
    given = option or os.environ.get(DEFAULT_PEER)
    if not given:
        return None, "no --peer given"
    path = Path(given).expanduser()
    if not (path / "hyperdb-mcp").exists():
        return None, f"no hyperdb-mcp in {path}"
    return path, None


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _compile_ours() -> None:
    """
    Cache the bytecode of our package, as pip does when it installs it: a
    source checkout would otherwise be measured compiling itself.
    """
    import compileall

    import hyperdaemon

    compileall.compile_dir(Path(hyperdaemon.__file__).parent, quiet=2)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.load_sessions:
        sizes["load"] = args.load_sessions
    repeats = 1 if args.quick else args.repeat
    if repeats < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    which = ALL_MEASURES
    if args.only:
        which = {int(x) for x in args.only.split(",") if x.strip()}
    signal.signal(signal.SIGTERM, _on_sigterm)
    raise_fd_limit(sizes["load"] + 256)  # before any daemon starts: they inherit it

    _compile_ours()
    ours = Ours()
    targets: list[Target] = [ours]
    peer_dir, no_peer = _peer(args.peer)
    peer_version = None
    if peer_dir is not None:
        theirs = Theirs(peer_dir)
        peer_version = theirs.version()
        targets.append(theirs)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "ours": {"version": ours.version(), "python": sys.executable,
                 "tableauhyperapi": _version("tableauhyperapi"), "twisted": _version("twisted")},
        "peer": ({"dir": str(peer_dir), "version": peer_version} if peer_dir
                 else {"absent": no_peer}),
        "repeat": repeats,
        "quick": args.quick,
        "sizes": sizes,
        "measures_run": sorted(which),
        "heartbeat_interval_s": measures.load_driver.HEARTBEAT_INTERVAL,
    }
    print(f"hyperdaemon benchmarks, {meta['date']}: ours {meta['ours']['version']}, "
          f"theirs {peer_version or '(none: ' + str(no_peer) + ')'}; "
          f"{repeats} repetition(s)", file=sys.stderr, flush=True)

    rec = measures.Recorder(repeats)
    reaper = Reaper()
    started = time.monotonic()
    leftovers: dict[int, str] = {}
    interrupted = False
    try:
        if 1 in which:
            measures.pings(reaper, targets, rec, sizes["pings"])
        if which & {6, 8}:
            measures.steady(reaper, targets, rec, sizes, which)
        if which & {2, 4, 5}:
            measures.lifecycle(reaper, targets, rec, which)
        if 3 in which:
            measures.clients(reaper, targets, rec)
        if 7 in which:
            measures.memory(reaper, targets, rec, sizes["sessions"])
        if 9 in which:
            measures.inline_loads(reaper, targets, rec, sizes)
            filetools.file_tools(reaper, targets, rec, sizes)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leftovers = reaper.cleanup()
        if leftovers:
            print("processes that would not stop:\n" + "\n".join(
                f"  {pid}: {cmd}" for pid, cmd in leftovers.items()), file=sys.stderr)
        if args.keep_temp:
            print(f"temporary folders kept in {reaper.root}", file=sys.stderr)
        else:
            shutil.rmtree(reaper.root, ignore_errors=True)
    if interrupted:
        print("interrupted: every process started was stopped; no results written",
              file=sys.stderr)
        return 130
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["machine"]["loadavg_end"] = os.getloadavg()

    rows = []
    with_peer = len(targets) > 1
    for fig in figures(sizes):
        if fig.measure not in which or (fig.against_peer and not with_peer):
            continue
        ours_summary = summarize(rec.values.get("ours", {}).get(fig.key, []))
        theirs_summary = None
        if with_peer and fig.peer:
            theirs_summary = summarize(rec.values.get("theirs", {}).get(fig.key, []))
        ratio = None
        if ours_summary and theirs_summary and theirs_summary["median"]:
            ratio = ours_summary["median"] / theirs_summary["median"]
        goal_ok = None
        if fig.goal is not None:
            goal_ok = fig.goal.check(ours_summary and ours_summary["median"],
                                     theirs_summary and theirs_summary["median"])
        rows.append({
            "key": fig.key, "measure": fig.measure, "label": fig.label, "unit": fig.unit,
            "peer": with_peer and fig.peer, "ours": ours_summary, "theirs": theirs_summary,
            "ratio": ratio, "target": fig.goal.describe(fig.unit) if fig.goal else None,
            "pass": goal_ok,
        })

    m = meta["machine"]
    header = (f"date {meta['date']}; machine: {m['nproc']} CPUs ({m['cpu_model']}), "
              f"{m['memory']}, Linux {m['kernel']}, Python {m['python']}, "
              f"load average {m['loadavg'][0]:.2f} at start\n"
              f"ours: hyperdaemon {meta['ours']['version']} (tableauhyperapi "
              f"{meta['ours']['tableauhyperapi']}); theirs: "
              f"{peer_version + ' (' + str(peer_dir) + ')' if peer_dir else 'none, ' + str(no_peer)}\n"
              f"{repeats} repetition(s), median [min-max]; sizes {sizes}; "
              f"took {meta['duration_s']:g} s")
    print(header)
    print(table(rows, with_peer, repeats))
    if rec.errors:
        print(f"\n{len(rec.errors)} error(s):")
        for e in rec.errors:
            print(f"  {e['target']} measure {e['measure']} rep {e['rep'] + 1} ({e['what']}): "
                  f"{e['error']}")
        if not args.keep_temp:
            print("  (the logs named were removed with the temporary folders: run again with "
                  "--keep-temp to keep them)")

    document = {"meta": meta, "figures": rows, "extras": rec.extras, "errors": rec.errors,
                "leftover_processes": {str(k): v for k, v in leftovers.items()}}
    Path(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nresults written to {args.json}")
    ours_failed = any(e["target"] == "ours" for e in rec.errors)
    return 1 if ours_failed or leftovers else 0
