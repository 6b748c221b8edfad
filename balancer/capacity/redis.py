"""Shared capacity store on Redis or Redis Cluster: every replica sees the same buckets.

Each operation is one Lua script, so one round trip, atomic on the server. The
scripts (`lua/*.lua`) run the policy of `balancer.policy` (ported in `lua/lib.lua`)
with the time taken from Redis `TIME`, since the replicas' clocks differ, and the
random number passed in by the caller, since scripts must be deterministic.

Key layout, one HASH per (model, region) with the fields tokens, requests, ts,
cooldown_until, failures, tripped, and for the later policies factor, calm, granted,
peak, and after a 429 top, cut and the a_* / b_* windows (learned capacity; lua/lib.lua)
and lat (latency weighting):

    {prefix}:{<model>}:<region>      e.g.  bal:{gpt-4}:eastus2

The model is a hash tag, so all of a model's regions live in one cluster slot and
one script can read and write all of them. One hash per region (rather than a key
per field) keeps a bucket's levels, stamp and circuit together: one HMGET reads it,
one HSET + EXPIRE writes it, and the TTL covers all of it. Live replicas are a
sorted set `{prefix}:{replicas}` scored by Redis time.

Clients (balancer.tenancy) have one HASH each per model for their budget,
`{prefix}:{<model>}:client:<name>`, and one HASH per model holds every client's fair-share
sums, `{prefix}:{<model>}:fair` (lua/tenants.lua): the model's hash tag again, so acquire
checks a client's budget and fair share in the same script, on a cluster too.

Response affinity is one plain STRING per stored response, `{prefix}:resp:<id>` =
"<model>\t<region>\t<tokens>" with the upstream retention as its TTL: one key per
command, so plain SET/GET/DEL (no script, no hash tag) work on a cluster too.

Every command goes through redis-py's asyncio client, with hiredis parsing replies
(`redis[hiredis]`), the same way on plain `redis://`, TLS `rediss://`, the cluster
schemes and Sentinel: the scripts are redis-py `register_script` objects (EVALSHA, and
on NOSCRIPT a SCRIPT LOAD then EVALSHA again). On a plain client the hot path's calls
made in one event-loop turn share one pipeline (`batching.py`). BENCHMARKS.md section 4
has what a call costs beside the other clients measured, and why this one was kept.

Connections (plain, TLS, cluster, Sentinel) come from `connection.py`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import fields
from functools import cache
from importlib import resources

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ResponseError

from balancer import policy
from balancer.capacity.base import ClientState, Grant, Pin, Queueing, RegionState, Wait, state_of
from balancer.capacity.batching import BatchedScript
from balancer.capacity.connection import Client, connect
from balancer.config import StoreConfig
from balancer.policy import Level, Limits, Refusal
from balancer.tenancy import Budget, ClientLimits

__all__ = ["Client", "RedisStore", "client_text", "connect", "limits_text"]

# Both keys share the model's hash tag, so one script keeps them consistent on a cluster.
DEQUEUE = "redis.call('ZREM', KEYS[1], ARGV[1]); redis.call('HDEL', KEYS[2], ARGV[1])"


def _num(x: float) -> str:
    # repr is the shortest string that parses back to the same double (Lua's tonumber
    # uses strtod), so the script computes with exactly the caller's values.
    return repr(float(x))


# Limits travel to the scripts as their values in the order of these fields, one
# region's separated from the next by ';'. The scripts get the same lists as Lua tables
# (`lua_prelude`), so lua/lib.lua's `parse_limits` gives each value its field's name: a
# new Limits field reaches Lua by its name with no change to the format. Positions, not
# `name=value` pairs, because parsing is a large share of an acquire's time in Redis
# (BENCHMARKS.md 2 (g)).
LIMIT_FIELDS = tuple(f.name for f in fields(Limits) if f.name != "region")
CLIENT_FIELDS = tuple(f.name for f in fields(ClientLimits) if f.name != "name")


def limits_text(limits: Limits) -> str:
    return " ".join([_num(getattr(limits, name)) for name in LIMIT_FIELDS])


@cache
def client_text(client: ClientLimits) -> str:
    """A client's limits for lua/tenants.lua's `parse_client` (cached: frozen, and few)."""
    return " ".join([_num(getattr(client, name)) for name in CLIENT_FIELDS])


def _lua_names(names: tuple[str, ...]) -> str:
    return "{ " + ", ".join(f"'{n}'" for n in names) + " }"


@cache
def lua_prelude() -> str:
    """What every script but the heartbeat starts with: the field lists, lib.lua and
    tenants.lua."""
    lua = resources.files("balancer.capacity") / "lua"
    return "\n".join([f"local LIMIT_FIELDS = {_lua_names(LIMIT_FIELDS)}",
                      f"local CLIENT_FIELDS = {_lua_names(CLIENT_FIELDS)}",
                      *((lua / f"{part}.lua").read_text(encoding="utf-8")
                        for part in ("lib", "tenants"))])


@cache
def _script(name: str, *, prelude: bool = True) -> str:
    text = (resources.files("balancer.capacity") / "lua" / f"{name}.lua").read_text(
        encoding="utf-8")
    return lua_prelude() + "\n" + text if prelude else text


# How long acquire's record of a reservation lives (seconds, as a Redis EX): long enough
# for a replica to come back from a Redis stall and release what it never saw granted;
# after it, refill has long given the tokens back anyway.
RESERVATION_LEASE = "60"

MAX_PIN_TTL = 2**31 - 1  # seconds (68 years): an EX that Redis surely accepts


def _pin_ttl(seconds: float) -> int:
    # EX takes whole seconds and refuses 0: round up, so a pin never expires early.
    return max(1, math.ceil(min(seconds, MAX_PIN_TTL)))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


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
        self.name = name or ("redis-cluster" if isinstance(client, RedisCluster) else
                             "redis-sentinel" if isinstance(
                                 client.connection_pool, SentinelConnectionPool) else "redis")
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
        # BALANCER_STORE_BATCHING=0 sends each call alone: for the A/B benchmark only.
        if (not isinstance(client, RedisCluster)
                and os.environ.get("BALANCER_STORE_BATCHING", "1") != "0"):
            # The hot path (acquire, settle and the other one-region writes) is batched
            # per event-loop turn into one pipeline (balancer.capacity.batching). redis-py
            # refuses EVALSHA in a cluster pipeline, so the cluster sends each call alone.
            self._acquire = BatchedScript(client, self._acquire, 2 * timeout_seconds)
            self._region = BatchedScript(client, self._region, 2 * timeout_seconds)
        self._snapshot = client.register_script(_script("snapshot"))
        self._clients = client.register_script(_script("clients"))
        self._release = client.register_script(_script("release"))
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
                      exclude: Collection[str] = (), queue: Queueing | None = None,
                      client: ClientLimits | None = None, demand: bool = True,
                      reservation: str = "") -> Grant | Wait:
        """As CapacityStore.acquire; with a `reservation` id, the script keeps a record
        of what it reserved for RESERVATION_LEASE seconds, so that `release` can give it
        back exactly if this call's reply never arrives."""
        usable = [c for c in candidates if c.region not in exclude]
        if not usable:
            return Wait(math.inf)  # policy.retry_after of nothing, as MemoryStore
        keys = [self.key(model, c.region) for c in usable]
        args = [_num(cost), _num(r), self._ttl, ";".join([self._limits(c) for c in usable])]
        if client is None:
            args += ["", "", ""]
        else:
            args += [client_text(client), client.name, "1" if demand else "0"]
        args += [reservation, RESERVATION_LEASE]
        if reservation:
            keys.append(self.reservation_key(model, reservation))
        if client is not None:
            keys += self._client_keys(model, client.name)
        if queue is not None:
            keys += self._queue_keys(model)
            args += [queue.ticket, _num(queue.boost), _num(queue.budget)]
        self._round_trip("acquire")
        reply = await self._acquire(keys=keys, args=args)
        index = reply[0]
        if index == 0:
            return Wait(float(reply[1]), int(reply[2]), bool(reply[3]), _text(reply[4]))
        budget = None
        if client is not None:
            budget = Budget(*(float(x) for x in reply[5:9]))
        return Grant(model, usable[index - 1], cost, int(reply[1]), level=float(reply[2]),
                     granted=float(reply[3]), at=float(reply[4]), client=client,
                     budget=budget)

    def reservation_key(self, model: str, reservation: str) -> str:
        return f"{self.prefix}:{{{model}}}:r:{reservation}"

    async def release(self, model: str, candidates: Sequence[Limits], reservation: str,
                      client: ClientLimits | None = None) -> bool:
        """Give back what `acquire(..., reservation=...)` on these candidates (after its
        exclusions) reserved, if it did; if it has not run yet, it never will (the
        record says released). True when something was given back. Idempotent."""
        keys = [self.reservation_key(model, reservation),
                *(self.key(model, c.region) for c in candidates)]
        args = [RESERVATION_LEASE, self._ttl, ";".join([self._limits(c) for c in candidates]),
                "", ""]
        if client is not None:
            keys += self._client_keys(model, client.name)
            args[3:] = [client_text(client), client.name]
        self._round_trip("release")
        return bool(await self._release(keys=keys, args=args))

    def _client_keys(self, model: str, name: str) -> list[str]:
        """A client's budget and the model's fair-share book (the model's hash tag)."""
        return [f"{self.prefix}:{{{model}}}:client:{name}", f"{self.prefix}:{{{model}}}:fair"]

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
        c = grant.client
        if c is None:
            await self._apply("settle", grant.model, grant.limits, str(delta), sample,
                              _num(grant.granted))
            return
        self._round_trip("settle")
        await self._region(
            keys=[self.key(grant.model, grant.region), *self._client_keys(grant.model, c.name)],
            args=["settle", self._ttl, self._limits(grant.limits), str(delta), sample,
                  _num(grant.granted), client_text(c), c.name])

    async def observe(self, model: str, limits: Limits, remaining: float) -> None:
        await self._apply("observe", model, limits, _num(remaining))

    async def cooldown(self, model: str, limits: Limits, seconds: float, *,
                       share: float | None = None, refusal: Refusal | None = None) -> None:
        bounds = ("", "", "", "", "", "") if refusal is None else (
            _num(refusal.high), _num(refusal.high_wait), _num(refusal.low),
            _num(refusal.low_wait), _num(refusal.reserved_at), _num(refusal.granted))
        await self._apply("cooldown", model, limits, _num(seconds),
                          "" if share is None else _num(share), *bounds)

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

    async def clients(self, model: str, clients: Sequence[ClientLimits]) -> list[ClientState]:
        if not clients:
            return []
        self._round_trip("clients")
        keys = [self._client_keys(model, c.name)[0] for c in clients]
        keys.append(self._client_keys(model, "")[1])
        args = [x for c in clients for x in (client_text(c), c.name)]
        raw = await self._clients(keys=keys, args=args)
        out = []
        for i, c in enumerate(clients):
            tokens, requests, day, month, demand, used = (float(x) for x in raw[i * 6:i * 6 + 6])
            out.append(ClientState(c.name, Budget(tokens, requests, day, month), demand, used))
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

    async def reset(self) -> None:
        """Close every pooled connection, so the next call opens a new one (resolving
        the host again, or asking the sentinels): after READONLY, the pool may hold
        connections to a primary demoted to a replica."""
        pool = getattr(self.client, "connection_pool", None)  # the cluster has none
        if pool is not None:
            await pool.disconnect()

    async def close(self) -> None:
        await self.client.aclose()
        # The sentinels' own clients belong to the Sentinel, not to the primary's client.
        manager = getattr(getattr(self.client, "connection_pool", None), "sentinel_manager",
                          None)
        if manager is not None:
            await manager.aclose()
