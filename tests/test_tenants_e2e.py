"""Clients (tenants) end to end: two `balancer serve` replicas sharing one real Redis
hold a client to its tpm budget, and, when the pool runs short, keep a modest client
served beside a greedy one (fair share); without fair share the greedy one crowds it out.

Real processes: a private redis-server, the simulator, two gateways; the load is sent
from the test, open loop, alternating between the replicas, so every answer's status,
x-balancer-limit and error code is seen. Time is compressed; margins are generous (the
exact figures are `balancer bench fairness`'s, BENCHMARKS.md section 5).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.balance import Region, bench_config, mean_cost
from bench.fairness import Tenant, scrape
from bench.loadgen import Mix
from tests.procs import Procs, get_json

pytestmark = pytest.mark.slow

MIX = Mix("gpt-4", (100, 300), (100, 300), 0.2)
SIM_ARGS = ("--latency-base-ms", "5", "--latency-per-token-ms", "0.05", "--seed", "3")


def key(name: str) -> str:
    return Tenant(name, 0).key


@dataclass
class Seen:
    """What one client saw: statuses, and each 429's x-balancer-limit and error code."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    refusals: Counter[tuple[str | None, str | None]] = field(default_factory=Counter)
    retry_after_missing: int = 0
    sent_at: list[float] = field(default_factory=list)  # each request, s after the first
    refused_at: list[float] = field(default_factory=list)  # the same, of each 429
    first: float = 0.0
    last: float = 0.0

    @property
    def served(self) -> float:
        return self.statuses[200] / max(1, self.sent)

    def served_after(self, seconds: float) -> float:
        """The share served of the requests sent `seconds` or more after the first."""
        sent = sum(1 for t in self.sent_at if t >= seconds)
        return 1 - sum(1 for t in self.refused_at if t >= seconds) / max(1, sent)


async def one(session: aiohttp.ClientSession, url: str, name: str, body: dict[str, Any],
              seen: Seen) -> None:
    at = round(time.monotonic() - seen.first, 2)
    seen.sent_at.append(at)
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key(name)}"}) as r:
        payload = await r.read()
        seen.statuses[r.status] += 1
        if r.status == 429:
            code = json.loads(payload).get("error", {}).get("code")
            seen.refusals[(r.headers.get("x-balancer-limit"), code)] += 1
            seen.retry_after_missing += "Retry-After" not in r.headers
            seen.refused_at.append(at)


async def load(gateways: list[str], rates: dict[str, float], seconds: float
               ) -> dict[str, Seen]:
    """Each client open loop at its rate (requests/s), alternating between gateways."""
    seen = {name: Seen() for name in rates}
    timeout = aiohttp.ClientTimeout(total=60)

    async def sender(session: aiohttp.ClientSession, name: str, rate: float, seed: int
                     ) -> None:
        rng, s, tasks = random.Random(seed), seen[name], []
        start = time.monotonic()
        s.first = start
        while (due := start + s.sent / rate) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            s.last = time.monotonic()
            tasks.append(asyncio.create_task(
                one(session, gateways[(s.sent + seed) % len(gateways)], name, MIX.body(rng), s)))
            s.sent += 1
        await asyncio.gather(*tasks)

    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=500)) as session:
        await asyncio.gather(*(sender(session, name, rate, i)
                               for i, (name, rate) in enumerate(rates.items())))
    return seen


def admitted(sim: str) -> dict[str, float]:
    stats = get_json(f"{sim}/_sim/stats")["regions"]
    return {k: sum(r["gpt-4"][k] for r in stats.values())
            for k in ("admitted_tokens", "requests", "throttled")}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the module; each test its own database."""
    with Procs(tmp_path_factory.mktemp("redis")) as procs:
        yield f"redis://127.0.0.1:{procs.redis()[1]}"


def run(tmp: Path, store: str, pool: dict[str, int], time_scale: float,
        tenants: list[Tenant], fair: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Simulator + two replicas on `store` serving `pool` (region -> TPM), each tenant's
    load (its demand x the pool's TPM), then what each side counted."""
    path = tmp / "regions.yaml"
    path.write_text(bench_config(
        [Region(name, tpm, tpm * 6 // 1000) for name, tpm in pool.items()], "gpt-4",
        {"time_scale": time_scale, "max_attempts": 3},
        {"fair_share": fair, "clients": [c.entry("gpt-4") for c in tenants]}))
    pool_rate = sum(pool.values()) * time_scale / 60 / mean_cost(MIX)  # requests/s
    rates = {c.name: c.demand * pool_rate for c in tenants}
    env = {"STORE_URL": store, "BALANCER_LOG_LEVEL": "WARNING"}
    with Procs(tmp) as procs:
        sim = procs.simulator(path, *SIM_ARGS, env=env)
        env["SIM_URL"] = sim
        gateways = [procs.gateway(f"gateway-{i}", path, env) for i in range(2)]
        before = admitted(sim)
        seen = asyncio.run(load(gateways, rates, seconds))
        after = admitted(sim)
        return {"seen": seen, "limited": scrape(gateways)["limited"],
                "upstream": {k: after[k] - before[k] for k in after}}


def test_two_replicas_hold_a_client_to_its_tpm_budget(redis_url: str, tmp_path: Path) -> None:
    """One client at ~2x its tpm budget, through both replicas: the regions admit no more
    for it than its budget over the elapsed time plus one bucket (+10%), and each request
    beyond it gets 429 with x-balancer-limit: tpm and code client_tpm_budget_exceeded."""
    ts, tpm, seconds = 20.0, 12_000, 8.0
    pool = {"a": 40_000, "b": 20_000}  # 5x the budget: the pool never refuses
    out = run(tmp_path, f"{redis_url}/1", pool, ts,
              [Tenant("budgeted", 2 * tpm / sum(pool.values()), tpm=tpm)], {"enabled": True},
              seconds)
    seen = out["seen"]["budgeted"]
    # Admissions happen between the first send and shortly after the last one.
    minutes = (seen.last - seen.first + 0.25) * ts / 60
    budget, bucket = tpm * minutes, tpm * 10 / 60  # gateway.burst_seconds: 10
    got = out["upstream"]["admitted_tokens"]
    detail = (f"admitted {got:,.0f} for a budget of {budget:,.0f} + bucket {bucket:,.0f} "
              f"({got / (budget + bucket):.1%}); sent {seen.sent}, statuses "
              f"{dict(seen.statuses)}, 429s {dict(seen.refusals)}, upstream {out['upstream']}")
    print("\n" + detail)
    assert got <= 1.1 * (budget + bucket), detail
    assert got >= 0.6 * budget, detail  # and it is served up to its budget
    assert set(seen.statuses) == {200, 429}, detail
    assert seen.statuses[429] >= 0.25 * seen.sent, detail  # about half is beyond its budget
    assert set(seen.refusals) == {("tpm", "client_tpm_budget_exceeded")}, detail
    assert seen.retry_after_missing == 0, detail
    limits = {k: v for k, v in out["limited"]["budgeted"].items() if v}
    assert limits == {"tpm": seen.statuses[429]}, out["limited"]  # the replicas' metrics


FAIR_POOL = {"a": 20_000, "b": 10_000}
FAIR_TS, FAIR_SECONDS = 20.0, 12.0  # 4 simulated minutes
# Fair share reads demand over the last fair window (10 simulated s); in the first one,
# before any demand is on record, the greedy client drains the regions' full buckets
# and the modest client may find the pool empty (a few 429s without x-balancer-limit).
WARM_UP = 2 * 10 / FAIR_TS


def greedy_and_modest(tmp: Path, store: str, fair: dict[str, Any]) -> dict[str, Any]:
    """A greedy client at 3x the pool and a modest one at 0.3x, the same weight."""
    return run(tmp, store, FAIR_POOL, FAIR_TS, [Tenant("greedy", 3), Tenant("modest", 0.3)],
               fair, FAIR_SECONDS)


def describe(out: dict[str, Any]) -> str:
    modest = out["seen"]["modest"]
    return "; ".join(f"{name}: served {s.served:.1%} of {s.sent}, 429s {dict(s.refusals)}"
                     for name, s in out["seen"].items()) + \
        f"; upstream {out['upstream']}; modest served after the first {WARM_UP:g} s " \
        f"{modest.served_after(WARM_UP):.1%}, refused at {modest.refused_at[:10]} s"


@pytest.fixture(scope="module")
def fair_on(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return greedy_and_modest(tmp_path_factory.mktemp("fair-on"), f"{redis_url}/2",
                             {"enabled": True})


def test_fair_share_keeps_a_modest_client_served_beside_a_greedy_one(
        fair_on: dict[str, Any]) -> None:
    detail = describe(fair_on)
    print("\nfair share ON: " + detail)
    modest, greedy = fair_on["seen"]["modest"], fair_on["seen"]["greedy"]
    assert modest.sent >= 30, detail
    assert modest.served >= 0.9, detail  # the whole run, warm-up included
    assert modest.served_after(WARM_UP) >= 0.95, detail
    assert greedy.served < 0.6, detail  # the pool really ran short
    assert greedy.refusals[("fair_share", "fair_share_exceeded")] > 0, detail


def test_without_fair_share_the_greedy_client_crowds_the_modest_one_out(
        fair_on: dict[str, Any], redis_url: str, tmp_path: Path) -> None:
    off = greedy_and_modest(tmp_path, f"{redis_url}/3", {"enabled": False})
    detail = describe(off)
    print(f"\nfair share OFF: {detail}\n(ON: {describe(fair_on)})")
    assert not any(limit == "fair_share" for s in off["seen"].values()
                   for limit, _ in s.refusals), detail
    assert off["seen"]["modest"].served < fair_on["seen"]["modest"].served - 0.1, detail
