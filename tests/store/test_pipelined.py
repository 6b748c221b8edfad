"""The pipelined connection behind RedisStore's hot path: replies split anywhere, many
concurrent callers, NOSCRIPT, a stuck or vanished server, and which clients get it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from balancer.capacity.pipelined import (
    _INCOMPLETE,
    PipelinedConnection,
    PipelinedScript,
    _parse,
)
from balancer.capacity.redis import RedisStore


def test_replies_parse_whole_or_not_at_all() -> None:
    reply = b"*4\r\n:1\r\n$5\r\nhello\r\n$-1\r\n*2\r\n+OK\r\n-ERR boom\r\n"
    value, end = _parse(reply, 0)
    assert value[:4] == [1, b"hello", None, value[3]] and end == len(reply)
    assert value[3][0] == b"OK" and isinstance(value[3][1], ResponseError)
    for cut in range(len(reply)):  # every split point is incomplete, never wrong
        assert _parse(reply[:cut], 0) == (_INCOMPLETE, 0)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_concurrent_scripts_get_their_own_replies(redis: Redis) -> None:
    conn = PipelinedConnection.for_client(redis, 0.5)
    assert conn is not None
    script = PipelinedScript(conn, redis.register_script("return {tonumber(ARGV[1]) * 2, "
                                                         "KEYS[1]}"))
    await redis.script_flush()  # the first calls meet NOSCRIPT and load it
    results = await asyncio.gather(*(script(keys=[f"k{i}"], args=[str(i)])
                                     for i in range(200)))
    assert results == [[2 * i, f"k{i}".encode()] for i in range(200)]
    with pytest.raises(ResponseError):
        await PipelinedScript(conn, redis.register_script("return redis.call('NOPE')"))()
    assert await script(keys=["again"], args=["21"]) == [42, b"again"]  # still in step
    conn.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """Accepts connections and never answers (a stuck Redis)."""
    clients: list[asyncio.StreamWriter] = []
    connected = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.append(writer)
        connected.set()

    silent_server.connected = connected  # type: ignore[attr-defined]

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, clients
    finally:
        for w in clients:
            w.close()
        server.close()


async def test_a_stuck_server_fails_pending_calls_within_the_timeout() -> None:
    async with silent_server() as (port, _):
        conn = PipelinedConnection("127.0.0.1", port, timeout=0.2)
        started = time.monotonic()
        outcomes = await asyncio.gather(*(conn.execute("PING") for _ in range(5)),
                                        return_exceptions=True)
        assert all(isinstance(o, RedisTimeoutError) for o in outcomes)
        assert time.monotonic() - started < 1.0
        conn.close()


async def test_a_vanished_server_fails_fast_and_the_next_call_reconnects(redis_url: str
                                                                          ) -> None:
    async with silent_server() as (port, clients):
        conn = PipelinedConnection("127.0.0.1", port, timeout=5)
        pending = asyncio.ensure_future(conn.execute("PING"))
        await asyncio.wait_for(silent_server.connected.wait(), 2)  # type: ignore[attr-defined]
        clients[0].transport.abort()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(pending, 2)
    with socket.socket() as s:  # nothing listens there any more
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    conn.port = free
    with pytest.raises(RedisConnectionError):
        await conn.execute("PING")
    real = Redis.from_url(redis_url)
    kw = real.connection_pool.connection_kwargs
    conn.host, conn.port = kw["host"], kw["port"]
    assert await conn.execute("PING") == b"PONG"
    conn.close()
    await real.aclose()


async def test_only_plain_tcp_clients_are_pipelined(redis: Redis) -> None:
    assert PipelinedConnection.for_client(redis, 0.25) is not None
    assert PipelinedConnection.for_client(fakeredis.aioredis.FakeRedis(), 0.25) is None
    tls = Redis.from_url("rediss://127.0.0.1:6390/0")
    assert PipelinedConnection.for_client(tls, 0.25) is None
    assert PipelinedConnection.for_client(Redis(unix_socket_path="/tmp/x.sock"), 0.25) is None
    assert RedisStore(redis)._fast is not None
    assert RedisStore(fakeredis.aioredis.FakeRedis())._fast is None
    await tls.aclose()
