"""The point of the gateway: under demand above total capacity, traffic lands on
regions in proportion to their TPM, and no region is pushed past its quota.

The reference eight regions (regions.yaml) run in the simulator with time
compressed 20x, so a simulated minute lasts 3 s."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace

import aiohttp

from balancer import config as config_mod
from tests.conftest import StackFactory

ADMITTED_TARGET = 2_000
TIME_SCALE = 20.0
BODY = {"model": "gpt-4", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Summarise the quarterly report. " * 4}]}


async def test_split_follows_tpm_under_overload(stack: StackFactory) -> None:
    cfg = config_mod.load("regions.yaml", {}, simulate=True)
    cfg = replace(cfg, regions=tuple(r for r in cfg.regions if r.priority == 0),
                  gateway=replace(cfg.gateway, time_scale=TIME_SCALE))
    tpm = {r.name: r.deployments["gpt-4"].tpm for r in cfg.regions}
    s = await stack(cfg, sim_knobs={"latency_base_ms": 5, "latency_per_token_ms": 0.02})

    # Open loop at ~1.5x capacity: each request costs ~1,040 tokens.
    capacity_rps = sum(tpm.values()) / 60 * TIME_SCALE / 1040
    interval = 1 / (1.5 * capacity_rps)
    landed: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    inflight: set[asyncio.Task[None]] = set()

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(f"{s.url}/v1/chat/completions", json=BODY) as r:
            await r.read()
            statuses[r.status] += 1
            if r.status == 200:
                landed[r.headers["x-balancer-region"]] += 1

    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        sent = 0
        while sum(landed.values()) < ADMITTED_TARGET and time.monotonic() - start < 60:
            sent += 1
            task = asyncio.create_task(one(session))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            await asyncio.sleep(max(0.0, start + sent * interval - time.monotonic()))
        await asyncio.gather(*inflight)

    total = sum(landed.values())
    assert total >= ADMITTED_TARGET
    assert statuses[429] > 0, "demand must exceed capacity for this test to mean anything"
    assert set(statuses) <= {200, 429}
    all_tpm = sum(tpm.values())
    for region, region_tpm in tpm.items():
        expected = total * region_tpm / all_tpm
        assert abs(landed[region] - expected) <= 0.05 * expected, (region, landed, expected)

    stats = await s.sim_stats()
    throttled = sum(stats[r]["gpt-4"]["throttled"] for r in tpm)
    assert throttled <= 0.005 * total, f"{throttled} upstream 429s"
    for region in tpm:
        dep = stats[region]["gpt-4"]
        # Never more than the quota of one (simulated) minute plus one burst window.
        assert dep["peak_window_tokens"] <= dep["max_tokens_over_window"], (region, dep)
    print(f"\nsplit over {total} admitted of {sent} sent: "
          + ", ".join(f"{r} {landed[r]} ({landed[r] / total:.1%} vs {tpm[r] / all_tpm:.1%})"
                      for r in tpm) + f"; upstream 429s: {throttled}")
