"""Soak: a gateway with a shared Redis store under a steady, mixed, slightly hostile
load for a bounded time, sampling its memory, descriptors and event-loop lag.

    python -m bench.soak                          # 10 minutes (after 60 s of warm-up)
    python -m bench.soak --minutes 1 --warmup 15  # the CI variant (tests/faults/test_soak.py)

Real processes on 127.0.0.1 (redis-server, the simulator, `balancer serve`), all
stopped at the end. The load is open loop: chat, streams and embeddings, plus clients
that leave mid-stream, bad JSON, unknown models and slow bodies; region c fails 5% of
its calls and hangs for 5 s of every 30. Every second the gateway's RSS and open
descriptors are read from /proc, its `balancer_event_loop_lag_seconds` from /metrics,
and /healthz is timed from outside.

Pass: RSS grows less than 10% from the end of warm-up to the end, and the descriptors
open while idle (measured in a pause after warm-up and after the load) do not grow.
Exit status 0 on pass, 1 on fail; --out writes the whole report as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import PYTHON, Procs

RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 4  # pooled keep-alive connections may differ by a few between two pauses
TPM = {"a": 300_000, "b": 300_000, "c": 120_000}
CONFIG = """
store: {url: "redis://127.0.0.1:${REDIS_PORT}/0", timeout_seconds: 0.2}
gateway: {time_scale: 10, read_timeout_seconds: 1, connect_timeout_seconds: 1,
          deadline_seconds: 10, body_timeout_seconds: 2, circuit_failures: 5,
          circuit_open_seconds: 2, default_cooldown_seconds: 1, drain_timeout_seconds: 2,
          reload_poll_seconds: 0}
regions:
""" + "".join(f"""
  - name: {name}
    kind: azure
    endpoint: ${{SIM_URL}}/{name}
    api_key: soak-region-key
    api_version: "2024-06-01"
    deployments:
      gpt-4: {{deployment: gpt-4, tpm: {tpm}}}
      emb: {{deployment: emb, tpm: {tpm}}}
""" for name, tpm in TPM.items())


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kb: int
    fds: int
    loop_lag_ms: float  # the gateway's own gauge: worst timer overshoot in its last second
    healthz_ms: float  # /healthz as a client sees it
    requests: int  # answered so far


@dataclass
class Report:
    minutes: float
    warmup: float
    rate: float
    samples: list[Sample] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    idle_fds_after_warmup: int = 0
    idle_fds_at_end: int = 0
    rss_after_warmup_kb: int = 0
    rss_at_end_kb: int = 0
    passed: bool = False
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["outcomes"] = dict(self.outcomes)
        return out


# --------------------------------------------------------------------------- the load

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()


async def one(session: aiohttp.ClientSession, url: str, rng: random.Random,
              report: Report) -> None:
    kind = rng.choices(["chat", "stream", "embed", "leave", "bad_json", "unknown", "slow"],
                       [70, 15, 5, 4, 3, 2, 1])[0]
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
    body: dict[str, Any] = {"model": "gpt-4", "max_tokens": rng.randint(8, 64),
                            "messages": [{"role": "user", "content": text}]}
    path = "/v1/chat/completions"
    try:
        if kind == "embed":
            path, body = "/v1/embeddings", {"model": "emb", "input": text}
        elif kind in ("stream", "leave"):
            body["stream"] = True
        elif kind == "unknown":
            body["model"] = f"no-such-model-{rng.randint(0, 10**9)}"
        elif kind == "slow":
            await slow_body(url, json.dumps(body).encode(), report)
            return
        data = b"{bad json" if kind == "bad_json" else json.dumps(body).encode()
        async with session.post(url + path, data=data,
                                headers={"Content-Type": "application/json"}) as r:
            if kind == "leave" and r.status == 200:
                await r.content.readany()
                r.close()  # gone mid-stream
                report.outcomes["left mid-stream"] += 1
                return
            payload = await r.read()
            if kind == "stream" and r.status == 200:
                outcome = "200 stream" if b"[DONE]" in payload else "stream error event"
            else:
                outcome = str(r.status)
            report.outcomes[outcome] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.outcomes[f"client error {type(exc).__name__}"] += 1


async def slow_body(url: str, body: bytes, report: Report) -> None:
    """A client that sends its body a byte per 0.5 s: answered 408 after body_timeout."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(len(body)):
            writer.write(body[i:i + 1])
            try:
                head = await asyncio.wait_for(reader.read(64), 0.5)
            except TimeoutError:
                continue
            report.outcomes[f"slow body {head[9:12].decode(errors='replace')}"] += 1
            return
        report.outcomes["slow body not refused"] += 1
    except OSError:
        report.outcomes["slow body reset"] += 1
    finally:
        writer.close()


async def faults(sim_url: str, stop: asyncio.Event) -> None:
    """Region c: 5% of calls fail throughout; every 30 s it hangs for 5 s."""
    async with aiohttp.ClientSession() as s:
        async def knobs(**values: Any) -> None:
            async with s.post(f"{sim_url}/_sim/regions/c", json=values) as r:
                r.raise_for_status()

        await knobs(fail_rate=0.05)
        while not stop.is_set():
            await knobs(hang=True)
            await _sleep_unless(stop, 5)
            await knobs(hang=False)
            await _sleep_unless(stop, 25)
        await knobs(hang=False, fail_rate=0.0)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


# --------------------------------------------------------------------------- sampling


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sample(session: aiohttp.ClientSession, url: str, pid: int, t: float,
                 report: Report) -> Sample:
    t0 = time.perf_counter()
    async with session.get(f"{url}/healthz") as r:
        await r.read()
    healthz = (time.perf_counter() - t0) * 1000
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    lag = next((float(line.split()[1]) for line in text.splitlines()
                if line.startswith("balancer_event_loop_lag_seconds ")), float("nan"))
    return Sample(round(t, 1), rss_kb(pid), fds(pid), round(lag * 1000, 2), round(healthz, 2),
                  sum(report.outcomes.values()))


async def idle_fds(pid: int, seconds: float = 2.0) -> int:
    """Descriptors once in-flight requests are done: the least seen over `seconds`."""
    least = fds(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        least = min(least, fds(pid))
    return least


async def soak(url: str, sim_url: str, pid: int, report: Report, *, quiet: bool) -> None:
    rng = random.Random(1)
    duration = report.warmup + report.minutes * 60
    tasks: set[asyncio.Task[None]] = set()
    stop_faults = asyncio.Event()
    fault_task = asyncio.create_task(faults(sim_url, stop_faults))
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as probe:
        started = time.monotonic()
        sent, next_sample, paused = 0, started, False
        while True:
            now = time.monotonic()
            elapsed = now - started
            if elapsed >= duration:
                break
            if not paused and elapsed >= report.warmup:
                paused = True  # a quiet moment to count idle descriptors, then carry on
                await asyncio.gather(*tasks)
                report.idle_fds_after_warmup = await idle_fds(pid)
                started += time.monotonic() - now  # the pause does not count
                next_sample = time.monotonic()
                _print(quiet, f"warm-up done: {report.idle_fds_after_warmup} descriptors idle")
                continue
            if now >= next_sample:
                s = await sample(probe, url, pid, elapsed, report)
                report.samples.append(s)
                next_sample += 1.0
                if len(report.samples) % 10 == 1:
                    _print(quiet, f"t={s.t:7.1f}s rss={s.rss_kb / 1024:7.1f} MiB fds={s.fds:4d} "
                                  f"loop_lag={s.loop_lag_ms:6.2f} ms healthz={s.healthz_ms:6.2f} "
                                  f"ms answered={s.requests}")
            due = started + sent / report.rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            task = asyncio.create_task(one(session, url, rng, report))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)
        stop_faults.set()
        await fault_task
        report.samples.append(await sample(probe, url, pid, time.monotonic() - started,
                                           report))
    report.idle_fds_at_end = await idle_fds(pid)


def judge(report: Report) -> None:
    after = [s for s in report.samples if s.t >= report.warmup]
    head = [s.rss_kb for s in after[:3]]
    tail = [s.rss_kb for s in after[-3:]]
    report.rss_after_warmup_kb = int(statistics.median(head))
    report.rss_at_end_kb = int(statistics.median(tail))
    growth = report.rss_at_end_kb / report.rss_after_warmup_kb - 1
    fd_growth = report.idle_fds_at_end - report.idle_fds_after_warmup
    lags = sorted(s.loop_lag_ms for s in after)
    healthz = sorted(s.healthz_ms for s in after)
    ok_rss, ok_fds = growth < RSS_GROWTH_LIMIT, fd_growth <= FD_SLACK
    report.passed = ok_rss and ok_fds
    report.verdict = (
        f"{'PASS' if report.passed else 'FAIL'}: RSS {report.rss_after_warmup_kb / 1024:.1f} -> "
        f"{report.rss_at_end_kb / 1024:.1f} MiB ({growth:+.1%}, limit "
        f"{RSS_GROWTH_LIMIT:.0%}){'' if ok_rss else ' FAIL'}; idle descriptors "
        f"{report.idle_fds_after_warmup} -> {report.idle_fds_at_end} ({fd_growth:+d}, slack "
        f"{FD_SLACK}){'' if ok_fds else ' FAIL'}; event-loop lag p50 "
        f"{lags[len(lags) // 2]:.2f} ms, p99 {lags[int(len(lags) * 0.99)]:.2f} ms, max "
        f"{lags[-1]:.2f} ms; /healthz p99 {healthz[int(len(healthz) * 0.99)]:.1f} ms; "
        f"{sum(report.outcomes.values())} requests")


def _print(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def run(minutes: float, warmup: float, rate: float, workdir: Path, *, quiet: bool = False
        ) -> Report:
    report = Report(minutes=minutes, warmup=warmup, rate=rate)
    with Procs(workdir) as procs:
        redis_port = procs.redis()
        config = workdir / "regions.yaml"
        config.write_text(CONFIG)
        env = {"BALANCER_LOG_LEVEL": "WARNING", "REDIS_PORT": str(redis_port)}
        sim_url = procs.server("simulator", [PYTHON, "-m", "balancer.cli", "simulate",
                                             "--config", str(config), "--port", "{port}",
                                             "--latency-base-ms", "5",
                                             "--latency-per-token-ms", "0.2"],
                               "/_sim/stats", env)
        env["SIM_URL"] = sim_url
        url = procs.server("gateway", [PYTHON, "-m", "balancer.cli", "serve", "--config",
                                       str(config), "--host", "127.0.0.1", "--port", "{port}"],
                           "/healthz", env)
        pid = procs.procs[-1].pid
        asyncio.run(soak(url, sim_url, pid, report, quiet=quiet))
        log = procs.log("gateway")
        problems = [line for line in log.splitlines()
                    if "Traceback" in line or '"level": "error"' in line]
        if problems:
            report.outcomes["gateway log errors"] += len(problems)
    judge(report)
    if problems:
        report.passed = False
        report.verdict += f"; FAIL: {len(problems)} errors in the gateway log: {problems[:3]}"
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="measured time after warm-up")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before measuring")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--workdir", help="logs go here (default: a temporary directory)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = run(args.minutes, args.warmup, args.rate, Path(args.workdir or tmp),
                     quiet=args.quiet)
    print(report.verdict)
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())))
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_json(), indent=1))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
