"""A client's budget and fair share on the request path: the limits the store applies
(`tenancy.ClientLimits`), the 429 when one of them refuses, and the OpenAI-style
rate-limit headers of its answers."""

from __future__ import annotations

import math
from functools import lru_cache

from aiohttp import web

from balancer import errors
from balancer.capacity.base import Wait
from balancer.config.model import ClientBudget, FairShare, GatewayConfig
from balancer.tenancy import Budget, ClientLimits

# Wait.reason -> (error code, what the message says was hit)
LIMITS = {
    "rpm": ("client_rpm_budget_exceeded", "its requests-per-minute budget"),
    "tpm": ("client_tpm_budget_exceeded", "its tokens-per-minute budget"),
    "day": ("client_daily_quota_exceeded", "its daily token quota"),
    "month": ("client_monthly_quota_exceeded", "its monthly token quota"),
    "fair_share": ("fair_share_exceeded", "its fair share of the pool, which is running "
                   "short: other clients are waiting for their share"),
}


@lru_cache(maxsize=4096)
def client_limits(name: str, weight: float, budget: ClientBudget | None, gw: GatewayConfig,
                  fair: FairShare) -> ClientLimits | None:
    """What the store applies to a client on one model: its budget there (None: none)
    and its fair share; None when neither applies. Buckets as the regions': `tpm` fills
    a bucket of burst_seconds, `rpm` one of rpm_burst_seconds; time_scale compresses
    both, and the fair window, as it does the regions' refill."""
    window = fair.window_seconds / gw.time_scale if fair.enabled else 0.0
    if budget is None and window <= 0:
        return None
    tpm = (budget.tpm or 0) if budget else 0
    rpm = (budget.rpm or 0) if budget else 0
    return ClientLimits(
        name=name,
        weight=weight,
        tokens_capacity=tpm / 60.0 * gw.burst_seconds,
        tokens_rate=tpm / 60.0 * gw.time_scale,
        requests_capacity=max(1.0, rpm / 60.0 * gw.rpm_burst_seconds) if rpm else 0.0,
        requests_rate=rpm / 60.0 * gw.time_scale,
        tokens_per_day=float((budget.tokens_per_day or 0) if budget else 0),
        tokens_per_month=float((budget.tokens_per_month or 0) if budget else 0),
        fair_window=window,
        fair_headroom=fair.headroom,
    )


def refused(client: str, model: str, wait: Wait) -> web.Response:
    """429 for a request its own budget or its fair share refused, saying which limit
    (x-balancer-limit too: rpm, tpm, day, month or fair_share)."""
    code, what = LIMITS[wait.reason]
    seconds = errors.retry_after_header(wait.retry_after)
    return errors.response(
        429, f"Client '{client}' has reached {what} for model '{model}'. "
             f"Please retry after {seconds} seconds.", code, type_="rate_limit_error",
        headers={"Retry-After": seconds,
                 "retry-after-ms": str(int(min(wait.retry_after, 86400.0) * 1000)),
                 "x-balancer-limit": wait.reason})


def rate_limit_headers(c: ClientLimits, budget: Budget, tpm: int | None, rpm: int | None
                       ) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from the client's own budget. The bucket holds
    burst_seconds of tpm, so remaining is the bucket's share left times the per-minute
    limit, and reset the time until the bucket is full again."""
    out = {}
    if tpm and c.tokens_capacity > 0:
        out.update(_trio("tokens", tpm, budget.tokens, c.tokens_capacity, c.tokens_rate))
    if rpm and c.requests_capacity > 0:
        out.update(_trio("requests", rpm, budget.requests, c.requests_capacity,
                         c.requests_rate))
    return out


def _trio(kind: str, limit: int, level: float, capacity: float, rate: float
          ) -> dict[str, str]:
    left = max(0.0, min(level, capacity))
    reset = (capacity - left) / rate if rate > 0 else 0.0
    return {f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(math.floor(limit * left / capacity)),
            f"x-ratelimit-reset-{kind}": duration(reset)}


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it (Go's style): 20ms, 1.5s, 6m0s."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{round(seconds, 3):g}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{round(seconds - 60 * minutes, 3):g}s"
