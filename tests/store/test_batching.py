"""Script calls batched per event-loop turn (balancer.capacity.batching), on fakeredis
and a real Redis: each caller gets its own reply or its own error. (redis-py refuses
EVALSHA in a cluster pipeline: RedisStore batches only on a plain client.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from balancer.capacity.batching import BatchedScript
from balancer.capacity.redis import connect
from balancer.config import StoreConfig

from .conftest import Backends, free_port


@pytest.fixture(params=["fakeredis", "redis"])
async def make_batched(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    backends = Backends(request.param, request)
    yield backends
    await backends.aclose()


# Echoes its key and argument and counts calls per key, so a reply proves whose it is.
ECHO = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
FAIL = "if ARGV[1] == 'bad' then return redis.error_reply('bad argument') end return ARGV[1]"


def keys(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"t:{{{tag}-{i}}}:k" for i in range(n)]  # spread over the cluster's slots


class Counting:
    """Counts pipelines sent through a client (its public `pipeline()` factory)."""

    def __init__(self, client: object):
        self.client = client
        self.pipelines = 0
        original = client.pipeline  # type: ignore[attr-defined]

        def pipeline(*a: object, **kw: object) -> object:
            self.pipelines += 1
            return original(*a, **kw)

        client.pipeline = pipeline  # type: ignore[attr-defined]


async def test_concurrent_calls_share_one_pipeline_and_get_their_own_replies(
        make_batched: Backends) -> None:
    client = make_batched.client()
    counting = Counting(client)
    script = BatchedScript(client, client.register_script(ECHO), 5.0)
    await client.script_load(ECHO)  # else the first pipeline meets NOSCRIPT and goes twice
    names = keys(20)
    replies = await asyncio.gather(*[script(keys=[k], args=[str(i)])
                                     for i, k in enumerate(names)])
    assert [(r[0].decode(), r[1].decode(), r[2]) for r in replies] == [
        (k, str(i), 1) for i, k in enumerate(names)]
    assert counting.pipelines == 1
    # A call alone in its turn is a plain EVALSHA, no pipeline.
    assert (await script(keys=[names[0]], args=["x"]))[2] == 2
    assert counting.pipelines == 1


async def test_a_reply_error_reaches_only_its_caller(make_batched: Backends) -> None:
    client = make_batched.client()
    script = BatchedScript(client, client.register_script(FAIL), 5.0)
    names = keys(3)
    results = await asyncio.gather(
        script(keys=[names[0]], args=["a"]), script(keys=[names[1]], args=["bad"]),
        script(keys=[names[2]], args=["c"]), return_exceptions=True)
    assert results[0] == b"a" and results[2] == b"c"
    assert isinstance(results[1], ResponseError) and "bad argument" in str(results[1])


async def test_scripts_lost_by_the_server_are_loaded_again(make_batched: Backends) -> None:
    if make_batched.backend == "fakeredis":
        pytest.skip("fakeredis keeps no script cache to flush")
    client = make_batched.client()
    script = BatchedScript(client, client.register_script(ECHO), 5.0)
    names = keys(8)
    await asyncio.gather(*[script(keys=[k], args=["1"]) for k in names])
    await client.script_flush()  # as a restarted Redis would have lost them
    replies = await asyncio.gather(*[script(keys=[k], args=["2"]) for k in names])
    assert [r[2] for r in replies] == [2] * len(names)


async def test_a_caller_that_gives_up_leaves_the_batch_alone(
        make_batched: Backends) -> None:
    client = make_batched.client()
    script = BatchedScript(client, client.register_script(ECHO), 5.0)
    names = keys(4)
    impatient = asyncio.ensure_future(script(keys=[names[0]], args=["x"]))
    others = [asyncio.ensure_future(script(keys=[k], args=["y"])) for k in names[1:]]
    impatient.cancel()
    replies = await asyncio.gather(*others)
    assert [r[1] for r in replies] == [b"y"] * 3
    assert impatient.cancelled()


async def test_a_dead_server_fails_every_waiter_with_redis_errors() -> None:
    client = connect(StoreConfig(url=f"redis://127.0.0.1:{free_port()}/0",
                                 timeout_seconds=0.5))
    script = BatchedScript(client, client.register_script(ECHO), 5.0)
    try:
        results = await asyncio.gather(*[script(keys=[k], args=["1"]) for k in keys(5)],
                                       return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await client.aclose()
