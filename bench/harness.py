"""The machinery of the benchmarks that run a simulated pool under open-loop load
(balance, scenarios, ptu, learning, fairness): the regions and their regions.yaml, the
simulator and the replicas in front of it, a private Redis, the load-generator processes
(bench/loadgen.py) and what they saw, and the simulator's counters over time.

A benchmark keeps what is its own: its scenarios, its analysis and its tables."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from balancer import config as config_mod
from balancer.operations import OPERATIONS
from bench import report
from bench.loadgen import OPERATIONS as LOAD_OPERATIONS
from bench.loadgen import Mix, merge, span
from bench.procs import PYTHON, Procs, get_json

SIM_KEY = "bench-key"
API_VERSION = "2024-06-01"


# --------------------------------------------------------------------------- regions


@dataclass
class Region:
    name: str
    tpm: int
    rpm: int


def reference_regions(path: str, model: str) -> tuple[list[Region], dict[str, Any]]:
    """The model's best-priority regions of `path` and the gateway settings to keep."""
    cfg = config_mod.load(path, simulate=True)
    targets = cfg.models.get(model)
    if not targets:
        raise SystemExit(f"{path}: no region serves the model {model!r}")
    best = min(t.priority for t in targets)
    regions = [Region(t.region.name, t.deployment.tpm, t.deployment.rpm)
               for t in targets if t.priority == best]
    gw = cfg.gateway
    keep = {"max_attempts": gw.max_attempts, "burst_seconds": gw.burst_seconds,
            "rpm_burst_seconds": gw.rpm_burst_seconds,
            "default_cooldown_seconds": gw.default_cooldown_seconds,
            "connect_timeout_seconds": gw.connect_timeout_seconds,
            "read_timeout_seconds": gw.read_timeout_seconds}
    return regions, keep


def bench_config(regions: list[Region], model: str, gateway: dict[str, Any],
                 sections: dict[str, Any] | None = None) -> str:
    """A regions.yaml for the benchmark: every region at its real TPM and RPM, served by
    the simulator (${SIM_URL}), the store from ${STORE_URL}; `sections` are further
    top-level sections (JSON is YAML)."""
    lines = ['store: {url: "${STORE_URL}"}', f"gateway: {json.dumps(gateway)}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in (sections or {}).items()]
    lines.append("regions:")
    for r in regions:
        lines += [f"  - name: {r.name}", "    kind: azure",
                  f"    endpoint: ${{SIM_URL}}/{r.name}", f"    api_key: {SIM_KEY}",
                  f'    api_version: "{API_VERSION}"', "    deployments:",
                  f"      {model}: {{deployment: {model}, tpm: {r.tpm}, rpm: {r.rpm}}}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the mix


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The request mix and run options every multi-process benchmark shares."""
    p.add_argument("--prompt-tokens", default="200:3000")
    p.add_argument("--max-tokens", default="50:1000")
    p.add_argument("--stream-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sample-interval", type=float, default=0.25,
                   help="seconds between reads of the simulator's counters")
    p.add_argument("--log-level", default="WARNING", help="the replicas' log level")


def load_mix(args: argparse.Namespace, operation: str = "chat") -> Mix:
    """The request mix of --model and add_load_arguments' options."""
    return Mix(args.model, span(args.prompt_tokens), span(args.max_tokens),
               args.stream_fraction, operation)


def mean_cost(mix: Mix, samples: int = 4000) -> float:
    """Mean estimated cost (prompt + max_tokens or max_output_tokens) of the mix, as the
    gateway and the simulator count it: with the estimator of the mix's operation, so
    chat and Responses API bodies of one seed cost the same."""
    operation = OPERATIONS[LOAD_OPERATIONS[mix.operation]]
    rng = random.Random(12345)
    total = 0
    for _ in range(samples):
        body = mix.body(rng)
        total += operation.estimate(body, 1024).total
    return total / samples


# --------------------------------------------------------------------------- processes


def workspace(kind: str) -> tuple[Path, report.Progress]:
    """A fresh working folder for the logs (kept), and the progress line."""
    return Path(tempfile.mkdtemp(prefix=f"bench-{kind}-")), report.Progress(every=10)


def require_redis(purpose: str = "") -> None:
    if shutil.which("redis-server") is None:
        raise SystemExit(f"redis-server is required{purpose} (Debian package redis-server)")


@contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """A private redis-server for the whole benchmark, its port (each run takes a database
    of its own: a fresh one)."""
    with Procs(workdir / "redis") as procs:
        yield procs.redis()


def simulate_cmd(config: Path, time_scale: float, seed: int, *extra: str) -> list[str]:
    return [PYTHON, "-m", "balancer.cli", "simulate", "--config", str(config), "--port",
            "{port}", "--time-scale", f"{time_scale:g}", "--seed", str(seed), *extra]


def serve_cmd(config: Path) -> list[str]:
    return [PYTHON, "-m", "balancer.cli", "serve", "--config", str(config), "--host",
            "127.0.0.1", "--port", "{port}"]


def start_pool(procs: Procs, store: str, log_level: str, simulator: list[str],
               replica: list[str], replicas: int, health: str = "/healthz"
               ) -> tuple[str, list[str]]:
    """The simulator and `replicas` copies of `replica` (its args with `{port}`) in front
    of it, started side by side (imports take a second each); their URLs."""
    env = {"STORE_URL": store, "SIM_URL": "http://127.0.0.1:1", "BALANCER_LOG_LEVEL": log_level}
    sim = procs.launch("simulator", simulator, "/_sim/stats", env)
    env["SIM_URL"] = sim.url
    servers = [procs.launch(f"replica-{i}", replica, health, env) for i in range(replicas)]
    procs.ready(sim, *servers)
    return sim.url, [s.url for s in servers]


# --------------------------------------------------------------------------- counters


class Poller(threading.Thread):
    """Calls `take` every `interval` seconds on a daemon thread (a failed read is
    skipped), collecting `samples`. A context manager: polls while inside."""

    def __init__(self, url: str, model: str, interval: float):
        super().__init__(daemon=True)
        self.url, self.model, self.interval = url, model, interval
        self.samples: list[Any] = []
        self.stop = threading.Event()

    def take(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.take()
            except OSError:
                pass

    def __enter__(self) -> Poller:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop.set()
        self.join(5)


class Sampler(Poller):
    """The simulator's counters of the model, per region: (time, {region: counters})."""

    samples: list[tuple[float, dict[str, dict[str, int]]]]

    def take(self) -> None:
        stats = get_json(f"{self.url}/_sim/stats")["regions"]
        now = time.monotonic()
        self.samples.append((now, {r: deps[self.model] for r, deps in stats.items()
                                   if self.model in deps}))


def at(samples: list[tuple[float, dict[str, dict[str, int]]]], t: float, region: str,
       key: str) -> float:
    """A counter at time t, interpolated between samples."""
    prev = samples[0]
    if t <= prev[0]:
        return prev[1][region][key]
    for cur in samples[1:]:
        if cur[0] >= t:
            a, b = prev[1][region][key], cur[1][region][key]
            span = cur[0] - prev[0]
            return a + (b - a) * ((t - prev[0]) / span if span > 0 else 1.0)
        prev = cur
    return prev[1][region][key]


# --------------------------------------------------------------------------- load


def wait_until(t0: float) -> float:
    """Sleep until the wall-clock time t0 (the load's --start-at); then time.monotonic()."""
    while time.time() < t0:
        time.sleep(0.01)
    return time.monotonic()


class Loads:
    """The load-generator processes of one run, each in a group (a client, a phase) and
    writing its report beside its log. The n-th (from 0) has the seed `seed` + n and sends
    to the targets in turn, starting with the n-th."""

    def __init__(self, procs: Procs, mix: Mix, seed: int):
        self.procs, self.mix, self.seed = procs, mix, seed
        self.runs: list[tuple[str, str, subprocess.Popen[bytes], Path]] = []

    def spawn(self, group: str, targets: list[str], rate: float, duration: float, *,
              start_at: float | None = None, api_key: str | None = None) -> None:
        n = len(self.runs)
        name = f"load-{n}"
        out = self.procs.workdir / f"{name}.json"
        m = self.mix
        cmd = [PYTHON, "-m", "bench.loadgen", "--rate", f"{rate:.4f}",
               "--duration", f"{duration:g}", "--model", m.model,
               "--prompt-tokens", "{}:{}".format(*m.prompt_tokens),
               "--max-tokens", "{}:{}".format(*m.max_tokens),
               "--stream-fraction", str(m.stream_fraction), "--operation", m.operation,
               "--seed", str(self.seed + n), "--out", str(out)]
        if api_key:
            cmd += ["--api-key", api_key]
        if start_at is not None:
            cmd += ["--start-at", f"{start_at:.3f}"]
        k = n % len(targets)
        for url in targets[k:] + targets[:k]:
            cmd += ["--target", url]
        self.runs.append((group, name, self.procs.spawn(name, cmd), out))

    def wait(self, started: float, duration: float, progress: report.Progress,
             line: Callable[[float], str], *, slack: float = 120.0, tick: float = 0.1,
             each: Callable[[float], None] | None = None) -> None:
        """Until every process has ended, showing `line(elapsed)`; `each(elapsed)` on every
        tick; an error if they run `slack` seconds past `duration`."""
        while any(p.poll() is None for _, _, p, _ in self.runs):
            elapsed = time.monotonic() - started
            if each is not None:
                each(elapsed)
            if elapsed > duration + slack:
                raise RuntimeError("load generators did not finish; logs in "
                                   f"{self.procs.workdir}")
            progress.update(line(elapsed))
            time.sleep(tick)

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """Each group's reports; an error if a process failed."""
        for group, name, proc, _ in self.runs:
            if proc.returncode != 0:
                raise RuntimeError(f"a load generator ({group}) failed; logs in "
                                   f"{self.procs.workdir}\n{self.procs.log(name)[-2000:]}")
        out: dict[str, list[dict[str, Any]]] = {}
        for group, _, _, path in self.runs:
            out.setdefault(group, []).append(json.loads(path.read_text()))
        return out

    def merged(self) -> dict[str, Any]:
        """All the reports in one."""
        return merge([r for reports in self.reports().values() for r in reports])


def client_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """What clients saw, from a (merged) load-generator report."""
    sent = max(1, rep["sent"])
    statuses = rep["statuses"]
    ok = statuses.get("200", 0)
    lat = rep["latencies"]
    return {"sent": rep["sent"], "ok": ok, "statuses": statuses,
            "rejected_429": statuses.get("429", 0) / sent,
            "errors": sum(n for s, n in statuses.items() if s not in ("200", "429")) / sent,
            "p50": report.percentile(lat, 50), "p90": report.percentile(lat, 90),
            "p99": report.percentile(lat, 99), "mean": sum(lat) / len(lat) if lat else None,
            "regions": rep["regions"], "error_samples": rep["errors"][:5]}
