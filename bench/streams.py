"""Thousands of open streams on one gateway replica: what each costs.

    balancer bench streams            # from the repository root (~1 min)
    balancer bench streams --quick    # 100 streams of ~1 s (the CI smoke run)

Streaming chat requests of ~5 s each (the simulator paces them: --latency-per-token-ms
with a max_tokens that makes ~5 s on average) arrive open-loop at 200/s, 2,000 of them,
so that ~1,000 are open at once. The same streams (bodies, schedule) go first straight
to the simulator, then through one gateway replica with the Redis store, in one run:

- added time to first byte: gateway TTFB minus direct TTFB (time from sending to the
  first line of the body), per percentile;
- resident memory of the gateway process (VmRSS) at the plateau minus idle, divided by
  the streams open at the plateau: memory per open stream;
- event-loop lag: the gateway's `balancer_event_loop_lag_seconds`, sampled during the
  plateau (the worst lateness of a 0.1 s timer over each second).

The load generator is several processes of an aiohttp client (`python -m bench.streams
worker`), each holding its share of the open streams; its own CPU and how late it sent
are reported, so that a saturated generator shows.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import random
import resource
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from balancer.sim.answers import STREAM_CHUNK_TOKENS
from bench import report
from bench.costs import process_cpu
from bench.harness import (
    SIM_KEY,
    Poller,
    Region,
    bench_config,
    serve_cmd,
    simulate_cmd,
    wait_until,
    workspace,
)
from bench.loadgen import Mix, chat_stream
from bench.overhead import CLIENT_PATH, UPSTREAM_PATH
from bench.procs import PYTHON, Procs, get_text
from bench.soak import rss_kb

MODEL = "gpt-4"
COMPLETION_MEAN = 0.75  # the simulator's answers use 50-100% of max_tokens
TTFB_P99_TARGET = 0.020  # seconds added by the gateway at ~1,000 open streams
# The paths a run can load: the simulator itself, or a gateway on the event loop named
# (BALANCER_EVENT_LOOP): "auto" is the default, uvloop; "asyncio" turns that lever off.
PATHS = {"direct": "", "gateway": "auto", "gateway-asyncio": "asyncio"}
LAG_METRIC = "balancer_event_loop_lag_seconds"
IN_FLIGHT_METRIC = "balancer_in_flight_requests"


# --------------------------------------------------------------------------- worker


def raise_fd_limit() -> int:
    """The soft limit on open files up to the hard one (each stream holds a socket, two
    through a proxy); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def body_of(mix: Mix, seed: int, k: int) -> dict[str, Any]:
    """The k-th stream's body: the same in every run of one seed; usage on the last
    chunk, which tells how many events the stream had."""
    body = mix.body(random.Random(seed * 1_000_003 + k))
    body["stream_options"] = {"include_usage": True}
    return body


def events_of(usage: dict[str, Any] | None) -> int:
    """The simulator's events of a stream: the role, a content delta per 4 completion
    tokens, the finish, the usage and [DONE]."""
    tokens = (usage or {}).get("completion_tokens", 0)
    return 4 + -(-tokens // STREAM_CHUNK_TOKENS)


async def one_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                     body: dict[str, Any], k: int, due: float, out: list[list[Any]],
                     errors: list[str]) -> None:
    """One stream: [k, sent (wall clock), late by, TTFB, end (wall clock), ok, events]."""
    sent, t0 = time.time(), time.perf_counter()
    ttfb = None
    ok, events = False, 0
    try:
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                errors.append(f"{r.status} {(await r.read())[:200]!r}")
            else:
                await r.content.readline()  # the first event's line: the first byte
                ttfb = time.perf_counter() - t0
                events = events_of(await chat_stream(r))
                ok = True
    except Exception as exc:  # counted and shown, never fatal
        errors.append(repr(exc)[:200])
    out.append([k, sent, sent - due, ttfb, sent + time.perf_counter() - t0, ok, events])


async def worker(url: str, headers: dict[str, str], mix: Mix, seed: int, rate: float,
                 count: int, index: int, of: int, start_at: float
                 ) -> tuple[list[list[Any]], list[str]]:
    """Streams index, index + of, ... of `count`, the k-th due at start_at + k / rate."""
    out: list[list[Any]] = []
    errors: list[str] = []
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        for k in range(index, count, of):
            body = body_of(mix, seed, k)
            due = start_at + k / rate
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one_stream(session, url, headers, body, k, due, out,
                                                  errors))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
    return out, errors


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streams worker")
    p.add_argument("--url", required=True)
    p.add_argument("--header", action="append", default=[], help="name=value")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--of", type=int, default=1)
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--prompt-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    fd_limit = raise_fd_limit()
    headers = dict(h.split("=", 1) for h in a.header)
    mix = Mix(MODEL, (a.prompt_tokens, a.prompt_tokens), (a.max_tokens, a.max_tokens), 1.0)
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    out, errors = asyncio.run(worker(a.url, headers, mix, a.seed, a.rate, a.count, a.index,
                                     a.of, a.start_at))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    Path(a.out).write_text(json.dumps({
        "streams": out, "errors": errors[:20], "error_count": len(errors), "fd_limit": fd_limit,
        "cpu_seconds": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime,
        "wall_seconds": time.time() - wall0}))
    return 0


# --------------------------------------------------------------------------- sampling


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and its descendants (`balancer serve --workers N` forks), KiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_kb(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, RuntimeError):  # gone meanwhile
            continue
    return total


def gauges(metrics_url: str) -> dict[str, float]:
    """The lag and in-flight gauges of a gateway's /metrics."""
    out: dict[str, float] = {}
    for line in get_text(metrics_url, timeout=2.0).splitlines():
        name, _, value = line.partition(" ")
        if name in (LAG_METRIC, IN_FLIGHT_METRIC):
            out[name] = float(value)
    return out


class ProcessSampler(Poller):
    """(wall time, RSS KiB of `pid`'s tree, the gateway's gauges or {}) every interval."""

    samples: list[tuple[float, int, dict[str, float]]]

    def __init__(self, pid: int, metrics_url: str | None, interval: float):
        super().__init__(metrics_url or "", MODEL, interval)
        self.pid = pid

    def take(self) -> None:
        try:
            values = gauges(self.url) if self.url else {}
        except (OSError, ValueError):
            values = {}
        self.samples.append((time.time(), tree_rss_kib(self.pid), values))


# --------------------------------------------------------------------------- one run


def warm_up(url: str, headers: dict[str, str], n: int = 3) -> None:
    """A few short streams, so that imports, pools and the store's scripts are loaded."""
    for _ in range(n):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 4, "stream": True}).encode()
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()


def load(procs: Procs, name: str, url: str, headers: dict[str, str], pid: int,
         metrics_url: str | None, args: argparse.Namespace, progress: report.Progress
         ) -> dict[str, Any]:
    """Send the streams to `url` from args.processes processes, sampling `pid` meanwhile."""
    warm_up(url, headers)
    time.sleep(args.settle)
    idle = tree_rss_kib(pid)
    idle_lag = gauges(metrics_url).get(LAG_METRIC) if metrics_url else None
    cpu0 = process_cpu(pid)
    start_at = time.time() + 1.0 + 0.3 * args.processes  # once every worker has imported
    runs = []
    for i in range(args.processes):
        out = procs.workdir / f"{name}-{i}.json"
        cmd = [PYTHON, "-m", "bench.streams", "worker", "--url", url, "--rate", str(args.rate),
               "--count", str(args.requests), "--index", str(i), "--of", str(args.processes),
               "--start-at", f"{start_at:.3f}", "--prompt-tokens", str(args.prompt_tokens),
               "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), "--out", str(out)]
        cmd += [a for k, v in headers.items() for a in ("--header", f"{k}={v}")]
        runs.append((procs.spawn(f"{name}-{i}", cmd), out))
    expected = args.requests / args.rate + 2 * args.stream_seconds
    with ProcessSampler(pid, metrics_url, args.sample_interval) as sampler:
        started = wait_until(start_at)
        while any(p.poll() is None for p, _ in runs):
            elapsed = time.monotonic() - started
            if elapsed > expected + 120:
                raise RuntimeError(f"{name}: the stream workers did not finish; logs in "
                                   f"{procs.workdir}")
            progress.update(report.running("streams", name, elapsed, expected))
            time.sleep(0.2)
    cpu = process_cpu(pid) - cpu0
    reports = []
    for i, (proc, out) in enumerate(runs):
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: stream worker {i} failed\n"
                               f"{procs.log(f'{name}-{i}')[-2000:]}")
        reports.append(json.loads(out.read_text()))
    return analyse(name, reports, sampler.samples, idle, idle_lag, cpu, start_at)


def open_at(starts: list[float], ends: list[float], t: float) -> int:
    """Streams open at time t, from sorted start and end times."""
    return bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t)


def analyse(name: str, reports: list[dict[str, Any]],
            samples: list[tuple[float, int, dict[str, float]]], idle_kib: int,
            idle_lag: float | None, cpu: float, start_at: float) -> dict[str, Any]:
    streams = [s for r in reports for s in r["streams"]]
    ok = [s for s in streams if s[5]]
    starts = sorted(s[1] for s in streams)
    ends = sorted(s[4] for s in streams)
    timeline = [(t, open_at(starts, ends, t), rss, g) for t, rss, g in samples]
    peak = max((o for _, o, _, _ in timeline), default=0)
    plateau = [x for x in timeline if peak and x[1] >= 0.9 * peak]
    window = (plateau[0][0], plateau[-1][0]) if plateau else (0.0, 0.0)
    opened = statistics.median(x[1] for x in plateau) if plateau else 0
    rss = statistics.median(x[2] for x in plateau) if plateau else idle_kib
    lags = [x[3][LAG_METRIC] for x in plateau if LAG_METRIC in x[3]]
    all_lags = [x[3][LAG_METRIC] for x in timeline if LAG_METRIC in x[3]]
    ttfb = [s[3] for s in ok]
    in_window = [s[3] for s in ok if window[0] <= s[1] <= window[1]]
    late = [s[2] for s in streams]
    wall = max(r["wall_seconds"] for r in reports)
    gen_cpu = [r["cpu_seconds"] for r in reports]
    events = sum(s[6] for s in ok)
    per_stream_rate = [s[6] / (s[4] - s[1]) for s in ok if s[4] > s[1]]
    event_rate = opened * statistics.median(per_stream_rate) if per_stream_rate else 0.0
    return {
        "streams": len(streams), "ok": len(ok), "errors": sum(r["error_count"] for r in reports),
        "error_samples": [e for r in reports for e in r["errors"]][:5],
        "ttfb": pctiles(ttfb), "ttfb_plateau": pctiles(in_window),
        "duration": pctiles([s[4] - s[1] for s in ok]),
        "open_peak": peak, "open_plateau": opened,
        "plateau_seconds": round(window[1] - window[0], 2),
        "rss_idle_mib": idle_kib / 1024, "rss_plateau_mib": rss / 1024,
        "rss_peak_mib": max((x[2] for x in timeline), default=idle_kib) / 1024,
        "kib_per_stream": (rss - idle_kib) / opened if opened else None,
        "lag_idle": idle_lag, "lag_plateau": pctiles(lags), "lag_max": max(all_lags, default=None),
        "server_cpu_seconds": cpu, "events": events, "events_per_second_plateau": event_rate,
        "cpu_us_per_event": 1e6 * cpu / events if events else None,
        "generator": {"processes": len(reports), "cpu_seconds": sum(gen_cpu),
                      "cores": sum(gen_cpu) / wall if wall else None,
                      "max_process_core": max(gen_cpu) / wall if wall else None,
                      "late_p50": report.percentile(late, 50),
                      "late_p99": report.percentile(late, 99),
                      "fd_limit": min(r["fd_limit"] for r in reports)},
        "timeline": [[round(t - start_at, 2), o, rss_kib, g.get(LAG_METRIC)]
                     for t, o, rss_kib, g in timeline],
    }


def pctiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": report.percentile(values, q) for q in (50, 90, 99)} | {
        "max": max(values, default=None), "n": len(values)}


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    report.check_known("--paths", args.paths, list(PATHS))
    raise_fd_limit()
    per_token = args.stream_seconds * 1000 / (COMPLETION_MEAN * args.max_tokens)
    workdir, progress = workspace("streams")
    config = workdir / "regions.yaml"
    config.write_text(bench_config([Region("bench", 10**9, 10**9)], MODEL, {"max_attempts": 3}))
    runs: dict[str, dict[str, Any]] = {}
    with Procs(workdir) as procs:
        redis_url = f"redis://127.0.0.1:{procs.redis()}/0"
        env = {"STORE_URL": redis_url, "SIM_URL": "http://127.0.0.1:1",
               "BALANCER_LOG_LEVEL": args.gateway_log_level}
        sim = procs.launch("simulator", simulate_cmd(
            config, 1.0, args.seed, "--latency-base-ms", "0", "--latency-per-token-ms",
            f"{per_token:.3f}"), "/_sim/stats", env)
        procs.ready(sim)
        targets = {"direct": (sim.url + UPSTREAM_PATH, {"api-key": SIM_KEY}, sim.proc.pid,
                              None)}
        for name in args.paths:
            if name == "direct":
                continue
            gateway = procs.launch(name, serve_cmd(config), "/healthz", {
                **env, "SIM_URL": sim.url, "BALANCER_EVENT_LOOP": PATHS[name]})
            procs.ready(gateway)
            targets[name] = (gateway.url + CLIENT_PATH, {}, gateway.proc.pid,
                             gateway.url + "/metrics")
        for name in args.paths:
            url, headers, pid, metrics = targets[name]
            runs[name] = load(procs, name, url, headers, pid, metrics, args, progress)
            time.sleep(args.settle)
        progress.done(f"streams: {len(runs)} runs done")
    return summarize(runs, args, per_token, workdir)


def summarize(runs: dict[str, dict[str, Any]], args: argparse.Namespace, per_token: float,
              workdir: Path) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    notes = []
    for name in runs:
        if name != "direct" and "direct" in runs:
            d, g = runs["direct"]["ttfb"], runs[name]["ttfb"]
            runs[name]["added_ttfb"] = {
                q: (g[q] - d[q]) if g[q] is not None and d[q] is not None else None
                for q in ("p50", "p90", "p99")}
    if "direct" in runs and "gateway" in runs:
        added = runs["gateway"]["added_ttfb"]
        targets["added_ttfb_p99"] = {
            "what": "gateway TTFB p99 - direct TTFB p99", "value": added["p99"],
            "target": TTFB_P99_TARGET,
            "met": added["p99"] is not None and added["p99"] <= TTFB_P99_TARGET}
    if "gateway" in runs:
        targets["kib_per_stream"] = {"what": "gateway RSS at the plateau - idle, per open "
                                             "stream", "value": runs["gateway"]["kib_per_stream"]}
    for name, r in runs.items():
        if r["errors"]:
            notes.append(f"{name}: {r['errors']} failed streams, e.g. {r['error_samples'][:2]}")
        if r["generator"]["max_process_core"] and r["generator"]["max_process_core"] > 0.8:
            notes.append(f"{name}: a load-generator process used "
                         f"{r['generator']['max_process_core']:.0%} of a core: near saturation, "
                         "add --processes.")
    return {"kind": "streams", "machine": report.machine(),
            "settings": {"requests": args.requests, "rate": args.rate,
                         "stream_seconds": args.stream_seconds, "max_tokens": args.max_tokens,
                         "prompt_tokens": args.prompt_tokens,
                         "latency_per_token_ms": round(per_token, 3),
                         "processes": args.processes, "paths": args.paths,
                         "gateway_log_level": args.gateway_log_level, "store": "redis",
                         "quick": args.quick},
            "runs": runs, "targets": targets, "notes": notes, "logs": str(workdir)}


def render(record: dict[str, Any]) -> str:
    runs, s = record["runs"], record["settings"]
    out = [f"{s['requests']:,} streaming chat requests (~{s['stream_seconds']:g} s each, "
           f"max_tokens {s['max_tokens']}, {s['latency_per_token_ms']:g} ms per token) "
           f"arriving at {s['rate']:g}/s, open loop, from {s['processes']} processes; the "
           "gateway is one replica with the Redis store."]
    rows = []
    for name, r in runs.items():
        added = r.get("added_ttfb", {})
        t, tp = r["ttfb"], r["ttfb_plateau"]
        rows.append([name, f"{r['ok']:,}/{r['streams']:,}", f"{r['open_peak']:,}",
                     _ms(t["p50"]), _ms(t["p90"]), _ms(t["p99"]), _ms(t["max"]),
                     _ms(tp["p99"]), _ms(added.get("p50"), sign=True),
                     _ms(added.get("p99"), sign=True), _ms(r["duration"]["p50"], 0)])
    out.append("Time to first byte (from sending to the first line of the body):\n\n" +
               report.table(["path", "ok", "open (peak)", "TTFB p50", "p90", "p99", "max",
                             "p99 at plateau", "added p50", "added p99", "stream p50"], rows))
    rows = []
    for name, g in runs.items():
        if name == "direct":
            continue
        lag = g["lag_plateau"]
        kib = g["kib_per_stream"]
        rows.append([name, f"{g['plateau_seconds']:g} s",
                     f"{g['open_plateau']:,.0f}", f"{g['events_per_second_plateau']:,.0f}",
                     _mib(g["rss_idle_mib"]), _mib(g["rss_plateau_mib"]),
                     _mib(g["rss_peak_mib"]), "n/a" if kib is None else f"{kib:,.0f} KiB",
                     _ms(g["lag_idle"]), f"{_ms(lag['p50'])} / {_ms(lag['max'])}",
                     f"{g['server_cpu_seconds']:.1f} s",
                     "n/a" if g["cpu_us_per_event"] is None
                     else f"{g['cpu_us_per_event']:,.0f} µs"])
    if rows:
        out.append("The gateway process with the streams open (plateau: ≥ 90% of the peak; "
                   "gateway-asyncio: the same gateway on asyncio's own loop, the uvloop lever "
                   "off):\n\n" + report.table(
                       ["path", "plateau", "open streams", "events/s", "RSS idle",
                        "RSS plateau", "RSS peak", "per open stream", "loop lag idle",
                        "loop lag p50 / max (plateau)", "CPU (run)", "CPU per event"], rows))
    rows = [[name, str(r["generator"]["processes"]), f"{r['generator']['cpu_seconds']:.1f} s",
             f"{r['generator']['cores']:.2f}", report.pct(r["generator"]["max_process_core"], 0),
             _ms(r["generator"]["late_p50"], 1), _ms(r["generator"]["late_p99"], 1),
             str(r["generator"]["fd_limit"])] for name, r in runs.items()]
    out.append("Load generator (its own CPU, and how late it sent against the schedule):\n\n" +
               report.table(["run", "processes", "CPU", "cores (mean)", "busiest process",
                             "late p50", "late p99", "open-files limit"], rows))
    t = record["targets"]
    if "added_ttfb_p99" in t:
        x = t["added_ttfb_p99"]
        out.append(f"Target: {x['what']} ≤ +{x['target'] * 1000:.0f} ms: "
                   f"{_ms(x['value'], sign=True)} ({'met' if x['met'] else 'NOT met'}).")
    out += record["notes"]
    return "\n\n".join(out)


def _ms(seconds: float | None, digits: int = 1, *, sign: bool = False) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:+,.{digits}f} ms" if sign else report.ms(seconds, digits)


def _mib(mib: float) -> str:
    return f"{mib:,.1f} MiB"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=2000, help="streams in all (2000)")
    p.add_argument("--rate", type=float, default=200.0, help="streams started per second (200)")
    p.add_argument("--stream-seconds", type=float, default=5.0,
                   help="mean length of a stream, paced by the simulator (5)")
    p.add_argument("--max-tokens", type=int, default=100,
                   help="each stream's max_tokens: ~4 tokens an event (100)")
    p.add_argument("--prompt-tokens", type=int, default=50)
    p.add_argument("--processes", type=int, default=4, help="load-generator processes (4)")
    p.add_argument("--paths", type=report.comma_list, default=list(PATHS),
                   help="any of direct,gateway,gateway-asyncio (all three, in this order; "
                        "gateway-asyncio is the gateway on asyncio's own loop)")
    p.add_argument("--gateway-log-level", default="INFO",
                   help="the gateway's log level (INFO, as shipped, writes access logs)")
    p.add_argument("--sample-interval", type=float, default=0.25,
                   help="seconds between samples of RSS and the gateway's gauges")
    p.add_argument("--settle", type=float, default=1.5,
                   help="seconds of quiet before measuring idle and between runs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="the CI smoke run: 100 streams of ~1 s at 100/s, 2 processes")
    report.add_output_arguments(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    args = report.parser("streams", __doc__, add_arguments).parse_args(argv)
    if args.quick:
        args.requests, args.rate, args.stream_seconds, args.processes = 100, 100.0, 1.0, 2
        args.settle = 0.5
    return report.execute("streams", "## Streams", run, render, args)


if __name__ == "__main__":
    sys.exit(main())
