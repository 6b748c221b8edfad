"""The store protocol every capacity backend implements.

The decision logic lives in `balancer.policy`; a store only keeps the levels
(token and request buckets, cooldowns, circuit failures) and applies the policy
atomically with the reservation, so that concurrent requests, in this process
or in other replicas, never spend the same tokens twice.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from balancer.policy import Limits


@dataclass(frozen=True, slots=True)
class Grant:
    """Capacity reserved in one region; settle it exactly once."""

    model: str
    limits: Limits
    tokens: int  # reserved
    failures: int = 0  # the region's consecutive failures when picked: >0 means a success
    # must call record_success, so the common path costs no extra store round trip
    source: str = "shared"  # "local" when a degraded ResilientStore issued it from its
    # own buckets: it must be settled there even after the shared store is back

    @property
    def region(self) -> str:
        return self.limits.region


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing can serve now; `retry_after` seconds until the earliest region could."""

    retry_after: float


@dataclass(frozen=True, slots=True)
class RegionState:
    region: str
    tokens: float
    tokens_capacity: float
    requests: float
    requests_capacity: float
    cooldown_seconds: float  # remaining; 0 when usable
    circuit: str  # "closed" | "open" | "half_open"
    failures: int


class CapacityStore(Protocol):
    name: str  # "memory", "redis", ...

    async def acquire(
        self,
        model: str,
        candidates: Sequence[Limits],
        cost: int,
        r: float,
        exclude: Collection[str] = (),
    ) -> Grant | Wait:
        """Refill, pick a region (policy.pick with random number r) and reserve `cost`
        tokens and one request there, all atomically."""
        ...

    async def settle(self, grant: Grant, actual_tokens: int) -> None:
        """Charge the difference between the reservation and what was really used
        (a refund when negative). A refund never fills a bucket beyond capacity."""
        ...

    async def cooldown(self, model: str, limits: Limits, seconds: float) -> None:
        """The region said 429: no traffic for `seconds`, and its bucket is empty."""
        ...

    async def record_failure(
        self, model: str, limits: Limits, threshold: int, open_seconds: float
    ) -> bool:
        """Count a 5xx/timeout; at `threshold` consecutive failures the circuit opens
        (a cooldown of `open_seconds`). Returns True when this failure opened it."""
        ...

    async def record_success(self, model: str, limits: Limits) -> None:
        """Close the circuit: the consecutive-failure count goes back to zero."""
        ...

    async def snapshot(self, model: str, candidates: Sequence[Limits]) -> list[RegionState]: ...

    async def close(self) -> None: ...
