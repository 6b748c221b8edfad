"""Three gateway processes share one real Redis and together keep every region
within its quota; the same three with per-replica memory stores overshoot.

Real processes throughout: redis-server, the simulator, three `balancer serve`,
and three load-generator processes sending at 2x total capacity for 30 s.
Time is compressed 6x (a simulated minute lasts 10 s), so 30 s spans three
simulated minutes of quota.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import merge
from tests.procs import PYTHON, Procs, get_json

pytestmark = pytest.mark.slow

TIME_SCALE = 6.0
TPM = {"a": 30_000, "b": 15_000, "c": 6_000}
DURATION = 30.0
CLIENTS = 3
PROMPT, MAX_TOKENS = (100, 300), (100, 300)
MEAN_COST = 7 + sum(PROMPT) / 2 + sum(MAX_TOKENS) / 2  # prompt estimate overhead + both means

CONFIG = f"""
store: {{url: "${{STORE_URL}}", timeout_seconds: 0.2}}
gateway: {{time_scale: {TIME_SCALE}, max_attempts: 3, default_cooldown_seconds: 1}}
learned_capacity: {{enabled: true}}
regions:
""" + "".join(f"""
  - name: {name}
    kind: azure
    endpoint: ${{SIM_URL}}/{name}
    api_key: ${{REGION_KEY}}
    api_version: "2024-06-01"
    deployments:
      gpt-4: {{deployment: gpt-4, tpm: {tpm}}}
""" for name, tpm in TPM.items())


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def run_scenario(procs: Procs, tmp_path: Path, store_url: str, *,
                 during: Any = None, learning: bool = True) -> dict[str, Any]:
    config = tmp_path / "regions.yaml"
    config.write_text(CONFIG if learning else CONFIG.replace("enabled: true", "enabled: false"))
    env = {"REGION_KEY": "region-secret", "STORE_URL": store_url,
           "BALANCER_LOG_LEVEL": "WARNING"}
    sim_url = procs.simulator(config, "--latency-base-ms", "5", "--latency-per-token-ms", "0.05",
                              "--seed", "3", env=env)
    env["SIM_URL"] = sim_url
    gateways = [procs.gateway(f"gateway-{i}", config, env) for i in range(3)]

    capacity_rps = sum(TPM.values()) / 60 * TIME_SCALE / MEAN_COST
    rate = 2 * capacity_rps / CLIENTS
    clients = []
    for i in range(CLIENTS):
        out = tmp_path / f"client-{i}.json"
        args = [PYTHON, "-m", "bench.loadgen", "--rate", f"{rate:.3f}", "--duration",
                str(DURATION), "--prompt-tokens", "{}:{}".format(*PROMPT), "--max-tokens",
                "{}:{}".format(*MAX_TOKENS), "--stream-fraction", "0.2", "--seed", str(i),
                "--out", str(out)]
        for url in gateways[i:] + gateways[:i]:
            args += ["--target", url]
        clients.append((procs.spawn(f"client-{i}", args), out))
    if during is not None:
        during(procs, gateways)
    for proc, _ in clients:
        assert proc.wait(DURATION + 60) == 0
    report = merge([json.loads(out.read_text()) for _, out in clients])
    stats = get_json(f"{sim_url}/_sim/stats")["regions"]
    report["sim"] = {r: stats[r]["gpt-4"] for r in TPM}
    report["gateways"] = gateways
    report["metrics"] = [_text(f"{g}/metrics") for g in gateways]
    return report


def _text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def summary(report: dict[str, Any]) -> str:
    lines = []
    for region, dep in report["sim"].items():
        quota = dep["max_tokens_over_window"]
        lines.append(f"{region}: offered peak {dep['peak_window_offered_tokens']} / "
                     f"quota+burst {quota} ({dep['peak_window_offered_tokens'] / quota:.2f}x), "
                     f"upstream calls {dep['requests']}, 429s {dep['throttled']}")
    calls = sum(d["requests"] for d in report["sim"].values())
    throttled = sum(d["throttled"] for d in report["sim"].values())
    lines.append(f"upstream 429s {throttled}/{calls} = {throttled / max(calls, 1):.2%}; "
                 f"client statuses {report['statuses']}")
    return "\n".join(lines)


def round_trips_per_request(report: dict[str, Any]) -> float:
    trips = requests = 0.0
    for text in report["metrics"]:
        for line in text.splitlines():
            if line.startswith("balancer_store_round_trips_total{"):
                trips += float(line.rsplit(" ", 1)[1])
            elif line.startswith("balancer_requests_total{"):
                requests += float(line.rsplit(" ", 1)[1])
    return trips / max(requests, 1)


def test_shared_redis_keeps_regions_within_quota(procs: Procs, tmp_path: Path) -> None:
    _, port = procs.redis()
    report = run_scenario(procs, tmp_path, f"redis://127.0.0.1:{port}/0")
    print("\nshared Redis:\n" + summary(report)
          + f"\nstore round trips per request: {round_trips_per_request(report):.2f}")
    assert set(report["statuses"]) <= {"200", "429"}, report["errors"]
    assert report["statuses"].get("429", 0) > 0, "demand must exceed capacity"
    for region, dep in report["sim"].items():
        assert dep["peak_window_offered_tokens"] <= dep["max_tokens_over_window"], region
    calls = sum(d["requests"] for d in report["sim"].values())
    throttled = sum(d["throttled"] for d in report["sim"].values())
    assert throttled < 0.01 * calls, summary(report)


def test_memory_store_per_replica_overshoots(procs: Procs, tmp_path: Path) -> None:
    """The control: without a shared store each replica spends the whole quota. Learned
    capacity off: it would learn from the 429s that each replica's view is too large,
    which hides what sharing the store is for (it still leaves 14% upstream 429s)."""
    report = run_scenario(procs, tmp_path, "memory://", learning=False)
    print("\nper-replica memory:\n" + summary(report))
    worst = max(d["peak_window_offered_tokens"] / d["max_tokens_over_window"]
                for d in report["sim"].values())
    calls = sum(d["requests"] for d in report["sim"].values())
    throttled = sum(d["throttled"] for d in report["sim"].values())
    assert worst > 1.5, summary(report)
    assert throttled > 0.05 * calls, summary(report)


def test_redis_killed_mid_load_fails_no_request(procs: Procs, tmp_path: Path) -> None:
    redis_proc, port = procs.redis()
    timings: dict[str, float] = {}

    def chaos(procs: Procs, gateways: list[str]) -> None:
        time.sleep(8)
        procs.stop(redis_proc, subprocess.signal.SIGKILL)  # type: ignore[attr-defined]
        timings["killed"] = time.monotonic()
        time.sleep(6)
        assert all(get_json(f"{g}/readyz")["degraded"] for g in gateways)
        procs.redis(port)
        timings["restarted"] = time.monotonic()
        while any(get_json(f"{g}/readyz")["degraded"] for g in gateways):
            time.sleep(0.05)
            assert time.monotonic() - timings["restarted"] < 15, "never left degraded mode"
        timings["recovered"] = time.monotonic()

    report = run_scenario(procs, tmp_path, f"redis://127.0.0.1:{port}/0", during=chaos)
    print(f"\nRedis killed for {timings['restarted'] - timings['killed']:.1f} s; degraded mode "
          f"ended {timings['recovered'] - timings['restarted']:.2f} s after the restart\n"
          + summary(report))
    assert set(report["statuses"]) <= {"200", "429"}, report["errors"]
