"""Reading a region's rate-limit headers."""

from __future__ import annotations

import math

from balancer import upstream


def test_throttle_prefers_milliseconds_and_knows_its_precision() -> None:
    h = {"retry-after-ms": "250", "retry-after": "1"}
    assert upstream.throttle(h, 5.0) == (0.25, 0.001)
    assert upstream.throttle({"retry-after": "3"}, 5.0) == (3.0, 1.0)  # whole seconds
    assert upstream.throttle({"retry-after": "0.5"}, 5.0) == (0.5, 0.001)
    assert upstream.throttle({"x-ratelimit-reset-tokens": "6m0s"}, 5.0) == (360.0, 1.0)
    assert upstream.throttle({"x-ratelimit-reset-tokens": "120ms"}, 5.0).seconds == 0.12
    assert upstream.throttle({"retry-after": "-1"}, 5.0) == (5.0, math.inf)  # our default


def test_remaining_headers_ignore_missing_malformed_and_minus_one() -> None:
    h = {"x-ratelimit-remaining-tokens": "1200", "x-ratelimit-remaining-requests": "0"}
    assert upstream.remaining_tokens(h) == 1200
    assert upstream.remaining_requests(h) == 0
    for bad in ({}, {"x-ratelimit-remaining-tokens": "-1"},
                {"x-ratelimit-remaining-tokens": "lots"}):
        assert upstream.remaining_tokens(bad) is None
