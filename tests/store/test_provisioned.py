"""Provisioned (PTU) deployments before standard ones, on every store backend: the tier
order comes from `runtime.limits_for` (priority*2, PTU first), so `policy.pick` and
its Lua port need nothing new."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from balancer import config
from balancer.capacity.base import Grant, Wait
from balancer.gateway.runtime import ModelRoute, build_routes

from .conftest import Backends

M = "gpt-4"
SPREAD = [i / 10 + 0.05 for i in range(10)]  # random draws across [0, 1)


def route(time_scale: float, ptu_priority: int = 0) -> ModelRoute:
    """A PTU and two standard regions of 60,000 TPM (buckets of 10,000 tokens), RPM
    high enough never to bind."""
    text = f"""
    gateway: {{time_scale: {time_scale}}}
    regions:
      - {{name: ptu, kind: openai, endpoint: "http://x", priority: {ptu_priority},
          deployments: {{gpt-4: {{tpm: 60000, rpm: 6000, sku: provisioned}}}}}}
      - {{name: a, kind: openai, endpoint: "http://x",
          deployments: {{gpt-4: {{tpm: 60000, rpm: 6000}}}}}}
      - {{name: b, kind: openai, endpoint: "http://x",
          deployments: {{gpt-4: {{tpm: 60000, rpm: 6000}}}}}}
    """
    return build_routes(config.parse(textwrap.dedent(text), "r.yaml", {}))[M]


def region_of(result: Grant | Wait) -> str:
    assert isinstance(result, Grant), result
    return result.region


def test_tiers_put_provisioned_first_within_each_priority() -> None:
    r = route(1.0)
    assert {lim.region: lim.priority for lim in r.limits} == {"ptu": 0, "a": 1, "b": 1}
    assert r.provisioned == frozenset({"ptu"})
    narrowed = r.only("ptu")  # a stored response's region keeps its sku
    assert narrowed is not None and narrowed.provisioned == {"ptu"}
    later = route(1.0, ptu_priority=1)  # a configured priority still comes first
    assert {lim.region: lim.priority for lim in later.limits} == {"ptu": 2, "a": 1, "b": 1}


async def test_provisioned_is_picked_first_while_it_has_capacity(make_store: Backends) -> None:
    store = make_store()
    limits = route(1e-6).limits  # refill negligible
    picked = [region_of(await store.acquire(M, limits, 1000, r)) for r in SPREAD]
    assert picked == ["ptu"] * 10  # its 10,000 tokens, whatever the random draw
    spill = [region_of(await store.acquire(M, limits, 1000, r)) for r in SPREAD]
    assert set(spill) == {"a", "b"}  # the PTU is empty: standard regions take the excess


async def test_standard_serves_while_provisioned_cools_then_it_is_back(
        make_store: Backends) -> None:
    store = make_store()
    limits = route(5.0).limits  # 5,000 tokens per second: refills within the test
    ptu = next(lim for lim in limits if lim.region == "ptu")
    assert region_of(await store.acquire(M, limits, 1000, 0.5)) == "ptu"
    await store.cooldown(M, ptu, 0.3)  # its 429's retry-after-ms
    during = [region_of(await store.acquire(M, limits, 1000, r)) for r in SPREAD[::3]]
    assert "ptu" not in during
    await asyncio.sleep(0.6)  # cooldown over, and its emptied bucket refilled
    assert region_of(await store.acquire(M, limits, 1000, 0.99)) == "ptu"


async def test_a_higher_priority_tier_is_not_jumped_by_a_provisioned_one(
        make_store: Backends) -> None:
    store = make_store()
    limits = route(1e-6, ptu_priority=1).limits
    picked = {region_of(await store.acquire(M, limits, 1000, r)) for r in SPREAD * 2}
    assert picked == {"a", "b"}  # 20 x 1,000 of their 20,000: the PTU's turn comes after
    assert region_of(await store.acquire(M, limits, 1000, 0.5)) == "ptu"


@pytest.mark.parametrize("priority", [0, 1, 7])
def test_tier_order_holds_for_any_priority(priority: int) -> None:
    tiers = {lim.region: lim.priority for lim in route(1.0, priority).limits}
    below = tiers["ptu"] < tiers["a"]
    assert below == (priority <= 0)
