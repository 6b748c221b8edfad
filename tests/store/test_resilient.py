"""Degraded mode against a real redis-server that these tests stop, restart and stall."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from balancer.capacity.base import Grant, Wait
from balancer.capacity.factory import create_store
from balancer.capacity.memory import MemoryStore
from balancer.capacity.redis import RedisStore
from balancer.capacity.resilient import ResilientStore, share
from balancer.config import StoreConfig
from balancer.tenancy import ClientLimits

from .conftest import RedisServer, free_port, lim, need_redis_binary

pytestmark = pytest.mark.redis

M = "gpt-4"
PASSWORD = "s3cret-pw"
TIMEOUT = 0.1


@pytest.fixture
def server(workdir: Path) -> Iterator[RedisServer]:
    need_redis_binary()
    srv = RedisServer(
        free_port(), str(workdir), "--enable-debug-command", "yes", password=PASSWORD
    ).start()
    yield srv
    srv.stop()


class Recorder:
    def __init__(self) -> None:
        self.round_trips: list[str] = []
        self.degraded: list[bool] = []


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def store(server: RedisServer, recorder: Recorder) -> AsyncIterator[ResilientStore]:
    s = make(server, recorder)
    yield s
    await s.close()


def make(server: RedisServer, recorder: Recorder, **kw: float) -> ResilientStore:
    shared = RedisStore.from_config(
        StoreConfig(url=server.url, key_prefix="rt", timeout_seconds=TIMEOUT),
        on_round_trip=recorder.round_trips.append,
    )
    return ResilientStore(
        shared,
        on_degraded=recorder.degraded.append,
        probe_interval=kw.get("probe_interval", 0.1),
        heartbeat_interval=kw.get("heartbeat_interval", 0.3),
    )


async def wait_for(condition, seconds: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"condition not met within {seconds} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_shared_mode_counts_replicas(
    store: ResilientStore, server: RedisServer, recorder: Recorder
) -> None:
    await store.start()
    assert (store.degraded, store.replicas, store.name) == (False, 1, "redis")
    other = make(server, Recorder())
    await other.start()
    assert other.replicas == 2
    await wait_for(lambda: store.replicas == 2)  # its next heartbeat sees the other one
    grant = await store.acquire(M, [lim("a")], 10, 0.5)
    assert isinstance(grant, Grant)
    assert grant.source == "shared"
    assert recorder.round_trips.count("acquire") == 1
    await other.close()  # leaves the set at once
    assert await store.shared.count_replicas() == 1
    assert recorder.degraded == []


async def test_redis_down_serves_this_replicas_share(
    store: ResilientStore,
    server: RedisServer,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="balancer.capacity.resilient")
    await store.shared.heartbeat("another-replica", 30)
    await store.start()
    assert store.replicas == 2
    a, b = lim("a", 1000), lim("b", 3000)
    server.stop()

    started = time.monotonic()
    results = await asyncio.gather(*(store.acquire(M, [a, b], 100, i / 10) for i in range(10)))
    assert time.monotonic() - started < 4 * TIMEOUT
    assert all(isinstance(g, Grant) and g.source == "local" for g in results)
    assert store.degraded
    assert recorder.degraded == [True]  # one transition, however many calls failed
    # the caller gets its own limits back, not the scaled copy
    assert {g.limits for g in results if isinstance(g, Grant)} <= {a, b}

    states = await store.snapshot(M, [a, b])
    assert [s.tokens_capacity for s in states] == [500, 1500]
    assert sum(s.tokens for s in states) == pytest.approx(2000 - 1000)
    # every operation keeps working, from local buckets only
    trips = len(recorder.round_trips)
    grant = results[0]
    assert isinstance(grant, Grant)
    await store.settle(grant, 0)
    await store.cooldown(M, a, 60)
    assert await store.record_failure(M, b, 5, 60) is False
    await store.record_success(M, b)
    assert isinstance(await store.acquire(M, [a, b], 1, 0.5), Grant)  # b; a cools down
    assert isinstance(await store.acquire(M, [a, b], 1500, 0.5), Wait)  # beyond the share
    assert all(op == "heartbeat" for op in recorder.round_trips[trips:])  # probes only

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "degraded" in warnings[0].getMessage()
    assert PASSWORD not in caplog.text


async def test_degraded_quotas_start_from_the_shared_counts(
    store: ResilientStore, server: RedisServer
) -> None:
    """A client's day quota does not start again from zero when Redis goes away: the
    local part starts from what the shared store last counted (this replica's part of
    it), so an outage cannot hand a client a second day's worth of tokens."""
    await store.shared.heartbeat("another-replica", 30)
    await store.start()
    assert store.replicas == 2
    quota = ClientLimits("batch", 1.0, tokens_per_day=2000.0, tokens_per_month=100_000.0)
    region = lim("a", 10**6)
    for _ in range(3):
        grant = await store.acquire(M, [region], 400, 0.5, client=quota)
        assert isinstance(grant, Grant) and grant.source == "shared"
    assert grant.budget is not None and grant.budget.day_used == 1200
    server.stop()
    # This replica's part: 1,000 a day, 600 of it used (half the shared 1,200).
    first = await store.acquire(M, [region], 300, 0.5, client=quota)
    assert isinstance(first, Grant) and first.source == "local", first
    refused = await store.acquire(M, [region], 200, 0.5, client=quota)
    assert isinstance(refused, Wait) and refused.reason == "day", refused
    [state] = await store.clients(M, [quota])
    assert (state.budget.day_used, state.budget.month_used) == (900, 900)


async def test_returns_to_shared_mode_by_itself(
    store: ResilientStore,
    server: RedisServer,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="balancer.capacity.resilient")
    await store.start()
    a = lim("a", 1000)
    server.stop()
    local = await store.acquire(M, [a], 400, 0.5)
    assert isinstance(local, Grant)
    assert local.source == "local"
    assert store.degraded

    server.start()  # same port, empty: no data, no scripts
    took = await wait_for(lambda: not store.degraded, seconds=3)
    assert took < 1.0
    assert recorder.degraded == [True, False]
    assert any("back to shared" in r.getMessage() for r in caplog.records)

    shared = await store.acquire(M, [a], 100, 0.5)
    assert isinstance(shared, Grant)
    assert shared.source == "shared"
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(900)  # the shared bucket, not the local one
    # a grant from the local buckets is settled there, not in Redis
    trips = len(recorder.round_trips)
    await store.settle(local, 0)
    assert "settle" not in recorder.round_trips[trips:]
    [state] = await store.local.snapshot(M, [a])
    assert state.tokens == pytest.approx(1000)
    [state] = await store.snapshot(M, [a])
    assert state.tokens == pytest.approx(900)


async def test_slow_redis_degrades_within_the_timeout(
    store: ResilientStore, server: RedisServer, recorder: Recorder
) -> None:
    await store.start()
    a = lim("a")
    assert (await store.acquire(M, [a], 1, 0.5)).source == "shared"  # type: ignore[union-attr]
    other = aioredis.Redis(port=server.port, password=PASSWORD)
    stall = asyncio.create_task(other.execute_command("DEBUG", "SLEEP", "1"))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    grant = await store.acquire(M, [a], 1, 0.5)
    assert time.monotonic() - started < 3 * TIMEOUT
    assert isinstance(grant, Grant)
    assert grant.source == "local"
    assert store.degraded
    await stall
    await other.aclose()
    await wait_for(lambda: not store.degraded, seconds=3)
    assert recorder.degraded == [True, False]


async def test_redis_down_from_the_start(
    store: ResilientStore, server: RedisServer, recorder: Recorder
) -> None:
    server.stop()
    started = time.monotonic()
    await store.start()
    assert time.monotonic() - started < 4 * TIMEOUT
    assert store.degraded
    assert store.replicas == 1  # nothing known: take the whole region
    assert isinstance(await store.acquire(M, [lim("a")], 10, 0.5), Grant)
    server.start()
    await wait_for(lambda: not store.degraded, seconds=3)


async def test_works_without_start(store: ResilientStore, server: RedisServer) -> None:
    server.stop()
    assert isinstance(await store.acquire(M, [lim("a")], 10, 0.5), Grant)
    server.start()
    await wait_for(lambda: not store.degraded, seconds=3)  # the probe started by itself


async def test_factory_builds_the_backends(server: RedisServer) -> None:
    assert isinstance(create_store(StoreConfig(url="memory://")), MemoryStore)
    trips: list[str] = []
    flags: list[bool] = []
    store = create_store(
        StoreConfig(url=server.url, key_prefix="fac", timeout_seconds=0.2),
        on_round_trip=trips.append,
        on_degraded=flags.append,
    )
    assert isinstance(store, ResilientStore)
    assert store.name == "redis"
    await store.start()
    assert isinstance(await store.acquire(M, [lim("a")], 10, 0.5), Grant)
    assert trips == ["ping", "heartbeat", "acquire"]  # start connects, then joins
    await store.close()
    for url, cluster in (
        ("redis+cluster://127.0.0.1:7000", False),
        ("rediss+cluster://127.0.0.1:7000", False),
        ("redis://127.0.0.1:7000", True),
    ):
        store = create_store(StoreConfig(url=url, cluster=cluster))
        assert store.name == "redis-cluster"
        await store.close()
    with pytest.raises(ValueError, match="scheme"):
        create_store(StoreConfig(url="http://nope"))


def test_share_divides_capacity_and_rate() -> None:
    a = lim("a", 900, 15.0, rcap=6, rrate=0.1, weight=2.0, priority=1)
    third = share(a, 3)
    assert (third.tokens_capacity, third.tokens_rate) == (300, 5.0)
    assert (third.requests_capacity, third.requests_rate) == (2, pytest.approx(0.1 / 3))
    assert (third.region, third.weight, third.priority) == ("a", 2.0, 1)
    assert share(a, 1) is a
