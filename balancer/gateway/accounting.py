"""After an attempt: settle the reservation with the usage the region reports, learn
from its rate-limit headers, and keep its circuit (failures and successes)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

from balancer import policy, upstream
from balancer.capacity.base import Grant
from balancer.gateway.call import Call
from balancer.usage import Usage

log = logging.getLogger("balancer")


async def settle(call: Call, grant: Grant, usage: Usage, elapsed: float) -> None:
    """Reconcile the reservation with real usage. In `quota` mode, charge what Azure's
    quota counter charges: the real prompt plus the completion budget it reserved; in
    `usage` mode, the tokens really used. With latency weighting on, the same call
    carries this replica's pooled seconds per output token when one is due
    (balancer.latency), so an exact estimate still costs no store call."""
    prompt, completion = usage
    route = call.rt.routes.get(grant.model)
    provisioned = route.provisioned if route is not None else frozenset()
    # A PTU corrects its utilisation to the real cost when a request ends (Azure's docs),
    # unlike the standard quota counter: charge a PTU what was used, whatever `settle` says.
    if call.gw.settle == "usage" or grant.region in provisioned:
        charged = prompt + completion
    else:
        charged = prompt + max(call.estimate.completion, completion)
    latency = None
    if call.config.latency_weighting.enabled and completion > 0:
        latency = call.rt.latency.add(grant.model, grant.region, elapsed, completion,
                                      riding=charged != grant.tokens)
    if charged != grant.tokens or latency is not None:  # else settling is a no-op
        await call.rt.store.settle(grant, charged, latency)
    call.record.prompt_tokens, call.record.completion_tokens = usage
    m = call.rt.metrics
    op = call.req.op.name
    call.rt.child(m.tokens, grant.model, grant.region, "prompt", op).inc(prompt)
    call.rt.child(m.tokens, grant.model, grant.region, "completion", op).inc(completion)
    if call.record.client is not None:
        call.rt.child(m.client_tokens, call.record.client, grant.model, "prompt").inc(prompt)
        call.rt.child(m.client_tokens, call.record.client, grant.model,
                      "completion").inc(completion)
    if provisioned and grant.region not in provisioned:  # PTUs exist, PAYG served: spilled
        call.rt.child(m.spilled_requests, grant.model).inc()
        call.rt.child(m.spilled_tokens, grant.model).inc(prompt + completion)


async def throttled(call: Call, grant: Grant, headers: Mapping[str, str], body: bytes = b""
                    ) -> float:
    """The region said 429: refund, cool it down for as long as it asks (its headers,
    else its message), and learn what the 429 implies of its real refill. Returns the
    cooldown in seconds."""
    throttle = upstream.throttle(headers, call.gw.default_cooldown_seconds, body)
    call.rt.metrics.upstream_throttled.labels(grant.model, grant.region,
                                              call.rt.sku(grant.model, grant.region)).inc()
    await call.rt.store.settle(grant, 0)
    share, refusal = evidence(call, grant, throttle, headers)
    await call.rt.store.cooldown(grant.model, grant.limits, throttle.seconds, share=share,
                                 refusal=refusal)
    return throttle.seconds


def evidence(call: Call, grant: Grant, throttle: upstream.Throttle,
             headers: Mapping[str, str]) -> tuple[float | None, policy.Refusal | None]:
    """What this 429 says of the region's real refill: the share it implies alone
    (policy.implied_share) and the bounds it puts on the region's level, which the store
    reads with the previous 429s' (policy.refusal). Nothing with learning off, nor from a
    provisioned deployment (README: its wait runs until its utilization drops under
    100%, not until the request's cost fits, and it may be overdrawn)."""
    if not call.config.learned_capacity.enabled or \
            call.rt.sku(grant.model, grant.region) == "provisioned":
        return None, None
    args = (grant.limits, grant.tokens, throttle.seconds, throttle.precision,
            upstream.remaining_tokens(headers), upstream.remaining_requests(headers))
    refusal = policy.refusal(*args)
    if refusal is not None and grant.source == "shared":  # a local grant's record is not ours
        refusal = replace(refusal, reserved_at=grant.at, granted=grant.granted)
    return policy.implied_share(*args), refusal


async def learn_remaining(call: Call, grant: Grant, headers: Mapping[str, str]) -> None:
    """A region reporting fewer remaining tokens than our bucket held right after the
    reservation is serving someone we cannot see: bring the bucket down to its word.
    Missing or -1 headers say nothing. Costs a store call only on such a discrepancy."""
    learn = call.config.learned_capacity
    if not learn.enabled:
        return
    remaining = upstream.remaining_tokens(headers)
    if remaining is None:
        return
    # The slack covers requests reserved here but admitted there in another order.
    slack = learn.evidence_margin * grant.limits.tokens_capacity + grant.tokens
    if remaining < grant.level - slack:
        await call.rt.store.observe(grant.model, grant.limits, float(remaining))


def note_utilization(call: Call, grant: Grant, headers: Mapping[str, str]) -> None:
    """A provisioned deployment's utilization header, when it sends one, into its gauge."""
    ratio = upstream.utilization(headers)
    if ratio is not None:
        call.rt.metrics.deployment_utilization.labels(grant.model, grant.region).set(ratio)


async def region_failed(call: Call, grant: Grant, reason: str, *, refund: bool) -> None:
    gw, store = call.gw, call.rt.store
    call.rt.metrics.upstream_errors.labels(grant.model, grant.region, reason).inc()
    if refund and grant.tokens:  # nothing reserved (a call on a stored response): no call
        await store.settle(grant, 0)
    opened = await store.record_failure(grant.model, grant.limits, gw.circuit_failures,
                                        gw.circuit_open_seconds)
    if opened:
        log.warning("circuit open for %s/%s for %.0f s after %s", grant.model, grant.region,
                    gw.circuit_open_seconds, reason)


async def region_ok(call: Call, grant: Grant) -> None:
    if grant.failures:  # only then is there a failure count to clear
        await call.rt.store.record_success(grant.model, grant.limits)
