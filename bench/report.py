"""Small helpers shared by the benchmarks: percentiles, Markdown tables, result files,
a progress line, and the frame of each benchmark's `main` (parse, run, print, write)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def comma_list(text: str) -> list[str]:
    """An argparse type: "a, b,,c" -> ["a", "b", "c"]."""
    return [x.strip() for x in text.split(",") if x.strip()]


def add_output_arguments(p: argparse.ArgumentParser, what: str = "the JSON record") -> None:
    """--out-dir and --no-write, the same for every benchmark."""
    p.add_argument("--out-dir", type=Path, default=RESULTS,
                   help=f"where {what} goes (bench/results)")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")


# --------------------------------------------------------------------------- main


def parser(name: str, doc: str | None,
           add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """`balancer bench <name>`'s parser: the module docstring as its description."""
    p = argparse.ArgumentParser(prog=f"balancer bench {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def check_known(what: str, given: Sequence[str], known: Iterable[str]) -> None:
    """Exit with a message when `given` (a --scenarios list, say) names one not `known`."""
    known = list(known)
    unknown = [x for x in given if x not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {','.join(known)}")


Record = dict[str, Any]


def timed(run: Callable[[argparse.Namespace], Record], args: argparse.Namespace
          ) -> tuple[Record, str]:
    """`run(args)`'s record with its wall time ("seconds"), and the stamp of its files."""
    started = time.monotonic()
    when = stamp()
    record = run(args)
    record["seconds"] = round(time.monotonic() - started, 1)
    return record, when


def execute(kind: str, heading: str, run: Callable[[argparse.Namespace], Record],
            render: Callable[[Record], str], args: argparse.Namespace, *,
            total: bool = True) -> int:
    """Run, print `heading` and the rendered tables (and the time in all, if `total`),
    and write `<kind>-<time>.json` and `<kind>-latest.json` unless --no-write."""
    record, when = timed(run, args)
    print(f"{heading}\n\n{render(record)}\n")
    if total:
        print(f"({record['seconds']:.0f} s in all)")
    if not args.no_write:
        print(f"record: {write_json(kind, record, args.out_dir, when)}")
    return 0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; `align` has one letter per column, l or r (default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align,
                                                                          strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                          for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def ms(seconds: float | None, digits: int = 0) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:,.{digits}f} ms"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "machine": platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import aiohttp

        info["aiohttp"] = aiohttp.__version__
    except ImportError:
        pass
    for name in ("uvloop", "orjson", "redis", "hiredis"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "yes")
        except ImportError:
            info[name] = None
    if shutil.which("redis-server"):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        info["redis_server"] = out.stdout.split()[2].removeprefix("v=") if out.stdout else None
    return info


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def write_json(kind: str, record: dict[str, Any], out_dir: Path, when: str) -> Path:
    """`<out_dir>/<kind>-<when>.json`, and a copy as `<kind>-latest.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{when}.json"
    text = json.dumps(record, indent=1, default=str)
    path.write_text(text)
    (out_dir / f"{kind}-latest.json").write_text(text)
    return path


class Progress:
    """One status line on stderr: rewritten in place on a terminal, else printed at most
    every `every` seconds (CI logs stay short)."""

    def __init__(self, every: float = 5.0):
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = 0.0
        self.width = 0

    def update(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self.width))
            self.width = len(text)
            sys.stderr.flush()
        elif force or now - self.last >= self.every:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self.last = now

    def done(self, text: str = "") -> None:
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self.width) + "\n")
            self.width = 0
        elif text:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def bar(fraction: float, width: int = 24) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def running(kind: str, label: str, elapsed: float, duration: float) -> str:
    """The progress line of a timed run: `kind [####....] label  12.3/30 s`."""
    parts = (kind, bar(min(1.0, elapsed / duration)), label,
             f"{min(elapsed, duration):5.1f}/{duration:.0f} s")
    return " ".join(x for x in parts if x)
