"""One attempt at one region: send the request, then either relay a final answer or
return a `Failure` the request path may retry elsewhere (nothing reached the client)."""

from __future__ import annotations

import json
import logging
import time

import aiohttp
from aiohttp import web

from balancer import errors, upstream
from balancer.capacity.base import Grant
from balancer.config import Target
from balancer.entra import AuthError
from balancer.gateway import outbound
from balancer.gateway.accounting import (
    learn_remaining,
    note_utilization,
    region_failed,
    region_ok,
    settle,
    throttled,
)
from balancer.gateway.affinity import remember
from balancer.gateway.call import Call, Failure
from balancer.gateway.relay import TOO_LARGE, relay_body, relay_stream
from balancer.upstream import TRANSPORT_ERRORS

log = logging.getLogger("balancer")

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
    try:
        token = await call.rt.auth.token(target.region)  # a fetch is not the region's latency
        sent = time.perf_counter()
        up = await outbound.send(session, call.rt.auth, target, token, "POST",
                                 upstream.url(target, req.op), upstream.body_for(target, req),
                                 timeout)
    except AuthError:  # no Entra token: this region cannot be called now, others can
        await region_failed(call, grant, "auth", refund=True)
        return Failure("auth", region, 502, b"")
    except TRANSPORT_ERRORS as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else "connect"
        # A timed-out request may still be running upstream: keep its reservation.
        await region_failed(call, grant, reason, refund=reason == "connect")
        return Failure(reason, region, 504 if reason == "timeout" else 502, b"")
    call.rt.child(call.rt.metrics.upstream_latency, req.model, region, req.op.name).observe(
        time.perf_counter() - sent)

    async with up:
        status = up.status
        note_utilization(call, grant, up.headers)
        failure = await region_refused(call, grant, up, REGION_FAULTS)
        if failure is not None:
            return failure
        limit = call.gw.max_upstream_body_bytes
        if status >= 400:  # the request itself is wrong: the same answer everywhere
            body = await read_quietly(up, limit)
            if body is None:  # nothing charged for a refused request: refund
                return await too_large(call, grant, up, limit, refund=True)
            await call.rt.store.settle(grant, 0)
            await region_ok(call, grant)
            return relay_body(status, body, up, region)
        if req.stream and up.content_type == "text/event-stream":
            return await relay_stream(call, grant, up, sent)
        try:
            body = await read_capped(up, limit)
            payload = None if body is None else json.loads(body)
        except (*TRANSPORT_ERRORS, ValueError):
            body, payload = b"", None
        if body is None:  # the region did the work and charged it: the reservation stands
            return await too_large(call, grant, up, limit, refund=False)
        usage = req.op.usage(payload)
        deferred = usage is None and req.op.deferred(payload)
        if usage is None and not deferred:  # 200 with a body we cannot read: broken region
            await region_failed(call, grant, "bad_response", refund=False)
            return Failure("bad_response", region, 502, b"")
        await learn_remaining(call, grant, up.headers)
        if usage is not None:  # deferred: the reservation stands for the work to come
            await settle(call, grant, usage, time.perf_counter() - sent)
        if req.op.stateful:  # before the client can learn the id and ask another replica
            await remember(call, region, payload.get("id"), sum(usage or (0, 0)))
        await region_ok(call, grant)
        return relay_body(status, body, up, region)


async def region_refused(call: Call, grant: Grant, up: aiohttp.ClientResponse,
                         faults: tuple[int, ...]) -> Failure | None:
    """A 429 (cool the region down as it asks) or a region fault (5xx, or one of
    `faults`: count it toward the circuit, refund): the Failure; else None."""
    status = up.status
    limit = call.gw.max_upstream_body_bytes
    if status == 429:
        body = await read_quietly(up, limit) or b""  # too large: no wait read from it
        wait = await throttled(call, grant, up.headers, body)
        return Failure("throttled", grant.region, 429, body, retry_after=wait)
    if status >= 500 or status in faults:
        body = await read_quietly(up, limit) or b""
        reason = f"status_{status // 100}xx"
        await region_failed(call, grant, reason, refund=True)
        return Failure(reason, grant.region, status, body)
    return None


async def read_quietly(up: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """`read_capped`, with a broken connection read as an empty body."""
    try:
        return await read_capped(up, limit)
    except TRANSPORT_ERRORS:
        return b""


async def read_capped(up: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None when it is larger than `limit` bytes (counted as
    decompressed, so a compressed bomb stops at the limit too): the rest is left unread
    and the connection closed, never reused. Raises what the connection raises."""
    length = up.content_length
    if length is not None and length > limit:
        up.close()
        return None
    if up.content.at_eof() or (length is not None and "Content-Encoding" not in up.headers):
        return await up.read()  # no more than `length` can come (or read already, cached)
    parts: list[bytes] = []
    size = 0
    while chunk := await up.content.readany():
        size += len(chunk)
        if size > limit:
            up.close()
            return None
        parts.append(chunk)
    return b"".join(parts)


async def too_large(call: Call, grant: Grant, up: aiohttp.ClientResponse, limit: int, *,
                    refund: bool) -> Failure:
    """A region's answer past `max_upstream_body_bytes`: not relayed, and the region's
    failure (another region may answer within it)."""
    log.warning("answer from %s (status %d) is larger than max_upstream_body_bytes (%d): "
                "not relayed", grant.region, up.status, limit)
    await region_failed(call, grant, TOO_LARGE, refund=refund)
    return Failure(TOO_LARGE, grant.region, 502, errors.body(
        f"The upstream region's answer is larger than {limit} bytes "
        "(gateway.max_upstream_body_bytes): it was not relayed.", TOO_LARGE,
        "upstream_error"))
