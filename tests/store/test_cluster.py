"""Redis Cluster specifics (the conformance suite also runs whole on the cluster)."""

from __future__ import annotations

import pytest

from balancer.capacity.factory import create_store
from balancer.capacity.redis import RedisStore, connect
from balancer.capacity.resilient import ResilientStore
from balancer.config import StoreConfig

from .conftest import lim

pytestmark = [pytest.mark.redis, pytest.mark.redis_cluster]

M = "gpt-4"
REGIONS = ("canadaeast", "japaneast", "eastus2", "uksouth", "australiaeast", "eastus")


async def test_a_model_lives_in_one_slot_and_models_spread(cluster_url: str) -> None:
    store = RedisStore.from_config(StoreConfig(url=cluster_url, key_prefix="slots"))
    try:
        assert store.name == "redis-cluster"
        regions = [lim(name) for name in REGIONS]
        for r in (0.1, 0.4, 0.6, 0.9):
            await store.acquire(M, regions, 10, r)
        client = store.client
        assert len({client.keyslot(store.key(M, c.region)) for c in regions}) == 1
        models = [f"model-{i}" for i in range(12)]
        slots = {client.keyslot(store.key(m, "eastus2")) for m in models}
        nodes = {client.get_node_from_key(store.key(m, "eastus2")).name for m in models}
        assert len(slots) > 1 and len(nodes) > 1  # models do spread over the shards
        for m in models:  # and each model's script runs on its own shard
            assert await store.acquire(m, regions, 10, 0.5)
    finally:
        await store.close()


async def test_cluster_flag_on_a_plain_url(cluster_url: str) -> None:
    plain = cluster_url.replace("redis+cluster://", "redis://")
    client = connect(StoreConfig(url=plain, cluster=True))
    store = RedisStore(client, key_prefix="flag")
    try:
        assert store.name == "redis-cluster"
        assert await store.heartbeat("r1", 5) == 1
    finally:
        await store.close()


async def test_factory_on_a_cluster(cluster_url: str) -> None:
    store = create_store(StoreConfig(url=cluster_url, key_prefix="factory"))
    assert isinstance(store, ResilientStore)
    await store.start()
    try:
        assert (store.name, store.degraded, store.replicas) == ("redis-cluster", False, 1)
        grant = await store.acquire(M, [lim("a"), lim("b")], 10, 0.5)
        assert grant.source == "shared"  # type: ignore[union-attr]
    finally:
        await store.close()
