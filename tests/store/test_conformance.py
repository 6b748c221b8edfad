"""The store contract, run unchanged on every backend (memory, fakeredis, Redis, Cluster).

Real Redis keeps its own clock, so time-dependent tests either make refill
negligible (rate 1e-9/s) or let a high rate refill measurably during a short sleep
and check with tolerances.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import replace

import pytest

from balancer import policy
from balancer.capacity.base import Grant, Queueing, Wait
from balancer.capacity.redis import RedisStore
from balancer.policy import Limits

from .conftest import SLOW, Backends, lim

M = "gpt-4"


def region_of(result: Grant | Wait) -> str:
    assert isinstance(result, Grant), result
    return result.region


async def test_new_bucket_starts_full(make_store: Backends) -> None:
    store = make_store()
    [state] = await store.snapshot(M, [lim("a", 1000, rcap=50)])
    assert state.region == "a"
    assert state.tokens == pytest.approx(1000)
    assert state.tokens_capacity == 1000
    assert state.requests == pytest.approx(50)
    assert state.requests_capacity == 50
    assert state.cooldown_seconds == 0
    assert state.circuit == "closed"
    assert state.failures == 0


async def test_reserve_reduces_tokens_and_requests(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000, rcap=50)
    grant = await store.acquire(M, [a], 300, 0.5)
    # level: tokens left after it; granted: tokens ever reserved there, this included;
    # at: when, on the store's clock
    assert isinstance(grant, Grant) and grant.at > 0
    assert grant == Grant(M, a, 300, 0, level=700.0, granted=300.0, at=grant.at)
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(700)
    assert state.requests == pytest.approx(49)


async def test_cannot_admit_beyond_capacity(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000, rate=10.0, rrate=1e6)
    assert isinstance(await store.acquire(M, [a], 600, 0.1), Grant)
    wait = await store.acquire(M, [a], 600, 0.1)
    assert isinstance(wait, Wait)
    # 200 tokens short at 10 tokens/s (a little refill may happen meanwhile)
    assert wait.retry_after == pytest.approx(20.0, abs=0.1)


async def test_request_bucket_limits_too(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1e6, rate=1e6, rcap=2, rrate=0.5)
    assert isinstance(await store.acquire(M, [a], 1, 0.0), Grant)
    assert isinstance(await store.acquire(M, [a], 1, 0.0), Grant)
    wait = await store.acquire(M, [a], 1, 0.0)
    assert isinstance(wait, Wait)
    assert wait.retry_after == pytest.approx(2.0, abs=0.05)


async def test_big_request_from_full_bucket_leaves_debt(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000, rate=100.0)
    assert isinstance(await store.acquire(M, [a], 5000, 0.3), Grant)
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(-4000, abs=1)
    wait = await store.acquire(M, [a], 1, 0.3)
    assert isinstance(wait, Wait)
    assert wait.retry_after == pytest.approx(40.01, abs=0.1)  # 4001 tokens at 100/s


async def test_big_request_needs_a_full_bucket(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000)
    assert isinstance(await store.acquire(M, [a], 1, 0.3), Grant)
    assert isinstance(await store.acquire(M, [a], 5000, 0.3), Wait)


async def test_refill_over_time(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000, rate=10_000.0)
    assert isinstance(await store.acquire(M, [a], 1000, 0.5), Grant)
    assert isinstance(await store.acquire(M, [a], 1000, 0.5), Wait)
    await asyncio.sleep(0.06)
    [state] = await store.snapshot(M, [a])
    assert state.tokens >= 500  # at least 0.05 s of refill at 10,000/s
    await asyncio.sleep(0.1)
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(1000)  # refill stops at capacity
    assert isinstance(await store.acquire(M, [a], 1000, 0.5), Grant)


async def test_weighted_pick_follows_remaining_tokens(make_store: Backends) -> None:
    store = make_store()
    big, small = lim("big", 3_000_000), lim("small", 1_000_000)
    picks = {"big": 0, "small": 0}
    n = 200
    for i in range(n):
        picks[region_of(await store.acquire(M, [big, small], 1, (i + 0.5) / n))] += 1
    assert picks["big"] == pytest.approx(0.75 * n, abs=3)


async def test_weights_scale_the_pick(make_store: Backends) -> None:
    store = make_store()
    a, b = lim("a", 1_000_000, weight=1.0), lim("b", 1_000_000, weight=3.0)
    picks = {"a": 0, "b": 0}
    for i in range(100):
        picks[region_of(await store.acquire(M, [a, b], 1, (i + 0.5) / 100))] += 1
    assert picks["b"] == pytest.approx(75, abs=2)


async def test_choice_is_deterministic_for_r(make_store: Backends) -> None:
    store = make_store()
    regions = [lim("a"), lim("b"), lim("c")]  # equal weights: thirds of [0, 1)
    expected = {0.0: "a", 0.32: "a", 0.34: "b", 0.66: "b", 0.67: "c", 0.999999: "c"}
    for r, region in expected.items():
        assert region_of(await store.acquire(M, regions, 0, r)) == region


async def test_lower_priority_tier_first(make_store: Backends) -> None:
    store = make_store()
    primary, fallback = lim("primary", 1000), lim("fallback", 100_000, priority=1)
    for r in (0.0, 0.5, 0.99):
        assert region_of(await store.acquire(M, [fallback, primary], 100, r)) == "primary"
    # primary has 700 left: a 800-token request spills to the fallback tier
    assert region_of(await store.acquire(M, [fallback, primary], 800, 0.0)) == "fallback"
    assert region_of(await store.acquire(M, [fallback, primary], 700, 0.99)) == "primary"


async def test_exclude(make_store: Backends) -> None:
    store = make_store()
    regions = [lim("a"), lim("b")]
    for r in (0.0, 0.99):
        assert region_of(await store.acquire(M, regions, 10, r, exclude={"a"})) == "b"
    wait = await store.acquire(M, regions, 10, 0.5, exclude=("a", "b"))
    assert isinstance(wait, Wait)
    assert math.isinf(wait.retry_after)


async def test_cooldown_blocks_and_empties(make_store: Backends) -> None:
    store = make_store()
    a, b = lim("a", rate=10.0), lim("b", rate=10.0)
    await store.cooldown(M, a, 30)
    sa, sb = await store.snapshot(M, [a, b])
    assert sa.cooldown_seconds == pytest.approx(30, abs=0.5)
    assert sa.tokens <= 1  # zeroed; only microseconds of refill since
    assert sb.cooldown_seconds == 0
    for r in (0.0, 0.5, 0.99):
        assert region_of(await store.acquire(M, [a, b], 1, r)) == "b"
    await store.cooldown(M, b, 10)
    wait = await store.acquire(M, [a, b], 1, 0.5)
    assert isinstance(wait, Wait)
    assert wait.retry_after == pytest.approx(10, abs=0.5)  # the earliest cooldown end


async def test_cooldown_never_shortens(make_store: Backends) -> None:
    store = make_store()
    a = lim("a")
    await store.cooldown(M, a, 30)
    await store.cooldown(M, a, 1)
    [state] = await store.snapshot(M, [a])
    assert state.cooldown_seconds == pytest.approx(30, abs=0.5)


async def test_cooldown_keeps_debt(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000)
    await store.acquire(M, [a], 3000, 0.0)
    await store.cooldown(M, a, 5)
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(-2000)


async def test_cooldown_ends(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", rate=1e6)
    await store.cooldown(M, a, 0.1)
    assert isinstance(await store.acquire(M, [a], 10, 0.5), Wait)
    await asyncio.sleep(0.15)
    assert region_of(await store.acquire(M, [a], 10, 0.5)) == "a"


async def test_settle_refund_and_charge(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000)
    grant = await store.acquire(M, [a], 300, 0.5)
    assert isinstance(grant, Grant)
    await store.settle(grant, 100)  # refund 200
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(900)
    grant = await store.acquire(M, [a], 200, 0.5)
    assert isinstance(grant, Grant)
    await store.settle(grant, 500)  # charge 300 more
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(400)
    await store.settle(grant, 200)  # exact: nothing changes
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(400)
    assert state.requests == pytest.approx(998)  # settling never gives requests back


async def test_refund_is_clamped_at_capacity(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000)
    grant = await store.acquire(M, [a], 400, 0.5)
    assert isinstance(grant, Grant)
    await store.settle(grant, 0)
    await store.settle(grant, 0)  # settled twice by mistake: still no tokens created
    await store.settle(grant, -10_000)
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(1000)
    assert state.tokens <= 1000


async def test_circuit_trips_at_threshold_then_half_open_then_closes(make_store: Backends) -> None:
    store = make_store()
    a, b = lim("a", rate=1e6), lim("b", rate=1e6)
    assert await store.record_failure(M, a, 3, 0.2) is False
    assert await store.record_failure(M, a, 3, 0.2) is False
    [state] = await store.snapshot(M, [a])
    assert (state.circuit, state.failures, state.cooldown_seconds) == ("closed", 2, 0)
    grant = await store.acquire(M, [a], 1, 0.0)
    assert isinstance(grant, Grant)
    assert grant.failures == 2  # so the gateway knows a success must reset them
    assert await store.record_failure(M, a, 3, 0.2) is True
    [state] = await store.snapshot(M, [a])
    assert (state.circuit, state.failures) == ("open", 3)
    assert state.cooldown_seconds == pytest.approx(0.2, abs=0.05)
    assert region_of(await store.acquire(M, [a, b], 1, 0.0)) == "b"
    await asyncio.sleep(0.25)
    [state] = await store.snapshot(M, [a])
    assert (state.circuit, state.cooldown_seconds) == ("half_open", 0)
    # the trial request fails: open again at once
    assert await store.record_failure(M, a, 3, 0.2) is True
    [state] = await store.snapshot(M, [a])
    assert state.circuit == "open"
    await asyncio.sleep(0.25)
    await store.record_success(M, a)
    [state] = await store.snapshot(M, [a])
    assert (state.circuit, state.failures) == ("closed", 0)
    grant = await store.acquire(M, [a], 1, 0.0)
    assert isinstance(grant, Grant)
    assert grant.failures == 0


async def test_success_on_a_new_region_is_harmless(make_store: Backends) -> None:
    store = make_store()
    a = lim("a")
    await store.record_success(M, a)
    [state] = await store.snapshot(M, [a])
    assert (state.tokens, state.circuit, state.failures) == (pytest.approx(1000), "closed", 0)


async def test_snapshot_of_several_regions_in_order(make_store: Backends) -> None:
    store = make_store()
    regions = [lim("x", 100, rcap=10), lim("y", 200, rcap=20), lim("z", 300, rcap=30)]
    await store.acquire(M, regions, 50, 0.0, exclude={"y", "z"})
    await store.cooldown(M, regions[2], 60)
    states = await store.snapshot(M, regions)
    assert [s.region for s in states] == ["x", "y", "z"]
    assert [s.tokens_capacity for s in states] == [100, 200, 300]
    assert [s.requests_capacity for s in states] == [10, 20, 30]
    assert [s.tokens for s in states] == [
        pytest.approx(50),
        pytest.approx(200),
        pytest.approx(0, abs=1e-6),
    ]
    assert [s.requests for s in states] == [pytest.approx(9), pytest.approx(20), pytest.approx(30)]
    assert states[2].cooldown_seconds == pytest.approx(60, abs=0.5)
    assert await store.snapshot(M, []) == []


async def test_models_are_separate(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000)
    await store.acquire(M, [a], 1000, 0.0)
    [state] = await store.snapshot("other-model", [a])
    assert state.tokens == pytest.approx(1000)


async def test_lowered_quota_is_clamped(make_store: Backends) -> None:
    """A config reload that shrinks a region takes effect at once."""
    store = make_store()
    await store.acquire(M, [lim("a", 1000)], 100, 0.0)
    [state] = await store.snapshot(M, [lim("a", 500)])
    assert state.tokens == pytest.approx(500)


# --------------------------------------------------------------------------- Redis only


async def test_keys_carry_prefix_hash_tag_and_ttl(make_redis_store: Backends) -> None:
    store = make_redis_store(key_ttl_seconds=120)
    assert isinstance(store, RedisStore)
    await store.acquire(M, [lim("eastus2")], 10, 0.0)
    key = f"{make_redis_store.prefix}:{{{M}}}:eastus2"
    assert store.key(M, "eastus2") == key
    assert 0 < await store.client.ttl(key) <= 120
    fields = await store.client.hgetall(key)
    assert set(fields) == {
        b"tokens",
        b"requests",
        b"ts",
        b"cooldown_until",
        b"failures",
        b"tripped",
        b"factor",
        b"lat",
        b"calm",
        b"granted",
        b"peak",
    }
    # every write sets the TTL, and a cooldown longer than it keeps the key alive
    for write in (
        store.settle(Grant(M, lim("westus"), 10), 0),
        store.cooldown(M, lim("uksouth"), 600),
        store.record_failure(M, lim("japaneast"), 1, 5),
    ):
        await write
    assert 0 < await store.client.ttl(store.key(M, "westus")) <= 120
    assert 600 <= await store.client.ttl(store.key(M, "uksouth")) <= 602
    assert 0 < await store.client.ttl(store.key(M, "japaneast")) <= 120
    await store.record_success(M, lim("japaneast"))
    assert 0 < await store.client.ttl(store.key(M, "japaneast")) <= 120
    # snapshots and successes on unknown regions write nothing
    await store.snapshot(M, [lim("nowhere")])
    await store.record_success(M, lim("nowhere"))
    assert not await store.client.exists(store.key(M, "nowhere"))


async def test_expired_bucket_starts_full(make_redis_store: Backends) -> None:
    store = make_redis_store(key_ttl_seconds=1)
    assert isinstance(store, RedisStore)
    a = lim("a")
    await store.acquire(M, [a], 1000, 0.0)
    await store.client.delete(store.key(M, "a"))  # what expiry does, without the wait
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(1000)


async def test_two_instances_share_state(make_redis_store: Backends) -> None:
    one = make_redis_store()
    two = make_redis_store(new_client=True)
    a, b = lim("a", 1000), lim("b", 1000)
    await one.cooldown(M, a, 30)
    for r in (0.0, 0.5, 0.99):
        assert region_of(await two.acquire(M, [a, b], 300, r)) == "b"
    [state] = await one.snapshot(M, [b])
    assert state.tokens == pytest.approx(100)
    assert isinstance(await one.acquire(M, [a, b], 300, 0.5), Wait)


async def test_one_round_trip_per_operation(make_redis_store: Backends) -> None:
    ops: list[str] = []
    store = make_redis_store(on_round_trip=ops.append)
    regions = [lim(f"r{i}") for i in range(8)]
    grant = await store.acquire(M, regions, 100, 0.3)
    assert ops == ["acquire"]
    assert isinstance(grant, Grant)
    await store.settle(grant, 100)  # nothing to reconcile: no round trip
    assert ops == ["acquire"]
    await store.settle(grant, 50)
    await store.cooldown(M, regions[0], 1)
    await store.record_failure(M, regions[1], 5, 1)
    await store.record_success(M, regions[1])
    await store.snapshot(M, regions)
    assert ops == ["acquire", "settle", "cooldown", "record_failure", "record_success", "snapshot"]


async def test_noscript_recovery_after_script_flush(make_redis_store: Backends) -> None:
    store = make_redis_store()
    a = lim("a")
    assert isinstance(await store.acquire(M, [a], 10, 0.0), Grant)
    assert isinstance(store, RedisStore)
    await store.client.script_flush()
    assert isinstance(await store.acquire(M, [a], 10, 0.0), Grant)
    await store.client.script_flush()
    await store.cooldown(M, a, 5)
    await store.client.script_flush()
    [state] = await store.snapshot(M, [a])
    assert state.cooldown_seconds > 4
    await store.client.script_flush()
    assert await store.heartbeat("x", 5) == 1


async def test_heartbeats_count_live_replicas(make_redis_store: Backends) -> None:
    store = make_redis_store()
    assert isinstance(store, RedisStore)
    assert await store.heartbeat("one", 0.3) == 1
    assert await store.heartbeat("two", 0.3) == 2
    assert await store.heartbeat("two", 0.3) == 2
    assert await store.count_replicas() == 2
    await asyncio.sleep(0.2)
    assert await store.heartbeat("two", 0.3) == 2
    await asyncio.sleep(0.2)  # "one" is now 0.4 s old
    assert await store.count_replicas() == 1
    assert await store.heartbeat("three", 0.3) == 2
    await store.leave("two")
    assert await store.count_replicas() == 1
    assert 0 < await store.client.ttl(store.replicas_key)


# --------------------------------------------------------------------------- learning


def learning(region: str, cap: float = 1000, *, rate: float = SLOW, min_factor: float = 0.25,
             recovery: float = 0.0, latency_weight: float = 0.0) -> Limits:
    return replace(lim(region, cap, rate), min_factor=min_factor, recovery_rate=recovery,
                   latency_weight=latency_weight)


async def test_throttle_shrinks_learned_capacity_to_the_implied_share(
        make_store: Backends) -> None:
    store = make_store()
    a = learning("a", rate=2000.0)  # refills in 0.5 s: one decrease per 0.5 s
    await store.cooldown(M, a, 0.0, share=0.99)  # within tolerance: not evidence
    await store.cooldown(M, learning("b", rate=2000.0), 0.0)  # no share: no evidence
    [state, sb] = await store.snapshot(M, [a, learning("b", rate=2000.0)])
    assert state.factor == sb.factor == 1.0
    await store.cooldown(M, a, 0.0, share=0.6)  # below what the region implies
    await store.cooldown(M, a, 0.0, share=0.3)  # the same refill window: no second cut
    [state] = await store.snapshot(M, [a])
    assert state.factor == pytest.approx(0.6 * policy.THROTTLE_BACKOFF)
    assert state.tokens_capacity == pytest.approx(600 * policy.THROTTLE_BACKOFF)
    await asyncio.sleep(0.6)
    await store.cooldown(M, a, 0.0, share=0.1)  # at most halved per window
    [state] = await store.snapshot(M, [a])
    assert state.factor == pytest.approx(0.3 * policy.THROTTLE_BACKOFF)
    await asyncio.sleep(0.6)
    await store.cooldown(M, a, 0.0, share=0.0)  # never below the floor
    [state] = await store.snapshot(M, [a])
    assert state.factor == pytest.approx(0.25)


async def test_learning_off_keeps_configured_capacity(make_store: Backends) -> None:
    store = make_store()
    a, b = lim("a"), lim("b")  # min_factor 1.0: learning off
    await store.cooldown(M, a, 0.0, share=0.5)
    await store.observe(M, b, 100.0)
    [sa, sb] = await store.snapshot(M, [a, b])
    assert sa.factor == sb.factor == 1.0 and sa.tokens_capacity == sb.tokens_capacity == 1000
    assert sb.tokens == pytest.approx(100.0)  # the level still follows the region


async def test_learned_capacity_recovers_additively(make_store: Backends) -> None:
    store = make_store()
    a = learning("a", recovery=2.0)  # +2.0 per second: back to 1 within 0.15 s
    await store.cooldown(M, a, 0.0, share=0.7)
    await asyncio.sleep(0.2)
    [state] = await store.snapshot(M, [a])
    assert state.factor == pytest.approx(1.0)


async def test_observe_lowers_the_bucket_to_what_the_region_reports(
        make_store: Backends) -> None:
    store = make_store()
    a = learning("a")
    await store.observe(M, a, 2000.0)  # more than we hold: nothing to learn
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(1000) and state.factor == 1.0
    await store.observe(M, a, 300.0)
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(300) and state.factor == pytest.approx(0.9)


async def test_latency_is_smoothed_and_weighs_the_choice(make_store: Backends) -> None:
    store = make_store()
    a, b = learning("a", latency_weight=1.0), learning("b", latency_weight=1.0)
    for region, sample in ((a, 0.01), (b, 0.03)):
        grant = await store.acquire(M, [region], 0, 0.5)
        assert isinstance(grant, Grant)
        await store.settle(grant, 0, sample)
    [sa, sb] = await store.snapshot(M, [a, b])
    assert (sa.latency, sb.latency) == (pytest.approx(0.01), pytest.approx(0.03))
    # equal tokens; b is 3x slower, so it weighs 1/3: a below r = 0.75, b above
    assert region_of(await store.acquire(M, [a, b], 0, 0.74)) == "a"
    assert region_of(await store.acquire(M, [a, b], 0, 0.76)) == "b"
    grant = await store.acquire(M, [b], 0, 0.5)
    assert isinstance(grant, Grant)
    await store.settle(grant, 0, 0.01)
    [sb] = await store.snapshot(M, [b])
    assert sb.latency == pytest.approx(0.03 + 0.2 * (0.01 - 0.03))


# --------------------------------------------------------------------------- admission queue


def q(ticket: str, budget: float = 30.0, boost: float = 0.0) -> Queueing:
    return Queueing(ticket, boost, budget)


async def test_queue_serves_waiters_in_order(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000)
    first = await store.acquire(M, [a], 1000, 0.5, queue=q("x"))
    assert isinstance(first, Grant)
    wait_a = await store.acquire(M, [a], 400, 0.5, queue=q("A"))
    wait_b = await store.acquire(M, [a], 400, 0.5, queue=q("B"))
    assert (wait_a.position, wait_a.queued) == (0, True)
    assert (wait_b.position, wait_b.queued) == (1, True)
    # a newcomer that will not wait does not jump the queue, and takes no place in it
    hurried = await store.acquire(M, [a], 10, 0.5, queue=q("C", budget=0))
    assert isinstance(hurried, Wait) and (hurried.position, hurried.queued) == (2, False)
    await store.settle(first, 0)  # capacity returns (a refund)
    blocked = await store.acquire(M, [a], 400, 0.5, queue=q("B"))
    assert isinstance(blocked, Wait) and blocked.position == 1  # A is still ahead
    assert isinstance(await store.acquire(M, [a], 400, 0.5, queue=q("A")), Grant)
    assert isinstance(await store.acquire(M, [a], 400, 0.5, queue=q("B")), Grant)
    assert isinstance(await store.acquire(M, [a], 10, 0.5, queue=q("D", budget=0)), Grant)


async def test_queue_priority_boost_and_wait_estimate(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000, rate=100.0)
    assert isinstance(await store.acquire(M, [a], 1000, 0.5), Grant)
    low = await store.acquire(M, [a], 500, 0.5, queue=q("low"))
    high = await store.acquire(M, [a], 500, 0.5, queue=q("high", boost=60))
    assert high.position == 0 and isinstance(high, Wait)
    again = await store.acquire(M, [a], 500, 0.5, queue=q("low"))
    assert isinstance(again, Wait) and again.position == 1
    # its turn comes after high's 500 and its own 500 tokens refill at 100/s: ~10 s
    assert again.retry_after == pytest.approx(10.0, abs=0.5)
    assert low.retry_after <= again.retry_after


async def test_queue_forgets_expired_and_dequeued_waiters(make_store: Backends) -> None:
    store = make_store()
    a = lim("a", 1000)
    grant = await store.acquire(M, [a], 1000, 0.5)
    await store.acquire(M, [a], 100, 0.5, queue=q("gone", budget=0.1))
    await store.acquire(M, [a], 100, 0.5, queue=q("quitter"))
    await store.dequeue(M, "quitter")
    await store.settle(grant, 0)
    await asyncio.sleep(0.2)
    assert isinstance(await store.acquire(M, [a], 100, 0.5, queue=q("new", budget=0)), Grant)


async def test_limits_reach_lua_by_field_name(make_redis_store: Backends) -> None:
    """Every Limits field but the region arrives in lib.lua's parse_limits under its own
    name, with its exact value: a new field needs no change to the argument format (the
    scripts get the field order from the dataclass, redis.lua_prelude)."""
    from balancer.capacity.redis import LIMIT_FIELDS, limits_text, lua_prelude

    client = make_redis_store.client()
    lib = lua_prelude()
    names = "{" + ", ".join(f"'{n}'" for n in LIMIT_FIELDS) + "}"
    echo = client.register_script(lib + f"""
local out = {{}}
for i, lim in ipairs(parse_limits(ARGV[1])) do
  for _, name in ipairs({names}) do out[#out + 1] = fmt(lim[name]) end
end
return out""")
    regions = [Limits("a", 1e5 / 3, 0.1, 7.0, 1 / 7, 2.5, 1, 0.2, 1e-9, 1.5),
               Limits("b", 1.0, 2.0, 3.0, 4.0)]
    raw = await echo(keys=[f"t:{{{uuid.uuid4().hex}}}"],
                     args=[";".join(limits_text(lim) for lim in regions)])
    got = [float(x) for x in raw]
    assert got == [float(getattr(lim, n)) for lim in regions for n in LIMIT_FIELDS]
