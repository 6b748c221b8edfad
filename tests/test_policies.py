"""Beyond static quotas, end to end over real HTTP: the admission queue, learned
capacity and latency-aware weighting, each against the same load with the feature
on and off."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import aiohttp

from balancer.config import Config
from tests.conftest import Stack, StackFactory, gateway_config
from tests.test_gateway import get

BODY = {"model": "gpt-4", "max_tokens": 200,
        "messages": [{"role": "user", "content": "Summarise the report. " * 8}]}


def with_features(cfg: Config, **sections: Any) -> Config:
    return replace(cfg, **{name: replace(getattr(cfg, name), **fields)
                           for name, fields in sections.items()})


async def load(s: Stack, rate: float, seconds: float, headers: dict[str, str] | None = None
               ) -> tuple[Counter[int], Counter[str]]:
    statuses: Counter[int] = Counter()
    regions: Counter[str] = Counter()
    tasks = []

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(f"{s.url}/v1/chat/completions", json=BODY,
                                headers=headers or {}) as r:
            await r.read()
            statuses[r.status] += 1
            if r.status == 200:
                regions[r.headers["x-balancer-region"]] += 1

    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(session)))
        await asyncio.gather(*tasks)
    return statuses, regions


async def region_rows(s: Stack) -> dict[str, dict[str, Any]]:
    _, body = await get(f"{s.url}/regions")
    return {row["region"]: row for row in body["models"]["gpt-4"]}


# --------------------------------------------------------------------------- admission queue


async def test_queue_turns_a_burst_into_waits(stack: StackFactory) -> None:
    # 6,000 TPM at 3x: a 1,000-token bucket refilled at 300 tokens/s; a request costs ~250
    s = await stack(gateway_config({"a": 6_000}, rpm_burst_seconds=60, time_scale=3))
    burst = 12
    async with aiohttp.ClientSession() as session:
        async def one(wait_ms: int) -> int:
            async with session.post(f"{s.url}/v1/chat/completions", json=BODY,
                                    headers={"x-balancer-max-wait-ms": str(wait_ms)}) as r:
                await r.read()
                return r.status
        no_wait = await asyncio.gather(*(one(0) for _ in range(burst)))
        await asyncio.sleep(4)  # refill
        started = time.monotonic()
        waited = await asyncio.gather(*(one(30_000) for _ in range(burst)))
        elapsed = time.monotonic() - started
    assert no_wait.count(429) >= burst - 4  # ~3 fit in the bucket, the rest are refused
    assert waited == [200] * burst  # all served, paced by the refill: ~2,000 tokens short
    assert 4 < elapsed < 15
    _, metrics = await get(f"{s.url}/metrics")
    assert 'balancer_admission_wait_seconds_count{model="gpt-4",outcome="admitted"}' in metrics
    # at most the odd 429 at the bucket's edge (two, seen once on a loaded CI machine),
    # which the queue absorbs as a wait: far from one per waiter
    assert (await s.sim_stats())["a"]["gpt-4-dep"]["throttled"] <= 2


async def test_queue_deadline_gives_429_with_retry_after(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 6_000}))
    async with aiohttp.ClientSession() as session:
        async def one(wait_ms: int) -> tuple[int, str | None, float]:
            t0 = time.monotonic()
            async with session.post(f"{s.url}/v1/chat/completions",
                                    json={**BODY, "max_tokens": 900},
                                    headers={"x-balancer-max-wait-ms": str(wait_ms)}) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After"), time.monotonic() - t0
        first = await one(0)
        status, retry_after, took = await one(1_500)
    assert first[0] == 200
    assert status == 429 and retry_after is not None and int(retry_after) >= 1
    assert took < 2.0  # answered at (or before) its deadline, not later


async def test_higher_class_is_served_first(stack: StackFactory) -> None:
    cfg = with_features(gateway_config({"a": 6_000}, rpm_burst_seconds=60, time_scale=3),
                        admission_queue={"priority_header": True})
    s = await stack(cfg)
    order: list[str] = []
    async with aiohttp.ClientSession() as session:
        async def one(name: str, priority: str) -> None:
            async with session.post(f"{s.url}/v1/chat/completions", json=BODY, headers={
                    "x-balancer-max-wait-ms": "30000", "x-balancer-priority": priority}) as r:
                await r.read()
                assert r.status == 200
                order.append(name)
        await one("warm", "normal")
        await one("warm", "normal")
        await one("warm", "normal")  # the bucket is now nearly empty
        lows = [asyncio.create_task(one(f"low{i}", "low")) for i in range(3)]
        await asyncio.sleep(0.3)
        high = asyncio.create_task(one("high", "high"))
        await asyncio.gather(*lows, high)
    served = [name for name in order if name != "warm"]
    assert served.index("high") <= 1, served  # overtook the low-priority waiters


async def test_queue_header_must_be_sane(stack: StackFactory) -> None:
    s = await stack(gateway_config({"a": 60_000}))
    async with aiohttp.ClientSession() as session:
        for header in ({"x-balancer-max-wait-ms": "-5"}, {"x-balancer-max-wait-ms": "soon"}):
            async with session.post(f"{s.url}/v1/chat/completions", json=BODY,
                                    headers=header) as r:
                assert r.status == 400
                assert (await r.json())["error"]["code"] == "invalid_max_wait"


# --------------------------------------------------------------------------- learned capacity


async def cotenant_run(stack: StackFactory, learn: bool) -> tuple[int, dict[str, Any]]:
    cfg = with_features(gateway_config({"a": 60_000, "b": 60_000}, time_scale=10,
                                       default_cooldown_seconds=0.5),
                        learned_capacity={"enabled": learn, "recovery_per_minute": 0.05},
                        admission_queue={"enabled": False})
    s = await stack(cfg, sim_knobs={"latency_base_ms": 5, "latency_per_token_ms": 0.01})
    await s.knobs("a", cotenant_tpm=45_000)  # a hidden consumer takes 3/4 of a's quota
    # capacity left: 15K + 60K TPM = 12,500 tokens/s at 10x; each request costs ~260
    await load(s, rate=40, seconds=6)
    stats = await s.sim_stats()
    return stats["a"]["gpt-4-dep"]["throttled"], await region_rows(s)


async def test_learned_capacity_cuts_429s_from_a_hidden_consumer(stack: StackFactory) -> None:
    throttled_off, rows_off = await cotenant_run(stack, learn=False)
    throttled_on, rows_on = await cotenant_run(stack, learn=True)
    print(f"\nupstream 429s from the shared region: {throttled_off} without learning, "
          f"{throttled_on} with; learned factor {rows_on['a']['capacity_factor']}")
    assert rows_off["a"]["capacity_factor"] == 1.0
    assert rows_on["a"]["capacity_factor"] < 0.8
    assert rows_on["b"]["capacity_factor"] == 1.0
    assert throttled_on < throttled_off


# --------------------------------------------------------------------------- latency weighting


async def test_latency_weighting_moves_traffic_off_a_slow_region(stack: StackFactory) -> None:
    shares = {}
    for enabled in (False, True):
        cfg = with_features(gateway_config({"a": 600_000, "b": 600_000}),
                            latency_weighting={"enabled": enabled, "strength": 1.0})
        s = await stack(cfg, sim_knobs={"latency_base_ms": 2, "latency_per_token_ms": 0.05})
        await s.knobs("b", slowdown=4.0)
        _, regions = await load(s, rate=60, seconds=4)
        shares[enabled] = regions["b"] / sum(regions.values())
        if enabled:
            rows = await region_rows(s)
            assert rows["b"]["latency_seconds_per_token"] > rows["a"]["latency_seconds_per_token"]
    print(f"\nslow region's share: {shares[False]:.0%} by capacity only, "
          f"{shares[True]:.0%} with latency weighting")
    assert shares[False] > 0.4
    assert shares[True] < 0.35
