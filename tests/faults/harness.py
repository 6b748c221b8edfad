"""What every fault test needs: real processes, a steady open-loop load on loopback,
and the checks made after each fault (failed requests, leaked reservations, errors
in the logs), with one result row per test for RELIABILITY.md.

Processes: a redis-server on a free port, the simulator, and gateway replicas, each
`python -m balancer.cli`, all on 127.0.0.1 and stopped by `Procs.close()` even when
a test fails. The load is bounded in time and count: `rate * seconds` requests, each
with its own timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.procs import PYTHON, ROOT, Procs, free_port, wait_http

TIME_SCALE = 10.0  # a simulated minute lasts 6 s: buckets refill to full within ~1 s
REGIONS = {"a": 120_000, "b": 120_000, "c": 60_000}
RESULTS = Path(os.environ.get("RELIABILITY_RESULTS", ROOT / "build" / "reliability" /
                              "results.jsonl"))

# The gateway settings of the fault tests: short timeouts so faults show within seconds.
GATEWAY = {
    "time_scale": TIME_SCALE,
    "max_attempts": 3,
    "deadline_seconds": 10,
    "connect_timeout_seconds": 1,
    "read_timeout_seconds": 1,
    "circuit_failures": 3,
    "circuit_open_seconds": 30,
    "default_cooldown_seconds": 1,
    "drain_timeout_seconds": 2,
    "reload_poll_seconds": 0,
}
STORE_TIMEOUT = 0.2  # store.timeout_seconds; a whole store call is bounded by twice that


def config_text(regions: dict[str, int] = REGIONS, models: tuple[str, ...] = ("gpt-4",),
                store: dict[str, Any] | None = None, **gateway: Any) -> str:
    """A regions.yaml: each model in every region (deployment named like the model),
    endpoints and keys from the environment as in production. `store`: settings of
    `store:` beside (or instead of) the URL from STORE_URL and the fault tests' timeout."""
    settings = {**GATEWAY, **gateway}
    stored = {"url": "${STORE_URL}", "timeout_seconds": STORE_TIMEOUT, **(store or {})}
    lines = ["store: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in stored.items()) + "}",
             "gateway: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items())
             + "}", "regions:"]
    for name, tpm in regions.items():
        lines += [f"  - name: {name}", "    kind: azure", f"    endpoint: ${{SIM_URL}}/{name}",
                  "    api_key: ${REGION_KEY}", '    api_version: "2024-06-01"',
                  "    deployments:"]
        lines += [f"      {m}: {{deployment: {m}, tpm: {tpm}}}" for m in models]
    return "\n".join(lines) + "\n"


@dataclass
class Gateway:
    name: str
    url: str
    proc: subprocess.Popen[bytes]


class Rig:
    """redis-server + simulator + gateway replicas, all real processes."""

    def __init__(self, procs: Procs, workdir: Path):
        self.procs = procs
        self.workdir = workdir
        self.gateways: list[Gateway] = []
        self.sim_url = ""
        self.redis_port = 0
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.redis_args: tuple[str, ...] = ()
        self.env: dict[str, str] = {}

    def start(self, config: str, *, replicas: int = 2, redis: bool = True,
              redis_args: tuple[str, ...] = ("--enable-debug-command", "yes"),
              env: dict[str, str] | None = None, log_level: str = "INFO",
              store_url: str | None = None) -> Rig:
        path = self.workdir / "regions.yaml"
        path.write_text(config)
        self.env = {"REGION_KEY": "region-key-not-secret-here", "BALANCER_LOG_LEVEL": log_level,
                    "STORE_URL": "memory://", **(env or {})}
        if redis:
            self.redis_args = redis_args
            self.redis_proc, self.redis_port = self.procs.redis(None, *redis_args)
            self.env["STORE_URL"] = (store_url or "redis://127.0.0.1:{port}/0").format(
                port=self.redis_port)
        self.sim_url = self.procs.simulator(path, "--latency-base-ms", "5",
                                            "--latency-per-token-ms", "0.2", "--seed", "1",
                                            env=self.env)
        self.env["SIM_URL"] = self.sim_url
        pending = []
        for i in range(replicas):  # started together: each takes ~1 s to import
            port = free_port()
            name = f"gateway-{i}"
            proc = self.procs.spawn(name, [PYTHON, "-m", "balancer.cli", "serve", "--config",
                                           str(path), "--host", "127.0.0.1", "--port",
                                           str(port)], self.env)
            pending.append(Gateway(name, f"http://127.0.0.1:{port}", proc))
        for gw in pending:
            wait_http(f"{gw.url}/healthz")
        self.gateways = pending
        return self

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]

    # -- redis faults ------------------------------------------------------------------

    def kill_redis(self) -> None:
        assert self.redis_proc is not None
        self.procs.stop(self.redis_proc, signal.SIGKILL)

    def restart_redis(self) -> None:
        self.redis_proc, _ = self.procs.redis(self.redis_port, *self.redis_args)

    def redis_command(self, *args: str, timeout: float = 10.0) -> bytes:
        """One command in RESP over a fresh socket; returns the raw reply."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=timeout) as s:
            s.sendall(payload)
            return s.recv(4096)

    # -- observations ------------------------------------------------------------------

    def log(self, gw: Gateway) -> str:
        return self.procs.log(gw.name)

    def log_problems(self) -> list[str]:
        """Unhandled exceptions and errors in every gateway's log (JSON lines)."""
        return [f"{g.name}: {line[:400]}" for g in self.gateways
                for line in self.log(g).splitlines() if is_problem(line)]


def is_problem(line: str) -> bool:
    if "Traceback" in line or "Task exception was never retrieved" in line:
        return True
    try:
        record = json.loads(line)
    except ValueError:
        return "Error" in line or "Exception" in line  # a bare print to stderr
    return record.get("level") in ("error", "critical") or "exception" in record


async def get_json(url: str, **kw: Any) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return await r.json(content_type=None)


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


async def knobs(rig: Rig, region: str, **values: Any) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"{rig.sim_url}/_sim/regions/{region}", json=values) as r:
        assert r.status == 200, await r.text()


async def sim_stats(rig: Rig) -> dict[str, dict[str, Any]]:
    """Per region, the stats of every deployment summed."""
    regions = (await get_json(f"{rig.sim_url}/_sim/stats"))["regions"]
    out: dict[str, dict[str, Any]] = {}
    for region, deps in regions.items():
        total: Counter[str] = Counter()
        for stats in deps.values():
            total.update({k: v for k, v in stats.items() if k in (
                "requests", "admitted", "throttled", "failed", "admitted_tokens")})
        out[region] = dict(total)
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over the series matching `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name):len(name) + 1] not in ("{", " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- the load

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


@dataclass
class Outcome:
    """What one client saw."""

    sent: float  # seconds after the load started
    latency: float
    stream: bool
    status: int = 0  # 0: no HTTP answer at all
    region: str = ""
    end: str = "ok"  # ok | error_event | truncated | http_<status> | transport:<error>
    retry_after: str | None = None
    retry_after_ms: str | None = None
    body: str = ""  # the error body, cut short

    @property
    def failed(self) -> bool:
        return self.end != "ok"

    @property
    def lost(self) -> bool:
        """Data lost: no answer at all, or a stream cut without an error event."""
        return self.status == 0 or self.end == "truncated"


def chat_body(rng: random.Random, model: str, stream: bool) -> dict[str, Any]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80)))
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(16, 64),
                            "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return body


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], started: float,
              headers: dict[str, str]) -> Outcome:
    t0 = time.monotonic()
    out = Outcome(sent=t0 - started, latency=0.0, stream=bool(body.get("stream")))
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            out.status, out.region = r.status, r.headers.get("x-balancer-region", "")
            out.retry_after = r.headers.get("Retry-After")
            out.retry_after_ms = r.headers.get("retry-after-ms")
            if r.status != 200:
                out.end, out.body = f"http_{r.status}", (await r.text())[:300]
            elif out.stream:
                out.end = "truncated"
                async for line in r.content:
                    if line.startswith(b"data: [DONE]"):
                        out.end = "ok"
                    elif line.startswith(b"data: {") and b'"error"' in line:
                        payload = json.loads(line[6:])
                        if "error" in payload:
                            out.end, out.body = "error_event", line.decode()[:300]
            else:
                payload = await r.json()
                if not payload.get("choices") or "usage" not in payload:
                    out.end, out.body = "bad_body", json.dumps(payload)[:300]
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        out.end, out.body = f"transport:{type(exc).__name__}", repr(exc)[:300]
    out.latency = time.monotonic() - t0
    return out


async def run_load(targets: list[str], *, rate: float, seconds: float, model: str = "gpt-4",
                   stream_fraction: float = 0.3, seed: int = 0, api_key: str | None = None,
                   request_timeout: float = 20.0) -> list[Outcome]:
    """Open loop: `rate` requests per second for `seconds`, round-robin over `targets`,
    whatever the answers; returns every outcome (in sending order)."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    count = int(rate * seconds)
    tasks = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=request_timeout),
                                     connector=aiohttp.TCPConnector(limit=500)) as session:
        started = time.monotonic()
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = chat_body(rng, model, rng.random() < stream_fraction)
            tasks.append(asyncio.create_task(
                one(session, targets[i % len(targets)], body, started, headers)))
        return list(await asyncio.gather(*tasks))


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    ends = Counter(o.end for o in outcomes)
    latencies = sorted(o.latency for o in outcomes)
    return {"requests": len(outcomes), "ends": dict(ends),
            "failed": sum(o.failed for o in outcomes), "lost": sum(o.lost for o in outcomes),
            "p50_ms": round(1000 * latencies[len(latencies) // 2]) if latencies else None,
            "max_ms": round(1000 * latencies[-1]) if latencies else None}


# --------------------------------------------------------------------------- after the load


async def leaked_reservations(rig: Rig, models: tuple[str, ...] = ("gpt-4",),
                              within: float = 15.0) -> list[str]:
    """After idle, every bucket must be full again and nothing in flight: returns what is
    not (empty when nothing leaked). With TIME_SCALE 10 a bucket refills in ~1 s."""
    deadline = time.monotonic() + within
    while True:
        problems = []
        for gw in rig.gateways:
            text = await get_text(f"{gw.url}/metrics")
            in_flight = metric(text, "balancer_in_flight_requests")
            if in_flight > 1:  # the /regions request itself may be in flight elsewhere
                problems.append(f"{gw.name}: {in_flight:.0f} requests in flight")
            body = await get_json(f"{gw.url}/regions")
            for model in models:
                for row in body["models"][model]:
                    requests_capacity = max(1.0, row["rpm"] / 60)  # rpm_burst_seconds: 1
                    if row["tokens_remaining"] < row["tokens_capacity"] - 1 or \
                            row["requests_remaining"] < requests_capacity - 0.01:
                        problems.append(f"{gw.name}: {model}/{row['region']} at "
                                        f"{row['tokens_remaining']}/{row['tokens_capacity']} "
                                        f"tokens, {row['requests_remaining']}/"
                                        f"{requests_capacity} requests")
        if not problems or time.monotonic() > deadline:
            return problems
        await asyncio.sleep(0.25)


@dataclass
class Row:
    """One line of the RELIABILITY.md table."""

    section: str  # "fault" | "input" | "security" | "soak"
    name: str
    load: str
    requests: int
    failed: int
    expected: str
    lost: int
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def record(row: Row) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(row)}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"\n[reliability] {json.dumps(line)}")
