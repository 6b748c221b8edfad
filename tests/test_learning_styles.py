"""Learned capacity end to end, whatever a region's rate-limit headers say: a gateway in
front of simulated regions answering in each header style of sim/config.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import StackFactory, gateway_config
from tests.test_policies import region_rows, with_features

TIME_SCALE = 20.0  # a simulated minute lasts 3 s
TPM = 60_000  # per region: a bucket of 10,000 tokens, ~12 requests
# ~850 tokens: requests of this size meet the token limit, never the request-rate one
BODY = {"model": "gpt-4", "max_tokens": 800,
        "messages": [{"role": "user", "content": "Summarise the report. " * 8}]}
COST = 850


async def run(stack: StackFactory, style: str, seconds: float
              ) -> tuple[list[tuple[float, dict[str, float]]], dict[str, Any]]:
    cfg = with_features(gateway_config({"shared": TPM, "full": TPM}, time_scale=TIME_SCALE),
                        admission_queue={"enabled": False})
    s = await stack(cfg, sim_knobs={"latency_base_ms": 2, "latency_per_token_ms": 0.01,
                                    "throttle_headers": style})
    await s.knobs("shared", cotenant_tpm=TPM / 2)  # really half of its quota
    rate = 1.6 * 2 * TPM * TIME_SCALE / 60 / COST  # 1.6x the configured TPM, per real second
    factors: list[tuple[float, dict[str, float]]] = []
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            async with session.post(f"{s.url}/v1/chat/completions", json=BODY) as r:
                await r.read()

        async def sample() -> None:
            while True:
                rows = await region_rows(s)
                factors.append((time.monotonic(), {name: row["capacity_factor"]
                                                   for name, row in rows.items()}))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        tasks, started = [], time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        sampler.cancel()
    stats = await s.sim_stats()
    return [(t - started, f) for t, f in factors], stats


@pytest.mark.parametrize("style", ["normal", "precise", "seconds", "retry-after-only"])
async def test_learned_capacity_finds_the_real_quota_whatever_the_headers(
        stack: StackFactory, style: str) -> None:
    """A hidden co-tenant takes half of one region's quota; the other has all of its own;
    1.6x the configured TPM of demand. Whether the 429s carry remaining tokens, a precise
    wait, only a whole-second wait or nothing else, the shared region's factor reaches
    the truth (0.5 +- 0.15) within a simulated minute and stays there, while the region
    that has its quota is not cut (its 429s come from the demand, not a co-tenant)."""
    minute = 60 / TIME_SCALE
    factors, stats = await run(stack, style, 2 * minute)
    shared = [(t, f["shared"]) for t, f in factors]
    reached = next((t for t, f in shared if abs(f - 0.5) <= 0.15), None)
    late = [f for t, f in shared if t >= 1.25 * minute]
    full = [f["full"] for _, f in factors]
    calls = {name: (stats[name]["gpt-4-dep"]["throttled"], stats[name]["gpt-4-dep"]["requests"])
             for name in ("shared", "full")}
    print(f"\n{style}: shared reached {reached} s, late mean {sum(late) / len(late):.2f} "
          f"[{min(late):.2f}, {max(late):.2f}]; full mean {sum(full) / len(full):.3f} "
          f"min {min(full):.2f}; 429s / calls {calls}")
    assert reached is not None and reached <= minute
    assert all(abs(f - 0.5) <= 0.15 for f in late)
    assert sum(full) / len(full) >= 0.95
