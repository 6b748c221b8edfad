"""Response affinity (pin, pinned, unpin) on every backend, and through degraded mode.

Redis keeps its own clock, so expiry there is checked through the key's TTL and a
PEXPIRE of a millisecond rather than by sleeping out a real TTL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from balancer.capacity import redis as redis_store
from balancer.capacity import resilient
from balancer.capacity.base import Pin
from balancer.capacity.memory import MAX_PINS, MemoryStore
from balancer.capacity.redis import RedisStore, decode_pin, encode_pin
from balancer.capacity.resilient import ResilientStore

from .conftest import Backends, RedisServer, free_port, need_redis_binary
from .test_resilient import PASSWORD, Recorder, make, wait_for

DAY = 86_400.0
TTL = 30 * DAY  # the default upstream retention
ODD_IDS = [
    "resp_" + "a1-_" * 30 + "xyz",  # 128 characters
    "resp-67ccd3a9da748190baa7f1570fe91ac604becb25c8c5fe2c",
    "a",
    "a:b",  # must not collide with any other key layout
    "{tagged}_id",  # braces: a hash tag on a cluster, still one key
]


def _key(store: object, response_id: str) -> str:
    assert isinstance(store, RedisStore)
    return store.pin_key(response_id)


async def test_pin_round_trip(make_store: Backends) -> None:
    store = make_store()
    assert await store.pinned("resp_unknown") is None
    await store.pin("resp_1", Pin("gpt-4o", "eastus2", 1234), TTL)
    assert await store.pinned("resp_1") == Pin("gpt-4o", "eastus2", 1234)
    await store.pin("resp_2", Pin("o3.mini", "sweden-central"), TTL)  # tokens default 0
    assert await store.pinned("resp_2") == Pin("o3.mini", "sweden-central", 0)
    assert await store.pinned("resp_1") == Pin("gpt-4o", "eastus2", 1234)
    assert await store.pinned("resp_unknown") is None


async def test_pin_overwrites(make_store: Backends) -> None:
    store = make_store()
    await store.pin("resp_1", Pin("gpt-4o", "eastus2", 10), TTL)
    await store.pin("resp_1", Pin("gpt-4o-mini", "westus", 20), TTL)
    assert await store.pinned("resp_1") == Pin("gpt-4o-mini", "westus", 20)


async def test_unpin_forgets(make_store: Backends) -> None:
    store = make_store()
    await store.pin("resp_1", Pin("gpt-4o", "eastus2", 10), TTL)
    await store.pin("resp_2", Pin("gpt-4o", "westus", 10), TTL)
    await store.unpin("resp_1")
    assert await store.pinned("resp_1") is None
    assert await store.pinned("resp_2") == Pin("gpt-4o", "westus", 10)
    await store.unpin("resp_1")  # again, and an unknown id: no error
    await store.unpin("resp_never")


async def test_odd_ids_and_names(make_store: Backends) -> None:
    store = make_store()
    names = "A.b_c-9" * 9 + "z"  # 64 characters of every allowed kind
    for i, response_id in enumerate(ODD_IDS):
        await store.pin(response_id, Pin(names, f"region-{i}", i), TTL)
    for i, response_id in enumerate(ODD_IDS):
        assert await store.pinned(response_id) == Pin(names, f"region-{i}", i)
    assert len(ODD_IDS[0]) == 128


async def test_pins_are_shared_and_survive_a_restart(make_store: Backends) -> None:
    if not make_store.is_redis:
        pytest.skip("a memory store is one replica's view")
    await make_store().pin("resp_1", Pin("gpt-4o", "eastus2", 7), TTL)
    other = make_store(new_client=True)  # another replica, or this one restarted
    assert await other.pinned("resp_1") == Pin("gpt-4o", "eastus2", 7)
    await other.unpin("resp_1")
    assert await make_store().pinned("resp_1") is None


async def test_pin_expires(make_store: Backends) -> None:
    pin = Pin("gpt-4o", "eastus2", 5)
    if not make_store.is_redis:
        now = [1000.0]
        store = MemoryStore(clock=lambda: now[0])
        await store.pin("resp_1", pin, 10)
        now[0] += 9.9
        assert await store.pinned("resp_1") == pin
        now[0] += 0.1
        assert await store.pinned("resp_1") is None
        assert "resp_1" not in store._pins  # dropped, not only hidden
        return
    store = make_store()
    client = make_store.client()
    await store.pin("resp_1", pin, TTL)
    assert TTL - 5 < await client.ttl(_key(store, "resp_1")) <= TTL
    await store.pin("resp_2", pin, 0.2)  # EX takes whole seconds, at least one
    assert await client.pttl(_key(store, "resp_2")) == pytest.approx(1000, abs=100)
    await store.pin("resp_3", pin, 1.5)  # rounded up: never expires early
    assert await client.pttl(_key(store, "resp_3")) == pytest.approx(2000, abs=100)
    await client.pexpire(_key(store, "resp_1"), 1)
    await asyncio.sleep(0.02)
    assert await store.pinned("resp_1") is None
    assert await store.pinned("resp_3") == pin


async def test_round_trips_are_counted(make_redis_store: Backends) -> None:
    ops: list[str] = []
    store = make_redis_store(on_round_trip=ops.append)
    await store.pin("resp_1", Pin("gpt-4o", "eastus2"), TTL)
    await store.pinned("resp_1")
    await store.unpin("resp_1")
    assert ops == ["pin", "pinned", "unpin"]


@pytest.mark.parametrize("raw", [
    b"garbage", b"gpt-4o\teastus2", b"gpt-4o\teastus2\tmany", b"gpt-4o\teastus2\t1\tx",
    b"\teastus2\t1", b"gpt-4o\t\t1", b"gpt-4o\teastus2\t-1", b"\xff\xfe\t\xff\t1", b"",
])
async def test_corrupt_value_is_no_pin(make_redis_store: Backends, raw: bytes) -> None:
    store = make_redis_store()
    await make_redis_store.client().set(_key(store, "resp_1"), raw, ex=60)
    assert await store.pinned("resp_1") is None


def test_encoding_round_trips() -> None:
    for pin in (Pin("gpt-4o", "eastus2", 0), Pin("a", "b", 10**12), Pin("x.y_z-1", "r", 3)):
        assert decode_pin(encode_pin(pin)) == pin
        assert decode_pin(encode_pin(pin).encode()) == pin
    assert decode_pin(None) is None


async def test_memory_pins_are_bounded() -> None:
    assert MAX_PINS >= 100_000
    store = MemoryStore(max_pins=3)
    for i in range(3):
        await store.pin(f"r{i}", Pin("m", f"region-{i}"), TTL)
    await store.pin("r0", Pin("m", "moved"), TTL)  # an overwrite is the newest again
    await store.pin("r3", Pin("m", "region-3"), TTL)  # evicts the oldest: r1
    assert await store.pinned("r1") is None
    assert [await store.pinned(f"r{i}") for i in (0, 2, 3)] == [
        Pin("m", "moved"), Pin("m", "region-2"), Pin("m", "region-3")]
    assert len(store._pins) == 3


async def test_memory_drops_expired_pins_as_it_goes() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    for i in range(100):
        await store.pin(f"r{i}", Pin("m", "a"), 10)
    now[0] = 11.0
    await store.pin("fresh", Pin("m", "a"), 10)  # nobody read the old ones: still gone
    assert list(store._pins) == ["fresh"]


# --------------------------------------------------------------------------- degraded


@pytest.fixture
def server(workdir: Path) -> Iterator[RedisServer]:
    need_redis_binary()
    srv = RedisServer(free_port(), str(workdir), password=PASSWORD).start()
    yield srv
    srv.stop()


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[ResilientStore]:
    s = make(server, Recorder())
    yield s
    await s.close()


@pytest.mark.redis
async def test_pins_made_while_degraded_reach_redis_on_recovery(
    store: ResilientStore, server: RedisServer
) -> None:
    await store.start()
    await store.pin("before", Pin("gpt-4o", "eastus2", 1), TTL)
    assert await store.shared.pinned("before") == Pin("gpt-4o", "eastus2", 1)

    server.stop()
    await store.pin("during", Pin("gpt-4o", "westus", 2), TTL)
    assert store.degraded
    assert await store.pinned("during") == Pin("gpt-4o", "westus", 2)  # from local
    assert await store.pinned("before") is None  # cannot tell: the gateway decides
    await store.pin("deleted", Pin("gpt-4o", "westus", 3), TTL)
    await store.unpin("deleted")  # must not come back with the others
    await store.pin("short", Pin("gpt-4o", "westus", 4), 0.05)
    await asyncio.sleep(0.1)  # expires before Redis is back: not written

    server.start()  # empty: what was written before the outage is gone
    await wait_for(lambda: not store.degraded, seconds=3)
    assert await store.shared.pinned("during") == Pin("gpt-4o", "westus", 2)
    assert await store.shared.pinned("deleted") is None
    assert await store.shared.pinned("short") is None
    ttl = await store.shared.client.ttl(store.shared.pin_key("during"))
    assert TTL - 10 < ttl <= TTL  # the remaining retention, not a fresh default
    other = make(server, Recorder())  # another replica sees it
    assert await other.pinned("during") == Pin("gpt-4o", "westus", 2)
    await other.close()


@pytest.mark.redis
async def test_recovery_waits_for_the_pending_pins(
    store: ResilientStore, server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.start()
    server.stop()
    await store.pin("during", Pin("gpt-4o", "westus", 2), TTL)
    assert store.degraded
    calls: list[int] = []
    pin_many = store.shared.pin_many

    async def flaky(pins):  # type: ignore[no-untyped-def]
        calls.append(len(pins))
        if len(calls) == 1:
            raise RedisConnectionError("gone again")
        await pin_many(pins)

    monkeypatch.setattr(store.shared, "pin_many", flaky)
    server.start()
    await wait_for(lambda: not store.degraded, seconds=3)
    assert calls == [1, 1]  # the failed write kept it pending, and stayed degraded
    assert await store.shared.pinned("during") == Pin("gpt-4o", "westus", 2)


@pytest.mark.redis
async def test_pending_pins_are_bounded(
    store: ResilientStore, server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resilient, "MAX_PENDING_PINS", 2)
    await store.start()
    server.stop()
    for i in range(3):
        await store.pin(f"r{i}", Pin("gpt-4o", f"region-{i}"), TTL)
    assert list(store._pending) == ["r1", "r2"]
    server.start()
    await wait_for(lambda: not store.degraded, seconds=3)
    assert await store.shared.pinned("r0") is None  # never reached Redis
    assert await store.shared.pinned("r2") == Pin("gpt-4o", "region-2")
    # but this replica still routes it, from its local store
    assert await store.pinned("r0") == Pin("gpt-4o", "region-0")


@pytest.mark.redis
async def test_odd_pins_do_not_block_recovery(
    store: ResilientStore, server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.start()
    server.stop()
    await store.pin("first", Pin("gpt-4o", "westus"), TTL)
    assert store.degraded
    await store.pin("forever", Pin("gpt-4o", "westus"), float("inf"))  # EX has a limit
    server.start()
    await wait_for(lambda: not store.degraded, seconds=3)
    assert await store.shared.pinned("first") == Pin("gpt-4o", "westus")
    assert await store.shared.client.ttl(store.shared.pin_key("forever")) > 10 * 365 * DAY

    server.stop()
    await store.pin("bad", Pin("gpt-4o", "westus"), TTL)
    assert store.degraded

    async def broken(pins):  # type: ignore[no-untyped-def]
        raise ValueError("a bug, not an outage")

    monkeypatch.setattr(store.shared, "pin_many", broken)
    server.start()
    await wait_for(lambda: not store.degraded, seconds=3)  # dropped, not retried forever
    assert not store._pending
    assert await store.pinned("bad") == Pin("gpt-4o", "westus")  # still local


async def test_refused_pins_are_counted_not_raised(
    make_redis_store: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_redis_store()
    assert isinstance(store, RedisStore)
    ttl = redis_store._pin_ttl
    monkeypatch.setattr(redis_store, "_pin_ttl", lambda s: 0 if s == 7 else ttl(s))
    refused = await store.pin_many([("a", Pin("m", "r"), TTL), ("bad", Pin("m", "r"), 7),
                                    ("b", Pin("m", "s", 2), TTL)])
    assert refused == 1  # EX 0: Redis says invalid expire time
    assert [await store.pinned(rid) for rid in ("a", "bad", "b")] == [
        Pin("m", "r"), None, Pin("m", "s", 2)]
    assert await store.pin_many([]) == 0
