"""Admission: reserve capacity for one attempt, waiting in the model's queue (shared
by every replica) when the request may wait and nothing can serve it now."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

from aiohttp import web

from balancer.capacity.base import Grant, Queueing, Wait
from balancer.config import AdmissionQueue, Config
from balancer.errors import ClientError
from balancer.gateway.call import Call
from balancer.gateway.runtime import ModelRoute

MIN_QUEUE_SLEEP = 0.01  # a waiter never asks the store more often than this


async def admit(call: Call, route: ModelRoute, avoid: set[str]) -> Grant | Wait:
    """Reserve capacity for one attempt. With the admission queue on, a request that
    cannot be served now waits, in order within its priority class, until capacity
    returns or its wait budget (kept across its attempts) runs out. Sleeps come from
    the store's refill arithmetic: no spinning."""
    rt, aq, model = call.rt, call.config.admission_queue, call.req.model
    cost = call.estimate.total
    # The request's first call counts its cost as the client's demand (fair share);
    # its later attempts and its waits in the queue ask for the same tokens again.
    client, demand, call.demanded = call.client, not call.demanded, True
    if not aq.enabled:
        return await rt.store.acquire(model, route.limits, cost, random.random(), avoid,
                                      client=client, demand=demand)
    loop = asyncio.get_running_loop()
    started = loop.time()
    if call.wait_until is None:
        call.wait_until = started + wait_budget(call.request, aq, call.req.op.name)
        call.first_admit = started
    # The head start counts the time already spent here, so a request sent back to the
    # queue by a region's 429 takes the place it had, not the tail.
    boost = call.priority * aq.class_head_start_seconds + (started - call.first_admit)
    queue = Queueing(call.ticket, boost, max(0.0, call.wait_until - started))
    queued = False
    result: Grant | Wait | None = None
    try:
        while True:
            result = await rt.store.acquire(model, route.limits, cost, random.random(), avoid,
                                            queue=queue, client=client, demand=demand)
            demand = False
            if isinstance(result, Grant) or not result.queued:
                return result
            queued = True
            if loop.time() + result.retry_after > call.wait_until:
                return result  # its turn cannot come in time: answer now
            depth = rt.metrics.queue_depth.labels(model)
            depth.inc()
            try:
                await asyncio.sleep(max(result.retry_after, MIN_QUEUE_SLEEP))
            finally:
                depth.dec()
            queue = replace(queue, budget=max(0.0, call.wait_until - loop.time()))
    finally:
        if queued:
            admitted = isinstance(result, Grant)
            rt.metrics.admission_wait.labels(model, "admitted" if admitted else "rejected"
                                             ).observe(loop.time() - started)
            if not admitted:  # leaving (deadline, or the client went away): free the place
                await asyncio.shield(rt.store.dequeue(model, queue.ticket))


def wait_budget(request: web.Request, aq: AdmissionQueue, operation: str) -> float:
    """Seconds this request may wait: `x-balancer-max-wait-ms`, else the operation's
    default, capped by `admission_queue.max_wait_ms`."""
    raw = request.headers.get("x-balancer-max-wait-ms")
    if raw is None:
        ms = aq.default_wait_ms.get(operation, 0)
    else:
        try:
            ms = int(raw)
        except ValueError:
            ms = -1
        if ms < 0:
            raise ClientError(400, "x-balancer-max-wait-ms must be a whole number of "
                              "milliseconds >= 0.", "invalid_max_wait")
    return min(ms, aq.max_wait_ms) / 1000.0


def priority_of(request: web.Request, config: Config, key_class: str | None) -> int:
    """The rank of the request's priority class: the `x-balancer-priority` header when
    the config allows it, else the client key's class, else the default class."""
    aq = config.admission_queue
    name = key_class or aq.default_class
    asked = request.headers.get("x-balancer-priority")
    if asked is not None and aq.priority_header:
        if asked not in aq.classes:
            raise ClientError(400, f"x-balancer-priority must be one of "
                              f"{', '.join(aq.classes)}.", "invalid_priority")
        name = asked
    return aq.classes.get(name, aq.classes.get(aq.default_class, 0))
