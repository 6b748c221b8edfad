"""Render the results the fault, input, security and soak tests recorded as the table
of RELIABILITY.md.

    .venv/bin/pytest tests/faults                    # writes build/reliability/results.jsonl
    python -m tests.faults.report                    # prints the table
    python -m tests.faults.report --write RELIABILITY.md   # replaces it between the markers
    python -m tests.faults.report --write RELIABILITY.md --soak soak.json  # and the soak's
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tests.faults.harness import RESULTS

START, END = "<!-- results:start -->", "<!-- results:end -->"
SECTIONS = {"fault": "Fault", "input": "Hostile input", "security": "Security",
            "soak": "Soak"}


def latest(path: Path) -> list[dict[str, Any]]:
    """The last row recorded for each (section, name), in the order they were last
    recorded (so a test's rows keep the order of its latest run, its total last)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.pop((row["section"], row["name"]), None)  # moves to its latest position
            rows[(row["section"], row["name"])] = row
    order = list(SECTIONS)
    return sorted(rows.values(), key=lambda r: order.index(r["section"]))


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| | What was tried | Load held | Requests | Failed | Expected | Data lost | "
           "Observed |", "|---|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        cells = [SECTIONS[r["section"]], r["name"], r["load"], f"{r['requests']:,}",
                 str(r["failed"]), r["expected"], str(r["lost"]), r["notes"]]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    total = sum(r["requests"] for r in rows)
    lost = sum(r["lost"] for r in rows)
    span = f"{min(r['at'] for r in rows)} to {max(r['at'] for r in rows)}"
    out.append(f"\n{total:,} requests in all; data lost: {lost}. Recorded {span} (UTC).")
    return "\n".join(out)


def soak_table(report: dict[str, Any], every: float = 60.0) -> str:
    """The soak's samples, one row per `every` seconds (worst lag and /healthz in it)."""
    out = ["| t (s) | RSS (MiB) | open descriptors | event-loop lag, worst (ms) | "
           "/healthz, worst (ms) | answered |", "|---:|---:|---:|---:|---:|---:|"]
    samples = report["samples"]
    start = 0.0
    while start <= samples[-1]["t"]:
        window = [s for s in samples if start <= s["t"] < start + every] or []
        if window:
            last = window[-1]
            out.append(f"| {last['t']:.0f} | {last['rss_kb'] / 1024:.1f} | {last['fds']} | "
                       f"{max(s['loop_lag_ms'] for s in window):.1f} | "
                       f"{max(s['healthz_ms'] for s in window):.1f} | {last['requests']:,} |")
        start += every
    outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(report["outcomes"].items()))
    return "\n".join(out) + (f"\n\nWarm-up {report['warmup']:g} s, then "
                              f"{report['minutes']:g} min at {report['rate']:g} requests/s. "
                              f"**{report['verdict']}**\n\nOutcomes: {outcomes}.")


def replace_between(doc: Path, start: str, end: str, text: str) -> None:
    head, _, rest = doc.read_text().partition(start)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--write", help="a markdown file whose table (between the markers) to "
                                   "replace")
    p.add_argument("--soak", help="a `bench.soak --out` report to render too")
    args = p.parse_args(argv)
    text = table(latest(Path(args.results)))
    soak = soak_table(json.loads(Path(args.soak).read_text())) if args.soak else None
    if not args.write:
        print(text + (f"\n\n{soak}" if soak else ""))
        return 0
    doc = Path(args.write)
    replace_between(doc, START, END, text)
    if soak:
        replace_between(doc, "<!-- soak:start -->", "<!-- soak:end -->", soak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
