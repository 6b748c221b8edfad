"""Reservations whose reply never arrived are given back exactly (RedisStore.release),
on every Redis backend, and by ResilientStore after a real stall."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from balancer.capacity.base import Grant, Wait
from balancer.capacity.redis import RedisStore
from balancer.capacity.resilient import ResilientStore
from balancer.config import StoreConfig
from balancer.tenancy import ClientLimits

from .conftest import SLOW, Backends, RedisServer, free_port, lim, need_redis_binary
from .test_resilient import wait_for

M = "gpt-4"


async def test_release_gives_a_reservation_back_once(make_redis_store: Backends) -> None:
    store = make_redis_store(fresh=True)
    assert isinstance(store, RedisStore)
    pool = [lim("a", 1000), lim("b", 1000)]
    team = ClientLimits("team", 1.0, 5000.0, SLOW, tokens_per_day=10_000.0)
    grant = await store.acquire(M, pool, 300, 0.9, client=team, reservation="r1")
    assert isinstance(grant, Grant)
    assert await store.release(M, pool, "r1", team)
    assert not await store.release(M, pool, "r1", team)  # idempotent
    states = await store.snapshot(M, pool)
    assert [s.tokens for s in states] == pytest.approx([1000, 1000])
    assert [s.requests for s in states] == pytest.approx([1000, 1000])
    [client] = await store.clients(M, [team])
    assert client.budget.tokens == pytest.approx(5000)
    assert client.budget.day_used == 0


async def test_a_released_reservation_that_arrives_late_takes_nothing(
        make_redis_store: Backends) -> None:
    store = make_redis_store(fresh=True)
    assert isinstance(store, RedisStore)
    pool = [lim("a", 1000)]
    assert not await store.release(M, pool, "late")  # the acquire has not run yet
    late = await store.acquire(M, pool, 300, 0.5, reservation="late")
    assert isinstance(late, Wait) and late.reason == "released"
    [state] = await store.snapshot(M, pool)
    assert state.tokens == pytest.approx(1000)
    # Other reservations are unaffected.
    assert isinstance(await store.acquire(M, pool, 300, 0.5, reservation="next"), Grant)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    need_redis_binary()
    srv = RedisServer(free_port(), str(tmp_path), "--enable-debug-command", "yes").start()
    yield srv
    srv.stop()


@pytest.fixture
async def resilient(server: RedisServer) -> AsyncIterator[ResilientStore]:
    shared = RedisStore.from_config(StoreConfig(url=server.url, key_prefix="rel",
                                                timeout_seconds=0.1))
    store = ResilientStore(shared, probe_interval=0.1, heartbeat_interval=0.3)
    yield store
    await store.close()


@pytest.mark.redis
async def test_a_reservation_orphaned_by_a_stall_is_given_back(
        resilient: ResilientStore, server: RedisServer) -> None:
    """Redis stalls (DEBUG SLEEP) while an acquire is on its way: the replica gives up
    and serves locally, and Redis runs the acquire after the stall, reserving 300 tokens
    nobody will settle. Once Redis answers, the replica releases them: the bucket holds
    exactly what the settled traffic left, not 300 fewer until refill."""
    await resilient.start()
    a = lim("a", 1000)
    first = await resilient.acquire(M, [a], 100, 0.5)
    assert isinstance(first, Grant) and first.source == "shared"
    other = aioredis.Redis(port=server.port)
    stall = asyncio.create_task(other.execute_command("DEBUG", "SLEEP", "1"))
    await asyncio.sleep(0.05)
    local = await resilient.acquire(M, [a], 300, 0.5)
    assert isinstance(local, Grant) and local.source == "local"
    await stall
    await other.aclose()
    await wait_for(lambda: not resilient.degraded and resilient.released >= 1, seconds=5)
    [state] = await resilient.shared.snapshot(M, [a])
    assert state.tokens == pytest.approx(900)


@pytest.mark.redis
async def test_a_cancelled_acquire_is_released(resilient: ResilientStore,
                                               server: RedisServer) -> None:
    """A request that goes away mid-acquire (its task cancelled) leaves no reservation."""
    await resilient.start()
    a = lim("a", 1000)
    other = aioredis.Redis(port=server.port)
    stall = asyncio.create_task(other.execute_command("DEBUG", "SLEEP", "0.3"))
    await asyncio.sleep(0.05)
    task = asyncio.create_task(resilient.acquire(M, [a], 400, 0.5))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stall
    await other.aclose()
    await wait_for(lambda: resilient.released >= 1, seconds=5)
    [state] = await resilient.shared.snapshot(M, [a])
    assert state.tokens == pytest.approx(1000)
