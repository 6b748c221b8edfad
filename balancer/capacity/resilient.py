"""Degraded mode: Redis failure is not an outage.

`ResilientStore` wraps a `RedisStore`. While Redis answers, every call goes to it.
The first call that fails or exceeds the timeout switches this replica to degraded
mode: that call and every later one are served from local buckets holding this
replica's share of each region (capacity and refill rate divided by the replicas
last seen live), so no request fails and none waits on a dead Redis. A background
task probes Redis and switches back by itself when it answers; the same task sends
the heartbeats that count the live replicas. A READONLY reply (a failover demoted the
primary this replica's connections reach) is a failure like any other; the probe then
closes the pooled connections, so the next ones reach the new primary (behind Sentinel,
redis-py's pool asks the sentinels where it is; a plain URL is resolved again).

Response pins made while degraded live in the local store and wait in a bounded
list; before switching back, the probe writes them to Redis, so a response created
during the outage can be followed up from every replica afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import replace
from functools import lru_cache
from typing import TypeVar

from redis.exceptions import ReadOnlyError, RedisClusterException, RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_fixed

from balancer.capacity.base import ClientState, Grant, Pin, Queueing, RegionState, Wait
from balancer.capacity.memory import MemoryStore
from balancer.capacity.redis import RedisStore
from balancer.policy import Limits, Refusal
from balancer.tenancy import ClientLimits

log = logging.getLogger(__name__)

# Everything a sick Redis (or the network to it) can raise. OSError covers socket
# errors that escape redis-py; TimeoutError is also what asyncio.timeout raises.
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
T = TypeVar("T")
STARTUP_SECONDS = 1.0  # bound on connecting to the store when a replica starts
# Pins made while degraded, waiting for Redis: bounded, since an outage can be long
# and busy; beyond it the oldest stay local only (this replica still routes them).
MAX_PENDING_PINS = 100_000
# Orphaned reservations waiting for Redis: bounded like the pins; past the bound the
# oldest are left to refill, which gives their tokens back within a refill window anyway.
MAX_ORPHANS = 10_000
PIN_BATCH = 500  # pending pins written per pipeline on recovery, each under the deadline


@lru_cache(maxsize=4096)
def share(limits: Limits, replicas: int) -> Limits:
    """This replica's part of a region when the replicas cannot coordinate."""
    if replicas <= 1:
        return limits
    return replace(
        limits,
        tokens_capacity=limits.tokens_capacity / replicas,
        tokens_rate=limits.tokens_rate / replicas,
        requests_capacity=limits.requests_capacity / replicas,
        requests_rate=limits.requests_rate / replicas,
    )


@lru_cache(maxsize=4096)
def client_share(client: ClientLimits | None, replicas: int) -> ClientLimits | None:
    """This replica's part of a client's budget when the replicas cannot coordinate (its
    quotas too; the local counts start from the shared ones: `_local_client`)."""
    if client is None or replicas <= 1:
        return client
    return replace(
        client,
        tokens_capacity=client.tokens_capacity / replicas,
        tokens_rate=client.tokens_rate / replicas,
        requests_capacity=client.requests_capacity / replicas,
        requests_rate=client.requests_rate / replicas,
        tokens_per_day=client.tokens_per_day / replicas,
        tokens_per_month=client.tokens_per_month / replicas,
    )


def replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ResilientStore:
    """A `CapacityStore` that falls back to local buckets while Redis is unavailable."""

    def __init__(
        self,
        shared: RedisStore,
        *,
        on_degraded: Callable[[bool], None] | None = None,
        probe_interval: float = 0.5,
        heartbeat_interval: float = 2.0,
        replica_id: str | None = None,
    ):
        self.shared = shared
        self.local = MemoryStore()
        self.name = shared.name
        self.replica_id = replica_id or replica_name()
        self._on_degraded = on_degraded
        self._probe_interval = probe_interval
        self._heartbeat_interval = heartbeat_interval
        # A replica missing three heartbeats no longer counts.
        self._replica_ttl = 3 * heartbeat_interval
        # Bounds a whole call, NOSCRIPT reload and cluster redirects included; each
        # socket operation is already bounded by the client's own timeout.
        self._deadline = 2 * shared.timeout
        self._degraded = False
        self._replicas = 1  # until a heartbeat says otherwise: alone, take it all
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._joined = False  # a heartbeat registered this replica
        self._wake = asyncio.Event()  # set on degrading: start probing now
        # response id -> (pin, expiry by time.monotonic) made while degraded, oldest first
        self._pending: OrderedDict[str, tuple[Pin, float]] = OrderedDict()
        # Shared acquires that never answered: (model, candidates, reservation id, client)
        self._orphans: deque[tuple[str, tuple[Limits, ...], str, ClientLimits | None]] = deque()
        self._reservations = (f"{self.replica_id}.{n}" for n in itertools.count())
        # Each client's day and month usage as the shared store last reported it, with the
        # wall time it did: degraded, the local quotas start from it (`_local_client`),
        # once per outage, not from zero. Keyed by config names, so bounded by the config.
        self._usage: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._carried: set[tuple[str, str]] = set()
        self.released = 0  # orphaned reservations released (tests, logs)

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def replicas(self) -> int:
        """Live replicas at the last heartbeat; the divisor of the local share."""
        return self._replicas

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Register this replica and start probing and heartbeats. Optional: the first
        operation starts the background task too, but without a heartbeat first."""
        if self._task is None and not self._closed:
            # Connect first, under a start-up bound rather than the per-call deadline:
            # on a new connection the first call also pays the TCP connect and the client
            # handshake, which on a busy host can overrun the deadline and start a healthy
            # replica degraded. A store that does not answer still degrades at `_beat`.
            with contextlib.suppress(*FAILURES):
                async with asyncio.timeout(max(self._deadline, STARTUP_SECONDS)):
                    await self.shared.ping()
            await self._beat()
            self._ensure_task()

    def _ensure_task(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._background(), name="balancer-store-probe"
            )

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            # Cancel until it ends: a cancellation can be lost. Python 3.11's
            # asyncio.wait_for, which redis-py uses while a new connection says hello,
            # returns the result instead when both happen in the same turn, and the
            # probe would run on, with close() waiting for it forever.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.1)
            self._task = None
        if self._joined and not self._degraded:
            with contextlib.suppress(*FAILURES):
                async with asyncio.timeout(self._deadline):
                    await self.shared.leave(self.replica_id)
        with contextlib.suppress(*FAILURES):
            await self.shared.close()
        await self.local.close()

    # -- mode switches -----------------------------------------------------------

    def _degrade(self, op: str, exc: BaseException) -> None:
        if self._degraded:
            return
        self._degraded = True
        # The exception text names host and port at most, never the URL's password.
        log.warning(
            "capacity store %s failed on %s (%s: %s); degraded mode: local buckets with "
            "1/%d of each region's capacity until it answers again",
            self.name,
            op,
            type(exc).__name__,
            str(exc) or "no answer in time",
            self._replicas,
        )
        self._notify(True)
        self._wake.set()
        self._ensure_task()

    def _recover(self) -> None:
        self._degraded = False
        self._carried.clear()  # the next outage starts from the shared counts again
        log.info("capacity store %s answers again; back to shared mode", self.name)
        self._notify(False)

    def _notify(self, degraded: bool) -> None:
        if self._on_degraded is not None:
            try:
                self._on_degraded(degraded)
            except Exception:  # a metrics hook must not break admission
                log.exception("on_degraded callback failed")

    async def _heartbeat(self) -> None:
        """Record this replica as live and learn how many are; raises if the store
        does not answer within the deadline."""
        async with asyncio.timeout(self._deadline):
            count = await self.shared.heartbeat(self.replica_id, self._replica_ttl)
        self._replicas = max(1, count)
        self._joined = True

    async def _beat(self) -> None:
        """A heartbeat in shared mode: a failure degrades."""
        try:
            await self._heartbeat()
        except FAILURES as exc:
            self._degrade("heartbeat", exc)

    async def _reconnect(self) -> None:
        """While degraded: a heartbeat every `probe_interval` until one answers. The
        probe is a heartbeat, not a bare PING: it also proves the scripts run, and
        brings back the current replica count."""
        probes = AsyncRetrying(wait=wait_fixed(self._probe_interval),
                               retry=retry_if_exception_type(FAILURES), reraise=True)
        await asyncio.sleep(self._probe_interval)  # it has only just failed
        async for attempt in probes:
            with attempt:
                try:
                    await self._heartbeat()
                except ReadOnlyError:
                    # A primary demoted to a replica (a failover) still holds the pooled
                    # connections: open new ones, which find the new primary.
                    await self.shared.reset()
                    raise

    async def _background(self) -> None:
        """Heartbeats in shared mode; the reconnect probe while degraded (a failing
        request wakes it at once, through `_wake`)."""
        while True:
            try:
                if self._degraded:
                    await self._reconnect()
                    # Pins first: until they are in Redis this replica keeps reading
                    # them locally. If Redis fails again meanwhile, probe again.
                    if await self._flush_pins():
                        await self._release_orphans()
                        self._recover()
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._heartbeat_interval):
                        await self._wake.wait()
                self._wake.clear()
                if not self._degraded:
                    await self._beat()
                    await self._release_orphans()
            except Exception:  # never let the probe die: it is the way back
                log.exception("capacity store probe failed unexpectedly")
                await asyncio.sleep(self._probe_interval)

    async def _release_orphans(self) -> None:
        """Release the reservations whose acquire never answered, oldest first; on a
        failure the rest wait for the next chance (a failure here does not degrade)."""
        while self._orphans:
            model, usable, reservation, client = self._orphans[0]
            try:
                async with asyncio.timeout(self._deadline):
                    await self.shared.release(model, usable, reservation, client)
            except FAILURES as exc:
                log.info("capacity store %s failed releasing %d orphaned reservations (%s)",
                         self.name, len(self._orphans), type(exc).__name__)
                return
            self._orphans.popleft()
            self.released += 1

    async def _flush_pins(self) -> bool:
        """Write the pins made while degraded to Redis with their remaining TTL, oldest
        first; False (the unwritten ones kept) if Redis fails meanwhile."""
        while self._pending:
            taken = list(itertools.islice(self._pending.items(), PIN_BATCH))
            now = time.monotonic()
            batch = [(rid, pin, expires - now) for rid, (pin, expires) in taken
                     if expires > now]  # an expired one is dropped with the batch
            try:
                async with asyncio.timeout(self._deadline):
                    refused = await self.shared.pin_many(batch)
                if refused:
                    log.warning("capacity store %s refused %d pending pins", self.name,
                                refused)
            except FAILURES as exc:
                log.info("capacity store %s failed writing %d pending pins (%s)",
                         self.name, len(self._pending), type(exc).__name__)
                return False
            except Exception:  # a pin that cannot be sent must not hold recovery back
                log.exception("capacity store %s: dropping %d pending pins", self.name,
                              len(batch))
            for rid, entry in taken:
                if self._pending.get(rid) is entry:  # not re-pinned meanwhile
                    del self._pending[rid]
        return True

    # -- the store protocol --------------------------------------------------------

    async def _either(self, op: str, shared: Callable[[], Awaitable[T]],
                      local: Callable[[], Awaitable[T]]) -> T:
        """The one fall-back: the shared store while it answers within the deadline;
        on the first failure degrade, and from then on the local buckets."""
        if self._task is None:
            self._ensure_task()
        if not self._degraded:
            try:
                async with asyncio.timeout(self._deadline):
                    return await shared()
            except FAILURES as exc:
                self._degrade(op, exc)
        return await local()

    def _share(self, limits: Limits) -> Limits:
        return share(limits, self._replicas)

    async def acquire(self, model: str, candidates: Sequence[Limits], cost: int, r: float,
                      exclude: Collection[str] = (), queue: Queueing | None = None,
                      client: ClientLimits | None = None, demand: bool = True
                      ) -> Grant | Wait:
        return await self._either(
            "acquire",
            lambda: self._acquire_shared(model, candidates, cost, r, exclude, queue, client,
                                         demand),
            lambda: self._acquire_locally(model, candidates, cost, r, exclude, queue, client,
                                          demand))

    async def _acquire_shared(self, model: str, candidates: Sequence[Limits], cost: int,
                              r: float, exclude: Collection[str], queue: Queueing | None,
                              client: ClientLimits | None, demand: bool) -> Grant | Wait:
        """The shared acquire, under a reservation id: if its reply never comes (a stall
        past the deadline, or the request cancelled), Redis may still have reserved, and
        nobody would settle it. Such reservations are released exactly once the store
        answers (`_release_orphans`), instead of waiting for refill."""
        reservation = next(self._reservations)
        try:
            result = await self.shared.acquire(model, candidates, cost, r, exclude, queue,
                                               client, demand, reservation=reservation)
            if isinstance(result, Grant) and client is not None and result.budget is not None:
                self._seen(model, client.name, result.budget.day_used,
                           result.budget.month_used)
            return result
        except BaseException:
            usable = tuple(c for c in candidates if c.region not in exclude)
            if len(self._orphans) >= MAX_ORPHANS:
                self._orphans.popleft()  # the oldest: refill has given it back by now
            self._orphans.append((model, usable, reservation, client))
            self._wake.set()
            raise

    async def _acquire_locally(self, model: str, candidates: Sequence[Limits], cost: int,
                               r: float, exclude: Collection[str], queue: Queueing | None,
                               client: ClientLimits | None, demand: bool) -> Grant | Wait:
        shares = [self._share(c) for c in candidates]
        # Degraded, this replica queues its own waiters only: the others cannot be seen.
        result = await self.local.acquire(model, shares, cost, r, exclude, queue,
                                          self._local_client(model, client), demand)
        if isinstance(result, Wait):
            return result
        # Hand back the caller's own Limits; settle scales them again.
        original = candidates[next(i for i, s in enumerate(shares) if s is result.limits)]
        return replace(result, limits=original, source="local", client=client)

    async def settle(self, grant: Grant, actual_tokens: int, latency: float | None = None
                     ) -> None:
        local = lambda: self.local.settle(  # noqa: E731
            replace(grant, limits=self._share(grant.limits),
                    client=self._local_client(grant.model, grant.client)),
            actual_tokens, latency)
        if grant.source != "shared":  # issued by the local buckets: settled there
            return await local()
        await self._either("settle", lambda: self.shared.settle(grant, actual_tokens, latency),
                           local)

    async def dequeue(self, model: str, ticket: str) -> None:
        await self.local.dequeue(model, ticket)
        await self._either("dequeue", lambda: self.shared.dequeue(model, ticket), _nothing)

    async def observe(self, model: str, limits: Limits, remaining: float) -> None:
        await self._either(
            "observe", lambda: self.shared.observe(model, limits, remaining),
            lambda: self.local.observe(model, self._share(limits), remaining))

    async def cooldown(self, model: str, limits: Limits, seconds: float, *,
                       share: float | None = None, refusal: Refusal | None = None) -> None:
        # The refusal's levels are the whole region's, not this replica's share of it:
        # the local buckets learn from the implied share only.
        await self._either(
            "cooldown", lambda: self.shared.cooldown(model, limits, seconds, share=share,
                                                     refusal=refusal),
            lambda: self.local.cooldown(model, self._share(limits), seconds, share=share))

    async def record_failure(
        self, model: str, limits: Limits, threshold: int, open_seconds: float
    ) -> bool:
        return await self._either(
            "record_failure",
            lambda: self.shared.record_failure(model, limits, threshold, open_seconds),
            lambda: self.local.record_failure(model, self._share(limits), threshold,
                                              open_seconds))

    async def record_success(self, model: str, limits: Limits) -> None:
        await self._either(
            "record_success", lambda: self.shared.record_success(model, limits),
            lambda: self.local.record_success(model, self._share(limits)))

    async def snapshot(self, model: str, candidates: Sequence[Limits]) -> list[RegionState]:
        return await self._either(
            "snapshot", lambda: self.shared.snapshot(model, candidates),
            lambda: self.local.snapshot(model, [self._share(c) for c in candidates]))

    async def clients(self, model: str, clients: Sequence[ClientLimits]) -> list[ClientState]:
        async def shared() -> list[ClientState]:
            states = await self.shared.clients(model, clients)
            for state in states:
                self._seen(model, state.name, state.budget.day_used, state.budget.month_used)
            return states

        return await self._either(
            "clients", shared,
            lambda: self.local.clients(model, [self._local_client(model, c) or c
                                               for c in clients]))

    def _seen(self, model: str, client: str, day_used: float, month_used: float) -> None:
        self._usage[(model, client)] = (day_used, month_used, time.time())

    def _local_client(self, model: str, client: ClientLimits | None) -> ClientLimits | None:
        """This replica's part of the client's limits; on its first local use in an
        outage, its local day and month quotas start from the shared counts last seen,
        divided as the limits are (so the part left is the whole's share)."""
        local = client_share(client, self._replicas)
        if client is None or local is None:
            return local
        key = (model, client.name)
        seen = self._usage.get(key)
        if seen is not None and key not in self._carried:
            self._carried.add(key)
            day_used, month_used, wall = seen
            n = max(1, self._replicas)
            self.local.carry_usage(model, local, day_used / n, month_used / n, wall)
        return local

    async def pin(self, response_id: str, pin: Pin, ttl_seconds: float) -> None:
        await self._either("pin", lambda: self.shared.pin(response_id, pin, ttl_seconds),
                           lambda: self._pin_locally(response_id, pin, ttl_seconds))

    async def _pin_locally(self, response_id: str, pin: Pin, ttl_seconds: float) -> None:
        await self.local.pin(response_id, pin, ttl_seconds)
        pending = self._pending
        pending.pop(response_id, None)  # an overwrite is the newest
        pending[response_id] = (pin, time.monotonic() + ttl_seconds)
        while len(pending) > MAX_PENDING_PINS:
            pending.popitem(last=False)

    async def pinned(self, response_id: str) -> Pin | None:
        # In shared mode a miss still asks the local store: it holds the pins made
        # while degraded that the bounded pending list could not keep for Redis.
        found = await self._either("pinned", lambda: self.shared.pinned(response_id),
                                   _nothing)
        return found if found is not None else await self.local.pinned(response_id)

    async def unpin(self, response_id: str) -> None:
        self._pending.pop(response_id, None)  # must not come back on recovery
        await self.local.unpin(response_id)
        await self._either("unpin", lambda: self.shared.unpin(response_id), _nothing)


async def _nothing() -> None:
    return None
