"""In-process capacity store: one replica's view, for the embedded default and tests.

Every operation runs without awaiting, so on one event loop it is atomic by
construction; no lock is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from balancer import policy
from balancer.capacity.base import Grant, RegionState, Wait
from balancer.policy import Level, Limits


@dataclass(slots=True)
class _Bucket:
    tokens: float
    requests: float
    stamp: float  # when the levels were last refilled
    cooldown_until: float = 0.0
    failures: int = 0
    tripped: bool = False  # the circuit opened and has not seen a success since


class MemoryStore:
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, model: str, limits: Limits, now: float) -> _Bucket:
        """The region's bucket, refilled up to `now` (a new one starts full)."""
        key = (model, limits.region)
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(limits.tokens_capacity, limits.requests_capacity, now)
            self._buckets[key] = b
            return b
        elapsed = now - b.stamp
        b.tokens = policy.refill(b.tokens, elapsed, limits.tokens_rate, limits.tokens_capacity)
        b.requests = policy.refill(
            b.requests, elapsed, limits.requests_rate, limits.requests_capacity
        )
        b.stamp = now
        return b

    def _level(self, b: _Bucket, now: float) -> Level:
        return Level(b.tokens, b.requests, max(0.0, b.cooldown_until - now))

    async def acquire(
        self,
        model: str,
        candidates: Sequence[Limits],
        cost: int,
        r: float,
        exclude: Collection[str] = (),
    ) -> Grant | Wait:
        now = self._clock()
        usable = [c for c in candidates if c.region not in exclude]
        buckets = [self._bucket(model, c, now) for c in usable]
        levels = [self._level(b, now) for b in buckets]
        index = policy.pick(usable, levels, cost, r)
        if index < 0:
            return Wait(policy.retry_after(usable, levels, cost))
        b = buckets[index]
        b.tokens -= cost
        b.requests -= 1
        return Grant(model, usable[index], cost, b.failures)

    async def settle(self, grant: Grant, actual_tokens: int) -> None:
        limits = grant.limits
        b = self._bucket(grant.model, limits, self._clock())
        b.tokens = min(b.tokens - (actual_tokens - grant.tokens), limits.tokens_capacity)

    async def cooldown(self, model: str, limits: Limits, seconds: float) -> None:
        now = self._clock()
        b = self._bucket(model, limits, now)
        b.cooldown_until = max(b.cooldown_until, now + seconds)
        b.tokens = min(b.tokens, 0.0)  # the region told us it is empty

    async def record_failure(
        self, model: str, limits: Limits, threshold: int, open_seconds: float
    ) -> bool:
        now = self._clock()
        b = self._bucket(model, limits, now)
        b.failures += 1
        if b.failures < threshold:
            return False
        b.tripped = True
        b.cooldown_until = max(b.cooldown_until, now + open_seconds)
        return True

    async def record_success(self, model: str, limits: Limits) -> None:
        b = self._buckets.get((model, limits.region))
        if b is not None and (b.failures or b.tripped):
            b.failures = 0
            b.tripped = False

    async def snapshot(self, model: str, candidates: Sequence[Limits]) -> list[RegionState]:
        now = self._clock()
        out = []
        for c in candidates:
            b = self._bucket(model, c, now)
            out.append(state_of(c, self._level(b, now), b.failures, b.tripped))
        return out

    async def close(self) -> None:
        self._buckets.clear()


def state_of(limits: Limits, level: Level, failures: int, tripped: bool) -> RegionState:
    if not tripped:
        circuit = "closed"
    else:
        circuit = "open" if level.cooldown > 0 else "half_open"
    return RegionState(
        region=limits.region,
        tokens=level.tokens,
        tokens_capacity=limits.tokens_capacity,
        requests=level.requests,
        requests_capacity=limits.requests_capacity,
        cooldown_seconds=level.cooldown,
        circuit=circuit,
        failures=failures,
    )
