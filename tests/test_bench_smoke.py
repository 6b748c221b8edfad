"""Smoke runs of the benchmarks, a few seconds each and without thresholds, so that
`make bench` cannot rot: each must run end to end through `balancer bench`, print its
tables and write its JSON record (and the PNG when matplotlib is installed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import PYTHON, ROOT

pytestmark = pytest.mark.slow


def peers_installed() -> str | None:
    """LiteLLM's version in bench/.peers/litellm when it is the pinned one."""
    from bench import peers

    version = peers.installed_version(peers.PEERS_DIR / "litellm", "litellm")
    return version if version == peers.LITELLM_VERSION else None

SMALL_REGIONS = """
regions:
""" + "".join(f"""
  - name: {name}
    kind: azure
    endpoint: http://unused
    api_key: unused
    api_version: "2024-06-01"
    deployments:
      gpt-4: {{deployment: gpt-4, tpm: {tpm}}}
""" for name, tpm in {"big": 30_000, "medium": 15_000, "small": 6_000}.items())


def bench(*args: str, timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    out = subprocess.run([PYTHON, "-m", "balancer.cli", "bench", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, time.monotonic() - started


def test_balance_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "regions.yaml"
    config.write_text(SMALL_REGIONS)
    stdout, seconds = bench(
        "balance", "--config", str(config), "--time-scale", "30", "--minutes", "1",
        "--warmup-minutes", "0.5", "--replicas", "2", "--clients", "1", "--out-dir",
        str(tmp_path / "results"), timeout=120)
    print(stdout + f"\n({seconds:.1f} s)")
    assert "| (a) naive proxy" in stdout and "| (c) balancer, shared Redis" in stdout
    assert "(d) " in stdout  # run, or skipped with a note
    record = json.loads((tmp_path / "results" / "balance-latest.json").read_text())
    keys = [s["key"] for s in record["strategies"]]
    assert keys[:3] == ["naive", "static", "redis"]
    for strategy in record["strategies"]:
        assert strategy["client"]["sent"] > 0
        assert set(strategy["regions"]) == {"big", "medium", "small"}
    assert record["total_tpm"] == 51_000
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the PNG is not drawn (the bench extra)")
    assert (tmp_path / "results" / "latest.png").stat().st_size > 10_000


def test_balance_benchmark_runs_responses_api_traffic(tmp_path: Path) -> None:
    """`--operation responses`: the same mix as Responses API calls (POST /v1/responses),
    which the simulated Azure regions answer with -1 remaining headers and 429s without
    retry-after; only (c), briefly. Its record is written beside chat's, not over it."""
    config = tmp_path / "regions.yaml"
    config.write_text(SMALL_REGIONS)
    stdout, seconds = bench(
        "balance", "--operation", "responses", "--strategies", "redis", "--config",
        str(config), "--time-scale", "30", "--minutes", "1", "--warmup-minutes", "0.5",
        "--replicas", "1", "--clients", "1", "--out-dir", str(tmp_path / "results"),
        timeout=60)
    print(stdout + f"\n({seconds:.1f} s)")
    assert "## Balancing: Responses API" in stdout and "| (c) balancer, shared Redis" in stdout
    assert not (tmp_path / "results" / "balance-latest.json").exists()
    record = json.loads((tmp_path / "results" / "balance-responses-latest.json").read_text())
    assert record["operation"] == record["settings"]["operation"] == "responses"
    (strategy,) = record["strategies"]
    client = strategy["client"]
    assert client["sent"] > 0 and client["ok"] > 0, client
    assert client["tokens"].get("prompt", 0) > 0 and client["tokens"].get("completion", 0) > 0
    others = {s: n for s, n in client["statuses"].items() if s not in ("200", "429")}
    assert not others, (others, client["error_samples"])
    assert strategy["upstream_calls"] > 0


def test_overhead_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    stdout, seconds = bench(
        "overhead", "--duration", "1", "--warmup", "0", "--rounds", "1",
        "--concurrency", "1,4", "--no-litellm", "--out-dir", str(tmp_path), timeout=120)
    print(stdout + f"\n({seconds:.1f} s)")
    for path in ("direct", "passthrough", "passthrough-uvloop", "gateway-memory",
                 "gateway-redis", "gateway-redis-asyncio"):
        assert f"| {path} " in stdout
    assert "`--peers litellm`" in stdout  # the skipped peer says how to include it
    record = json.loads((tmp_path / "overhead-latest.json").read_text())
    assert set(record["targets"]) == {"rps_ratio", "added_serial_p50"}
    assert set(record["info"]) == {"rps_ratio_same_loop", "uvloop_rps_gain"}
    assert "(both on uvloop)" in stdout
    for path in record["paths"].values():
        for row in path.values():
            assert row["requests"] > 0 and row["errors"] == 0


def test_scenarios_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """The three scenarios (slow region, hidden co-tenant, burst), each ON and OFF, with
    --quick durations and one replica: only that they run and report, no thresholds."""
    stdout, seconds = bench("scenarios", "--quick", "--replicas", "1", "--out-dir",
                            str(tmp_path), timeout=120)
    print(stdout + f"\n({seconds:.1f} s)")
    for feature in ("latency_weighting", "learned_capacity", "admission_queue"):
        assert f"| {feature} ON " in stdout and f"| {feature} OFF " in stdout
    record = json.loads((tmp_path / "scenarios-latest.json").read_text())
    assert set(record["scenarios"]) == {"slow", "cotenant", "burst"}
    for key, scenario in record["scenarios"].items():
        on, off = scenario["on"], scenario["off"]
        feature = scenario["feature"]
        assert on["sections"][feature] != off["sections"][feature], key
        others = {k: v for k, v in on["sections"].items() if k != feature}
        assert others == {k: v for k, v in off["sections"].items() if k != feature}, key
        for run in (on, off):
            assert run["all_clients"]["sent"] > 0 and run["whole"]["upstream_calls"] > 0
            assert run["all_clients"]["errors"] == 0, run["all_clients"]["error_samples"]


def test_ptu_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """The PTU spill scenario with --quick (one replica, a few seconds): it runs, the
    gateway serves every request, and the PTU and standard regions both carry some."""
    stdout, seconds = bench("ptu", "--quick", "--out-dir", str(tmp_path), timeout=90)
    print(stdout + f"\n({seconds:.1f} s)")
    assert "| PTU delivered / its real TPM" in stdout
    record = json.loads((tmp_path / "ptu-latest.json").read_text())
    clients = record["clients"]
    assert clients["sent"] > 0 and clients["errors"] == 0, clients["error_samples"]
    assert record["ptu_tpm"] > 0 and record["payg_tpm"] > 0
    assert record["spilled_requests"] > 0
    assert set(record["targets"]) == {"client_failures", "ptu_share"}


def test_learning_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """Learned capacity per header style, --quick, one style: the tester's one-region
    scenario runs ON and OFF and reports; no thresholds."""
    stdout, seconds = bench("learning", "--quick", "--styles", "seconds", "--scenarios",
                            "solo", "--out-dir", str(tmp_path), timeout=120)
    print(stdout + f"\n({seconds:.1f} s)")
    assert "| seconds " in stdout and "learning ON" in stdout and "learning OFF" in stdout
    record = json.loads((tmp_path / "learning-latest.json").read_text())
    assert [r["variant"] for r in record["results"]["solo"]] == ["on", "off"]
    for run in record["results"]["solo"]:
        assert run["upstream_calls"] > 0 and run["clients"]["errors"] == 0
    assert record["results"]["cotenant"] == []


def test_fairness_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """Client budgets and fair share, --quick (2 replicas, 2 s of load per run): every
    scenario runs and reports; no thresholds."""
    stdout, seconds = bench("fairness", "--quick", "--out-dir", str(tmp_path), timeout=120)
    print(stdout + f"\n({seconds:.1f} s)")
    assert "| admitted / (budget + burst)" in stdout
    assert "| fair_share ON " in stdout and "| fair_share OFF " in stdout
    record = json.loads((tmp_path / "fairness-latest.json").read_text())
    runs = {r["key"]: r for r in record["runs"]}
    assert set(runs) == {"budget", "fair-on", "fair-off", "weighted"}
    assert runs["budget"]["budget"]["admitted_tokens"] > 0
    for run in runs.values():
        assert run["pool"]["upstream_calls"] > 0
        for client in run["clients"].values():
            assert client["sent"] > 0 and client["errors"] == 0, client["error_samples"]


def test_overhead_benchmark_rejects_an_unknown_peer() -> None:
    out = subprocess.run([PYTHON, "-m", "balancer.cli", "bench", "overhead", "--peers", "nginx"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown peers ['nginx']" in out.stderr


def test_peer_litellm_is_reused_at_the_pinned_version(tmp_path: Path) -> None:
    """An existing bench/.peers/litellm at the pinned version is reused, not reinstalled
    (no network here: a stand-in venv whose python reports the version)."""
    from bench import peers

    venv = tmp_path / "litellm"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho {peers.LITELLM_VERSION}\n")
    python.chmod(0o755)
    (venv / "bin" / "litellm").write_text("")
    installed = peers.ensure_litellm(tmp_path / "install.log", venv)
    assert installed.install_seconds is None and installed.version == peers.LITELLM_VERSION
    assert not (tmp_path / "install.log").exists()


@pytest.mark.skipif(peers_installed() is None, reason="bench/.peers/litellm is not installed "
                    "(`balancer bench overhead --peers litellm` installs it)")
def test_overhead_benchmark_runs_with_the_litellm_peer(tmp_path: Path) -> None:
    """With LiteLLM already installed: its row and the ratio table, briefly."""
    stdout, seconds = bench(
        "overhead", "--duration", "1", "--warmup", "0.5", "--rounds", "1", "--concurrency",
        "1,4", "--peers", "litellm", "--out-dir", str(tmp_path), timeout=240)
    print(stdout + f"\n({seconds:.1f} s)")
    assert "| litellm " in stdout and "Gateway vs litellm" in stdout
    record = json.loads((tmp_path / "overhead-latest.json").read_text())
    peer = record["peers"]["litellm"]
    assert peer["ratios"]["gateway-redis"]["4"] > 0 and "met" in peer["target"]


def test_streams_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """Open streams, --quick (100 streams of ~1 s at 100/s): straight to the simulator,
    then through one gateway replica on uvloop and one on asyncio's loop; tables and the
    record, no thresholds."""
    stdout, seconds = bench("streams", "--quick", "--out-dir", str(tmp_path), timeout=120)
    print(stdout + f"\n({seconds:.1f} s)")
    assert "| direct " in stdout and "| gateway " in stdout and "per open stream" in stdout
    record = json.loads((tmp_path / "streams-latest.json").read_text())
    assert set(record["runs"]) == {"direct", "gateway", "gateway-asyncio"}
    assert "| gateway-asyncio " in stdout
    for run in record["runs"].values():
        assert run["ok"] == run["streams"] == 100, run["error_samples"]
        assert run["ttfb"]["p50"] is not None and run["events"] > 0
        assert run["generator"]["cpu_seconds"] > 0
    gateway = record["runs"]["gateway"]
    assert gateway["rss_plateau_mib"] > 0 and "added_ttfb" in gateway
    assert set(record["targets"]) == {"added_ttfb_p99", "kib_per_stream"}
