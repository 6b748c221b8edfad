"""Operating a running gateway process: hot reload under load, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import merge
from tests.procs import PYTHON, Procs, get_json

pytestmark = pytest.mark.slow


def region(name: str, tpm: int, weight: float = 1.0) -> str:
    return f"""
  - name: {name}
    kind: azure
    endpoint: ${{SIM_URL}}/{name}
    api_key: sim-secret
    api_version: "2024-06-01"
    deployments:
      gpt-4: {{deployment: gpt-4, tpm: {tpm}, weight: {weight}}}
"""


HEAD = """gateway: {time_scale: 10, reload_poll_seconds: 0.2, drain_timeout_seconds: 20,
          shutdown_delay_seconds: 1}
regions:
"""


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def sim_calls(sim_url: str) -> dict[str, int]:
    stats = get_json(f"{sim_url}/_sim/stats")["regions"]
    return {name: deps["gpt-4"]["requests"] for name, deps in stats.items()}


def metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def access_lines(log: str) -> list[dict[str, Any]]:
    """The gateway's access-log lines: JSON objects with message "request"."""
    out = []
    for text in log.splitlines():
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "balancer.access":
            out.append(entry)
    return out


def swap(path: Path, text: str) -> None:
    """Replace a config file at once, as editors and Kubernetes do: the file watcher
    must never read a half-written file (that would count as one more refused reload)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        return r.read().decode()


def test_reload_under_load_loses_nothing(procs: Procs, tmp_path: Path) -> None:
    sim_config = tmp_path / "sim.yaml"
    sim_config.write_text(HEAD + region("a", 600_000) + region("b", 600_000)
                          + region("c", 600_000))
    sim_url = procs.simulator(sim_config, "--latency-base-ms", "5", "--latency-per-token-ms",
                              "2")
    config = tmp_path / "regions.yaml"
    config.write_text(HEAD + region("a", 600_000) + region("b", 600_000))
    env = {"SIM_URL": sim_url}
    gw = procs.gateway("gateway", config, env)

    out = tmp_path / "load.json"
    load = procs.spawn("load", [PYTHON, "-m", "bench.loadgen", "--target", gw, "--rate", "40",
                                "--duration", "12", "--prompt-tokens", "50:200",
                                "--max-tokens", "20:200", "--stream-fraction", "0.5",
                                "--out", str(out)])
    time.sleep(3)
    # 1. b is removed, c is added with twice a's weight
    swap(config, HEAD + region("a", 600_000) + region("c", 600_000, weight=2))
    time.sleep(1.5)
    before = sim_calls(sim_url)
    time.sleep(2.5)
    after = sim_calls(sim_url)
    assert after["b"] == before["b"], "a removed region still received traffic"
    grew_a, grew_c = after["a"] - before["a"], after["c"] - before["c"]
    assert grew_c > grew_a > 0  # c weighs twice a
    # 2. an invalid file is refused and the running config stays
    swap(config, HEAD + region("a", -5))
    time.sleep(1.0)
    before = sim_calls(sim_url)
    time.sleep(1.5)
    after = sim_calls(sim_url)
    assert after["a"] > before["a"] and after["c"] > before["c"]
    # 3. a valid file again, applied on SIGHUP too
    swap(config, HEAD + region("a", 600_000) + region("b", 600_000))
    procs.procs[1].send_signal(signal.SIGHUP)
    assert load.wait(30) == 0

    report = merge([json.loads(out.read_text())])
    text = scrape(gw)
    reloads_ok = metric(text, 'balancer_config_reloads_total{result="success"}')
    reloads_bad = metric(text, 'balancer_config_reloads_total{result="failure"}')
    print(f"\nreload under load: {report['sent']} requests, statuses {report['statuses']}, "
          f"reloads ok {reloads_ok:.0f}, refused {reloads_bad:.0f}")
    assert report["statuses"] == {"200": report["sent"]}, report["errors"]
    assert reloads_ok >= 2 and reloads_bad == 1
    assert "regions[0].deployments.gpt-4.tpm: must be >= 1" in procs.log("gateway")
    time.sleep(0.5)  # access lines are written in batches, every 0.1 s
    lines = access_lines(procs.log("gateway"))
    assert len(lines) == report["sent"]  # one per request, none lost or doubled
    assert {line["status"] for line in lines} == {200}
    assert all(line["message"] == "request" and line["level"] == "info" and line["region"]
               and line["request_id"] and line["latency_ms"] > 0 for line in lines)


def test_sigterm_drains_a_stream_in_flight(procs: Procs, tmp_path: Path) -> None:
    config = tmp_path / "regions.yaml"
    config.write_text(HEAD + region("a", 600_000))
    sim_url = procs.simulator(config, "--latency-base-ms", "5", "--latency-per-token-ms", "25")
    gw = procs.gateway("gateway", config, {"SIM_URL": sim_url})
    gateway_proc = procs.procs[-1]

    events: list[bytes] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = json.dumps({"model": "gpt-4", "stream": True, "max_tokens": 120,
                           "messages": [{"role": "user", "content": "tell me a story"}]})
        request = urllib.request.Request(f"{gw}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            for line in r:
                if line.startswith(b"data: "):
                    events.append(line.strip())
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(10)
    gateway_proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(urllib.error.HTTPError) as info:  # readiness fails first
        urllib.request.urlopen(f"{gw}/readyz", timeout=2)
    assert info.value.code == 503
    reader.join(30)
    assert gateway_proc.wait(30) == 0
    assert events[-1] == b"data: [DONE]", events[-3:]
    # the drained stream's access line was flushed on the way out
    assert [line["status"] for line in access_lines(procs.log("gateway"))] == [200]
    assert not any(b'"error"' in e for e in events)
    assert len(events) > 10
