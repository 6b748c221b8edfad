"""Latency samples pooled per region between store writes."""

from __future__ import annotations

import pytest

from balancer.latency import LatencyPools


def test_pools_send_a_token_weighted_mean_at_most_every_interval() -> None:
    now = [100.0]
    pools = LatencyPools(interval=0.5, clock=lambda: now[0])
    assert pools.add("m", "a", 1.0, 100) == pytest.approx(0.01)  # the first goes at once
    now[0] += 0.1
    assert pools.add("m", "a", 2.0, 100) is None  # pooled
    assert pools.add("m", "b", 3.0, 100) == pytest.approx(0.03)  # regions pool apart
    now[0] += 0.1
    assert pools.add("m", "a", 1.0, 300) is None
    now[0] += 0.4
    # (2 + 1 + 2) s over (100 + 300 + 100) tokens
    assert pools.add("m", "a", 2.0, 100) == pytest.approx(5.0 / 500)
    now[0] += 0.1
    assert pools.add("m", "a", 4.0, 100, riding=True) == pytest.approx(0.04)  # free ride
