"""One attempt at one region: send the request, then either relay a final answer or
return a `Failure` the request path may retry elsewhere (nothing reached the client)."""

from __future__ import annotations

import json
import time

import aiohttp
from aiohttp import web

from balancer import upstream
from balancer.capacity.base import Grant
from balancer.config import Target
from balancer.gateway.accounting import learn_remaining, region_failed, region_ok, settle, throttled
from balancer.gateway.call import Call, Failure
from balancer.gateway.relay import relay_body, relay_stream
from balancer.upstream import TRANSPORT_ERRORS

# 401/403/404 mean this region is misconfigured, not that the request is bad.
REGION_FAULTS = (401, 403, 404, 408)


async def forward(call: Call, grant: Grant, target: Target, remaining: float
                  ) -> web.StreamResponse | Failure:
    """A final response, or a Failure to retry elsewhere."""
    gw, req = call.gw, call.req
    region = grant.region
    timeout = aiohttp.ClientTimeout(total=None, connect=min(gw.connect_timeout_seconds, remaining),
                                    sock_read=min(gw.read_timeout_seconds, remaining))
    session = call.rt.session
    assert session is not None
    sent = time.perf_counter()
    try:
        up = await session.post(upstream.url(target, req.op.name),
                                data=upstream.body_for(target, req),
                                headers=upstream.headers(target), timeout=timeout)
    except TRANSPORT_ERRORS as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else "connect"
        # A timed-out request may still be running upstream: keep its reservation.
        await region_failed(call, grant, reason, refund=reason == "connect")
        return Failure(reason, region, 504 if reason == "timeout" else 502, b"")
    call.rt.child(call.rt.metrics.upstream_latency, req.model, region).observe(
        time.perf_counter() - sent)

    async with up:
        status = up.status
        if status == 429:
            body = await _read_quietly(up)
            wait = await throttled(call, grant, up.headers)
            return Failure("throttled", region, 429, body, retry_after=wait)
        if status >= 500 or status in REGION_FAULTS:
            body = await _read_quietly(up)
            await region_failed(call, grant, f"status_{status // 100}xx", refund=True)
            return Failure(f"status_{status // 100}xx", region, status, body)
        if status >= 400:  # the request itself is wrong: the same answer everywhere
            body = await _read_quietly(up)
            await call.rt.store.settle(grant, 0)
            await region_ok(call, grant)
            return relay_body(status, body, up, region)
        if req.stream and up.content_type == "text/event-stream":
            return await relay_stream(call, grant, up, sent)
        try:
            body = await up.read()
            usage = req.op.usage(json.loads(body))
        except (*TRANSPORT_ERRORS, ValueError):
            usage = None
        if usage is None:  # 200 with a body we cannot read: the region is broken
            await region_failed(call, grant, "bad_response", refund=False)
            return Failure("bad_response", region, 502, b"")
        await learn_remaining(call, grant, up.headers)
        await settle(call, grant, usage, time.perf_counter() - sent)
        await region_ok(call, grant)
        return relay_body(status, body, up, region)


async def _read_quietly(up: aiohttp.ClientResponse) -> bytes:
    try:
        return await up.read()
    except TRANSPORT_ERRORS:
        return b""
