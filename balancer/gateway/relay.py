"""Relaying a region's answer to the client: a whole body, or a stream event by event.

A stream is relayed without buffering. Until its first chunk arrives nothing has
reached the client, so a region that fails before it can still be retried elsewhere;
after it, a broken stream ends with an error event the SDKs raise on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from balancer.capacity.base import Grant
from balancer.gateway.accounting import learn_remaining, region_failed, region_ok, settle
from balancer.gateway.affinity import remember
from balancer.gateway.call import Call, Failure
from balancer.sse import error_event
from balancer.upstream import TRANSPORT_ERRORS

log = logging.getLogger("balancer")
CLIENT_GONE = (ConnectionError, aiohttp.ClientConnectionResetError)
TOO_LARGE = "upstream_body_too_large"  # an answer past gateway.max_upstream_body_bytes


def relay_body(status: int, body: bytes, up: aiohttp.ClientResponse, region: str
               ) -> web.Response:
    return web.Response(status=status, body=body, headers={
        "Content-Type": up.headers.get("Content-Type", "application/json"),
        "x-balancer-region": region})


async def relay_stream(call: Call, grant: Grant, up: aiohttp.ClientResponse, sent: float
                       ) -> web.StreamResponse | Failure:
    """Relay SSE chunk by chunk, settling from the usage the stream carries."""
    region, req = grant.region, call.req
    assert req.op.stream is not None
    tap = req.op.stream.tap(not req.include_usage)
    try:
        first = await up.content.readany()
    except TRANSPORT_ERRORS:
        first = b""
    if not first:
        await region_failed(call, grant, "bad_response", refund=False)
        return Failure("bad_response", region, 502, b"")
    call.rt.metrics.time_to_first_token.labels(req.model, region).observe(
        time.perf_counter() - sent)

    response = await _open_stream(call.request, 200, region)
    broken: str | None = None
    client_gone = False
    chunks = _chunks(up, first)
    pinned = not req.op.stateful
    limit, size = call.gw.max_upstream_body_bytes, 0
    while True:
        try:
            chunk = await anext(chunks, None)
        except TRANSPORT_ERRORS as exc:
            broken = "timeout" if isinstance(exc, TimeoutError) else "stream_broken"
            break
        if chunk is not None:
            size += len(chunk)  # what was read, so an event that never ends is bounded too
            if size > limit:  # the rest is not read (the connection is not reused); the
                broken = TOO_LARGE  # whole events within the cap still go out
                up.close()
                chunk = chunk[:len(chunk) - (size - limit)]
        out = tap.feed(chunk) if chunk is not None else tap.flush()
        if tap.object_id is not None and not pinned:  # before the client sees the id
            pinned = True
            await remember(call, region, tap.object_id, 0)
        if out:
            try:
                await response.write(out)
            except CLIENT_GONE:
                client_gone = True
                break
        if chunk is None or broken:
            break
    if not broken and not client_gone and not tap.done:
        broken = "stream_broken"  # the region closed without its final event
    if broken:
        log.warning("stream from %s broke after the first byte: %s", region, broken)
        await region_failed(call, grant, broken, refund=False)
        if not client_gone:
            try:
                await response.write(_broken_event(broken, limit))
            except CLIENT_GONE:
                client_gone = True
    if tap.usage is not None:
        await learn_remaining(call, grant, up.headers)
        await settle(call, grant, tap.usage, time.perf_counter() - sent)
        if req.op.stateful and tap.object_id is not None:  # now its context is known
            await remember(call, region, tap.object_id, sum(tap.usage))
    if not broken:
        await region_ok(call, grant)
    if not client_gone:
        await _finish(response)
    call.rt.child(call.rt.metrics.requests, req.model, region, "200", req.op.name).inc()
    if call.record.client is not None:
        call.rt.child(call.rt.metrics.client_requests, call.record.client, req.model,
                      "200").inc()
    return response


async def relay_events(request: web.Request, up: aiohttp.ClientResponse, region: str,
                       limit: int) -> web.StreamResponse:
    """Relay a stream as it comes, reading nothing (a stored response replayed): no
    reservation rides on it. A break, or more than `limit` bytes, ends it with an error
    event, as any stream."""
    response = await _open_stream(request, up.status, region)
    broken: str | None = None
    size = 0
    try:
        async for chunk in up.content.iter_any():
            size += len(chunk)
            if size > limit:
                broken = TOO_LARGE
                up.close()
                break
            await response.write(chunk)
    except CLIENT_GONE:
        return response
    except TRANSPORT_ERRORS:
        broken = "stream_broken"
    if broken:
        try:
            await response.write(_broken_event(broken, limit))
        except CLIENT_GONE:
            return response
    await _finish(response)
    return response


def _broken_event(reason: str, limit: int) -> bytes:
    """The error event ending a stream that broke after its first byte."""
    if reason == TOO_LARGE:
        return error_event(f"The upstream region's stream grew larger than {limit} bytes "
                           "(gateway.max_upstream_body_bytes); the answer is incomplete.",
                           reason)
    return error_event("The upstream region broke the stream; the answer is incomplete.",
                       reason)


async def _finish(response: web.StreamResponse) -> None:
    """The last bytes of a stream; a client that left right after the final event
    (it has all it wanted) is not an error."""
    with contextlib.suppress(*CLIENT_GONE):
        await response.write_eof()


async def _open_stream(request: web.Request, status: int, region: str
                       ) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "x-balancer-region": region})
    await response.prepare(request)
    return response


async def _chunks(up: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
    yield first
    async for chunk in up.content.iter_any():
        yield chunk
