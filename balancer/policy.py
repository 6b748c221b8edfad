"""Selection policy: bucket math, weights and the weighted random choice.

Pure functions with no I/O and no clock, so every store backend (the memory
store here, the Lua script in Redis) applies exactly the same rules, and
hypothesis can check them. `capacity/lua/lib.lua` is a line-by-line port of
`refill`, `admissible`, `wait_seconds` and `pick`, for the Redis store.
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
# lowered it), and the effective capacity drops at once to what the region implies, but
# by at most half per refill window (one odd answer cannot wipe a region out). Without
# new evidence it creeps back additively, so a co-tenant that left is noticed, probing
# above the real quota only by the little regained since the last 429.
THROTTLE_TOLERANCE = 0.97  # implied share below this fraction of the factor is evidence
THROTTLE_MAX_CUT = 0.5  # the deepest decrease one refill window may make
DRIFT_DECREASE = 0.9  # factor kept when a region reports far fewer remaining tokens
LATENCY_SMOOTHING = 0.2  # EWMA weight of a new latency sample


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


def throttled_factor(factor: float, limits: Limits, share: float) -> float:
    """The factor after a 429 implying the region refills at `share` of its configured
    rate: unchanged unless that is clearly below the factor, else down to `share`, but
    by at most THROTTLE_MAX_CUT and never under the configured minimum."""
    if share >= factor * THROTTLE_TOLERANCE:
        return factor
    return max(limits.min_factor, factor * THROTTLE_MAX_CUT, share)


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
