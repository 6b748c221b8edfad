"""Latency samples for latency-aware weighting, pooled on this replica.

Sending every request's seconds per output token to the store would cost a store
round trip per request (settling is otherwise skipped when the estimate was exact).
Instead each replica pools a region's samples and sends their token-weighted mean at
most every `interval` seconds, or sooner when a settle call goes to the store anyway
and can carry it for free. The store's moving average then moves per pooled sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Pool:
    seconds: float = 0.0
    tokens: int = 0
    sent: float = -math.inf  # when the last pooled sample left


class LatencyPools:
    def __init__(self, interval: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._pools: dict[tuple[str, str], _Pool] = {}

    def add(self, model: str, region: str, seconds: float, tokens: int, *,
            riding: bool = False) -> float | None:
        """Pool one attempt's `seconds` for `tokens` output tokens. Returns the pooled
        seconds per token to send now (and empties the pool), or None to keep pooling.
        `riding`: a store call goes out anyway, so the sample costs nothing to send."""
        pool = self._pools.get((model, region))
        if pool is None:
            if len(self._pools) > 10_000:  # bounded by configured models x regions
                self._pools.clear()
            pool = self._pools[(model, region)] = _Pool()
        pool.seconds += seconds
        pool.tokens += tokens
        now = self._clock()
        if not riding and now - pool.sent < self.interval:
            return None
        sample = pool.seconds / pool.tokens
        pool.seconds, pool.tokens, pool.sent = 0.0, 0, now
        return sample
