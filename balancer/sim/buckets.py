"""Admission state of one (region, deployment), as Azure keeps it: a token bucket holding
`token_window_seconds` of the TPM quota, a request bucket for RPM, counters, and sliding
one-minute windows of what was admitted and what was offered.

A provisioned (PTU) deployment keeps its utilization instead, as Azure's docs describe
it (a leaky bucket): a request is admitted while utilization is under 100%, adding its
estimate (prompt + max_tokens); when it finishes, the estimate is corrected to the
tokens really used; utilization drains at the deployment's throughput. Here the token
bucket's level is the free share (capacity - utilization), so it may go negative; the
request bucket is not enforced (PTUs have no RPM limit)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from balancer.sim.config import SimConfig, SimDeployment


@dataclass
class _Bucket:
    capacity: float
    rate: float  # refill per real second
    level: float
    updated: float
    drain: float = 0.0  # hidden co-tenant's consumption per real second

    def advance(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.updated = max(self.updated, now)
        net = self.rate - self.drain
        level = min(self.capacity, self.level + net * elapsed)
        if net < 0:  # the co-tenant is throttled too: it cannot push the bucket below zero
            level = max(level, min(self.level, 0.0))
        self.level = level

    def wait_for(self, amount: float) -> float:
        """Real seconds until the bucket holds `amount` (inf if it never will)."""
        missing = amount - self.level
        if missing <= 0:
            return 0.0
        net = self.rate - self.drain
        return missing / net if net > 0 else math.inf


@dataclass
class _Stats:
    requests: int = 0
    admitted: int = 0
    throttled: int = 0
    failed: int = 0
    admitted_tokens: int = 0  # estimated cost charged, as Azure's quota counter sees it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    peak_window_tokens: int = 0  # most estimated tokens admitted within one simulated minute
    # what clients sent, admitted or not: shows a gateway overshooting a region's quota
    offered_tokens: int = 0
    peak_window_offered_tokens: int = 0


class _Window:
    """Tokens within a sliding window of `seconds` (one simulated minute)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entries: deque[tuple[float, int]] = deque()
        self.total = 0

    def clear(self) -> None:
        self.entries.clear()
        self.total = 0

    def add(self, tokens: int, now: float) -> int:
        """Record `tokens` at `now`; returns the window's total."""
        self.entries.append((now, tokens))
        self.total += tokens
        while self.entries and self.entries[0][0] <= now - self.seconds:
            self.total -= self.entries.popleft()[1]
        return self.total


class DeploymentState:
    """Buckets, stats and the sliding window of one (region, deployment)."""

    def __init__(self, spec: SimDeployment, config: SimConfig, now: float) -> None:
        assert spec.rpm is not None
        self.spec = spec
        tokens_per_s, requests_per_s = spec.tpm / 60, spec.rpm / 60
        self.tokens = _Bucket(
            tokens_per_s * config.token_window_seconds, tokens_per_s * config.time_scale, 0, now
        )
        self.requests = _Bucket(
            max(1.0, requests_per_s * config.request_window_seconds),
            requests_per_s * config.time_scale,
            0,
            now,
        )
        self.provisioned = spec.sku == "provisioned"
        self.window_seconds = 60 / config.time_scale
        self.window = _Window(self.window_seconds)
        self.offered = _Window(self.window_seconds)
        self.stats = _Stats()
        self.reset(now)

    def reset(self, now: float) -> None:
        for bucket in (self.tokens, self.requests):
            bucket.level, bucket.updated = bucket.capacity, now
        self.window.clear()
        self.offered.clear()
        self.stats = _Stats()

    def admit(self, charge: int, now: float) -> float:
        """Charge the request and return 0, or return the real seconds until it would fit."""
        self.tokens.advance(now)
        self.requests.advance(now)
        self.stats.offered_tokens += charge
        self.stats.peak_window_offered_tokens = max(
            self.stats.peak_window_offered_tokens, self.offered.add(charge, now)
        )
        if self.provisioned:  # under 100% utilization: in, however big; else wait until so
            if self.tokens.level > 0:
                self.tokens.level -= charge
                self._record(charge, now)
                return 0.0
            return max(self.tokens.wait_for(1.0), 1e-3)  # until one token is free
        need = min(charge, self.tokens.capacity)  # a request bigger than the bucket needs it full
        if self.tokens.level + 1e-9 >= need and self.requests.level + 1e-9 >= 1:
            self.tokens.level -= charge  # may go negative: the overdraft delays later requests
            self.requests.level -= 1
            self._record(charge, now)
            return 0.0
        return max(self.tokens.wait_for(need), self.requests.wait_for(1), 1e-3)

    def finished(self, estimate: int, used: int, now: float) -> None:
        """A PTU's request ended: correct its utilization from the estimate to the tokens
        used (the standard quota counter keeps the estimate)."""
        if self.provisioned:
            self.tokens.advance(now)
            self.tokens.level = min(self.tokens.capacity, self.tokens.level + estimate - used)

    def utilization(self) -> float:
        """A PTU's utilization, 1.0 = 100% (above while an admitted request overshoots)."""
        return 1.0 - self.tokens.level / self.tokens.capacity

    def _record(self, charge: int, now: float) -> None:
        self.stats.admitted += 1
        self.stats.admitted_tokens += charge
        self.stats.peak_window_tokens = max(
            self.stats.peak_window_tokens, self.window.add(charge, now)
        )

    def snapshot(self, now: float) -> dict[str, Any]:
        self.tokens.advance(now)
        self.requests.advance(now)
        return {
            **asdict(self.stats),
            "tpm": self.spec.tpm,
            "sku": self.spec.sku,
            "rpm": self.spec.rpm,
            "tokens_available": self.tokens.level,
            "requests_available": self.requests.level,
            # what the buckets can let through in one simulated minute: a full burst + the refill
            "max_tokens_over_window": self.spec.tpm + self.tokens.capacity,
        }
