"""A redis-py client for a store URL: plain `redis://`, TLS `rediss://`, Redis Cluster
(`redis+cluster://`, `rediss+cluster://` or `cluster: true`) and Sentinel
(`redis+sentinel://`, `rediss+sentinel://`), always redis-py's own asyncio clients.

TLS is the store's fast path too, not a second client: `rediss://` makes redis-py use its
`SSLConnection`, a `Connection` whose socket is wrapped in TLS (`store.ca_file`,
`cert_file`, `key_file` become its `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`), with
the same hiredis parser, pool, scripts and per-turn pipeline. ACL credentials come from
the URL's userinfo (`rediss://user:password@host:6380/0`, often `${VAR}`s).

Sentinel (`redis+sentinel://s1:26379,s2:26379/mymaster[/db]`, `rediss+sentinel://` for
TLS to the sentinels and the data nodes alike) is redis-py's own
`redis.asyncio.sentinel.Sentinel(...).master_for(name)`: a plain `Redis` client on a
`SentinelConnectionPool`, so again the same scripts and pipeline. Each new connection
asks the sentinels where the primary is; a connection error, or a READONLY reply from
a primary demoted meanwhile (`SentinelManagedConnection` turns it into a connection
error), drops the connection, and ResilientStore degrades until its probe reaches the
promoted primary through a fresh connection.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from balancer.config import STORE_SCHEMES, StoreConfig
from balancer.config.store import SENTINEL_SCHEMES, TLS_SCHEMES, sentinel_url

Client = Redis | RedisCluster

# `redis+cluster://` names the cluster client; the client itself takes the plain scheme.
CLUSTER_SCHEMES = {s: s.removesuffix("+cluster") for s in STORE_SCHEMES if s.endswith("+cluster")}


def connect(config: StoreConfig) -> Client:
    """A client for `config.url` with a short connect timeout and no retries: a slow or
    absent Redis must fail fast so the caller can degrade instead of queueing requests.
    No socket (read/write) timeout: redis-py implements it with a task per send and a
    timeout scope per read, the largest part of its CPU per call here; every call is
    bounded by its caller's deadline instead (ResilientStore, BatchedScript), and a
    call cancelled mid-read makes redis-py drop that connection."""
    parts = urlsplit(config.url)
    cluster = config.cluster or parts.scheme in CLUSTER_SCHEMES
    url = urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)))
    options: dict[str, Any] = {
        "socket_connect_timeout": config.timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        **tls_options(config),
    }
    if parts.scheme in SENTINEL_SCHEMES:
        return _sentinel_primary(config, options)
    if cluster:
        # The cluster client caps connections per node (100 by default) and raises
        # beyond that; admission concurrency can exceed it under load.
        return RedisCluster.from_url(url, max_connections=10_000, **options)
    return Redis.from_url(url, **options)


def tls_options(config: StoreConfig) -> dict[str, Any]:
    """redis-py's TLS options from `store.ca_file`, `cert_file`, `key_file` (TLS schemes
    only; the certificate's name must match the host, as redis-py checks by default)."""
    if urlsplit(config.url).scheme not in TLS_SCHEMES:
        return {}
    files = {"ssl_ca_certs": config.ca_file, "ssl_certfile": config.cert_file,
             "ssl_keyfile": config.key_file}
    return {k: v for k, v in files.items() if v}


def _sentinel_primary(config: StoreConfig, options: dict[str, Any]) -> Redis:
    """The primary the sentinels name, as a `Redis` on redis-py's SentinelConnectionPool.
    The sentinels are asked with the same connect timeout and no retries, and a read
    timeout (they are asked only when a connection opens, so its cost does not matter):
    a sentinel that does not answer is skipped for the next one."""
    url = sentinel_url(config.url)
    tls = {"ssl": True, **options} if url.tls else dict(options)
    sentinels = Sentinel(
        url.sentinels,
        sentinel_kwargs={**tls, "socket_timeout": config.timeout_seconds,
                         "username": url.sentinel_username,
                         "password": url.sentinel_password})
    return sentinels.master_for(url.service, db=url.db, username=url.username,
                                password=url.password, **tls)
