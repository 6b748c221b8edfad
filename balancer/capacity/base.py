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

from balancer.policy import Level, Limits, Refusal
from balancer.tenancy import Budget, ClientLimits


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
    level: float = 0.0  # tokens left in the bucket right after this reservation: compared
    # with what the region reports remaining, it reveals consumers the gateway cannot see
    granted: float = 0.0  # the bucket's count of tokens ever reserved, this grant's
    # included: tells whether a learned-capacity window began before it (settle)
    at: float = 0.0  # when it was reserved, on the store's clock (policy.Refusal.reserved_at)
    client: ClientLimits | None = None  # charged too: settle charges or refunds it as well
    budget: Budget | None = None  # the client's budget levels right after this reservation

    @property
    def region(self) -> str:
        return self.limits.region


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing can serve now; `retry_after` seconds until the earliest region could
    (or, for a queued request, until its turn could come)."""

    retry_after: float
    position: int = 0  # requests queued ahead of this one
    queued: bool = False  # this request holds a place in the model's admission queue
    # What refused: "capacity" (no region can take it), the client's own budget ("rpm",
    # "tpm", "day", "month") or its fair share of a pool that runs short ("fair_share").
    reason: str = "capacity"


@dataclass(frozen=True, slots=True)
class Queueing:
    """A request that may wait for capacity in the model's admission queue, shared by
    every replica. Waiters are served in order of arrival minus `boost`: a higher
    priority class counts as having arrived earlier, but only by a bounded time, so a
    lower class is never starved."""

    ticket: str  # unique per request, kept across its attempts
    boost: float  # seconds of head start: its priority class's, plus the time it has
    # already waited (a request back from a region's 429 keeps its place)
    budget: float  # seconds it may still wait; 0: do not wait (but do not jump the queue)


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
    factor: float = 1.0  # learned share of the configured token capacity (1: all of it)
    latency: float = 0.0  # smoothed seconds per output token (0: no sample yet)


@dataclass(frozen=True, slots=True)
class ClientState:
    """A client's budget levels and fair-share sums on one model, refilled to now."""

    name: str
    budget: Budget
    demand: float  # decayed tokens asked within about one fair window
    used: float  # decayed tokens granted within about one fair window


@dataclass(frozen=True, slots=True)
class Pin:
    """Where a stored response lives: the model group and region that created it, and
    its context (input + output tokens), which a continuation re-reads as input."""

    model: str
    region: str
    tokens: int = 0


class CapacityStore(Protocol):
    """Every backend offers all of this; callers never probe for optional parts."""

    name: str  # "memory", "redis", "redis-cluster"

    @property
    def degraded(self) -> bool:
        """Serving from local buckets because the shared store does not answer."""
        ...

    @property
    def replicas(self) -> int:
        """Gateway replicas sharing the store (1 when there is nothing to share)."""
        ...

    async def start(self) -> None:
        """Connect and start background work, once the event loop runs."""
        ...

    async def acquire(self, model: str, candidates: Sequence[Limits], cost: int, r: float,
                      exclude: Collection[str] = (), queue: Queueing | None = None,
                      client: ClientLimits | None = None, demand: bool = True
                      ) -> Grant | Wait:
        """Refill, pick a region (policy.pick with random number r) and reserve `cost`
        tokens and one request there, all atomically. With `queue`, a request never
        overtakes waiters queued ahead of it, and takes (or keeps) a place in the queue
        when it cannot be served and has budget left. With `client`, the same round trip
        checks and charges its budget (`tenancy.refusal`, `tenancy.quota_refusal`) and
        holds it to its fair share (`tenancy.fair_cap`); `demand` counts the cost as asked
        (a request's first call: not its retries nor its waits in the queue)."""
        ...

    async def dequeue(self, model: str, ticket: str) -> None:
        """Give up a place in the queue (the waiter reached its deadline)."""
        ...

    async def settle(self, grant: Grant, actual_tokens: int, latency: float | None = None
                     ) -> None:
        """Charge the difference between the reservation and what was really used
        (a refund when negative). A refund never fills a bucket beyond capacity.
        `latency` (seconds per output token) feeds the region's smoothed latency."""
        ...

    async def cooldown(self, model: str, limits: Limits, seconds: float, *,
                       share: float | None = None, refusal: Refusal | None = None) -> None:
        """The region said 429: no traffic for `seconds`, and its bucket is empty. `share`
        is the refill rate the 429 implies, as a share of the configured one (read at most
        once per refill window); `refusal` bounds the region's level at this 429, and with
        the previous 429s' and the tokens reserved there since, bounds its real rate
        (`policy.window_share`). Evidence well below the learned factor shrinks the
        region's effective capacity (`policy.cut_target`, `policy.bounded`)."""
        ...

    async def observe(self, model: str, limits: Limits, remaining: float) -> None:
        """The region reported `remaining` tokens, fewer than the bucket holds: bring the
        bucket down to it, and with learning on shrink the effective capacity a little."""
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

    async def snapshot(self, model: str, candidates: Sequence[Limits]) -> list[RegionState]:
        """Every candidate's state refilled to now, without changing it."""
        ...

    async def clients(self, model: str, clients: Sequence[ClientLimits]) -> list[ClientState]:
        """Each client's budget and fair-share state on `model`, refilled to now, without
        changing it (index-aligned with `clients`)."""
        ...

    # -- response affinity: a stored response (Responses API) lives in the region that
    # created it, so every follow-up call must go there, from whichever replica.

    async def pin(self, response_id: str, pin: Pin, ttl_seconds: float) -> None:
        """Remember where `response_id` lives (overwriting), for `ttl_seconds` (the
        upstream retention)."""
        ...

    async def pinned(self, response_id: str) -> Pin | None:
        """Where `response_id` lives; None when unknown or expired."""
        ...

    async def unpin(self, response_id: str) -> None:
        """Forget `response_id` (the response was deleted)."""
        ...

    async def close(self) -> None:
        """Stop background work and release connections."""
        ...


def state_of(limits: Limits, level: Level, failures: int, tripped: bool, factor: float = 1.0
             ) -> RegionState:
    """A region's state for /regions and the gauges, from its effective limits and level."""
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
        factor=factor,
        latency=level.latency,
    )
