"""The request path, top to bottom; each step is a room of its own.

    client -> auth -> parse & validate -> estimate cost -> SELECT+RESERVE (store)
           <- relay response <- forward to region <-----------------'
                                 '-> 429/5xx/timeout: cool down or count a failure,
                                     refund, exclude the region, select again
           after the response: SETTLE (reserved vs actual usage) + metrics

Retries happen only before the first byte reaches the client. What differs between
API operations (chat, completions, embeddings, responses) comes from
`balancer.operations`; a create continuing a stored response is narrowed to the region
holding it (`affinity`). Calls on a stored response by id are `stored`'s.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from balancer import errors, validate
from balancer.capacity.base import Grant, Wait
from balancer.errors import ClientError
from balancer.gateway import affinity, budgets
from balancer.gateway.admission import admit, priority_of
from balancer.gateway.attempt import forward
from balancer.gateway.call import Call, Failure
from balancer.gateway.clients import authorize, read_body
from balancer.gateway.runtime import ANONYMOUS, RECORD, RUNTIME, ModelRoute
from balancer.operations import OPERATIONS, Operation

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# [0-9], not \d: \d also matches non-ASCII digits (fullwidth, Arabic-Indic...).
API_VERSION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?")


def openai_route(op: Operation) -> Handler:
    """`POST /v1/{operation}` and Azure's `/openai/v1/{operation}`: the model group is
    the body's `model`."""
    async def handle(request: web.Request) -> web.StreamResponse:
        return await proxy(request, op, None)
    return handle


def azure_dated_route(op: Operation) -> Handler:
    """`POST /openai/{operation}?api-version=` (the Responses API): the model group is
    the body's `model`."""
    async def handle(request: web.Request) -> web.StreamResponse:
        check_api_version(request)
        return await proxy(request, op, None)
    return handle


async def azure_route(request: web.Request) -> web.StreamResponse:
    """`POST /openai/deployments/{model}/{operation}?api-version=`: the model group is
    the path's deployment name."""
    check_api_version(request)
    op = OPERATIONS[request.match_info["operation"]]
    return await proxy(request, op, request.match_info["model"])


def check_api_version(request: web.Request) -> None:
    """Azure's dated routes need an api-version, as Azure does. Its value only has to
    be well formed: each region is called with its own (`regions.yaml`)."""
    api_version = request.query.get("api-version")
    if not api_version:
        raise ClientError(400, "Missing the api-version query parameter.", "missing_api_version",
                          param="api-version")
    if not API_VERSION.fullmatch(api_version):
        raise ClientError(400, "Unsupported api-version: use the form YYYY-MM-DD[-preview].",
                          "invalid_api_version", param="api-version")


def model_route(routes: dict[str, ModelRoute], model: str) -> ModelRoute:
    route = routes.get(model)
    if route is None:
        raise ClientError(404, f"The model '{model[:256]}' does not exist or you do not "
                          "have access to it.", "model_not_found", param="model",
                          reason="not_found")
    return route


async def proxy(request: web.Request, op: Operation, path_model: str | None
                ) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    record = request[RECORD]
    tenant = authorize(request, rt)
    raw = await read_body(request, rt.config.gateway.max_body_bytes,
                          rt.config.gateway.body_timeout_seconds)
    req = validate.parse(op, raw, path_model)
    config, routes = rt.config, rt.routes  # this request keeps them, whatever a reload does
    route = model_route(routes, req.model)
    # Only a configured model names a metric series or an access-log line: a client
    # sending made-up names must not grow /metrics (or the logs) without bound.
    record.model, record.operation = req.model, op.name
    context = 0
    if op.stateful:  # continuing a stored response: only its region, and its context
        route, context = await affinity.continued(rt, req, route)
    estimate = op.estimate(req.body, route.default_max_tokens, context)
    call = Call(rt, request, req, estimate, config, record,
                priority=priority_of(request, config, tenant.key_class), tenant=tenant)
    if tenant is not ANONYMOUS:  # an open gateway has one client: nothing to share
        record.client = tenant.name
        call.client = budgets.client_limits(tenant.name, tenant.weight,
                                            tenant.budgets.get(req.model), config.gateway,
                                            config.fair_share)
    return await attempts(call, route)


async def attempts(call: Call, route: ModelRoute) -> web.StreamResponse:
    """Admit, forward, and on a retryable failure try again (elsewhere unless the
    region only asked us to slow down), within the deadline and `max_attempts` (which
    a provisioned deployment's first 429 does not count against)."""
    rt, gw, model, record = call.rt, call.gw, call.req.model, call.record
    loop = asyncio.get_running_loop()
    deadline = loop.time() + gw.deadline_seconds
    avoid: set[str] = set()  # regions that failed this request (a 429 cools down instead)
    full: set[str] = set()  # provisioned regions that answered this request 429
    failure: Failure | None = None
    attempt, limit = 0, gw.max_attempts
    while attempt < limit:
        attempt += 1
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        grant = await admit(call, route, avoid)  # may wait in the admission queue
        if isinstance(grant, Wait):
            if failure is None:
                return refused(call, grant)
            break
        if failure is not None:
            rt.metrics.retries.labels(model, failure.reason).inc()
        record.attempts, record.region = attempt, grant.region
        if grant.budget is not None and grant.client is not None:
            record.headers = rate_limit_headers(call, grant)
        rt.child(rt.metrics.selections, model, grant.region).inc()
        outcome = await forward(call, grant, route.targets[grant.region], remaining)
        if isinstance(outcome, web.StreamResponse):
            return outcome
        failure = outcome
        if failure.reason != "throttled":
            avoid.add(grant.region)
        elif grant.region in route.provisioned and grant.region not in full:
            # A full PTU is routing, not failure (standard deployments take the excess):
            # its first 429 costs no attempt, so PTUs cannot use up max_attempts.
            full.add(grant.region)
            limit += 1
    if failure is None:  # the deadline passed before any attempt
        return errors.no_capacity(model, gw.default_cooldown_seconds)
    return failure.response()


def refused(call: Call, wait: Wait) -> web.Response:
    """429 before any region: the pool has no capacity now, or the client's own budget
    or fair share refused (the body says which)."""
    rt, model = call.rt, call.req.model
    reason = "no_capacity" if wait.reason == "capacity" else wait.reason
    if call.record.client is not None:
        rt.child(rt.metrics.client_limited, call.record.client, model, reason).inc()
    if wait.reason == "capacity":
        rt.metrics.rejections.labels("no_capacity").inc()
        return errors.no_capacity(model, wait.retry_after)
    rt.metrics.rejections.labels("client_limit").inc()
    return budgets.refused(call.record.client or "?", model, wait)


def rate_limit_headers(call: Call, grant: Grant) -> dict[str, str]:
    assert grant.client is not None and grant.budget is not None
    budget = call.tenant.budgets.get(call.req.model)
    if budget is None:
        return {}
    return budgets.rate_limit_headers(grant.client, grant.budget, budget.tpm, budget.rpm)
