"""In-process capacity store: one replica's view, for the embedded default and tests.

Every operation runs without awaiting, so on one event loop it is atomic by
construction; no lock is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from balancer import policy
from balancer.capacity.base import ClientState, Grant, Pin, Queueing, RegionState, Wait, state_of
from balancer.capacity.tenants import ClientBook
from balancer.policy import Level, Limits, Refusal
from balancer.tenancy import ClientLimits

# Pins live as long as upstream retention (30 days): without a bound, one replica's
# memory would grow with every response it creates for that long. Beyond it the oldest
# pins go first (their follow-ups are the least likely); a Redis-backed gateway keeps
# its pins in Redis and holds here only those made while Redis was down.
MAX_PINS = 200_000


@dataclass(slots=True)
class _Window:
    """The stretch since one 429 (policy.window_share): when it began (0: none), the
    bucket's `granted` as the refused request left it, settle corrections of grants made
    since, the lower bound of that 429 (policy.Refusal), our bucket's highest level and
    the lowest factor since."""

    start: float = 0.0
    granted: float = 0.0
    adjust: float = 0.0
    low: float = 0.0
    low_wait: float = 0.0
    peak: float = 0.0
    floor: float = 1.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    requests: float
    stamp: float  # when the levels were last refilled
    cooldown_until: float = 0.0
    failures: int = 0
    tripped: bool = False  # the circuit opened and has not seen a success since
    factor: float = 1.0  # learned share of the configured token capacity
    latency: float = 0.0  # smoothed seconds per output token
    calm_until: float = 0.0  # no new decrease of the factor before this time
    # Learned capacity from 429s (policy.window_share): tokens reserved here ever, our
    # highest level since the last 429, the factor when the refill window of the last
    # cut began, when that cut was made, and two windows since a 429 (older, newer).
    granted: float = 0.0
    peak: float = 0.0
    calm_top: float = 1.0
    cut_at: float = 0.0
    older: _Window = field(default_factory=_Window)
    newer: _Window = field(default_factory=_Window)


@dataclass(slots=True)
class _Ticket:
    order: float  # arrival minus the class's boost: lower is served first
    deadline: float
    cost: int


class MemoryStore:
    name = "memory"
    degraded = False  # nothing shared to lose
    replicas = 1  # one replica's view

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 max_pins: int = MAX_PINS, wall: Callable[[], float] = time.time):
        self._clock = clock
        self._wall = wall  # calendar periods of client quotas (UTC days and months)
        self._clients: dict[str, ClientBook] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._queues: dict[str, dict[str, _Ticket]] = {}
        # response id -> (pin, expiry by the clock), oldest insertion first. An
        # OrderedDict, since popping a plain dict's first item again and again
        # degrades to a scan over the deleted slots.
        self._pins: OrderedDict[str, tuple[Pin, float]] = OrderedDict()
        self._max_pins = max_pins

    def _bucket(self, model: str, limits: Limits, now: float) -> tuple[_Bucket, Limits]:
        """The region's bucket refilled up to `now` (a new one starts full), and its
        effective limits (the configured ones scaled by the learned factor)."""
        key = (model, limits.region)
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(limits.tokens_capacity, limits.requests_capacity, now,
                        peak=limits.tokens_capacity)
            self._buckets[key] = b
            return b, limits
        elapsed = now - b.stamp
        b.factor = policy.recover(b.factor, elapsed, limits.recovery_rate)
        eff = policy.effective(limits, b.factor)
        b.tokens = policy.refill(b.tokens, elapsed, eff.tokens_rate, eff.tokens_capacity)
        b.requests = policy.refill(b.requests, elapsed, eff.requests_rate, eff.requests_capacity)
        b.peak = max(b.peak, b.tokens)
        b.stamp = now
        return b, eff

    def _level(self, b: _Bucket, now: float) -> Level:
        return Level(b.tokens, b.requests, max(0.0, b.cooldown_until - now), b.latency)

    async def acquire(self, model: str, candidates: Sequence[Limits], cost: int, r: float,
                      exclude: Collection[str] = (), queue: Queueing | None = None,
                      client: ClientLimits | None = None, demand: bool = True
                      ) -> Grant | Wait:
        now = self._clock()
        usable = [c for c in candidates if c.region not in exclude]
        loaded = [self._bucket(model, c, now) for c in usable]
        effs = [eff for _, eff in loaded]
        levels = [self._level(b, now) for b, _ in loaded]
        admission = None
        if client is not None:
            book = self._clients.setdefault(model, ClientBook())
            admission = book.admit(client, cost, demand, now, self._wall(),
                                   policy.total_rate(effs))
            if admission.refused not in (None, "fair_share"):  # its own budget: no queue
                if queue is not None:
                    self._queues.get(model, {}).pop(queue.ticket, None)
                return Wait(admission.wait, reason=admission.refused)
        held = admission is not None and admission.refused == "fair_share"
        ahead: list[_Ticket] = []
        if queue is not None:
            waiting = self._waiting(model, now)
            mine = waiting.get(queue.ticket)
            if mine is not None:
                order = mine.order
            elif admission is not None and admission.start is not None:
                order = admission.start - queue.boost  # weighted fair queuing
            else:
                order = now - queue.boost
            ahead = [t for name, t in waiting.items() if t.order < order]
        index = policy.pick(effs, levels, cost, r) if not ahead and not held else -1
        if index >= 0:
            if queue is not None:
                self._queues[model].pop(queue.ticket, None)
            b = loaded[index][0]
            b.tokens -= cost
            b.requests -= 1
            b.granted += cost
            budget = ClientBook.charge(client, admission, cost) if client and admission else None
            return Grant(model, usable[index], cost, b.failures, level=b.tokens,
                         granted=b.granted, at=now, client=client, budget=budget)
        reason = "capacity"
        wait = policy.retry_after(effs, levels, cost)
        if held:
            assert admission is not None
            reason, wait = "fair_share", max(wait, admission.wait)
        if queue is None:
            return Wait(wait, reason=reason)
        if ahead:
            wait = max(wait, policy.queue_wait(sum(t.cost for t in ahead), cost, effs, levels))
        if queue.budget <= 0:
            waiting.pop(queue.ticket, None)
            return Wait(wait, len(ahead), reason=reason)
        waiting[queue.ticket] = _Ticket(order, now + queue.budget, cost)
        return Wait(wait, len(ahead), queued=True, reason=reason)

    def _waiting(self, model: str, now: float) -> dict[str, _Ticket]:
        """The model's queue, without waiters whose deadline passed (crashed or gone)."""
        waiting = self._queues.setdefault(model, {})
        for name in [name for name, t in waiting.items() if t.deadline < now]:
            del waiting[name]
        return waiting

    async def dequeue(self, model: str, ticket: str) -> None:
        self._queues.get(model, {}).pop(ticket, None)

    async def settle(self, grant: Grant, actual_tokens: int, latency: float | None = None
                     ) -> None:
        b, eff = self._bucket(grant.model, grant.limits, self._clock())
        delta = actual_tokens - grant.tokens
        b.tokens = min(b.tokens - delta, eff.tokens_capacity)
        if latency is not None and latency > 0:
            b.latency = policy.smooth(b.latency, latency)
        if delta != 0:  # what the windows begun before this grant count as sent
            for w in (b.older, b.newer):
                if w.start > 0 and grant.granted > w.granted:
                    w.adjust += delta
        if grant.client is not None and delta != 0:
            self._clients.setdefault(grant.model, ClientBook()).settle(
                grant.client, delta, self._clock(), self._wall())

    async def cooldown(self, model: str, limits: Limits, seconds: float, *,
                       share: float | None = None, refusal: Refusal | None = None) -> None:
        now = self._clock()
        b, _ = self._bucket(model, limits, now)
        target = None
        if share is not None and now >= b.calm_until:  # one reading per refill window
            target = policy.cut_target(b.factor, share)
        if refusal is not None:
            for w in (b.older, b.newer):
                bound = self._window_target(b, w, limits, now, refusal)
                if bound is not None and (target is None or bound < target):
                    target = bound
        if target is not None:
            self._shrink(b, limits, now, target)
        b.cooldown_until = max(b.cooldown_until, now + seconds)
        b.tokens = min(b.tokens, 0.0)  # the region told us it is empty
        b.older.peak = max(b.older.peak, b.peak)
        b.newer.peak = max(b.newer.peak, b.peak)
        # A new window begins here unless the newer one is young and the older still
        # usable: the longer a window, the tighter its bound.
        if refusal is not None and policy.window_turn(limits, now, b.older.start,
                                                      b.newer.start):
            since = refusal.granted if refusal.granted > 0 else b.granted
            b.older = b.newer
            b.newer = _Window(now, since, 0.0, refusal.low, refusal.low_wait, b.tokens,
                              b.factor)
        b.peak = b.tokens

    @staticmethod
    def _window_target(b: _Bucket, w: _Window, limits: Limits, now: float,
                       refusal: Refusal) -> float | None:
        """The factor the window since `w`'s 429 asks for, ending at this 429."""
        if w.start <= 0:
            return None
        end = policy.window_end(now, refusal)
        span = end - w.start
        share = policy.window_share(limits, span, b.granted - w.granted + w.adjust,
                                    Refusal(0.0, 0.0, w.low, w.low_wait), refusal)
        if share is None or not policy.window_usable(
                limits, b.factor, span, max(w.peak, b.peak), w.floor,
                max(0.0, end - max(w.start, b.cut_at)), share):
            return None
        return policy.cut_target(b.factor, share)

    async def observe(self, model: str, limits: Limits, remaining: float) -> None:
        now = self._clock()
        b, _ = self._bucket(model, limits, now)
        if remaining < b.tokens:
            b.tokens = remaining
            if now >= b.calm_until:  # a relative cut: once per refill window
                self._shrink(b, limits, now,
                             policy.decrease(b.factor, limits, policy.DRIFT_DECREASE))

    @staticmethod
    def _shrink(b: _Bucket, limits: Limits, now: float, target: float) -> None:
        """Lower the factor toward `target`, by at most THROTTLE_MAX_CUT within one
        refill window (policy.bounded)."""
        fresh = now >= b.calm_until  # a new refill window begins with this cut
        factor = policy.bounded(limits, b.factor if fresh else b.calm_top, target)
        if factor < b.factor:
            if fresh:
                b.calm_top = b.factor
                b.calm_until = now + policy.calm_seconds(limits)
            b.factor = factor
            b.cut_at = now
            b.older.floor = min(b.older.floor, factor)
            b.newer.floor = min(b.newer.floor, factor)

    async def record_failure(
        self, model: str, limits: Limits, threshold: int, open_seconds: float
    ) -> bool:
        now = self._clock()
        b, _ = self._bucket(model, limits, now)
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
            b, eff = self._bucket(model, c, now)
            out.append(state_of(eff, self._level(b, now), b.failures, b.tripped, b.factor))
        return out

    def carry_usage(self, model: str, client: ClientLimits, day_used: float,
                    month_used: float, wall: float) -> None:
        """The client's quotas used so far today and this month, as counted elsewhere at
        `wall` (ResilientStore: the shared store's count when it became unreachable)."""
        self._clients.setdefault(model, ClientBook()).carry(
            client, day_used, month_used, self._clock(), wall)

    async def clients(self, model: str, clients: Sequence[ClientLimits]) -> list[ClientState]:
        book = self._clients.setdefault(model, ClientBook())
        now, wall = self._clock(), self._wall()
        return [book.state(c, now, wall) for c in clients]

    async def pin(self, response_id: str, pin: Pin, ttl_seconds: float) -> None:
        now = self._clock()
        pins = self._pins
        pins.pop(response_id, None)  # an overwrite counts as the newest insertion
        pins[response_id] = (pin, now + ttl_seconds)
        # Drop what has expired at the old end (cheap, and the usual way pins go), then
        # whatever the bound still forbids.
        while pins and (len(pins) > self._max_pins or next(iter(pins.values()))[1] <= now):
            pins.popitem(last=False)

    async def pinned(self, response_id: str) -> Pin | None:
        entry = self._pins.get(response_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._pins[response_id]
            return None
        return entry[0]

    async def unpin(self, response_id: str) -> None:
        self._pins.pop(response_id, None)

    async def start(self) -> None:
        pass  # nothing to connect

    async def close(self) -> None:
        self._buckets.clear()
        self._queues.clear()
        self._clients.clear()
        self._pins.clear()

