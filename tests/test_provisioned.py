"""Provisioned throughput (PTU) first, standard (pay-as-you-go) deployments only for the
excess: the `sku` setting, the simulator's PTU, the spill of a PTU's 429 to a standard
deployment within the same client request, and the metrics that tell them apart."""

from __future__ import annotations

import asyncio
import textwrap
import time
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancer import config as config_mod
from balancer import sim, upstream
from balancer.config import Config, ConfigError
from balancer.sim.buckets import DeploymentState
from balancer.sim.config import SimConfig, SimDeployment, SimRegion
from balancer.sim.ratelimit import UTILIZATION, ratelimit_headers, throttled
from tests.conftest import StackFactory

M, DEP = "gpt-4", "gpt-4-dep"
CHAT = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def ptu_config(*, sections: str = "", **gateway: Any) -> Config:
    """A PTU ("ptu") and a standard deployment ("payg") of 60,000 TPM each: buckets of
    10,000 tokens refilling 1,000 per second."""
    text = textwrap.dedent(f"""
    {sections}
    regions:
      - name: ptu
        kind: azure
        endpoint: http://placeholder
        api_version: "2024-06-01"
        deployments:
          {M}: {{deployment: {DEP}, tpm: 60000, sku: provisioned}}
      - name: payg
        kind: azure
        endpoint: http://placeholder
        api_version: "2024-06-01"
        deployments:
          {M}: {{deployment: {DEP}, tpm: 60000}}
    """)
    cfg = config_mod.parse(text, "test.yaml", {})
    return replace(cfg, gateway=replace(cfg.gateway, **gateway))


# --------------------------------------------------------------------------- config


def test_sku_defaults_to_standard_and_is_validated() -> None:
    cfg = ptu_config()
    ptu, payg = (r.deployments[M] for r in cfg.regions)
    assert (ptu.sku, ptu.provisioned) == ("provisioned", True)
    assert (payg.sku, payg.provisioned) == ("standard", False)
    bad = textwrap.dedent("""
    regions:
      - {name: a, kind: openai, endpoint: "http://x", deployments: {m: {tpm: 1, sku: ptu}}}
    """)
    with pytest.raises(ConfigError) as info:
        config_mod.parse(bad, "r.yaml", {})
    assert info.value.problems == [
        ("regions[0].deployments.m.sku", "must be one of standard, provisioned, got 'ptu'")]


def test_the_simulated_twin_of_a_provisioned_deployment_is_a_ptu() -> None:
    twin = sim.simulator_config(ptu_config())
    assert {r.name: r.deployments[0].sku for r in twin.regions} == {
        "ptu": "provisioned", "payg": "standard"}


@pytest.mark.parametrize("value, ratio", [
    ("85%", 0.85), ("85.3%", 0.853), (" 100% ", 1.0), ("130%", 1.0), ("0%", 0.0),
    ("0.85", 0.85), ("1", 1.0), ("85", None), ("-5%", None), ("nan%", None), ("", None),
    ("high", None)])
def test_utilization_header_is_read_as_a_ratio(value: str, ratio: float | None) -> None:
    got = upstream.utilization({"azure-openai-deployment-utilization": value})
    assert got == (None if ratio is None else pytest.approx(ratio))
    assert upstream.utilization({}) is None


# --------------------------------------------------------------------------- simulator


def test_simulated_ptu_admits_under_full_utilization_and_corrects_at_the_end() -> None:
    """Azure's leaky bucket: in while under 100% (however big), 429 until it is again,
    each request's estimate corrected to its real cost when it ends; no RPM limit."""
    region = SimRegion("r", [SimDeployment("d", 60_000, sku="provisioned")])
    dep = DeploymentState(region.deployments[0], SimConfig([region]), now=0.0)
    assert ratelimit_headers(region, dep) == {UTILIZATION: "0.0%"}
    assert dep.admit(9_000, 0.0) == 0
    assert dep.admit(3_000, 0.0) == 0  # 90% used: in, to 120%
    wait = dep.admit(10, 0.0)
    assert wait == pytest.approx(2.001)  # until 1 token is free at 1,000 per second
    error = throttled(sim.Simulator(SimConfig([region])), region, dep, "chat/completions",
                      "v1", wait)
    assert error.status == 429
    assert int(error.headers["retry-after-ms"]) in (2001, 2002)  # rounded up
    assert error.headers["retry-after"] == "3"
    assert error.headers[UTILIZATION] == "120.0%"
    assert not any(h.startswith("x-ratelimit") for h in error.headers)
    dep.finished(3_000, 500, 0.0)  # it used 500 of its 3,000 estimate
    assert dep.tokens.level == pytest.approx(-2_000 + 2_500)
    assert dep.admit(10, 0.0) == 0  # under 100% again
    assert [dep.admit(1, 0.0) for _ in range(50)] == [0.0] * 50  # no RPM limit
    standard = DeploymentState(SimDeployment("s", 60_000), SimConfig([region]), now=0.0)
    standard.admit(9_000, 0.0)
    standard.finished(9_000, 10, 0.0)  # the standard quota counter keeps the estimate
    assert standard.tokens.level == pytest.approx(1_000)


# --------------------------------------------------------------------------- end to end


async def fill_ptu(s: Any, http: aiohttp.ClientSession) -> float:
    """Send the simulated PTU, directly, a 12,000-token prompt: its utilization goes to
    ~120%, so it answers 429 for ~2 s. Returns the wait it will ask (seconds)."""
    body = {"messages": [{"role": "user", "content": "word " * 9_600}], "max_tokens": 1}
    url = f"{s.sim_url}/ptu/openai/deployments/{DEP}/chat/completions?api-version=2024-06-01"
    async with http.post(url, json=body, headers={"api-key": sim.sim_key("ptu")}) as r:
        assert r.status == 200, await r.text()
    level = (await s.sim_stats())["ptu"][DEP]["tokens_available"]
    assert level < -1_000
    return (1 - level) / 1_000  # until one token is free, at 1,000 tokens per second


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """(sample name, sorted labels) -> value."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    return {(smp.name, ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))): smp.value
            for family in text_string_to_metric_families(text) for smp in family.samples}


async def region_row(http: aiohttp.ClientSession, url: str, region: str) -> dict[str, Any]:
    async with http.get(f"{url}/regions") as r:
        rows = (await r.json())["models"][M]
    return next(row for row in rows if row["region"] == region)


async def test_a_ptu_429_spills_the_same_request_to_standard_at_once(
        stack: StackFactory) -> None:
    """One client request, two upstream calls (the PTU's 429, then the standard
    deployment's 200); the PTU cools for its retry-after-ms; the metrics say so."""
    s = await stack(ptu_config())
    async with aiohttp.ClientSession() as http:
        assert (await region_row(http, s.url, "ptu"))["sku"] == "provisioned"
        async with http.post(f"{s.url}/v1/chat/completions", json=CHAT) as r:  # PTU first
            assert r.status == 200 and r.headers["x-balancer-region"] == "ptu"
        before = await s.sim_stats()
        wait = await fill_ptu(s, http)
        asked = time.monotonic()
        async with http.post(f"{s.url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-balancer-region"] == "payg"
            usage = (await r.json())["usage"]
        row = await region_row(http, s.url, "ptu")
        expected = wait - (time.monotonic() - asked)
        assert row["cooldown_seconds"] == pytest.approx(expected, abs=0.25)
        assert row["priority"] == 0  # the configured priority, not the store's tier
        after = await s.sim_stats()
        calls = {region: after[region][DEP]["requests"] - before[region][DEP]["requests"]
                 for region in ("ptu", "payg")}
        assert calls == {"ptu": 2, "payg": 1}  # the filler, the 429; then the 200
        assert after["ptu"][DEP]["throttled"] - before["ptu"][DEP]["throttled"] == 1
        got = await metrics(http, s.url)
        assert got[("balancer_upstream_throttled_total",
                    f"model={M},region=ptu,sku=provisioned")] == 1
        assert ("balancer_upstream_throttled_total",
                f"model={M},region=payg,sku=standard") not in got
        assert got[("balancer_spilled_requests_total", f"model={M}")] == 1
        assert got[("balancer_spilled_tokens_total", f"model={M}")] == usage["total_tokens"]
        assert got[("balancer_deployment_utilization_ratio", f"model={M},region=ptu")] == 1.0
        assert ("balancer_deployment_utilization_ratio", f"model={M},region=payg") not in got
        await asyncio.sleep(max(0.0, expected) + 0.3)  # the PTU is back: no more spill
        async with http.post(f"{s.url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and r.headers["x-balancer-region"] == "ptu"
        got = await metrics(http, s.url)
        assert got[("balancer_spilled_requests_total", f"model={M}")] == 1
        assert got[("balancer_deployment_utilization_ratio", f"model={M},region=ptu")] < 1


async def test_a_ptu_429_costs_no_attempt(stack: StackFactory) -> None:
    """With max_attempts 1 the request still reaches the standard deployment."""
    s = await stack(ptu_config(max_attempts=1))
    async with aiohttp.ClientSession() as http:
        await fill_ptu(s, http)
        async with http.post(f"{s.url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and r.headers["x-balancer-region"] == "payg"


async def test_with_a_wait_budget_the_request_spills_instead_of_waiting_for_the_ptu(
        stack: StackFactory) -> None:
    """Admission queue on and a 5 s wait allowed: the PTU's ~2 s cooldown is not waited
    for while the standard deployment has capacity, neither after its 429 nor later."""
    s = await stack(ptu_config())
    headers = {"x-balancer-max-wait-ms": "5000"}
    async with aiohttp.ClientSession() as http:
        await fill_ptu(s, http)
        for _ in range(2):  # the first meets the PTU's 429; the second finds it cooling
            started = time.monotonic()
            async with http.post(f"{s.url}/v1/chat/completions", json=CHAT,
                                 headers=headers) as r:
                assert r.status == 200 and r.headers["x-balancer-region"] == "payg"
            assert time.monotonic() - started < 1.0
        stats = await s.sim_stats()
        assert stats["ptu"][DEP]["throttled"] == 1  # the cooling PTU was not tried again


async def test_when_standard_is_full_too_the_client_gets_429_and_both_skus_count(
        stack: StackFactory) -> None:
    s = await stack(ptu_config())
    async with aiohttp.ClientSession() as http:
        await fill_ptu(s, http)
        body = {"messages": [{"role": "user", "content": "word " * 9_600}], "max_tokens": 1}
        url = (f"{s.sim_url}/payg/openai/deployments/{DEP}/chat/completions"
               "?api-version=2024-06-01")
        async with http.post(url, json=body, headers={"api-key": sim.sim_key("payg")}) as r:
            assert r.status == 200  # a bigger-than-the-bucket request empties it
        async with http.post(f"{s.url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 429 and "Retry-After" in r.headers
        got = await metrics(http, s.url)
    assert got[("balancer_upstream_throttled_total",
                f"model={M},region=ptu,sku=provisioned")] == 1
    assert got[("balancer_upstream_throttled_total",
                f"model={M},region=payg,sku=standard")] == 1
    assert got.get(("balancer_spilled_requests_total", f"model={M}"), 0) == 0
