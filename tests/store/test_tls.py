"""The store over TLS, against real `redis-server`s that serve TLS only (`--port 0
--tls-port N`), with a CA and certificates this file makes with openssl: the store's
calls over `rediss://` with an ACL user, on the same fast client path as plain Redis
(redis-py's asyncio client, hiredis, the per-turn pipeline); mutual TLS; and the
failures that must be quick and clear, not hangs: a wrong CA, a missing client
certificate, a wrong password."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from balancer.capacity.base import Grant, Pin
from balancer.capacity.batching import BatchedScript
from balancer.capacity.factory import create_store
from balancer.capacity.redis import RedisStore, connect
from balancer.capacity.resilient import STARTUP_SECONDS, ResilientStore
from balancer.config import StoreConfig

from .conftest import (
    PipelineCounter,
    RedisServer,
    TLSFiles,
    free_port,
    lim,
    make_tls_files,
    need_redis_binary,
)

pytestmark = pytest.mark.redis

M = "gpt-4"
USER, PASSWORD = "balancer", "tls-acl-pw-Hk27"
# An ACL user with every right, and no default user: only `balancer` gets in.
ACL = ("--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all", "--user", "default", "off")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    need_redis_binary()
    return make_tls_files(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(tls: TLSFiles, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[RedisServer]:
    """TLS only, an ACL user; any client may connect (no client certificate asked)."""
    server = RedisServer(free_port(), str(tmp_path_factory.mktemp("tls")), *ACL,
                         username=USER, password=PASSWORD, tls=tls).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(tls: TLSFiles, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RedisServer]:
    """TLS only, and every client must present a certificate the CA signed."""
    server = RedisServer(free_port(), str(tmp_path_factory.mktemp("mtls")), *ACL,
                         username=USER, password=PASSWORD, tls=tls,
                         tls_auth_clients=True).start()
    yield server
    server.stop()


def store_config(server: RedisServer, **kw: Any) -> StoreConfig:
    return StoreConfig(url=server.url, key_prefix=f"tls{time.monotonic_ns()}", **kw)


async def test_store_over_tls_with_an_acl_user(tls_server: RedisServer, tls: TLSFiles) -> None:
    """The conformance basics, over `rediss://user:password@...` built by `connect`."""
    store = RedisStore.from_config(store_config(tls_server, ca_file=tls.ca))
    regions = [lim("a", 100), lim("b", 100)]
    try:
        grant = await store.acquire(M, regions, 30, 0.1)
        assert isinstance(grant, Grant) and grant.source == "shared"
        await store.settle(grant, 10)  # 20 of the 30 reserved come back
        states = {s.region: s for s in await store.snapshot(M, regions)}
        assert states[grant.region].tokens == pytest.approx(90, abs=1e-3)
        assert await store.heartbeat("replica-1", 5) == 1
        await store.pin("resp_1", Pin(M, "a", 7), 60)
        assert await store.pinned("resp_1") == Pin(M, "a", 7)
        assert await store.ping()
    finally:
        await store.close()


async def test_tls_takes_the_same_fast_path(tls_server: RedisServer, tls: TLSFiles) -> None:
    """TLS is redis-py's SSLConnection under the same client: hiredis parses the replies,
    and calls made in one event-loop turn go out as one pipeline (batching.py)."""
    store = RedisStore.from_config(store_config(tls_server, ca_file=tls.ca))
    pipelines = PipelineCounter(store.client)
    try:
        assert isinstance(store._acquire, BatchedScript)
        assert store.client.connection_pool.connection_class is SSLConnection
        replies = await asyncio.gather(*[store.acquire(M, [lim("a"), lim("b")], 1, i / 20)
                                         for i in range(20)])
        assert all(isinstance(r, Grant) for r in replies)
        assert 1 <= pipelines.count < 20  # batched, not one trip each
        conn = await store.client.connection_pool.get_connection()
        try:
            assert isinstance(conn, SSLConnection)
            assert isinstance(conn._parser, _AsyncHiredisParser)
        finally:
            await store.client.connection_pool.release(conn)
    finally:
        await store.close()


async def test_mutual_tls(mtls_server: RedisServer, tls: TLSFiles,
                          caplog: pytest.LogCaptureFixture) -> None:
    """With the client certificate the store works; without one the server refuses the
    handshake, and the replica degrades at once with the reason in its log."""
    good = RedisStore.from_config(store_config(
        mtls_server, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key))
    try:
        assert await good.heartbeat("r1", 5) == 1
        assert isinstance(await good.acquire(M, [lim("a")], 5, 0.5), Grant)
    finally:
        await good.close()

    # TLS 1.3: the server checks the client's certificate after the client's side of the
    # handshake is done, so the refusal shows as its alert or as the connection reset.
    refused = "CERTIFICATE_REQUIRED|certificate required|reset by peer|closed by server"
    bare = RedisStore.from_config(store_config(mtls_server, ca_file=tls.ca))
    try:
        with pytest.raises(RedisConnectionError, match=refused):
            await bare.ping()
    finally:
        await bare.close()
    with caplog.at_level(logging.WARNING, "balancer.capacity.resilient"):
        store = await started(store_config(mtls_server, ca_file=tls.ca))
    try:
        assert store.degraded
        assert re.search(refused, caplog.text), caplog.text
        assert isinstance(await store.acquire(M, [lim("a")], 5, 0.5), Grant)  # served locally
    finally:
        await store.close()


async def test_wrong_ca_fails_fast_and_clearly(tls_server: RedisServer, tls: TLSFiles,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A server certificate the CA did not sign: the handshake fails at once (no hang),
    the replica starts degraded and says why."""
    with caplog.at_level(logging.WARNING, "balancer.capacity.resilient"):
        t0 = time.monotonic()
        store = await started(store_config(tls_server, ca_file=tls.other_ca))
        took = time.monotonic() - t0
    try:
        assert store.degraded and took < STARTUP_SECONDS
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        assert PASSWORD not in caplog.text
    finally:
        await store.close()


async def test_wrong_password_degrades_without_showing_it(
        tls_server: RedisServer, tls: TLSFiles, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-pw-Lx90"
    config = StoreConfig(url=tls_server.url.replace(PASSWORD, wrong), ca_file=tls.ca)
    with caplog.at_level(logging.DEBUG):
        store = await started(config)
    try:
        assert store.degraded
        assert "AuthenticationError" in caplog.text
        assert wrong not in caplog.text and PASSWORD not in caplog.text
    finally:
        await store.close()


async def test_plain_client_on_a_tls_port_is_refused(tls_server: RedisServer) -> None:
    """A `redis://` (no TLS) client on the TLS-only port: an error, quickly."""
    client = connect(StoreConfig(url=tls_server.url.replace("rediss://", "redis://"),
                                 timeout_seconds=0.5))
    try:
        async with asyncio.timeout(3):
            with pytest.raises(RedisConnectionError):
                await client.ping()
    finally:
        await client.aclose()


async def started(config: StoreConfig) -> ResilientStore:
    store = create_store(config)
    assert isinstance(store, ResilientStore)
    await store.start()
    return store

