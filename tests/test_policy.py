"""The pure selection policy, property-tested."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer import policy
from balancer.policy import Level, Limits


def lim(region: str, tokens: float = 1000, priority: int = 0, weight: float = 1.0) -> Limits:
    return Limits(region, tokens, tokens / 10, 10, 1, weight, priority)


def test_choose_is_proportional() -> None:
    weights = [100.0, 300.0, 0.0, 600.0]
    counts = Counter(policy.choose(weights, i / 10_000) for i in range(10_000))
    assert counts[2] == 0
    assert abs(counts[0] - 1000) <= 1 and abs(counts[1] - 3000) <= 1
    assert abs(counts[3] - 6000) <= 1


def test_choose_nothing_when_all_zero() -> None:
    assert policy.choose([0.0, 0.0], 0.5) == -1


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=10), st.floats(0, 1, exclude_max=True))
def test_choose_never_picks_a_zero_weight(weights: list[float], r: float) -> None:
    i = policy.choose(weights, r)
    if any(w > 0 for w in weights):
        assert weights[i] > 0
    else:
        assert i == -1


def test_pick_prefers_lower_priority_tier() -> None:
    limits = [lim("a", priority=1), lim("b", priority=0)]
    levels = [Level(1000, 10), Level(1000, 10)]
    assert all(policy.pick(limits, levels, 100, r / 10) == 1 for r in range(10))
    levels = [Level(1000, 10), Level(50, 10)]  # b cannot cover the cost: fall back to a
    assert policy.pick(limits, levels, 100, 0.3) == 0


def test_pick_skips_cooldown_and_empty_request_bucket() -> None:
    limits = [lim("a"), lim("b"), lim("c")]
    levels = [Level(1000, 10, cooldown=3), Level(1000, 0.5), Level(10, 10)]
    assert policy.pick(limits, levels, 5, 0.99) == 2
    assert policy.pick(limits, levels, 50, 0.5) == -1
    assert policy.retry_after(limits, levels, 50) == min(3, 0.5 / 1, 40 / 100)


def test_oversized_request_passes_from_a_full_bucket() -> None:
    limits = [lim("a", tokens=1000)]
    assert policy.pick(limits, [Level(1000, 10)], 5000, 0.1) == 0
    assert policy.pick(limits, [Level(999, 10)], 5000, 0.1) == -1


@given(st.floats(-1e6, 1e6), st.floats(0, 1e4), st.floats(0, 1e5), st.floats(1, 1e6))
def test_refill_never_exceeds_capacity(level: float, elapsed: float, rate: float,
                                       cap: float) -> None:
    out = policy.refill(level, elapsed, rate, cap)
    assert out <= cap
    assert out >= min(level, cap) - 1e-6


@given(st.floats(0, 1e5), st.floats(0, 10), st.floats(1, 1e5), st.floats(0, 30))
def test_wait_seconds_is_enough(tokens: float, requests: float, cost: float,
                                cooldown: float) -> None:
    limit = Limits("a", 1e5, 1000.0, 10, 1.0)
    level = Level(tokens, requests, cooldown)
    wait = policy.wait_seconds(level, cost, limit)
    assert math.isfinite(wait)
    later = Level(policy.refill(tokens, wait + 1e-6, 1000.0, 1e5),
                  policy.refill(requests, wait + 1e-6, 1.0, 10), cooldown - wait - 1e-6)
    assert policy.admissible(later, cost, limit)


# --------------------------------------------------------------------------- learned capacity


def learner(tokens: float = 1000, rate: float = 100.0) -> Limits:
    return Limits("a", tokens, rate, 100, 100, min_factor=0.2, recovery_rate=0.01)


@given(remaining=st.floats(0, 2000), cost=st.floats(1, 3000), rate=st.floats(1, 1e5),
       precision=st.sampled_from([0.001, 1.0]))
def test_a_region_at_its_configured_rate_never_looks_slow(
        remaining: float, cost: float, rate: float, precision: float) -> None:
    """The wait a region refilling at the configured rate asks for, rounded up as its
    header rounds it, never implies a share below 1, with or without `remaining`."""
    limits = learner(rate=rate)
    missing = policy.need(cost, limits.tokens_capacity) - remaining
    wait = math.ceil(max(missing, 0) / rate / precision) * precision
    for told in (remaining, None):
        share = policy.implied_share(limits, cost, wait, precision, told, None)
        assert share is None or share >= 1.0 - 1e-9
        if share is not None:
            assert policy.cut_target(1.0, share) is None


def test_implied_share_reads_a_slow_refill() -> None:
    limits = learner()  # 100 tokens per second
    # 400 tokens missing, a 8 s wait: the region refills at 50/s, half the configured rate
    assert policy.implied_share(limits, 500, 8.001, 0.001, 100, 5) == pytest.approx(0.5)
    # without `remaining` the whole cost counts as missing: an upper bound
    assert policy.implied_share(limits, 500, 8.001, 0.001, None, None) == pytest.approx(0.625)
    assert policy.implied_share(limits, 500, 8.0, 0.001, 600, 5) is None  # had the tokens
    assert policy.implied_share(limits, 500, 8.0, 0.001, 0, 0) is None  # request limit
    assert policy.implied_share(limits, 500, 0.9, 1.0, 0, 5) is None  # within rounding


def test_cut_lands_below_the_evidence_at_most_halving_per_window() -> None:
    limits = learner()
    assert policy.cut_target(1.0, 0.98) is None  # within tolerance
    assert policy.cut_target(0.55, 0.5) == pytest.approx(0.5 * policy.THROTTLE_BACKOFF)
    assert policy.bounded(limits, 1.0, 0.54) == pytest.approx(0.54)
    assert policy.bounded(limits, 0.8, 0.1) == pytest.approx(0.4)  # halved at most
    assert policy.bounded(limits, 0.3, 0.0) == pytest.approx(0.2)  # the floor
    assert policy.calm_seconds(limits) == pytest.approx(10.0)  # the bucket's refill time


def test_refusal_bounds_the_level_by_what_the_429_says() -> None:
    limits = learner()
    told = policy.refusal(limits, 500, 1.0, 1.0, 120, None)  # remaining on the 429
    assert told == policy.Refusal(121, 0.0, 119, 0.0)  # a whole count: within a token
    precise = policy.refusal(limits, 500, 2.5, 0.001, None, None)  # retry-after-ms
    assert precise == policy.Refusal(500, pytest.approx(2.499), 500, 2.5)
    coarse = policy.refusal(limits, 500, 1.0, 1.0, None, None)  # whole seconds: only < cost
    assert coarse == policy.Refusal(500, 0.0, 0.0, 0.0)
    assert policy.refusal(limits, 500, 5.0, math.inf, None, None) == coarse  # no header
    assert policy.refusal(limits, 5000, 1.0, 1.0, None, None).high == 1000  # needs a full bucket
    assert policy.refusal(limits, 500, 1.0, 1.0, None, 0) is None  # the request-rate limit
    assert policy.refusal(limits, 0, 1.0, 1.0, None, None) is None


def test_window_share_reads_the_rate_between_two_429s() -> None:
    """The tester's region: configured at 100 tokens/s, refilling at 50."""
    limits = learner(tokens=10_000)
    # 429 at level < 300 (whole seconds), then 1,000 tokens admitted in 20 s, then a 429
    # at level < 400: the rate is at most (1,000 + 400) / 20 = 70 tokens/s, a share of 0.7
    first = policy.refusal(limits, 300, 1.0, 1.0, None, None)
    last = policy.refusal(limits, 400, 1.0, 1.0, None, None)
    assert policy.window_share(limits, 20.0, 1000, first, last) == pytest.approx(0.7)
    assert policy.window_share(limits, 200.0, 9600, first, last) == pytest.approx(0.5)
    # precise waits: level 300 - 50 * 2 = 200, then 400 - 50 * 6 = 100, so 50 * 20 =
    # 1,100 sent + 100 - 200: exactly half
    first = policy.refusal(limits, 300, 2.0, 0.0, None, None)
    last = policy.refusal(limits, 400, 6.0, 0.0, None, None)
    assert policy.window_share(limits, 20.0, 1100, first, last) == pytest.approx(0.5)
    # remaining reported on both: within a token at each end
    first = policy.refusal(limits, 300, 1.0, 1.0, 200, None)
    last = policy.refusal(limits, 400, 1.0, 1.0, 100, None)
    assert policy.window_share(limits, 20.0, 1100, first, last) == pytest.approx(0.501)
    assert policy.window_share(limits, 0.0, 1100, first, last) is None  # no time
    waited = policy.Refusal(0, 0, 0, 5.0)
    assert policy.window_share(limits, 1.0, 10, waited, last) is None  # inside the wait


def test_windows_turn_so_that_a_long_one_is_at_hand() -> None:
    limits = learner()  # refills in 10 s: windows of up to 120 s
    assert policy.window_turn(limits, 5.0, 0.0, 0.0)  # the first 429
    assert policy.window_turn(limits, 6.0, 0.0, 5.0)  # the second: the first gets older
    assert not policy.window_turn(limits, 30.0, 5.0, 6.0)  # both kept
    assert policy.window_turn(limits, 46.0, 5.0, 6.0)  # the newer is a third of the span old
    assert policy.window_turn(limits, 130.0, 5.0, 100.0)  # the older is too long


def test_a_window_ends_when_its_last_refused_request_was_reserved() -> None:
    """A 429 may reach the store late (a busy gateway); its request was reserved before
    the region refused it, so the window never looks longer than the region's."""
    late = policy.Refusal(100, 0, 0, 0, reserved_at=50.0)
    assert policy.window_end(52.5, late) == 50.0
    assert policy.window_end(52.5, policy.Refusal(100, 0, 0, 0)) == 52.5  # unknown


@given(share=st.floats(0.05, 1.0), start=st.floats(0, 0.999), first=st.integers(1, 3000),
       steps=st.lists(st.tuples(st.floats(0.001, 3.0), st.integers(1, 3000)), max_size=40),
       style=st.sampled_from(["remaining", "precise", "seconds", "none"]))
def test_a_window_never_reads_a_region_slower_than_it_is(
        share: float, start: float, first: int, steps: list[tuple[float, int]],
        style: str) -> None:
    """A region refilling at `share` of the configured rate (its bucket never full) is
    sent requests at random times; between two of its 429s the bound is never below
    `share`, whatever its 429s say (the property that keeps a region at its quota from
    being cut)."""
    limits = learner(tokens=1e12)  # a bucket that never fills
    rate = share * limits.tokens_rate

    def refused(level: float, cost: int) -> policy.Refusal:
        wait = (cost - level) / rate
        told = {"remaining": (1.0, 0.001, math.floor(level)), "precise": (wait, 0.001, None),
                "seconds": (wait, 1.0, None), "none": (5.0, math.inf, None)}[style]
        w, precision, remaining = told
        if precision < math.inf:  # rounded up as the header rounds it
            w = max(precision, math.ceil(w / precision - 1e-9) * precision)
        out = policy.refusal(limits, cost, w, precision, remaining, None)
        assert out is not None
        return out

    level = start * first  # the first 429: the request did not fit
    opening = refused(level, first)
    span = sent = 0.0
    for dt, cost in steps:
        span += dt
        level += rate * dt
        if level >= cost:  # admitted; a refused request changes nothing
            level -= cost
            sent += cost
    span += 0.001
    level += rate * 0.001
    closing = refused(level, math.floor(level) + 1 + first)  # the last 429
    bound = policy.window_share(limits, span, sent, opening, closing)
    assert bound is None or bound >= share * (1 - 1e-9) - 1e-9


def test_a_window_is_usable_only_while_the_region_cannot_have_filled() -> None:
    limits = learner()  # bucket 1,000, 100 tokens per second: fills in 10 s
    assert policy.window_usable(limits, 1.0, 30.0, 200, 1.0, 30.0, 0.5)
    assert not policy.window_usable(limits, 1.0, 121.0, 200, 1.0, 121.0, 0.5)  # too long
    assert not policy.window_usable(limits, 0.6, 30.0, 550, 0.6, 30.0, 0.5)  # we were idle
    # sending at a factor of 0.3 while the region may refill at 0.5: after 10 s it may
    # have saved 0.2 * 10 = 2 s of refill, within half its (0.5) bucket of 5 s; not after
    assert policy.window_usable(limits, 0.3, 10.0, 0, 0.3, 0.0, 0.5)
    assert not policy.window_usable(limits, 0.3, 20.0, 0, 0.3, 0.0, 0.5)
    # unless the factor was recovering meanwhile (0.01 per second)
    assert policy.window_usable(limits, 0.5, 20.0, 0, 0.3, 20.0, 0.5)
