"""The store behind Redis Sentinel (`redis+sentinel://`, `rediss+sentinel://`), against a
real primary, one replica and three sentinels on free ports (conftest `SentinelSet`):
the scripts (EVALSHA, and the per-turn pipeline of batching.py) through redis-py's
SentinelConnectionPool; and READONLY, what a primary demoted by a failover answers, taken
as a store failure (degraded mode) and recovered from, behind Sentinel or not.

The failover itself (SIGKILL of the primary under a gateway's load, the time until the
gateway is back on the promoted primary) is tests/faults/test_sentinel.py."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from balancer.capacity.base import Grant, Pin
from balancer.capacity.batching import BatchedScript
from balancer.capacity.factory import create_store
from balancer.capacity.redis import RedisStore
from balancer.capacity.resilient import ResilientStore
from balancer.config import StoreConfig

from .conftest import (
    PipelineCounter,
    RedisServer,
    SentinelSet,
    TLSFiles,
    free_port,
    lim,
    make_tls_files,
    need_redis_binary,
)

pytestmark = pytest.mark.redis

M = "gpt-4"
PASSWORD = "sentinel-pw-Qe51"


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """Password everywhere. The tests here leave the topology as they found it."""
    need_redis_binary()
    with SentinelSet(tmp_path_factory.mktemp("sentinel"), password=PASSWORD) as s:
        yield s


def config(url: str, **kw: Any) -> StoreConfig:
    return StoreConfig(url=url, key_prefix=f"s{uuid.uuid4().hex[:10]}", **kw)


async def wait_until(check: Any, within: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_store_behind_sentinel(sentinels: SentinelSet) -> None:
    """redis-py's own Sentinel client: master_for() is a plain Redis on a
    SentinelConnectionPool, so the store keeps its scripts and its batched pipeline."""
    store = RedisStore.from_config(config(sentinels.url))
    pool = store.client.connection_pool
    pipelines = PipelineCounter(store.client)
    try:
        assert store.name == "redis-sentinel"
        assert isinstance(pool, SentinelConnectionPool) and pool.is_master
        assert isinstance(store._acquire, BatchedScript)
        regions = [lim("a", 100), lim("b", 100)]
        grant = await store.acquire(M, regions, 30, 0.2)
        assert isinstance(grant, Grant)
        await store.settle(grant, 10)
        states = {s.region: s for s in await store.snapshot(M, regions)}
        assert states[grant.region].tokens == pytest.approx(90, abs=1e-3)
        replies = await asyncio.gather(*[store.acquire(M, regions, 1, i / 20) for i in range(20)])
        assert all(isinstance(r, Grant) for r in replies)
        assert 1 <= pipelines.count < 20  # EVALSHA in one pipeline per turn, on the sentinel pool
        assert await store.heartbeat("r1", 5) == 1
        await store.pin("resp_s", Pin(M, "b", 3), 60)
        assert await store.pinned("resp_s") == Pin(M, "b", 3)
        # Everything went to the primary the sentinels name.
        assert pool.master_address == sentinels.primary_address()
        assert sentinels.primary is not None
        with sentinels.primary.client() as primary:
            assert primary.script_exists(store._acquire.script.sha) == [True]
            assert primary.exists(store.key(M, grant.region))
    finally:
        await store.close()


async def test_readonly_from_a_demoted_primary_degrades_then_recovers(
        sentinels: SentinelSet, caplog: pytest.LogCaptureFixture) -> None:
    """The pool reaches the replica where it expects the primary (what a failover leaves
    behind: the sentinels' answer was stale, or the old primary was demoted under its
    connections). The script's write gets READONLY, which redis-py's sentinel connection
    turns into a connection error: the replica degrades, serves locally, and its probe,
    asking the sentinels again, finds the real primary and resyncs."""
    store = create_store(config(sentinels.url))
    assert isinstance(store, ResilientStore)
    await store.start()
    pool = store.shared.client.connection_pool
    assert sentinels.replica is not None
    replica = ("127.0.0.1", sentinels.replica.port)
    try:
        assert not store.degraded
        await pool.disconnect()  # the next connection asks where the primary is

        async def stale() -> tuple[str, int]:
            pool.master_address = replica
            return replica

        pool.get_master_address = stale  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, "balancer.capacity.resilient"):
            grant = await store.acquire(M, [lim("a")], 5, 0.5)
        assert store.degraded and isinstance(grant, Grant) and grant.source == "local"
        assert "The previous master is now a slave" in caplog.text
        del pool.get_master_address  # the sentinels answer truly again
        took = await wait_until(lambda: not store.degraded, 5, "back in shared mode")
        assert pool.master_address == sentinels.primary_address()
        grant = await store.acquire(M, [lim("a")], 5, 0.5)
        assert isinstance(grant, Grant) and grant.source == "shared"
        assert took < 2  # one probe interval (0.5 s) and a round trip or two
    finally:
        await store.close()


async def test_readonly_without_sentinel_degrades_then_recovers(tmp_path: Path) -> None:
    """A plain URL whose server is a replica (a failover behind a DNS name or a proxy):
    READONLY degrades; the probe reopens the pool's connections each time it gets
    READONLY, and the replica resyncs once the server is a primary again."""
    need_redis_binary()
    primary = RedisServer(free_port(), str(tmp_path)).start()
    replica = RedisServer(free_port(), str(tmp_path), "--replicaof", "127.0.0.1",
                          str(primary.port)).start()
    store: ResilientStore | None = None
    try:
        created = create_store(config(replica.url))
        assert isinstance(created, ResilientStore)
        store = created
        resets = 0
        reset = store.shared.reset

        async def counted() -> None:
            nonlocal resets
            resets += 1
            await reset()

        store.shared.reset = counted  # type: ignore[method-assign]
        await store.start()
        assert store.degraded
        grant = await store.acquire(M, [lim("a")], 5, 0.5)
        assert isinstance(grant, Grant) and grant.source == "local"
        await wait_until(lambda: resets >= 1, 3, "the probe reopening the pool")
        with replica.client() as c:
            c.replicaof("NO", "ONE")  # promoted
        await wait_until(lambda: not store.degraded, 3, "back in shared mode")
        grant = await store.acquire(M, [lim("a")], 5, 0.5)
        assert isinstance(grant, Grant) and grant.source == "shared"
    finally:
        if store is not None:
            await store.close()
        replica.stop()
        primary.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("certs"))


async def test_sentinel_over_tls(tls: TLSFiles, tmp_path: Path) -> None:
    """`rediss+sentinel://`: TLS to the sentinels and to the data nodes alike (every port
    of the set is TLS only), one CA for both."""
    need_redis_binary()
    with SentinelSet(tmp_path, password=PASSWORD, tls=tls) as s:
        assert s.url.startswith("rediss+sentinel://")
        store = create_store(config(s.url, ca_file=tls.ca))
        assert isinstance(store, ResilientStore)
        await store.start()
        try:
            assert not store.degraded and store.name == "redis-sentinel"
            grant = await store.acquire(M, [lim("a"), lim("b")], 5, 0.5)
            assert isinstance(grant, Grant) and grant.source == "shared"
            pool = store.shared.client.connection_pool
            assert pool.connection_class is SentinelManagedSSLConnection
            asked = pool.sentinel_manager.sentinels[0].connection_pool
            assert asked.connection_class.__name__ == "SSLConnection"
            assert pool.master_address == s.primary_address()
        finally:
            await store.close()
        # The sentinels' certificate checked like the data nodes': a wrong CA fails fast.
        wrong = create_store(config(s.url, ca_file=tls.other_ca))
        t0 = time.monotonic()
        await wrong.start()
        try:
            assert wrong.degraded and time.monotonic() - t0 < 2
        finally:
            await wrong.close()

