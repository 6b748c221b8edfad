"""App wiring: routes from the operation table, and one cleanup context per resource
(upstream session, Entra credentials, capacity store, access-log writer, event-loop lag
probe)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

import balancer.gateway.admin as admin
import balancer.gateway.usage as usage
from balancer import upstream
from balancer.capacity.base import CapacityStore
from balancer.capacity.factory import create_store
from balancer.config import Config
from balancer.gateway.middleware import add_request_id, openai_errors
from balancer.gateway.proxy import azure_dated_route, azure_route, openai_route
from balancer.gateway.runtime import RUNTIME, Runtime
from balancer.gateway.stored import ACTIONS, stored_route
from balancer.metrics import Metrics, exposition_registry
from balancer.operations import OPERATIONS


def open_store(config: Config, metrics: Metrics) -> CapacityStore:
    trips: dict[str, Any] = {}  # op -> its counter child: labels() on every call costs

    def round_trip(op: str) -> None:  # a store call (a few ops: the cache stays small)
        child = trips.get(op)
        if child is None:
            child = trips[op] = metrics.store_round_trips.labels(op)
        child.inc()

    return create_store(
        config.store,
        on_round_trip=round_trip,
        on_degraded=lambda flag: metrics.store_degraded.set(1 if flag else 0),
    )


def create_app(config: Config, *, store: CapacityStore | None = None,
               api_keys: tuple[bytes, ...] | None = None,
               env: Mapping[str, str] | None = None) -> web.Application:
    """`env`: where BALANCER_API_KEYS and BALANCER_ADMIN_KEYS are read, at start and on
    every reload (default: os.environ); `api_keys` (tests): these client keys instead
    of BALANCER_API_KEYS's."""
    metrics = Metrics()
    env = os.environ if env is None else env
    if api_keys is not None:
        env = {**env, "BALANCER_API_KEYS": ",".join(k.decode() for k in api_keys)}
    rt = Runtime(config=config, store=store or open_store(config, metrics), metrics=metrics,
                 env=env)
    app = web.Application(middlewares=[openai_errors])
    app[RUNTIME] = rt
    app[admin.METRICS_RENDER] = make_aiohttp_handler(exposition_registry(metrics))
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_entra_credentials)
    app.cleanup_ctx.append(_store_lifecycle)
    app.cleanup_ctx.append(_loop_lag_probe)
    app.cleanup_ctx.append(_access_log_writer)
    app.on_response_prepare.append(add_request_id)
    add_api_routes(app.router)
    app.router.add_get("/v1/models", admin.list_models)
    app.router.add_get("/openai/v1/models", admin.list_models)
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/regions", admin.regions)
    app.router.add_get("/clients", usage.clients)
    app.router.add_get("/metrics", admin.metrics)
    return app


def add_api_routes(router: web.UrlDispatcher) -> None:
    """Every operation on each route shape clients use:
    - OpenAI `/v1/{op}` and Azure v1 `/openai/v1/{op}`: the model group is the body's;
    - Azure dated `/openai/deployments/{model}/{op}?api-version=`, or `/openai/{op}?...`
      for operations Azure serves without a deployment in the path (responses);
    - for operations that store what they create, the calls on it by id, under each of
      the three prefixes (`/v1`, `/openai/v1`, and `/openai` with an api-version)."""
    for op in OPERATIONS.values():
        router.add_post(op.openai_path, openai_route(op))
        router.add_post(f"/openai/v1/{op.name}", openai_route(op))
        if not op.deployment_route:
            router.add_post(f"/openai/{op.name}", azure_dated_route(op))
    names = "|".join(name for name, op in OPERATIONS.items() if op.deployment_route)
    router.add_post(f"/openai/deployments/{{model}}/{{operation:{names}}}", azure_route)
    for op in (op for op in OPERATIONS.values() if op.stateful):
        for prefix, dated in (("/v1", False), ("/openai/v1", False), ("/openai", True)):
            for method, suffix, action in ACTIONS:
                router.add_route(method, f"{prefix}/{op.name}/{{id}}{suffix}",
                                 stored_route(op, suffix, action, dated=dated))


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.session = upstream.new_session(rt.config.gateway.connect_timeout_seconds)
    yield
    await rt.session.close()


async def _entra_credentials(app: web.Application) -> AsyncIterator[None]:
    """Credentials are made on first use (balancer.entra); closed here, with the app."""
    yield
    await app[RUNTIME].auth.close()


async def _store_lifecycle(app: web.Application) -> AsyncIterator[None]:
    store = app[RUNTIME].store
    await store.start()
    yield
    await store.close()


async def _access_log_writer(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[RUNTIME].access.run(), name="balancer-access-log")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _loop_lag_probe(app: web.Application) -> AsyncIterator[None]:
    """`balancer_event_loop_lag_seconds`: how late a 0.1 s timer fired, worst over each
    second. Anything that blocks the loop (CPU-bound work, a blocking call) delays every
    request by as much, and shows here first."""
    gauge = app[RUNTIME].metrics.event_loop_lag

    async def probe() -> None:  # perf_counter: uvloop's loop.time() counts whole ms
        worst, window_end = 0.0, time.perf_counter() + 1.0
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.1)
            now = time.perf_counter()
            worst = max(worst, now - before - 0.1)
            if now >= window_end:
                gauge.set(worst)
                worst, window_end = 0.0, now + 1.0

    task = asyncio.create_task(probe(), name="balancer-loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
