"""Shared capacity store on Redis or Redis Cluster: every replica sees the same buckets.

Each operation is one Lua script, so one round trip, atomic on the server. The
scripts (`lua/*.lua`) run the policy of `balancer.policy` (ported in `lua/lib.lua`)
with the time taken from Redis `TIME`, since the replicas' clocks differ, and the
random number passed in by the caller, since scripts must be deterministic.

Key layout, one HASH per (model, region) with the fields tokens, requests, ts,
cooldown_until, failures, tripped, and for the later policies factor, calm (learned
capacity) and lat (latency weighting):

    {prefix}:{<model>}:<region>      e.g.  bal:{gpt-4}:eastus2

The model is a hash tag, so all of a model's regions live in one cluster slot and
one script can read and write all of them. One hash per region (rather than a key
per field) keeps a bucket's levels, stamp and circuit together: one HMGET reads it,
one HSET + EXPIRE writes it, and the TTL covers all of it. Live replicas are a
sorted set `{prefix}:{replicas}` scored by Redis time.

Response affinity is one plain STRING per stored response, `{prefix}:resp:<id>` =
"<model>\t<region>\t<tokens>" with the upstream retention as its TTL: one key per
command, so plain SET/GET/DEL (no script, no hash tag) work on a cluster too.

Every command goes through redis-py's asyncio client, with hiredis parsing replies
(`redis[hiredis]`), the same way on plain `redis://`, TLS `rediss://` and the cluster
schemes: the scripts are redis-py `register_script` objects (EVALSHA, and on NOSCRIPT a
SCRIPT LOAD then EVALSHA again). On a plain client the hot path's calls made in one
event-loop turn share one pipeline (`batching.py`). BENCHMARKS.md section 4 has what a
call costs beside the other clients measured, and why this one was kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import fields
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from balancer import policy
from balancer.capacity.base import Grant, Pin, Queueing, RegionState, Wait, state_of
from balancer.capacity.batching import BatchedScript
from balancer.config import STORE_SCHEMES, StoreConfig
from balancer.policy import Level, Limits

Client = Redis | RedisCluster

# `redis+cluster://` names the cluster client; the client itself takes the plain scheme.
CLUSTER_SCHEMES = {s: s.removesuffix("+cluster") for s in STORE_SCHEMES if s.endswith("+cluster")}


# Both keys share the model's hash tag, so one script keeps them consistent on a cluster.
DEQUEUE = "redis.call('ZREM', KEYS[1], ARGV[1]); redis.call('HDEL', KEYS[2], ARGV[1])"


@cache
def _script(name: str, *, prelude: bool = True) -> str:
    lua = resources.files("balancer.capacity") / "lua"
    body = (lua / f"{name}.lua").read_text(encoding="utf-8")
    return (lua / "lib.lua").read_text(encoding="utf-8") + "\n" + body if prelude else body


def _num(x: float) -> str:
    # repr is the shortest string that parses back to the same double (Lua's tonumber
    # uses strtod), so the script computes with exactly the caller's values.
    return repr(float(x))


# Limits travel to the scripts as `name=value` pairs, one region's separated from the
# next by ';': a new Limits field reaches lua/lib.lua's `parse_limits` by its name.
LIMIT_FIELDS = tuple(f.name for f in fields(Limits) if f.name != "region")


def limits_text(limits: Limits) -> str:
    return " ".join([f"{name}={_num(getattr(limits, name))}" for name in LIMIT_FIELDS])


MAX_PIN_TTL = 2**31 - 1  # seconds (68 years): an EX that Redis surely accepts


def _pin_ttl(seconds: float) -> int:
    # EX takes whole seconds and refuses 0: round up, so a pin never expires early.
    return max(1, math.ceil(min(seconds, MAX_PIN_TTL)))


def encode_pin(pin: Pin) -> str:
    """Model and region are names ([A-Za-z0-9._-]), so a tab cannot occur in them."""
    return f"{pin.model}\t{pin.region}\t{int(pin.tokens)}"


def decode_pin(raw: bytes | str | None) -> Pin | None:
    """The pin `encode_pin` wrote, or None for anything else (absent, or a value that
    is not ours): a wrong pin would send follow-ups to a region without the response."""
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        model, region, tokens = text.split("\t")
        count = int(tokens)
    except ValueError:  # UnicodeDecodeError is one, as are a wrong field count and int()
        return None
    if not model or not region or count < 0:
        return None
    return Pin(model, region, count)


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
    }
    if cluster:
        # The cluster client caps connections per node (100 by default) and raises
        # beyond that; admission concurrency can exceed it under load.
        return RedisCluster.from_url(url, max_connections=10_000, **options)
    return Redis.from_url(url, **options)


class RedisStore:
    """`CapacityStore` on a `redis.asyncio` client (plain or cluster)."""

    def __init__(
        self,
        client: Client,
        *,
        key_prefix: str = "bal",
        key_ttl_seconds: int = 3600,
        timeout_seconds: float = 0.25,
        on_round_trip: Callable[[str], None] | None = None,
        name: str | None = None,
    ):
        self.client = client
        self.name = name or ("redis-cluster" if isinstance(client, RedisCluster) else "redis")
        self.prefix = key_prefix
        self.ttl = int(key_ttl_seconds)
        self._ttl = str(self.ttl)
        self.timeout = timeout_seconds
        self._round_trip = on_round_trip or (lambda op: None)
        # register_script: EVALSHA, and on NOSCRIPT a SCRIPT LOAD then EVALSHA again. On
        # the async cluster client SCRIPT LOAD goes to every primary and EVALSHA to the
        # keys' slot, so the same objects work on both clients.
        self._acquire = client.register_script(_script("acquire"))
        self._region = client.register_script(_script("region"))
        if not isinstance(client, RedisCluster):
            # The hot path (acquire, settle and the other one-region writes) is batched
            # per event-loop turn into one pipeline (balancer.capacity.batching). redis-py
            # refuses EVALSHA in a cluster pipeline, so the cluster sends each call alone.
            self._acquire = BatchedScript(client, self._acquire, 2 * timeout_seconds)
            self._region = BatchedScript(client, self._region, 2 * timeout_seconds)
        self._snapshot = client.register_script(_script("snapshot"))
        self._dequeue = client.register_script(DEQUEUE)
        self._heartbeat = client.register_script(_script("heartbeat", prelude=False))
        self._replica_ttl = 10.0  # the ttl of the last heartbeat, for count_replicas()
        self._replica_count = 1
        self._limit_args: dict[Limits, str] = {}

    @classmethod
    def from_config(
        cls, config: StoreConfig, *, on_round_trip: Callable[[str], None] | None = None
    ) -> RedisStore:
        return cls(
            connect(config),
            key_prefix=config.key_prefix,
            key_ttl_seconds=config.key_ttl_seconds,
            timeout_seconds=config.timeout_seconds,
            on_round_trip=on_round_trip,
        )

    def key(self, model: str, region: str) -> str:
        return f"{self.prefix}:{{{model}}}:{region}"

    def pin_key(self, response_id: str) -> str:
        return f"{self.prefix}:resp:{response_id}"

    @property
    def replicas_key(self) -> str:
        return f"{self.prefix}:{{replicas}}"

    def _limits(self, limits: Limits) -> str:
        """The Lua side's `parse_limits` text for one region, field by field (cached:
        Limits are frozen)."""
        text = self._limit_args.get(limits)
        if text is None:
            if len(self._limit_args) > 4096:  # config reloads create new Limits
                self._limit_args.clear()
            text = self._limit_args[limits] = limits_text(limits)
        return text

    async def acquire(self, model: str, candidates: Sequence[Limits], cost: int, r: float,
                      exclude: Collection[str] = (), queue: Queueing | None = None
                      ) -> Grant | Wait:
        usable = [c for c in candidates if c.region not in exclude]
        if not usable:
            return Wait(math.inf)  # policy.retry_after of nothing, as MemoryStore
        keys = [self.key(model, c.region) for c in usable]
        args = [_num(cost), _num(r), self._ttl, ";".join([self._limits(c) for c in usable])]
        if queue is not None:
            keys += self._queue_keys(model)
            args += [queue.ticket, _num(queue.boost), _num(queue.budget)]
        self._round_trip("acquire")
        reply = await self._acquire(keys=keys, args=args)
        index = reply[0]
        if index == 0:
            return Wait(float(reply[1]), int(reply[2]), bool(reply[3]))
        return Grant(model, usable[index - 1], cost, int(reply[1]), level=float(reply[2]))

    def _queue_keys(self, model: str) -> list[str]:
        return [f"{self.prefix}:{{{model}}}:queue", f"{self.prefix}:{{{model}}}:tickets"]

    async def dequeue(self, model: str, ticket: str) -> None:
        queue, tickets = self._queue_keys(model)
        self._round_trip("dequeue")
        await self._dequeue(keys=[queue, tickets], args=[ticket])

    async def _apply(self, op: str, model: str, limits: Limits, *extra: str) -> int:
        self._round_trip(op)
        return await self._region(
            keys=[self.key(model, limits.region)],
            args=[op, self._ttl, self._limits(limits), *extra],
        )

    async def settle(self, grant: Grant, actual_tokens: int, latency: float | None = None
                     ) -> None:
        delta = actual_tokens - grant.tokens
        if delta == 0 and not latency:
            return  # nothing to charge, refund or learn: skip the round trip
        sample = _num(latency) if latency else ""
        await self._apply("settle", grant.model, grant.limits, str(delta), sample)

    async def observe(self, model: str, limits: Limits, remaining: float) -> None:
        await self._apply("observe", model, limits, _num(remaining))

    async def cooldown(self, model: str, limits: Limits, seconds: float, *,
                       share: float | None = None) -> None:
        await self._apply("cooldown", model, limits, _num(seconds),
                          "" if share is None else _num(share))

    async def record_failure(
        self, model: str, limits: Limits, threshold: int, open_seconds: float
    ) -> bool:
        opened = await self._apply(
            "record_failure", model, limits, str(int(threshold)), _num(open_seconds)
        )
        return bool(opened)

    async def record_success(self, model: str, limits: Limits) -> None:
        self._round_trip("record_success")
        await self._region(
            keys=[self.key(model, limits.region)], args=["record_success", self._ttl]
        )

    async def snapshot(self, model: str, candidates: Sequence[Limits]) -> list[RegionState]:
        if not candidates:
            return []
        self._round_trip("snapshot")
        raw = await self._snapshot(
            keys=[self.key(model, c.region) for c in candidates],
            args=[";".join([self._limits(c) for c in candidates])],
        )
        out = []
        for i, c in enumerate(candidates):
            tokens, requests, cooldown, failures, tripped, factor, lat = raw[i * 7 : i * 7 + 7]
            level = Level(float(tokens), float(requests), float(cooldown), float(lat))
            eff = policy.effective(c, float(factor))
            out.append(state_of(eff, level, int(failures), int(tripped) != 0, float(factor)))
        return out

    async def pin(self, response_id: str, pin: Pin, ttl_seconds: float) -> None:
        self._round_trip("pin")
        await self.client.set(self.pin_key(response_id), encode_pin(pin),
                              ex=_pin_ttl(ttl_seconds))

    async def pinned(self, response_id: str) -> Pin | None:
        self._round_trip("pinned")
        return decode_pin(await self.client.get(self.pin_key(response_id)))

    async def unpin(self, response_id: str) -> None:
        self._round_trip("unpin")
        await self.client.delete(self.pin_key(response_id))

    async def pin_many(self, pins: Sequence[tuple[str, Pin, float]]) -> int:
        """Write several pins (response id, pin, ttl) in one pipeline: the pins a
        degraded replica made, once Redis is back. Not atomic, and need not be: each
        SET stands alone, and a retry rewrites the same values. Returns how many Redis
        refused; a lost connection raises."""
        if not pins:
            return 0
        self._round_trip("pin_many")
        # transaction=False: no MULTI, so the cluster client may split it across nodes.
        pipe = self.client.pipeline(transaction=False)
        for response_id, pin, ttl in pins:
            pipe.set(self.pin_key(response_id), encode_pin(pin), ex=_pin_ttl(ttl))
        # A refused SET comes back as its error: one bad pin must not fail the others
        # (nor, raised, look like an outage to the caller). Any other error is one.
        replies = await pipe.execute(raise_on_error=False)
        errors = [r for r in replies if isinstance(r, Exception)]
        for error in errors:
            if not isinstance(error, ResponseError):
                raise error
        return len(errors)

    async def heartbeat(self, replica_id: str, ttl_seconds: float) -> int:
        """Record this replica as live; returns how many replicas were live within
        `ttl_seconds` (this one included), by the Redis clock."""
        self._replica_ttl = ttl_seconds
        self._round_trip("heartbeat")
        count = int(
            await self._heartbeat(
                keys=[self.replicas_key],
                args=[replica_id, _num(ttl_seconds), str(max(self.ttl, math.ceil(ttl_seconds)))],
            )
        )
        self._replica_count = max(1, count)
        return count

    async def count_replicas(self) -> int:
        """Live replicas within the ttl of the last heartbeat (10 s before any)."""
        self._round_trip("replicas")
        return int(
            await self._heartbeat(
                keys=[self.replicas_key], args=["", _num(self._replica_ttl), str(self.ttl)]
            )
        )

    degraded = False  # ResilientStore adds the fall-back; alone, a failure raises

    @property
    def replicas(self) -> int:
        """The count of the last heartbeat (1 before any)."""
        return self._replica_count

    async def start(self) -> None:
        pass  # the client connects on first use

    async def leave(self, replica_id: str) -> None:
        """Forget this replica at shutdown, so the others' count drops at once."""
        self._round_trip("leave")
        await self.client.zrem(self.replicas_key, replica_id)

    async def ping(self) -> bool:
        self._round_trip("ping")
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
