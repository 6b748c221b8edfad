"""The memory store's clients: each model's client budgets and fair-share sums, and the
steps `acquire` and `settle` take on them (lua/tenants.lua does the same in Redis)."""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer import policy, tenancy
from balancer.capacity.base import ClientState
from balancer.tenancy import Budget, ClientLimits, Share


@dataclass(slots=True)
class _Budget:
    tokens: float
    requests: float
    stamp: float
    day: float = 0.0
    day_used: float = 0.0
    month: float = 0.0
    month_used: float = 0.0


@dataclass(slots=True)
class _Fair:
    demand: float = 0.0
    used: float = 0.0
    stamp: float = 0.0
    weight: float = 1.0
    clock: float = 0.0  # virtual time of the admission queue's weighted fair queuing


@dataclass(slots=True)
class Admission:
    """What one acquire learned of its client: budget levels, the limit that refuses
    it (and for how long), and where its request goes in the queue."""

    budget: _Budget
    fair: _Fair | None
    refused: str | None = None
    wait: float = 0.0
    start: float | None = None  # its virtual start (weighted fair queuing), when new


@dataclass
class ClientBook:
    """One model's clients."""

    budgets: dict[str, _Budget] = field(default_factory=dict)
    fair: dict[str, _Fair] = field(default_factory=dict)

    def budget(self, c: ClientLimits, now: float, wall: float) -> _Budget:
        """The client's budget refilled to `now`, its periods rolled over by `wall`."""
        b = self.budgets.get(c.name)
        if b is None:
            b = self.budgets[c.name] = _Budget(c.tokens_capacity, c.requests_capacity, now)
        elapsed = now - b.stamp
        b.tokens = policy.refill(b.tokens, elapsed, c.tokens_rate, c.tokens_capacity)
        b.requests = policy.refill(b.requests, elapsed, c.requests_rate, c.requests_capacity)
        b.stamp = now
        day, month = tenancy.day_of(wall), tenancy.month_of(wall)
        if b.day != day:
            b.day, b.day_used = day, 0.0
        if b.month != month:
            b.month, b.month_used = month, 0.0
        return b

    def carry(self, c: ClientLimits, day_used: float, month_used: float, now: float,
              wall: float) -> None:
        """Start the client's day and month quotas from usage counted elsewhere at `wall`
        (the shared store's, before it became unreachable) instead of from zero. Never
        lowers a count this book already has for the same day or month; a later day or
        month rolls them over as usual."""
        b = self.budget(c, now, wall)
        b.day_used, b.month_used = max(b.day_used, day_used), max(b.month_used, month_used)

    def shares(self, now: float, window: float) -> list[Share]:
        """Every client's fair-share sums decayed to `now` (in insertion order, which
        both backends' water-filling does not depend on: it sums in index order, so the
        Redis store sorts by name; so does this)."""
        out = []
        for name in sorted(self.fair):
            f = self.fair[name]
            elapsed = now - f.stamp
            out.append(Share(name, f.weight, tenancy.decay(f.demand, elapsed, window),
                             tenancy.decay(f.used, elapsed, window)))
        return out

    def admit(self, c: ClientLimits, cost: float, demand: bool, now: float, wall: float,
              pool_rate: float) -> Admission:
        """Check the client's budget and fair share for a request of `cost` (counting
        it as asked when `demand`)."""
        b = self.budget(c, now, wall)
        # Over its own budget, a request is not demand on the pool: the client could
        # not use the share it would claim.
        verdict = tenancy.refusal(c, _levels(b), cost) or \
            tenancy.quota_refusal(c, _levels(b), cost, wall)
        if verdict is not None:
            return Admission(b, None, verdict[0], verdict[1])
        if c.fair_window <= 0:
            return Admission(b, None)
        fair = self._fair(c, now)
        if demand:
            fair.demand += cost
        book = self.shares(now, c.fair_window)
        me = [s.name for s in book].index(c.name)
        cap = tenancy.fair_cap(book, me, pool_rate, c.fair_window, c.fair_headroom)
        start = None
        if demand:
            active = [s for s in book if s.demand >= tenancy.MIN_ACTIVE]
            start = tenancy.virtual_start(now, fair.clock, c.fair_window)
            fair.clock = tenancy.virtual_advance(start, cost, c.weight, pool_rate,
                                                 tenancy.total([s.weight for s in active]))
        if cap is not None and tenancy.fair_refuses(fair.used, cap, cost):
            return Admission(b, fair, "fair_share",
                             tenancy.fair_wait(fair.used, cap, cost, c.fair_window), start)
        return Admission(b, fair, None, 0.0, start)

    def _fair(self, c: ClientLimits, now: float) -> _Fair:
        f = self.fair.get(c.name)
        if f is None:
            f = self.fair[c.name] = _Fair(stamp=now, clock=now)
        elapsed = now - f.stamp
        f.demand = tenancy.decay(f.demand, elapsed, c.fair_window)
        f.used = tenancy.decay(f.used, elapsed, c.fair_window)
        f.stamp, f.weight = now, c.weight
        return f

    @staticmethod
    def charge(c: ClientLimits, a: Admission, cost: float) -> Budget:
        """Reserve `cost` on the client's budget and usage; its levels after. Buckets
        the client has no budget for stay empty."""
        b = a.budget
        if c.tokens_capacity > 0:
            b.tokens -= cost
        if c.requests_capacity > 0:
            b.requests -= 1
        b.day_used += cost
        b.month_used += cost
        if a.fair is not None:
            a.fair.used += cost
        return _levels(b)

    def settle(self, c: ClientLimits, delta: float, now: float, wall: float) -> None:
        """Charge a reservation's correction (a refund when negative)."""
        b = self.budget(c, now, wall)
        if c.tokens_capacity > 0:
            b.tokens = min(b.tokens - delta, c.tokens_capacity)
        b.day_used = max(0.0, b.day_used + delta)
        b.month_used = max(0.0, b.month_used + delta)
        if c.fair_window > 0:
            f = self._fair(c, now)
            f.used = max(0.0, f.used + delta)

    def state(self, c: ClientLimits, now: float, wall: float) -> ClientState:
        b = self.budget(c, now, wall)
        f = self.fair.get(c.name)
        demand = used = 0.0
        if f is not None and c.fair_window > 0:
            demand = tenancy.decay(f.demand, now - f.stamp, c.fair_window)
            used = tenancy.decay(f.used, now - f.stamp, c.fair_window)
        return ClientState(c.name, _levels(b), demand, used)


def _levels(b: _Budget) -> Budget:
    return Budget(b.tokens, b.requests, b.day_used, b.month_used)
