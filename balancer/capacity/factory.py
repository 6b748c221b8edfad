"""Pick the capacity store named by `StoreConfig.url` (schemes: `config.STORE_SCHEMES`)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from balancer.capacity.base import CapacityStore
from balancer.capacity.memory import MemoryStore
from balancer.config import STORE_SCHEMES, StoreConfig


def create_store(
    config: StoreConfig,
    *,
    on_round_trip: Callable[[str], None] | None = None,
    on_degraded: Callable[[bool], None] | None = None,
) -> CapacityStore:
    """`memory://` -> MemoryStore; `redis://`, `rediss://` -> Redis,
    `redis+cluster://`, `rediss+cluster://` (or `cluster: true`) -> Redis Cluster, and
    `redis+sentinel://`, `rediss+sentinel://` -> the primary Redis Sentinel names, each
    wrapped in a ResilientStore (call its `start()` once the event loop runs). The
    `rediss` schemes are TLS (`store.ca_file`, `cert_file`, `key_file`), on the same
    client: `redis.connect`."""
    scheme = urlsplit(config.url).scheme
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"unsupported store URL scheme {scheme!r}")
    if scheme == "memory":
        return MemoryStore()
    # Imported here so the memory store does not need redis-py loaded.
    from balancer.capacity.redis import RedisStore
    from balancer.capacity.resilient import ResilientStore

    shared = RedisStore.from_config(config, on_round_trip=on_round_trip)
    return ResilientStore(shared, on_degraded=on_degraded)
