"""Selection policy: bucket math, weights and the weighted random choice.

Pure functions with no I/O and no clock, so every store backend (the memory
store here, the Lua script in Redis) applies exactly the same rules, and
hypothesis can check them. `capacity/lua/lib.lua` is a line-by-line port of
`refill`, `admissible`, `wait_seconds`, `pick` and the learned-capacity arithmetic, for
the Redis store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Limits:
    """One region's limits for one model, in tokens and requests."""

    region: str
    tokens_capacity: float  # bucket size: the burst window's worth of TPM
    tokens_rate: float  # refill per second
    requests_capacity: float
    requests_rate: float
    weight: float = 1.0
    priority: int = 0
    # Learned capacity: the floor of the effective-capacity factor (1.0 turns learning
    # off) and how fast the factor recovers toward 1 without new evidence (per second).
    min_factor: float = 1.0
    recovery_rate: float = 0.0
    # Latency-aware weighting: the exponent on (fastest latency / this latency); 0 is off.
    latency_weight: float = 0.0


@dataclass(frozen=True, slots=True)
class Level:
    """A region's bucket levels and cooldown at one instant (after refill)."""

    tokens: float
    requests: float
    cooldown: float = 0.0  # seconds until the region may be used again
    latency: float = 0.0  # smoothed seconds per output token; 0 when unknown


# Learned capacity is AIMD, as TCP's congestion window. A 429 tells how long the region
# needs to refill what this request missed, so it implies the region's real refill rate:
# when that is clearly below what we assume, someone else shares the quota (or Azure
# lowered it), and the effective capacity drops at once below what the region implies
# (THROTTLE_BACKOFF), but by at most half per refill window (one odd answer cannot wipe a
# region out). Without new evidence it creeps back additively, so a co-tenant that left
# is noticed, probing above the real quota only by the little regained since the last cut.
#
# Not every region says how much it missed: some send remaining tokens only on successes,
# some only a whole-second retry-after. What every 429 does say is that the region could
# not admit the request at that moment, and the store counts what this gateway sent
# there since the previous one. Between two 429s the region refilled what it admitted
# plus the change of its level, which each 429 bounds (`Refusal`): so the tokens sent,
# over the time between, bound its real rate from above (`window_share`), whatever the
# headers, tighter the longer the window and exact where a 429 names remaining tokens or
# a precise wait. The bound holds while the region's bucket never filled within the
# window (a full bucket loses refill, which would read as a slow region):
# `window_usable` checks that from what the store saw.
THROTTLE_TOLERANCE = 0.97  # implied share below this fraction of the factor is evidence
THROTTLE_MAX_CUT = 0.5  # the deepest decrease one refill window may make
# A cut lands this far below what the evidence implies: the additive increase then takes
# a while to reach the real share again, so probing above it (a 429 each time) is rare.
# The region's unused refill meanwhile stays in its bucket and is spent when the factor
# overshoots, so the margin costs little delivered throughput.
THROTTLE_BACKOFF = 0.9
DRIFT_DECREASE = 0.9  # factor kept when a region reports far fewer remaining tokens
WINDOW_SPAN = 12.0  # longest window between two 429s, in refill windows (calm_seconds)
SATURATED = 0.9  # our bucket's highest level within a usable window, share of capacity
RESERVE = 0.5  # the most the region may have saved within a usable window, share of its
# (learned) capacity: beyond, its bucket may have filled
LATENCY_SMOOTHING = 0.2  # EWMA weight of a new latency sample


@dataclass(frozen=True, slots=True)
class Refusal:
    """What one 429 says of the region's token level L at that moment, as bounds linear
    in its unknown real refill rate r (tokens per second):
    low - r * low_wait <= L <= high - r * high_wait; and the refused request's place in
    the store's record (0: unknown): when it was reserved, on the store's clock (the
    region refused it later: window_end), and the bucket's count of tokens ever reserved
    there, its own included (what was reserved after it reached the region after it: a
    window beginning at this 429 counts that as sent, however late the 429 arrives)."""

    high: float
    high_wait: float
    low: float
    low_wait: float
    reserved_at: float = 0.0
    granted: float = 0.0


def effective(limits: Limits, factor: float) -> Limits:
    """The limits as learned: token capacity and refill scaled by `factor`."""
    if factor >= 1.0:
        return limits
    return replace(limits, tokens_capacity=limits.tokens_capacity * factor,
                   tokens_rate=limits.tokens_rate * factor)


def calm_seconds(limits: Limits) -> float:
    """After a decrease, how long further evidence is not counted again: the time the
    configured bucket takes to refill from empty. Throttles arriving within it answer
    requests admitted before the decrease took effect, so counting them would cut twice
    for one excess (as TCP halves its window once per round trip, not once per loss)."""
    return limits.tokens_capacity / limits.tokens_rate if limits.tokens_rate > 0 else 0.0


def recover(factor: float, elapsed: float, rate: float) -> float:
    """Additive increase toward 1 over `elapsed` seconds."""
    if elapsed > 0:
        factor += elapsed * rate
    return min(factor, 1.0)


def decrease(factor: float, limits: Limits, by: float) -> float:
    """Multiplicative decrease, floored at the configured minimum."""
    return max(limits.min_factor, factor * by)


def implied_share(limits: Limits, cost: float, wait: float, precision: float,
                  remaining: float | None, requests_left: float | None) -> float | None:
    """The region's real token refill as a share of its configured rate, as a 429
    implies it: it asks us to wait `wait` seconds for the tokens this request missed
    (its cost less the `remaining` tokens it reports; the whole cost when it does not
    say). The wait is taken less its header's `precision` (rounding), so the share is
    an upper bound and a region refilling at its configured rate never looks slow.
    None when the 429 says nothing about the token refill: the request-rate limit was
    hit, the region still had the tokens, or the wait is within its rounding."""
    missing = need(cost, limits.tokens_capacity) - (remaining or 0.0)
    measured = wait - precision
    if missing <= 0 or measured <= 0 or limits.tokens_rate <= 0 or requests_left == 0:
        return None
    return missing / (measured * limits.tokens_rate)


def refusal(limits: Limits, cost: float, wait: float, precision: float,
            remaining: float | None, requests_left: float | None) -> Refusal | None:
    """The bounds a 429 puts on the region's token level. Remaining tokens reported on
    it are the level (a whole count: within a token). Else the region refused `cost`, so
    it held less than that (and never less than nothing); a precise wait says more: the
    level reaches the cost after the true wait, within (wait - precision, wait]. None
    when the request-rate limit refused it (the tokens may well have been there)."""
    if remaining is not None:
        return Refusal(remaining + 1.0, 0.0, remaining - 1.0, 0.0)
    n = need(cost, limits.tokens_capacity)
    if requests_left == 0 or n <= 0:
        return None
    measured = wait - precision
    if measured > 0:
        return Refusal(n, measured, n, wait)
    return Refusal(n, 0.0, 0.0, 0.0)


def window_share(limits: Limits, span: float, sent: float, start: Refusal,
                 end: Refusal) -> float | None:
    """An upper bound on the region's real refill, as a share of the configured rate,
    from a window of `span` seconds between two 429s in which the region was sent `sent`
    tokens (admitted or still in flight): it refilled r * span = admitted + L_end -
    L_start, with L_start >= start.low - r * start.low_wait and L_end <= end.high -
    r * end.high_wait. None when the window says nothing (too short for the waits)."""
    refill = (span + end.high_wait - start.low_wait) * limits.tokens_rate
    if span <= 0 or refill <= 0:  # refill: what the configured rate fills in that time
        return None
    return (sent + end.high - start.low) / refill


def window_end(now: float, end: Refusal) -> float:
    """Where a window ending at `end` ends, on the store's clock: when its refused request
    was reserved (the region refused it later), else `now` (when the store learns it).
    A window begins when the store learns of its first 429, so it is never longer than
    the region's own: the bound it gives errs high, never low, however late 429s arrive."""
    return end.reserved_at if end.reserved_at > 0 else now


def window_turn(limits: Limits, now: float, older: float, newer: float) -> bool:
    """Whether a 429 at `now` begins a new window (the newer becoming the older, the
    older dropped), given when the two kept ones began (0: none): when the older is
    missing or too long to use, or the newer is a third of the longest span old. So
    while 429s come at most two thirds of the span apart, a window of at least a third
    of it is at hand at each."""
    span = WINDOW_SPAN * calm_seconds(limits)
    return older <= 0 or now - older > span or newer <= 0 or now - newer >= span / 3


def window_usable(limits: Limits, factor: float, span: float, peak: float, floor: float,
                  steady: float, share: float) -> bool:
    """Whether `window_share` holds: the region's bucket cannot have filled within the
    window. It spans at most WINDOW_SPAN refill windows; our bucket stayed low (peak: we
    were sending all our factor allowed, and a region refilling slower than that stays
    lower still); and while the factor was below `share` (at least `floor`, and rising at
    the recovery rate for the last `steady` seconds) the region could not have saved more
    than RESERVE of its capacity."""
    calm = calm_seconds(limits)
    if span > WINDOW_SPAN * calm or peak > SATURATED * limits.tokens_capacity * factor:
        return False
    return savings(limits, span, floor, steady, share) <= RESERVE * share * calm


def savings(limits: Limits, span: float, floor: float, steady: float, share: float) -> float:
    """The most refill (in seconds of the configured rate) a region refilling at `share`
    could have saved within a window while the factor was below it: at `floor` for the
    first span - steady seconds, then rising at the recovery rate."""
    gap = share - floor
    if gap <= 0:
        return 0.0
    rise = steady
    if limits.recovery_rate > 0:
        rise = min(steady, gap / limits.recovery_rate)
    return gap * (span - steady) + gap * rise - limits.recovery_rate * rise * rise / 2


def cut_target(factor: float, share: float) -> float | None:
    """The factor evidence of a `share` asks for: None unless clearly below the factor,
    else THROTTLE_BACKOFF below the share (`bounded` then limits the cut)."""
    if share >= factor * THROTTLE_TOLERANCE:
        return None
    return share * THROTTLE_BACKOFF


def bounded(limits: Limits, top: float, target: float) -> float:
    """A cut within one refill window goes at most THROTTLE_MAX_CUT below `top`, the
    factor when the window began, and never under the configured minimum."""
    return max(limits.min_factor, top * THROTTLE_MAX_CUT, target)


def smooth(average: float, sample: float) -> float:
    """Exponentially weighted moving average; the first sample starts it."""
    if average <= 0:
        return sample
    return average + LATENCY_SMOOTHING * (sample - average)


def latency_factor(latency: float, fastest: float, strength: float) -> float:
    """How much a region's weight shrinks for being slower than the fastest region:
    (fastest / latency) ** strength; 1 when either latency is unknown."""
    if strength <= 0 or latency <= 0 or fastest <= 0:
        return 1.0
    return (fastest / latency) ** strength


def refill(level: float, elapsed: float, rate: float, capacity: float) -> float:
    """Level after `elapsed` seconds. A level above capacity (the quota was lowered
    by a reload) is clamped; a negative level (debt from an oversized request) refills."""
    if elapsed > 0:
        level += elapsed * rate
    return min(level, capacity)


def need(cost: float, capacity: float) -> float:
    """Tokens a bucket must hold to admit `cost`. A request bigger than the whole bucket
    is admitted from a full bucket and leaves it in debt, else it could never pass."""
    return min(cost, capacity)


def admissible(level: Level, cost: float, limits: Limits) -> bool:
    return (
        level.cooldown <= 0
        and level.tokens >= need(cost, limits.tokens_capacity)
        and level.requests >= need(1, limits.requests_capacity)
    )


def wait_seconds(level: Level, cost: float, limits: Limits) -> float:
    """Seconds until `admissible` becomes true with no other traffic."""
    wait = max(level.cooldown, 0.0)
    short = need(cost, limits.tokens_capacity) - level.tokens
    if short > 0:
        wait = max(wait, short / limits.tokens_rate if limits.tokens_rate > 0 else math.inf)
    short = need(1, limits.requests_capacity) - level.requests
    if short > 0:
        wait = max(wait, short / limits.requests_rate if limits.requests_rate > 0 else math.inf)
    return wait


def weight(level: Level, limits: Limits) -> float:
    """Remaining capacity, scaled by the configured weight. The +1 keeps an admissible
    region with an empty bucket (a zero-cost request) selectable."""
    return (max(level.tokens, 0.0) + 1.0) * limits.weight


def choose(weights: Sequence[float], r: float) -> int:
    """Index picked with probability proportional to its weight, for r in [0, 1).
    Zero weights are never picked; returns -1 when all weights are zero."""
    total = 0.0
    for w in weights:  # left to right, as the Lua port adds (3.12's sum() compensates)
        if w > 0:
            total += w
    if total <= 0:
        return -1
    target = r * total
    last = -1
    for i, w in enumerate(weights):
        if w <= 0:
            continue
        last = i
        target -= w
        if target < 0:
            return i
    return last  # r close to 1 and float rounding


def pick(limits: Sequence[Limits], levels: Sequence[Level], cost: float, r: float) -> int:
    """The region to use: among the best priority tier with any admissible region,
    a weighted random choice by remaining capacity. -1 if nothing can serve now."""
    tiers = sorted({lim.priority for lim in limits})
    for tier in tiers:
        ok = [lim.priority == tier and admissible(lev, cost, lim)
              for lim, lev in zip(limits, levels, strict=True)]
        fastest = 0.0
        for i, lev in enumerate(levels):
            if ok[i] and lev.latency > 0 and (fastest <= 0 or lev.latency < fastest):
                fastest = lev.latency
        weights = [
            weight(lev, lim) * latency_factor(lev.latency, fastest, lim.latency_weight)
            if ok[i] else 0.0
            for i, (lim, lev) in enumerate(zip(limits, levels, strict=True))
        ]
        index = choose(weights, r)
        if index >= 0:
            return index
    return -1


def retry_after(limits: Sequence[Limits], levels: Sequence[Level], cost: float) -> float:
    """Seconds until the earliest region could admit `cost` (refill or cooldown end)."""
    waits = [wait_seconds(lev, cost, lim) for lim, lev in zip(limits, levels, strict=True)]
    return min(waits, default=math.inf)


def total_rate(limits: Sequence[Limits]) -> float:
    """The pool's refill: every region's token rate, summed left to right (as Lua)."""
    rate = 0.0
    for lim in limits:
        rate = rate + lim.tokens_rate
    return rate


def queue_wait(ahead_cost: float, cost: float, limits: Sequence[Limits],
               levels: Sequence[Level]) -> float:
    """Seconds until the requests queued ahead (`ahead_cost` tokens) and this one could
    all be served, if every region's refill went to them: how long a waiter sleeps
    before it asks again, so waiting never spins on the store."""
    rate = 0.0
    have = 0.0
    for lim, lev in zip(limits, levels, strict=True):
        rate += lim.tokens_rate
        have += max(lev.tokens, 0.0)
    short = ahead_cost + cost - have
    if short <= 0:
        return 0.0
    return short / rate if rate > 0 else math.inf
