"""Clients of the pool: their own budgets, and a fair share when the pool runs short.

Pure functions with no I/O and no clock, as `policy`: every store backend applies the
same rules, in the same round trip as the region choice (`capacity/lua/tenants.lua`
is a line-by-line port of this module for the Redis store).

A client's **budget** per model is a token bucket (`tpm`), a request bucket (`rpm`)
and token quotas per UTC day and month. A reservation is charged to them with the
region's, and settled with it, so a client is charged what the region charged.

Its **fair share** is weighted max-min fairness over the pool's refill rate: every
client with recent demand is offered `weight` parts of the pool; one asking less than
that gets what it asks, and what it leaves is split among the others, again by weight
(water-filling). Demand and usage are exponentially decayed sums of tokens over
`fair_window` seconds, kept per client in the store, so every replica sees the same.
A client asking more than its share is held to it; a client asking less is never
checked. While any active client asks less than its share, the others are held
`fair_headroom` below theirs, so the pool keeps tokens for the modest client's next
request (a pool drained to zero would refuse it however fair the rates were).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from balancer.policy import need

DAY = 86400.0
MIN_ACTIVE = 1.0  # decayed demand (tokens) below which a client counts as gone
# How far ahead of now a client's virtual time may run in the admission queue, in
# fair windows: a client that asked far beyond its share waits behind the others, but
# its lead does not grow without bound (it asked; it did not use).
MAX_LEAD_WINDOWS = 10.0


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """One client's limits on one model, as the store applies them (0: no such limit).
    Rates are per second of the store's clock (time_scale applied), as `policy.Limits`."""

    name: str
    weight: float = 1.0
    tokens_capacity: float = 0.0  # the tpm bucket: burst_seconds of tpm
    tokens_rate: float = 0.0
    requests_capacity: float = 0.0  # the rpm bucket
    requests_rate: float = 0.0
    tokens_per_day: float = 0.0
    tokens_per_month: float = 0.0
    fair_window: float = 0.0  # seconds of demand and usage kept; 0: fair share off
    fair_headroom: float = 0.0  # share of the pool kept free for clients under theirs

    @property
    def budgeted(self) -> bool:
        return bool(self.tokens_capacity or self.requests_capacity or
                    self.tokens_per_day or self.tokens_per_month)


@dataclass(frozen=True, slots=True)
class Budget:
    """A client's budget levels at one instant (after refill and period roll-over)."""

    tokens: float  # in the tpm bucket
    requests: float  # in the rpm bucket
    day_used: float
    month_used: float


@dataclass(frozen=True, slots=True)
class Share:
    """One client's fair-share state at one instant (decayed to then)."""

    name: str
    weight: float
    demand: float  # tokens asked within about one fair window (decayed sum)
    used: float  # tokens granted within about one fair window (decayed sum)


# -- budgets --------------------------------------------------------------------------


def day_of(now: float) -> float:
    """The UTC day number of a Unix time."""
    return math.floor(now / DAY)


def civil(days: float) -> tuple[int, int]:
    """(year, month) of a day number since 1970-01-01 (Howard Hinnant's civil_from_days;
    Redis's Lua has no os.date)."""
    z = int(days) + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month


def days_from_civil(year: int, month: int) -> int:
    """The day number of the first of `month` (Hinnant's days_from_civil)."""
    y = year - 1 if month <= 2 else year
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    mp = month + 9 if month <= 2 else month - 3
    doy = (153 * mp + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def month_of(now: float) -> int:
    """A month number (year * 12 + month - 1) of a Unix time, UTC."""
    year, month = civil(day_of(now))
    return year * 12 + month - 1


def day_reset(now: float) -> float:
    """Seconds until the next UTC midnight."""
    return (day_of(now) + 1) * DAY - now


def month_reset(now: float) -> float:
    """Seconds until the first of next month, UTC."""
    year, month = civil(day_of(now))
    if month == 12:
        year, month = year + 1, 1
    else:
        month += 1
    return days_from_civil(year, month) * DAY - now


def refusal(limits: ClientLimits, budget: Budget, cost: float) -> tuple[str, float] | None:
    """The rate budget that refuses `cost` tokens now and the seconds until it would
    not, or None. Checked in order rpm, tpm (then `quota_refusal`): the first to refuse
    is named."""
    if limits.requests_capacity > 0:
        short = need(1.0, limits.requests_capacity) - budget.requests
        if short > 0:
            return "rpm", short / limits.requests_rate if limits.requests_rate > 0 else math.inf
    if limits.tokens_capacity > 0:
        short = need(cost, limits.tokens_capacity) - budget.tokens
        if short > 0:
            return "tpm", short / limits.tokens_rate if limits.tokens_rate > 0 else math.inf
    return None


def quota_refusal(limits: ClientLimits, budget: Budget, cost: float, wall: float
                  ) -> tuple[str, float] | None:
    """The day or month quota that `cost` more tokens would exceed, and the seconds until
    it resets, or None. Quotas follow the calendar (UTC): their periods are read from
    `wall` (Unix time) and are not compressed by time_scale."""
    if limits.tokens_per_day > 0 and budget.day_used + cost > limits.tokens_per_day:
        return "day", day_reset(wall)
    if limits.tokens_per_month > 0 and budget.month_used + cost > limits.tokens_per_month:
        return "month", month_reset(wall)
    return None


# -- fair share -----------------------------------------------------------------------


def decay(value: float, elapsed: float, window: float) -> float:
    """A decayed sum `elapsed` seconds later (time constant `window`)."""
    if elapsed > 0 and window > 0:
        return value * math.exp(-elapsed / window)
    return value


def total(values: Sequence[float]) -> float:
    """A plain left-to-right sum, as the Lua port's loop (sum() may differ from it in
    the last bit on other Pythons)."""
    out = 0.0
    for v in values:
        out = out + v
    return out


def shares(demands: Sequence[float], weights: Sequence[float], capacity: float
           ) -> list[float]:
    """Weighted max-min fair allocation of `capacity` among demands (water-filling): each
    gets min(its demand, weight x level), the level set so the allocations fill the
    capacity, or every demand when they fit. Index-aligned with `demands`."""
    n = len(demands)
    out = [0.0] * n
    left = capacity
    open_ = [i for i in range(n) if weights[i] > 0]
    while open_:
        level = left / total([weights[i] for i in open_])
        satisfied = [i for i in open_ if demands[i] <= weights[i] * level]
        if not satisfied:
            for i in open_:
                out[i] = weights[i] * level
            return out
        for i in satisfied:
            out[i] = demands[i]
            left = left - demands[i]
        open_ = [i for i in open_ if demands[i] > weights[i] * level]
    return out


def fair_cap(clients: Sequence[Share], me: int, pool_rate: float, window: float,
             headroom: float) -> float | None:
    """The tokens client `me` may have used within the window (its decayed `used`) and
    still be granted more, or None when it is not held: fewer than two active clients,
    demand that fits the pool, or a client asking no more than its share. Rates are
    decayed sums over `window` (tokens per window), the pool's too."""
    active = [i for i in range(len(clients)) if clients[i].demand >= MIN_ACTIVE]
    if len(active) < 2 or me not in active:
        return None
    capacity = pool_rate * window
    demands = [clients[i].demand for i in active]
    if total(demands) <= capacity:
        return None
    alloc = shares(demands, [clients[i].weight for i in active], capacity)
    mine = active.index(me)
    if demands[mine] <= alloc[mine]:
        return None  # asks no more than its share: never held
    cap = alloc[mine]
    for k in range(len(active)):
        if demands[k] <= alloc[k]:  # someone asks less: keep room for its next request
            return cap * (1.0 - headroom)
    return cap


def fair_wait(used: float, cap: float, cost: float, window: float) -> float:
    """Seconds until a client held at `cap` (decayed tokens used) may take `cost` more:
    until its decayed usage has fallen to cap - cost (a whole window when the cost alone
    exceeds the cap)."""
    room = cap - cost
    if used <= room:
        return 0.0
    if room <= 0 or used <= 0:
        return window
    return window * math.log(used / room)


def fair_refuses(used: float, cap: float | None, cost: float) -> bool:
    """Whether a held client's next `cost` tokens exceed its share (decayed usage)."""
    return cap is not None and used + cost > cap


def virtual_start(now: float, clock: float, window: float) -> float:
    """Where a client's next request starts in the admission queue's weighted fair
    queuing: at its virtual clock, never before now nor more than MAX_LEAD_WINDOWS ahead."""
    return min(max(now, clock), now + MAX_LEAD_WINDOWS * window)


def virtual_advance(start: float, cost: float, weight: float, pool_rate: float,
                    active_weight: float) -> float:
    """A client's virtual clock after a request of `cost` starting at `start`: the time
    its weighted part of the pool takes to serve it."""
    rate = pool_rate * weight / active_weight if active_weight > 0 else pool_rate
    if rate <= 0:
        return start
    return start + cost / rate
