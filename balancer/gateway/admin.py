"""The routes around the API: models, health, readiness, region state and metrics
(GET /clients is `usage.clients`)."""

from __future__ import annotations

from aiohttp import web

from balancer.gateway import usage
from balancer.gateway.clients import authorize, authorize_admin
from balancer.gateway.runtime import RUNTIME

METRICS_RENDER = web.AppKey("metrics_render", object)


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    authorize(request, rt)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "balancer"}
            for name in sorted(rt.routes)]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body = {"status": "draining" if rt.draining else "ready", "store": rt.store.name,
            "degraded": rt.store.degraded}
    return web.json_response(body, status=503 if rt.draining else 200)


async def regions(request: web.Request) -> web.Response:
    """Per model and region: remaining tokens, cooldown and circuit. No endpoints, no keys."""
    rt = request.app[RUNTIME]
    authorize_admin(request, rt)
    if not rt.config.gateway.expose_regions:
        raise web.HTTPNotFound()
    models = {}
    for model, route in sorted(rt.routes.items()):
        states = await rt.store.snapshot(model, route.limits)
        rows = []
        for lim, state in zip(route.limits, states, strict=True):
            target = route.targets[lim.region]
            rows.append({
                # the configured priority, not the store's tier (runtime.tier)
                "region": lim.region, "kind": target.region.kind,
                "priority": target.region.priority, "sku": target.deployment.sku,
                "deployment": target.deployment.deployment, "tpm": target.deployment.tpm,
                "rpm": target.deployment.rpm, "weight": lim.weight,
                "tokens_remaining": round(state.tokens, 1),
                "tokens_capacity": round(state.tokens_capacity, 1),
                "requests_remaining": round(state.requests, 2),
                "cooldown_seconds": round(state.cooldown_seconds, 3),
                "circuit": state.circuit, "failures": state.failures,
                "capacity_factor": round(state.factor, 4),
                "latency_seconds_per_token": round(state.latency, 6)})
        models[model] = rows
    return web.json_response({"store": rt.store.name, "degraded": rt.store.degraded,
                              "replicas": rt.store.replicas, "models": models})


async def metrics(request: web.Request) -> web.Response:
    """Refresh the gauges read from the store, then render the registry. Open, unless
    BALANCER_ADMIN_KEYS is set: then it needs an admin key."""
    rt = request.app[RUNTIME]
    if rt.keys.admin:
        authorize_admin(request, rt)
    m, routes, config = rt.metrics, rt.routes, rt.config  # a reload during the awaits
    snapshots = {model: await rt.store.snapshot(model, route.limits)  # must not mix configs
                 for model, route in routes.items()}
    # Each configured client's budgets and what is left of them (gateway.usage, as
    # GET /clients shows them): one store call per model.
    budgeted = await usage.rows(rt.store, config, usage.budgeted_models)
    region_gauges = (m.region_tpm, m.remaining_tokens, m.remaining_requests, m.capacity_tokens,
                     m.cooldown, m.circuit_open, m.capacity_factor, m.latency_per_token)
    for gauge in region_gauges:  # a region removed by a reload must not linger
        gauge.clear()
    for model, states in snapshots.items():
        route = routes[model]
        for state in states:
            labels = (model, state.region)
            m.region_tpm.labels(*labels).set(route.targets[state.region].deployment.tpm)
            m.remaining_tokens.labels(*labels).set(state.tokens)
            m.remaining_requests.labels(*labels).set(state.requests)
            m.capacity_tokens.labels(*labels).set(state.tokens_capacity)
            m.cooldown.labels(*labels).set(state.cooldown_seconds)
            m.circuit_open.labels(*labels).set(1 if state.circuit == "open" else 0)
            m.capacity_factor.labels(*labels).set(state.factor)
            m.latency_per_token.labels(*labels).set(state.latency)
    usage.set_gauges(m, budgeted)  # cleared first: a removed client must not linger
    m.store_degraded.set(1 if rt.store.degraded else 0)
    m.live_replicas.set(rt.store.replicas)
    return await request.app[METRICS_RENDER](request)
