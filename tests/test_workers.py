"""`balancer serve --workers N`: N processes on one port (SO_REUSEPORT) and one Redis,
under a supervisor that forwards SIGTERM and SIGHUP and restarts a worker that dies.
/metrics sums every worker's counters whichever worker the scrape reaches.

Real processes: a private redis-server, the simulator, the supervisor and its workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import PYTHON, ROOT, Procs, get_json

pytestmark = [pytest.mark.slow, pytest.mark.redis]

CONFIG = """
store: {{url: "${{STORE_URL}}"}}
gateway: {{reload_poll_seconds: 0, drain_timeout_seconds: 10}}
regions:
  - name: a
    kind: azure
    endpoint: ${{SIM_URL}}/a
    api_key: sim-secret
    api_version: "2024-06-01"
    deployments:
{deployments}
"""
GPT4 = "      gpt-4: {deployment: gpt-4, tpm: 100000000, rpm: 1000000}\n"
GPT35 = "      gpt-35: {deployment: gpt-35, tpm: 100000000, rpm: 1000000}\n"
BODY = json.dumps({"model": "gpt-4", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def log_lines(procs: Procs, name: str) -> list[dict[str, Any]]:
    out = []
    for text in procs.log(name).splitlines():
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def wait_for(what: str, check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def logged(procs: Procs, *, logger: str | None = None, message: str = ""
           ) -> list[dict[str, Any]]:
    """The supervisor's and its workers' log lines (one file) from `logger`, whose
    message starts with `message`."""
    return [e for e in log_lines(procs, "gateway")
            if (logger is None or e.get("logger") == logger)
            and str(e.get("message", "")).startswith(message)]


def listening(procs: Procs) -> list[int]:
    """Worker numbers that logged 'balancer listening', once per (re)start."""
    return [e["worker"] for e in logged(procs, message="balancer listening")]


def children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def post(url: str) -> int:
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=BODY,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:  # a new connection each time
        return r.status


def requests_total(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("balancer_requests_total{"))


def metric_lines(url: str, prefix: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        return [line for line in r.read().decode().splitlines() if line.startswith(prefix)]


def test_two_workers_share_port_metrics_and_signals(procs: Procs, tmp_path: Path) -> None:
    _, redis_port = procs.redis()
    config = tmp_path / "regions.yaml"
    config.write_text(CONFIG.format(deployments=GPT4))
    env = {"STORE_URL": f"redis://127.0.0.1:{redis_port}/0", "SIM_URL": "http://127.0.0.1:1"}
    env["SIM_URL"] = procs.simulator(config, "--latency-base-ms", "0",
                                     "--latency-per-token-ms", "0", env=env)
    gw = procs.server("gateway", [PYTHON, "-m", "balancer.cli", "serve", "--config",
                                  str(config), "--host", "127.0.0.1", "--port", "{port}",
                                  "--workers", "2"], "/healthz", env)
    supervisor = procs.procs[-1]
    wait_for("both workers listening", lambda: sorted(listening(procs)) == [0, 1])
    workers = children(supervisor.pid)
    assert len(workers) == 2

    sent = 0
    for _ in range(40):
        assert post(gw) == 200
        sent += 1
    # Both workers answered: each access line names its worker (written every 0.1 s).
    wait_for("every access line", lambda: len(logged(procs, logger="balancer.access")) == sent)
    lines = logged(procs, logger="balancer.access")
    assert {e["worker"] for e in lines} == {0, 1}, [e["worker"] for e in lines]
    assert len({e["request_id"] for e in lines}) == sent  # per-process id prefixes
    # Whichever worker a scrape reaches, the counters are the sum over both.
    for _ in range(6):
        assert requests_total(gw) == sent
    assert metric_lines(gw, "balancer_in_flight_requests ")  # livesum: no pid label
    # Each worker is a replica in the store's heartbeat.
    wait_for("2 live replicas", lambda: get_json(f"{gw}/regions")["replicas"] == 2)

    # A worker that dies is restarted; what it had counted stays counted.
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_for("the worker restarted", lambda: len(listening(procs)) == 3)
    assert "exited unexpectedly with signal SIGKILL" in procs.log("gateway")
    workers = children(supervisor.pid)
    assert len(workers) == 2 and victim not in workers
    for _ in range(10):
        assert post(gw) == 200
        sent += 1
    for _ in range(4):
        assert requests_total(gw) == sent

    # SIGHUP reloads in every worker: a second model appears everywhere.
    config.write_text(CONFIG.format(deployments=GPT4 + GPT35))
    supervisor.send_signal(signal.SIGHUP)
    wait_for("a reload in each worker",
             lambda: len(logged(procs, message="config reloaded (SIGHUP)")) == 2)
    assert sorted(e["worker"] for e in logged(procs, message="config reloaded (SIGHUP)")
                  ) == [0, 1]
    for _ in range(4):
        assert metric_lines(gw, 'balancer_config_reloads_total{result="success"}') == [
            'balancer_config_reloads_total{result="success"} 2.0']
        models = {m["id"] for m in get_json(f"{gw}/v1/models")["data"]}
        assert models == {"gpt-4", "gpt-35"}
        # gauges read from the store: the scraping worker's, one series each, no pid
        assert len(metric_lines(gw, "balancer_region_tpm{")) == 2
        assert not any('pid="' in line for line in metric_lines(gw, "balancer_"))

    # SIGTERM: every worker drains and exits 0, and so does the supervisor.
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    assert not any(alive(pid) for pid in workers)
    assert "workers stopped (status 0, status 0)" in procs.log("gateway")
    started = logged(procs, message="supervisor")
    assert not Path(started[0]["message"].rsplit(" ", 1)[1]).exists()  # cleaned up


def test_simulate_runs_one_simulator_for_all_workers(procs: Procs, tmp_path: Path) -> None:
    _, redis_port = procs.redis()
    config = tmp_path / "regions.yaml"
    config.write_text(CONFIG.format(deployments=GPT4))
    env = {"STORE_URL": f"redis://127.0.0.1:{redis_port}/0"}
    gw = procs.server("gateway", [PYTHON, "-m", "balancer.cli", "serve", "--config",
                                  str(config), "--host", "127.0.0.1", "--port", "{port}",
                                  "--workers", "2", "--simulate"], "/healthz", env)
    wait_for("both workers listening", lambda: sorted(listening(procs)) == [0, 1])
    for _ in range(10):
        assert post(gw) == 200
    sims = logged(procs, message="simulated regions at")
    assert len(sims) == 1 and "worker" not in sims[0]  # the supervisor's
    # A supervisor killed outright (no SIGTERM to forward): its workers stop by themselves.
    supervisor = procs.procs[-1]
    workers = children(supervisor.pid)
    assert len(workers) == 2
    supervisor.kill()
    supervisor.wait()
    wait_for("orphaned workers to stop", lambda: not any(alive(pid) for pid in workers))
    assert len(logged(procs, message="the supervisor (pid")) == 2


def test_memory_store_refuses_several_workers(tmp_path: Path) -> None:
    config = tmp_path / "regions.yaml"
    config.write_text(CONFIG.format(deployments=GPT4))
    env = {**os.environ, "STORE_URL": "memory://", "SIM_URL": "http://127.0.0.1:1"}
    env.pop("REDIS_URL", None)
    out = subprocess.run([PYTHON, "-m", "balancer.cli", "serve", "--config", str(config),
                          "--workers", "2"], capture_output=True, text=True, timeout=30,
                         cwd=ROOT, env=env)
    assert out.returncode == 2
    assert "the memory store cannot be shared" in out.stderr, out.stderr


def test_workers_must_be_positive(tmp_path: Path) -> None:
    out = subprocess.run([PYTHON, "-m", "balancer.cli", "serve", "--workers", "0"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2
    assert "--workers: must be at least 1" in out.stderr, out.stderr
