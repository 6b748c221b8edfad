"""Control endpoints under /_sim: read and change a region's knobs, read or reset the stats
(per deployment under "regions"; per region's stored responses under "responses"; per
region's 401s under "auth", by reason)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from balancer.sim.config import KNOBS, region_knobs
from balancer.sim.errors import ApiError
from balancer.sim.routes import read_body
from balancer.sim.state import SIMULATOR


async def get_knobs(request: web.Request) -> web.Response:
    region = request.app[SIMULATOR].region(request.match_info["region"])
    return web.json_response(region_knobs(region))


async def post_knobs(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    region = sim.region(request.match_info["region"])
    body = await read_body(request)
    errors = [f"unknown field {k!r}" for k in body if k not in KNOBS]
    errors += [
        f"invalid value for {k!r}: {v!r}"
        for k, v in body.items()
        if k in KNOBS and not KNOBS[k](v)
    ]
    if errors:
        raise ApiError(400, "; ".join(errors), "invalid_knob")
    sim.set_knobs(region, body)
    return web.json_response(region_knobs(region))


async def get_stats(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    now = sim.clock()
    regions: dict[str, dict[str, Any]] = {}
    for (region, name), dep in sim.deployments.items():
        regions.setdefault(region, {})[name] = dep.snapshot(now)
    responses = {name: store.stats() for name, store in sim.stores.items()}
    auth = {name: {"unauthorized": 0, **counts} for name, counts in sim.auth.items()}
    return web.json_response({"regions": regions, "responses": responses, "auth": auth})


async def post_reset(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    now = sim.clock()
    for dep in sim.deployments.values():
        dep.reset(now)
    for store in sim.stores.values():
        store.reset_counters()
    for counts in sim.auth.values():
        counts.clear()
    return web.json_response({"reset": True})
