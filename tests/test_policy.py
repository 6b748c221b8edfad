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
            assert policy.throttled_factor(1.0, limits, share) == 1.0


def test_implied_share_reads_a_slow_refill() -> None:
    limits = learner()  # 100 tokens per second
    # 400 tokens missing, a 8 s wait: the region refills at 50/s, half the configured rate
    assert policy.implied_share(limits, 500, 8.001, 0.001, 100, 5) == pytest.approx(0.5)
    # without `remaining` the whole cost counts as missing: an upper bound
    assert policy.implied_share(limits, 500, 8.001, 0.001, None, None) == pytest.approx(0.625)
    assert policy.implied_share(limits, 500, 8.0, 0.001, 600, 5) is None  # had the tokens
    assert policy.implied_share(limits, 500, 8.0, 0.001, 0, 0) is None  # request limit
    assert policy.implied_share(limits, 500, 0.9, 1.0, 0, 5) is None  # within rounding


def test_throttled_factor_cuts_to_the_share_at_most_by_half() -> None:
    limits = learner()
    assert policy.throttled_factor(1.0, limits, 0.98) == 1.0  # within tolerance
    assert policy.throttled_factor(1.0, limits, 0.6) == pytest.approx(0.6)
    assert policy.throttled_factor(0.8, limits, 0.1) == pytest.approx(0.4)  # halved at most
    assert policy.throttled_factor(0.3, limits, 0.0) == pytest.approx(0.2)  # the floor
    assert policy.calm_seconds(limits) == pytest.approx(10.0)  # the bucket's refill time
