"""Calls on a stored response by its id: retrieve, delete, cancel, list its input items.

Each goes to the one region holding the response (`affinity.owner`), never elsewhere:
any other region would answer 404. These calls carry no tokens, so they reserve none;
they do respect the region's state: while it cools down after a 429 the call waits
(within its wait budget) or gets 429 with Retry-After, and while its circuit is open
it gets 503. A 429 or 5xx from the region cools it down or counts a failure, as any
attempt does, and is relayed: there is no other region to retry.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from balancer import errors, upstream
from balancer.capacity.base import Grant
from balancer.cost import Estimate
from balancer.entra import AuthError
from balancer.errors import ClientError
from balancer.gateway import affinity, outbound
from balancer.gateway.accounting import region_failed, region_ok
from balancer.gateway.admission import wait_budget
from balancer.gateway.attempt import REGION_FAULTS, read_quietly, region_refused, too_large
from balancer.gateway.call import Call, Failure
from balancer.gateway.clients import authorize, read_body
from balancer.gateway.proxy import Handler, check_api_version
from balancer.gateway.relay import relay_body, relay_events
from balancer.gateway.runtime import RECORD, RUNTIME
from balancer.operations import Operation
from balancer.upstream import TRANSPORT_ERRORS
from balancer.validate import ClientRequest

# Here a 404 is the answer (no such response there), not a misconfigured region.
FAULTS = tuple(status for status in REGION_FAULTS if status != 404)

# The actions on a stored object: (HTTP method, path after its id, metric label suffix).
ACTIONS = (
    ("GET", "", "retrieve"),
    ("DELETE", "", "delete"),
    ("POST", "/cancel", "cancel"),
    ("GET", "/input_items", "input_items"),
)


def stored_route(op: Operation, suffix: str, action: str, *, dated: bool) -> Handler:
    """A handler for `{prefix}/{op.name}/{id}{suffix}`; `dated`: Azure's dated routes,
    which need an api-version."""
    async def handle(request: web.Request) -> web.StreamResponse:
        if dated:
            check_api_version(request)
        return await on_stored(request, op, suffix, action)
    return handle


async def on_stored(request: web.Request, op: Operation, suffix: str, action: str
                    ) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    record = request[RECORD]
    authorize(request, rt)
    gw = rt.config.gateway
    raw = await read_body(request, gw.max_body_bytes, gw.body_timeout_seconds) \
        if request.method == "POST" else b""
    response_id = request.match_info["id"]
    pin = await affinity.owner(rt, response_id)
    route = rt.routes.get(pin.model)
    narrowed = route.only(pin.region) if route is not None else None
    if narrowed is None:  # a reload removed the region (or model) that holds it
        raise ClientError(404, f"Response with id '{response_id}' is held by a region this "
                          "gateway no longer serves.", "not_found", reason="not_found")
    record.model, record.region, record.attempts = pin.model, pin.region, 1
    record.operation = f"{op.name}/{action}"
    limits = narrowed.limits[0]
    state = (await rt.store.snapshot(pin.model, [limits]))[0]
    if state.cooldown_seconds > 0:
        if state.circuit == "open":
            return errors.response(503, "The region holding this response is failing; "
                                   "retry later.", "region_unavailable", type_="server_error",
                                   headers=_retry_after(state.cooldown_seconds))
        if state.cooldown_seconds > wait_budget(request, rt.config.admission_queue, op.name):
            return errors.response(429, "The region holding this response is rate limited; "
                                   "retry later.", "rate_limit_exceeded",
                                   type_="rate_limit_error",
                                   headers=_retry_after(state.cooldown_seconds))
        await asyncio.sleep(state.cooldown_seconds)

    grant = Grant(pin.model, limits, 0)  # nothing reserved: for the accounting helpers
    target = narrowed.targets[pin.region]
    timeout = aiohttp.ClientTimeout(total=None, connect=gw.connect_timeout_seconds,
                                    sock_read=gw.read_timeout_seconds)
    call = Call(rt, request, ClientRequest(op, pin.model, {}, raw, False, False),
                Estimate(0, 0), rt.config, record)
    assert rt.session is not None
    path = f"{op.name}/{response_id}{suffix}"
    try:
        token = await rt.auth.token(target.region)
        sent = time.perf_counter()
        up = await outbound.send(rt.session, rt.auth, target, token, request.method,
                                 upstream.stored_url(target, path, request.query), raw or None,
                                 timeout)
    except AuthError:
        await region_failed(call, grant, "auth", refund=False)
        return Failure("auth", pin.region, 502, b"").response()
    except TRANSPORT_ERRORS as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else "connect"
        await region_failed(call, grant, reason, refund=False)
        return Failure(reason, pin.region, 504 if reason == "timeout" else 502, b"").response()
    rt.child(rt.metrics.upstream_latency, pin.model, pin.region, record.operation).observe(
        time.perf_counter() - sent)
    async with up:
        status = up.status
        # No other region to retry: the failure goes to the client as it is.
        failure = await region_refused(call, grant, up, FAULTS)
        if failure is not None:
            return failure.response()
        if status == 404 or (status < 300 and request.method == "DELETE"):
            await rt.store.unpin(response_id)  # gone there (expired, deleted): gone here
        limit = gw.max_upstream_body_bytes
        if status < 300 and up.content_type == "text/event-stream":  # retrieve, streamed
            return await relay_events(request, up, pin.region, limit)
        body = await read_quietly(up, limit)
        if body is None:
            return (await too_large(call, grant, up, limit, refund=False)).response()
        if status < 400:
            await region_ok(call, grant)
        return relay_body(status, body, up, pin.region)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": errors.retry_after_header(seconds)}
